"""A LoRA's update is the base matmul's addend: x Wᵀ + (b + strength · x Dᵀ Uᵀ) in one base matmul,
for plain and fp8 base Linears, with the same values and gradients as adding it afterwards."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from library.fp8 import dequantize_weight, make_fp8_linear
from networks.lora_modules import LoRAModule
from tests.test_lora_math import randomize_lora

TOKENS, IN, OUT, RANK = 12, 96, 80, 4


class MatmulRecorder(TorchDispatchMode):
    """Each matrix product's operand shapes."""

    def __init__(self):
        super().__init__()
        self.products: list[tuple[tuple[int, ...], ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm"):
            self.products.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def adapted(base: nn.Linear, **kwargs) -> LoRAModule:
    lora = LoRAModule("lora_test", base, lora_dim=RANK, alpha=2, multiplier=0.8, **kwargs)
    randomize_lora(lora, seed=1, std=0.2)
    lora.apply_to()
    return lora


def plain_base(seed=0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).to(dtype).requires_grad_(False)


def by_hand(weight: torch.Tensor, bias: torch.Tensor, lora: LoRAModule, x: torch.Tensor) -> torch.Tensor:
    update = nn.functional.linear(nn.functional.linear(x, lora.lora_down.weight), lora.lora_up.weight)
    return nn.functional.linear(x, weight, bias) + lora.multiplier * lora.scale * update


def forward_and_backward(fn, x: torch.Tensor, lora: LoRAModule):
    x = x.clone().requires_grad_(True)
    lora.zero_grad()
    with MatmulRecorder() as recorder:
        out = fn(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape))
    return (out.detach(), x.grad, lora.lora_down.weight.grad.clone(), lora.lora_up.weight.grad.clone()), recorder


def output_sized_operands(recorder: MatmulRecorder) -> list[tuple[tuple[int, ...], ...]]:
    """The forward's products that read an output-sized tensor."""
    return [p for p in recorder.products if (TOKENS, OUT) in p]


@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8"])
def test_the_update_is_the_base_matmuls_addend_with_unchanged_numbers(fp8):
    base = plain_base()
    if fp8:
        make_fp8_linear(base, scaled=True)
    lora = adapted(base)
    weight = dequantize_weight(base.weight, getattr(base, "weight_scale", None), torch.float32)
    x = torch.randn(TOKENS, IN)
    ours, recorder = forward_and_backward(base, x, lora)
    reference, _ = forward_and_backward(lambda t: by_hand(weight, base.bias, lora, t), x, lora)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the output-sized update is read once, by the base matmul (x Wᵀ + update); no rank-sized
    # product reads a finished base output to add the update to it
    assert output_sized_operands(recorder) == [((TOKENS, OUT), (TOKENS, IN), (IN, OUT))]


def test_a_base_whose_forward_other_code_wrapped_is_called_as_it_is():
    base = plain_base()
    plain_forward = base.forward
    calls = []

    def wrapped(x):
        calls.append(x.shape)
        return plain_forward(x)

    base.forward = wrapped
    lora = adapted(base)
    x = torch.randn(TOKENS, IN)
    ours, recorder = forward_and_backward(base, x, lora)
    reference, _ = forward_and_backward(lambda t: by_hand(base.weight, base.bias, lora, t), x, lora)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == [(TOKENS, IN)]
    assert ((TOKENS, OUT), (TOKENS, RANK), (RANK, OUT)) in output_sized_operands(recorder)  # added afterwards


def test_a_base_in_another_dtype_than_the_lora_without_autocast_keeps_its_own_forward():
    """bf16 base, fp32 LoRA, no autocast: the base runs in bf16, the update in fp32, as before."""
    base = plain_base(dtype=torch.bfloat16)
    lora = adapted(base)
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16)
    with MatmulRecorder() as recorder:
        out = base(x)
    update = lora.multiplier * lora.scale * lora.lora_up(lora.lora_down(x.float()))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (lora.org_forward(x).float() + update).bfloat16())
    assert ((TOKENS, OUT), (TOKENS, RANK), (RANK, OUT)) in output_sized_operands(recorder)  # added afterwards


def test_autocast_runs_the_fused_base_matmul_in_bf16():
    base = plain_base()
    lora = adapted(base)
    x = torch.randn(TOKENS, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with MatmulRecorder() as recorder:
            out = base(x)
        reference = lora.org_forward(x) + lora.multiplier * lora.scale * lora.lora_up(lora.lora_down(x))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
    assert output_sized_operands(recorder) == [((TOKENS, OUT), (TOKENS, IN), (IN, OUT))]  # the fused form
