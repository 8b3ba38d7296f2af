"""fp8 weights under gradient checkpointing: a block's recomputation keeps the weights it dequantizes
for the backward that follows it, so each weight is dequantized twice a step (forward and
recomputation), not three times; a forward outside a recomputation still keeps only fp8."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.fp8 import FP8, block_linears, fp8_matmul_plus, quantize_dit_
from tests.test_flux_models import dit_inputs
from tests.test_fp8 import GUIDANCE, flux_like_model


class DequantizeCounter(TorchDispatchMode):
    """Casts out of float8_e4m3fn, by the weight's shape."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy" and args[0].dtype == FP8:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def fp8_model(checkpointing: dict | None = None):
    """A tiny fp8 DiT in training mode, with gradient checkpointing as ``checkpointing`` asks (None: off)."""
    model = quantize_dit_(flux_like_model(), torch.float32, scaled=True)
    if checkpointing is not None:
        model.enable_gradient_checkpointing(**checkpointing)
    return model.train()


def step(model) -> tuple[list[torch.Tensor], int]:
    """Input gradient and output of one forward + backward, and the dequantizations it did."""
    x = dit_inputs(model.params)
    img = x.pop("img").clone().requires_grad_(True)
    with DequantizeCounter() as counter:
        out = model(img=img, **x, guidance=GUIDANCE)
        out.square().mean().backward()
    return [out.detach(), img.grad], len(counter.shapes)


@pytest.mark.parametrize(
    "checkpointing",
    [{}, {"cpu_offload": True}, {"keep_attention": True}],
    ids=["recompute", "cpu_offload", "keep_attention"],
)
def test_each_weight_is_dequantized_twice_a_step_with_unchanged_gradients(checkpointing):
    model, plain = fp8_model(checkpointing), fp8_model()
    linears = len(list(block_linears(model)))

    ours, dequantized = step(model)
    reference, reference_dequantized = step(plain)
    assert linears > 10
    assert reference_dequantized == 2 * linears  # forward and backward, without checkpointing
    assert dequantized == 2 * linears  # forward and recomputation: the backward uses the recomputation's
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_a_recomputation_the_backward_keeps_only_fp8():
    """What a plain forward saves for backward: the fp8 weights themselves, never a dequantized copy."""
    model = fp8_model()
    weight_shapes = {tuple(m.weight.shape) for _, m in block_linears(model)}
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = dit_inputs(model.params)
    img = x.pop("img").clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(img=img, **x, guidance=GUIDANCE).square().mean().backward()
    weights = [t for t in saved if tuple(t.shape) in weight_shapes]
    assert any(t.dtype == FP8 for t in weights)
    # the fp8 weights themselves, or stand-ins that take one element of memory; no copy of a weight
    copies = [t for t in weights if t.data_ptr() not in parameters and t.untyped_storage().nbytes() > t.element_size()]
    assert not copies


def test_a_linear_whose_input_needs_no_gradient_holds_no_weight_for_backward():
    """The modulation's input needs no gradient in LoRA training, so its backward never reads the
    weight; holding it would keep a swapped-out block's weight on the device until the backward."""
    model = fp8_model()
    linear = model.double_blocks[0].img_mod.lin
    addend = torch.zeros(2, linear.out_features, requires_grad=True)  # as a LoRA's update makes the output need one
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fp8_matmul_plus(linear, torch.randn(2, linear.in_features), addend)
    out.sum().backward()
    assert torch.equal(addend.grad, torch.ones_like(addend))
    assert not [t for t in saved if t.untyped_storage().nbytes() > t.element_size()]
