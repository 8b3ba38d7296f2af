"""End-to-end runs through ``accelerate launch`` on tiny FLUX.1 dev, schnell and Chroma: caching to
disk, samples, validation, saving every epoch and TensorBoard events, as a user runs it."""

import glob
import os
import subprocess
import sys

import pytest

from library.safetensors_io import read_metadata
from tests.training_helpers import base_argv, dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(argv: list[str], *launcher_flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher_flags, "--num_processes", "1",
        "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
        "--num_cpu_threads_per_process", "1",
        os.path.join(ROOT, "flux_train_network.py"), *argv,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def scalar_tags(logging_dir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in glob.glob(os.path.join(logging_dir, "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(events)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["flux", "schnell", "chroma"])
def test_accelerate_launch_trains_caches_samples_validates_and_logs(tiny_model_files, tmp_path, model_type):
    data = dataset(tmp_path, batch_size=2, validation_split=0.34)  # 4 training and 2 validation images
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    argv = base_argv(
        tiny_model_files, data, out, model_type=model_type, steps=1, max_train_epochs=2,
        cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True,
        sample_prompts=data.sample_prompts, sample_every_n_epochs=1, save_every_n_epochs=1,
        logging_dir=logs, log_with="tensorboard",
    )  # fmt: skip
    result = launch(argv)
    assert result.returncode == 0, result.stderr[-3000:]

    # epoch 1 is saved on its own, epoch 2 is the final file
    assert sorted(os.listdir(out)) == ["lora-000001.safetensors", "lora.safetensors", "sample"]
    metadata = read_metadata(os.path.join(out, "lora.safetensors"))
    architecture = {"flux": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora", "chroma": "chroma/lora"}
    assert metadata["modelspec.architecture"] == architecture[model_type]
    assert metadata["ss_epoch"] == "2"
    assert metadata["ss_steps"] == str(2 * int(metadata["ss_num_batches_per_epoch"]))  # two whole epochs
    samples = sorted(os.listdir(os.path.join(out, "sample")))
    assert len(samples) == 2 and samples[0].startswith("lora_e000001_00_") and samples[1].startswith("lora_e000002_00_")

    images = sorted(glob.glob(os.path.join(data.image_dir, "*.png")))
    for image in images:
        stem = os.path.splitext(image)[0]
        assert len(glob.glob(stem + "_*x*_flux.npz")) == 1, stem
        assert os.path.isfile(stem + "_flux_te.npz")

    tags = scalar_tags(logs)
    assert {"loss/current", "loss/average", "loss/epoch_average", "loss/validation/epoch_average"} <= tags
    assert any(tag.startswith("lr/") for tag in tags)


@pytest.mark.slow
def test_launch_exits_non_zero_with_one_message_on_a_user_error(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), sample_prompts=str(tmp_path / "missing.txt"),
                     sample_every_n_steps=1)
    # without --quiet, accelerate's launcher adds a traceback of its own after the child's message
    result = launch(argv, "--quiet")
    assert result.returncode != 0
    assert "error: --sample_prompts" in result.stderr and "missing.txt" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_prodigy_run_logs_its_adapted_step_size(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    logs = str(tmp_path / "logs")
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=2, optimizer_type="prodigy",
                     learning_rate=1.0, network_train_unet_only=True, logging_dir=logs)
    import flux_train_network

    assert flux_train_network.main(argv) == 0
    tags = scalar_tags(logs)
    assert "lr/unet" in tags and "lr/d*lr/unet" in tags
