"""Elementwise work that reads and writes whole activations, under CUDA's autocast rules
(emulated on the CPU by bench/bench_traffic.py): the modulated LayerNorm and the q/k
normalisation make no fp32 copies of their bf16 inputs, and give the numbers of the fp32
arithmetic that the copies fed."""

import pytest
import torch
import torch.nn.functional as F

from bench import bench_traffic
from bench.bench_traffic import TrafficCounter, cuda_autocast_rules
from library.flux_attention import _attention_inputs_composed, attention_inputs
from library.flux_layers import ModulationOut, norm_and_modulate
from library.flux_models import Flux
from library.tiny_models import tiny_flux_params
from networks import lora_flux
from tests.test_compiled_blocks import streams

BF16 = torch.bfloat16


def fp32_results(counter: TrafficCounter, shape) -> list[str]:
    return [op for op, s, dtype in counter.tensors if dtype == torch.float32 and s == torch.Size(shape)]


def activation_passes(counter: TrafficCounter, x) -> list[str]:
    """The ops whose results are as large as one sample of ``x`` or larger (with their dtype checked)."""
    passes = [(op, dtype) for op, shape, dtype in counter.tensors if shape.numel() >= x[:1].numel()]
    assert all(dtype == x.dtype for _, dtype in passes), passes
    return [op for op, _ in passes]


def weighted_sum(tensors, weights):
    return sum((t.float() * w.float()).sum() for t, w in zip(tensors, weights, strict=True))


def modulated_inputs(batch: int = 1, mod_batch: int = 1, dtype=BF16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 24, 64, generator=g).to(dtype).requires_grad_(True)
    scale, shift = (torch.randn(mod_batch, 1, 64, generator=g).mul_(0.1).to(dtype).requires_grad_(True) for _ in "ab")
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


LAYER_NORM = torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-6)


@pytest.mark.parametrize("batch, mod_batch", [(1, 1), (3, 3), (3, 1)], ids=["one", "three", "broadcast-modulation"])
def test_modulated_layer_norm_makes_no_fp32_copy_of_the_activation(batch, mod_batch):
    x, scale, shift = modulated_inputs(batch, mod_batch)
    forward, backward = TrafficCounter(), TrafficCounter()
    with cuda_autocast_rules(), torch.autocast("cpu", BF16):
        with forward:
            out = norm_and_modulate(LAYER_NORM, x, ModulationOut(shift, scale, None))
        grad = torch.ones_like(out)
        with backward:
            grads = torch.autograd.grad(out, (x, scale, shift), grad)
    assert out.dtype == BF16 and all(g.dtype == BF16 for g in grads)
    # every pass over the activation: one LayerNorm kernel per sample, and joining the samples
    joined = ["cat"] if batch > 1 else []
    assert activation_passes(forward, x) == ["native_layer_norm"] * batch + joined
    assert activation_passes(backward, x) == ["native_layer_norm_backward"] * batch + joined
    # the numbers of CUDA autocast's fp32 LayerNorm, rounded once at the next Linear
    reference = torch.cat([
        F.layer_norm(x[i : i + 1].float(), (64,), (1 + scale[i % mod_batch, 0]).float(),
                     shift[i % mod_batch, 0].float(), 1e-6)
        for i in range(batch)
    ])  # fmt: skip
    torch.testing.assert_close(out, reference.to(BF16), rtol=0, atol=0)


@pytest.mark.parametrize("batch, mod_batch", [(3, 3), (3, 1)], ids=["three", "broadcast-modulation"])
def test_modulated_layer_norm_per_sample_is_the_formula(batch, mod_batch):
    """fp32: one fused kernel per sample gives (1 + scale) · LayerNorm(x) + shift, values and gradients."""
    x, scale, shift = modulated_inputs(batch, mod_batch, dtype=torch.float32)
    fused = norm_and_modulate(LAYER_NORM, x, ModulationOut(shift, scale, None))
    formula = (1 + scale) * LAYER_NORM(x) + shift
    torch.testing.assert_close(fused, formula, rtol=1e-6, atol=1e-6)
    weight = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad((fused * weight).sum(), (x, scale, shift)),
                    torch.autograd.grad((formula * weight).sum(), (x, scale, shift)), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_dit_with_lora_runs_on_a_device_without_autocast():
    """Autocast is neither queried nor turned off where there is none: shape inference on the meta
    device, through the modulated LayerNorm and LoRA's forward."""
    p = tiny_flux_params()
    with torch.device("meta"):
        model = Flux(p).requires_grad_(False)
        network = lora_flux.create_network(1.0, 4, 4, None, [None, None], model)
        network.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
        out = model(img=torch.randn(2, 16, p.in_channels), img_ids=torch.zeros(2, 16, 3),
                    txt=torch.randn(2, 5, p.context_in_dim), txt_ids=torch.zeros(2, 5, 3), timesteps=torch.ones(2),
                    y=torch.randn(2, p.vec_in_dim), guidance=torch.ones(2))  # fmt: skip
    assert out.shape == (2, 16, p.out_channels) and out.is_meta


