"""The LoRA's input gradient is added into the base Linear's by one matmul (``_SharedInput``):
the same numbers as plain autograd, without the separate pass that adds the two gradients."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from library.tiny_models import random_model, tiny_flux_params
from networks import lora_modules
from networks.lora_flux import create_network
from networks.lora_modules import LoRAModule
from tests.test_lora_math import dit_inputs, randomize_lora


def adapted_linear(split_dims=None, seed=0) -> tuple[nn.Linear, LoRAModule]:
    torch.manual_seed(seed)
    linear = nn.Linear(8, 6).requires_grad_(False)
    lora = LoRAModule("lora_test", linear, lora_dim=2, alpha=1, multiplier=0.7, split_dims=split_dims)
    randomize_lora(lora, seed=seed + 1, std=0.5)
    lora.apply_to()
    return linear, lora


def by_hand(linear: nn.Linear, lora: LoRAModule, x: torch.Tensor) -> torch.Tensor:
    """base(x) + multiplier · scale · x Dᵀ Uᵀ, each chunk of a split module with its own pair."""
    updates = [nn.functional.linear(nn.functional.linear(x, d.weight), u.weight) for d, u in lora.pairs()]
    return nn.functional.linear(x, linear.weight, linear.bias) + lora.multiplier * lora.scale * torch.cat(updates, -1)


def plain_shared_input(x, down, dtype):
    """What autograd did before ``_SharedInput``: x read twice, its two gradients added."""
    return x, nn.functional.linear(x.to(dtype), down.to(dtype))


def gradients(run, x: torch.Tensor, lora: LoRAModule) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    lora.zero_grad()
    out = run(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out.detach(), x.grad, *(p.grad.clone() for p in lora.parameters())


@pytest.mark.parametrize("split_dims", [None, [2, 4]], ids=["plain", "split"])
def test_values_and_gradients_equal_plain_autograd(split_dims):
    linear, lora = adapted_linear(split_dims)
    x = torch.randn(3, 5, 8)
    ours = gradients(linear, x, lora)
    reference = gradients(lambda t: by_hand(linear, lora, t), x, lora)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[1].abs().min() > 0 and all(g.abs().max() > 0.1 for g in ours[2:]), "every gradient reaches us"


class OpRecorder(TorchDispatchMode):
    """The kernels that produce tensors (views and detaches produce none), with their results' shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not func.is_view and func.overloadpacket.__name__ != "detach":
            self.ops.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def backward_ops(linear: nn.Linear, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    out = linear(x)
    with OpRecorder() as recorder:
        out.backward(torch.ones_like(out))
    return recorder.ops


def test_the_two_input_gradients_meet_in_one_matmul_not_an_added_pass(monkeypatch):
    linear, _ = adapted_linear()
    x = torch.randn(4, 8)
    ours = backward_ops(linear, x.clone().requires_grad_(True))
    assert [op for op, shape in ours if shape == (4, 8)] == ["mm", "addmm"]  # base's gradient, then + g·D
    monkeypatch.setattr(lora_modules._SharedInput, "apply", plain_shared_input)
    plain_ops = backward_ops(linear, x.clone().requires_grad_(True))
    assert [op for op, shape in plain_ops if shape == (4, 8)] == ["mm", "mm", "add"]


def test_an_input_without_gradient_gets_none_computed():
    """A frozen input (the DiT's first layers read data) must not make the base compute an input gradient."""
    linear, lora = adapted_linear()
    x = torch.randn(4, 8)
    ops = backward_ops(linear, x)
    assert not [shape for _, shape in ops if shape == (4, 8)]
    assert lora.lora_down.weight.grad is not None and lora.lora_up.weight.grad is not None


def test_autocast_keeps_the_dtypes_of_plain_autograd():
    """bf16 autocast: the LoRA computes in bf16, x's gradient comes back in x's dtype, the LoRA's in fp32."""
    linear, lora = adapted_linear()
    x = torch.randn(3, 8)

    def run(fn):
        def autocast(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(t)

        return gradients(autocast, x, lora)

    ours, reference = run(linear), run(lambda t: by_hand(linear, lora, t))
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding, summed otherwise
    assert ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32


def test_the_base_gradient_keeps_its_precision_under_a_bf16_lora():
    """An fp32 base with bf16 LoRA weights: the sum is formed in fp32, so with a zero update
    (lora_up = 0, as a new LoRA starts) x's gradient is the base's, bit for bit."""
    linear, lora = adapted_linear()
    lora.to(torch.bfloat16)
    torch.nn.init.zeros_(lora.lora_up.weight)
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 6)
    linear(x).backward(g)
    assert torch.equal(x.grad, g @ linear.weight)
    assert lora.lora_up.weight.grad.dtype == torch.bfloat16 and lora.lora_up.weight.grad.abs().max() > 0


def test_a_tiny_dit_with_checkpointing_gets_the_gradients_of_plain_autograd(monkeypatch):
    """Through the whole model: every LoRA weight's gradient equals the one plain autograd gives,
    with gradient checkpointing recomputing the node."""
    p = tiny_flux_params()
    model = random_model(p, seed=0).requires_grad_(False)
    network = create_network(1.0, 4, 2, None, [None, None], model)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    randomize_lora(network, seed=3)
    model.enable_gradient_checkpointing()
    model.train()
    inputs = dit_inputs(p)

    def lora_gradients():
        network.zero_grad()
        img = inputs["img"].clone().requires_grad_(True)
        model(**{**inputs, "img": img}).square().mean().backward()
        return [param.grad.clone() for param in network.parameters()] + [img.grad]

    ours = lora_gradients()
    monkeypatch.setattr(lora_modules._SharedInput, "apply", plain_shared_input)
    reference = lora_gradients()
    assert len(ours) == len(list(network.parameters())) + 1 > 10
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(g.abs().max() > 0 for g in ours)
