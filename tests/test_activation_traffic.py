"""bench/bench_traffic.py: CUDA's autocast rules emulated on the CPU, and the traffic count."""

import pytest
import torch
import torch.nn.functional as F

from bench import bench_traffic
from bench.bench_traffic import TrafficCounter, cuda_autocast_rules

BF16 = torch.bfloat16


def fp32_results(counter: TrafficCounter, shape) -> list[str]:
    return [op for op, s, dtype in counter.tensors if dtype == torch.float32 and s == torch.Size(shape)]


def modulated_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, 64, generator=g).to(BF16).requires_grad_(True)
    scale, shift = (torch.randn(1, 1, 64, generator=g).mul_(0.1).to(BF16).requires_grad_(True) for _ in range(2))
    return x, scale, shift


def test_the_emulated_rules_cast_what_cuda_autocast_casts():
    """The premise of the other tests: a plain LayerNorm under the emulated rules runs in fp32 (an
    fp32 copy of x in, an fp32 activation out), and the rules are gone afterwards."""
    x, _, _ = modulated_inputs()
    counter = TrafficCounter()
    with cuda_autocast_rules(), counter, torch.autocast("cpu", BF16):
        out = F.layer_norm(x, (64,))
        total = torch.linalg.vector_norm(x, dim=-1)
    assert out.dtype == total.dtype == torch.float32
    assert fp32_results(counter, x.shape) == ["_to_copy", "native_layer_norm"]
    with torch.autocast("cpu", BF16):
        assert F.layer_norm(x, (64,)).dtype == BF16  # CPU autocast's own rule again


def test_bench_traffic_counts_less_elementwise_traffic_than_diffusers_at_a_tiny_width(capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    results = {r["setting"]: r for r in bench_traffic.main(["--tiny", "--settings", "a,b,ref", "--top", "3"])}
    a, b, ref = results["a"], results["b"], results["ref"]
    assert 0 < b["elementwise_bytes"] < ref["elementwise_bytes"] and 0 < b["kernels"] < ref["kernels"]
    assert 0 < a["elementwise_bytes"] < b["elementwise_bytes"]  # checkpointing's recompute
    assert a["matmul_calls"] < b["matmul_calls"]
    out = capsys.readouterr().out
    # the ratio is printed for (b), which checkpoints as the reference does, not for (a)
    assert f"b/ref: elementwise traffic {b['elementwise_bytes'] / ref['elementwise_bytes']:.3f}" in out
    assert "a/ref" not in out
