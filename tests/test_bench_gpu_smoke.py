"""bench/bench_gpu.py at a tiny width on the CPU: every setting runs, measures and is recorded,
and the diffusers reference adapts the same modules as our LoRA."""

import json

import pytest
import torch

from bench import bench_gpu
from library.flux_models import configs, training_flops


def test_every_setting_runs_and_appends_its_result(tmp_path):
    out = tmp_path / "results.jsonl"
    settings = ["a", "ac", "b", "bk", "bc", "c", "ck", "cs", "d18", "d28"]
    if pytest.importorskip("peft") and pytest.importorskip("diffusers"):
        settings += ["ref", "refc"]
    argv = ["--tiny", "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--steps", "2", "--warmup", "0",
            "--settings", ",".join(settings), "--out", str(out)]  # fmt: skip
    bench_gpu.main(argv)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["setting"] for r in results] == settings
    for r in results:
        assert "error" not in r, (r["setting"], r.get("traceback"))
        assert r["s_per_step"] > 0 and len(r["step_times"]) == 2 and r["loss_finite"]
        assert r["lora_params"] > 0 and r["flop_per_step"] > 0
    ours = {r["setting"]: r for r in results}
    assert ours["b"]["flop_per_step"] > ours["bk"]["flop_per_step"] > ours["a"]["flop_per_step"]  # recomputes


def test_a_failing_setting_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench_gpu, "build_diffusers", out_of_memory)
    bench_gpu.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--steps", "1", "--warmup", "0",
                    "--settings", "ref,a", "--out", str(out)])  # fmt: skip
    ref, a = [json.loads(line) for line in out.read_text().splitlines()]
    assert ref["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "error" not in a and a["s_per_step"] > 0


def test_diffusers_reference_adapts_the_same_modules():
    pytest.importorskip("peft")
    params = bench_gpu.tiny_params()
    model, _, trainable = bench_gpu.build_diffusers(params, torch.device("cpu"), {"checkpointing": False},
                                                    torch.float32)  # fmt: skip
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    # per double block: q, k, v, out and MLP (2) of each stream plus the two modulations; per single: q, k, v,
    # MLP in, out, modulation. diffusers splits what BFL fuses (qkv, linear1), so it has more modules.
    assert len(adapted) == 14 * params.depth + 6 * params.depth_single_blocks
    assert all(p.dtype == torch.float32 for p in trainable)


def test_flops_of_a_full_size_step_match_the_landscape_estimate():
    dev = configs["dev"]
    assert training_flops(dev, 4096, 512) / 1e12 == pytest.approx(164, abs=2)  # landscape.md §2.4: 165-172 TFLOP
    assert training_flops(dev, 4096, 512, gradient_checkpointing=True) / 1e12 == pytest.approx(238, abs=2)
    # keeping the attention outputs takes the attention forward (4·L²·hidden per block) out of the recompute
    kept = training_flops(dev, 4096, 512, gradient_checkpointing=True, keep_attention=True)
    assert training_flops(dev, 4096, 512, gradient_checkpointing=True) - kept == 57 * 4 * 4608**2 * 3072