@pytest.mark.parametrize("gelu_rest", [False, True], ids=["double", "single"])
def test_q_k_normalisation_reads_bf16_projections_without_upcasting_them(gelu_rest):
    projections, norms, pe, heads = streams(gelu_rest, dtype=BF16)
    forward, backward = TrafficCounter(), TrafficCounter()
    with cuda_autocast_rules(), torch.autocast("cpu", BF16):
        with forward:
            q, k, v, *rests = attention_inputs(projections, norms, pe, heads, gelu_rest)
        loss = q.float().sum() + k.float().sum() + v.float().sum()
        with backward:
            torch.autograd.grad(loss, projections)
    head_dim = norms[0].query_norm.scale.shape[0]
    for proj in projections:
        # forward: the fp32 arithmetic takes the bf16 values by type promotion, no cast first
        assert "_to_copy" not in fp32_results(forward, (*proj.shape[:2], 2, heads, head_dim))
        # backward: only the incoming gradients of q and k are upcast (one each)
        assert fp32_results(backward, (*proj.shape[:2], heads, head_dim)).count("_to_copy") == 2
    # the numbers: fp32 arithmetic on the bf16 values, rounded once to bf16: within half an ulp, a
    # relative 2⁻⁸ at most (rounding twice, as BFL's code does, can be off by a whole ulp)
    exact_inputs = [p.detach().float().requires_grad_(True) for p in projections]
    exact = _attention_inputs_composed(exact_inputs, norms, pe, heads, gelu_rest)
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(5)).to(BF16) for t in exact]
    ours = attention_inputs(projections, norms, pe, heads, gelu_rest)
    grads = torch.autograd.grad(weighted_sum(ours, weights), projections)
    exact_grads = torch.autograd.grad(weighted_sum(exact, weights), exact_inputs)
    for a, b in zip((*ours, *grads), (*exact, *exact_grads), strict=True):
        assert a.dtype == BF16
        torch.testing.assert_close(a.float(), b, rtol=2**-8 + 1e-6, atol=1e-6)


def test_one_streams_v_is_a_view_of_its_projection_and_passes_its_gradient_back():
    """The single blocks' v is read in place from the projection (no copy); its gradient still
    lands in the projection's v channels, and the joint streams' v is gathered into one tensor."""
    projections, norms, pe, heads = streams(True)
    image, text_tokens = projections[1], projections[0].shape[1]
    q, k, v, rest = attention_inputs([image], norms[1:], pe[:, :, text_tokens:], heads, True)
    inner = 3 * heads * norms[1].query_norm.scale.shape[0]
    v_channels = image[..., 2 * inner // 3 : inner]
    assert v.untyped_storage().data_ptr() == image.untyped_storage().data_ptr()
    assert torch.equal(v.flatten(2), v_channels)
    (grad,) = torch.autograd.grad(v.sum(), image)
    assert torch.equal(grad[..., 2 * inner // 3 : inner], torch.ones_like(v_channels))
    assert not grad[..., : 2 * inner // 3].any() and not grad[..., inner:].any()
    joint_v = attention_inputs(projections, norms, pe, heads, True)[2]
    assert joint_v.is_contiguous() and joint_v.shape[1] == text_tokens + image.shape[1]


def test_bench_traffic_counts_less_elementwise_traffic_than_diffusers_at_a_tiny_width(capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    results = {r["setting"]: r for r in bench_traffic.main(["--tiny", "--settings", "a,b,ref", "--top", "3"])}
    a, b, ref = results["a"], results["b"], results["ref"]
    assert 0 < b["elementwise_bytes"] < ref["elementwise_bytes"] and 0 < b["kernels"] < ref["kernels"]
    assert 0 < a["elementwise_bytes"] < b["elementwise_bytes"]  # checkpointing's recompute
    assert a["matmul_calls"] < b["matmul_calls"]
    assert 0 < a["thin_bytes"] < b["thin_bytes"] and a["thin_calls"] > 0  # LoRA's rank-16 products, recomputed in (b)
    out = capsys.readouterr().out
    # the ratio is printed for (b), which checkpoints as the reference does, not for (a)
    assert f"b/ref: elementwise traffic {b['elementwise_bytes'] / ref['elementwise_bytes']:.3f}" in out
    assert "a/ref" not in out
    (two,) = bench_traffic.main(["--tiny", "--settings", "b", "--batch", "2"])
    assert b["elementwise_bytes"] < two["elementwise_bytes"] < 2.5 * b["elementwise_bytes"]


def test_traffic_counts_what_each_kernel_reads_and_writes():
    a, b, out = torch.ones(1000), torch.ones(1000), torch.empty(1000)  # 4000 bytes each
    square = torch.ones(100, 100)  # 40000 bytes
    counter = TrafficCounter()
    with counter:
        torch.add(a, b)  # reads two, writes one
        torch.mul(a, b, out=out)  # the same: out= is written, not read
        a.mul_(b)  # reads a and b, writes a
        a.view(10, 100).t()  # views move nothing
        out.zero_()  # writes only
        torch.empty(1000)  # allocates only
        square @ square  # counted apart: reads both, writes one
        a.view(10, 100) @ b.view(100, 10)  # a dimension of at most 64: memory-bound, counted as thin
        torch.promote_types(torch.bfloat16, torch.float32)  # touches no tensor: no kernel
    expected = {"add": 12000, "mul": 12000, "mul_": 12000, "zero_": 4000, "matmul": 120000, "thin": 8400}
    assert dict(counter.bytes) == expected
    assert counter.elementwise_bytes == 40000 and counter.elementwise_calls == 4
