"""The README's main job: demo.py trains a LoRA end to end and prints where the LoRA and the sample went."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from library.safetensors_io import read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_writes_a_lora_and_a_sample_and_prints_their_paths(tmp_path):
    # a sample left by an earlier run into the same folder is neither reported nor taken as success
    stale = tmp_path / "demo" / "lora" / "sample" / "demo_lora_000012_00_20200101000000_42.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--output", str(tmp_path / "demo")],
                            capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    lora = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("LoRA:"))
    samples = [line.split(":", 1)[1].strip() for line in lines if line.startswith("sample:")]
    assert os.path.isfile(lora) and lora.startswith(str(tmp_path / "demo"))
    assert len(samples) == 1 and os.path.isfile(samples[0]) and samples[0].endswith(".png")
    assert str(stale) not in samples
    with Image.open(samples[0]) as image:  # the PNG says which LoRA made it
        assert json.loads(image.text["loras"]) == [{"name": "demo_lora", "multiplier": 1.0}]
    metadata = read_metadata(lora)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_steps"] == "12"
    assert "validation loss" in result.stderr
