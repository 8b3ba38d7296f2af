"""fp8 storage for the frozen DiT: ``--fp8_base``, ``--fp8_base_unet`` and ``--fp8_scaled``.

Only the block Linears' weights are stored in ``float8_e4m3fn`` (they are 99% of the
parameters); what is tiny and sensitive stays in the compute dtype: biases, RMSNorm scales,
the input embedders, Chroma's modulation approximator and the final layer. sd-scripts casts
every floating tensor of the DiT to fp8.

A converted Linear keeps its class (``nn.Linear``), names and state-dict keys, so LoRA code
that finds targets by class or ``isinstance`` still does; only its ``forward`` changes. It
dequantizes the weight to the compute dtype (the autocast dtype, else the input's) for each
matmul and saves the fp8 weight, not the dequantized copy, for backward, so the activations
kept for backward never hold a second, wider copy of the model.

``--fp8_scaled`` stores ``weight / scale`` with one power-of-two scale per output row
(buffer ``weight_scale``), chosen so that the row's largest magnitude lands in e4m3's top
binade. Small weights then keep e4m3's 3-bit relative precision instead of falling into its
subnormals (below 2^-6, where FLUX's weights mostly are), and dequantizing is exact in any
compute dtype because the scale is a power of two.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.dtypes import autocast_dtype

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def compute_dtype_for(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on, else ``x``'s."""
    return autocast_dtype(x.device.type) or x.dtype


SMALLEST_SCALE = 2.0**-24  # fp16's smallest step: a smaller scale would round to 0 in fp16 and zero its row


def row_scales(weight: Tensor) -> Tensor:
    """Per-output-row power-of-two scales (fp32) that map each row's max |w| into (224, 448] (into less, for rows
    under 448 * 2**-24 ~ 2.7e-5, whose scale stays one that fp16 compute can hold)."""
    amax = weight.detach().float().abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))).clamp(min=SMALLEST_SCALE)


def quantize_weight(weight: Tensor, scaled: bool) -> tuple[Tensor, Tensor | None]:
    """(fp8 weight, per-row scale or None). An fp8 weight without ``scaled`` is kept as stored."""
    if not scaled:
        return (weight if weight.dtype == FP8 else weight.to(FP8)), None
    scale = row_scales(weight)
    return (weight.float() / scale[:, None]).to(FP8), scale


def dequantize_weight(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    w = weight.to(dtype)
    return w if scale is None else w * scale.to(dtype)[:, None]  # exact: the scale is a power of two


# thread-local: on CUDA the backward, and so the recomputation, runs on a thread of its own
_recomputation = threading.local()


@contextlib.contextmanager
def keep_dequantized_weights() -> Iterator[None]:
    """While active, fp8 Linears keep their dequantized weight for backward instead of the fp8 one.

    For a checkpointed block's recomputation, which runs just before the block's backward: that
    backward then uses the weights the recomputation dequantized, where it would dequantize them a
    third time (forward, recomputation, backward). Only there: a plain forward that kept them would
    hold a second, wider copy of the model until the backward.
    """
    previous = getattr(_recomputation, "keep", False)
    _recomputation.keep = True
    try:
        yield
    finally:
        _recomputation.keep = previous


class _Fp8Linear(torch.autograd.Function):
    """y = x Wᵀ + b (+ addend) with W dequantized on the fly; backward re-dequantizes instead of saving W
    (except under :func:`keep_dequantized_weights`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None, dtype: torch.dtype,
                addend: Tensor | None):  # fmt: skip
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.addend_dtype = None if addend is None else addend.dtype
        w = dequantize_weight(weight, scale, dtype)
        # The third slot holds the dequantized weight when one is kept, else a stand-in of its shape
        # and dtype that takes no memory (one element, broadcast). Checkpointing hands the backward
        # what the recomputation saved, slot by slot, after checking that shapes and dtypes agree.
        needs_weight = ctx.needs_input_grad[0]  # (the modulation's input needs no gradient in LoRA training)
        kept = w if needs_weight and getattr(_recomputation, "keep", False) else w.new_empty(()).expand(w.shape)
        # a weight held for a backward that will not read it would keep a swapped-out block on the device
        ctx.save_for_backward(*((weight, scale) if needs_weight else (None, None)), kept)
        if addend is None:
            return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
        if bias is not None:
            raise ValueError("give the bias inside the addend")
        flat = torch.addmm(addend.reshape(-1, w.shape[0]).to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), w.t())
        return flat.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scale, kept = ctx.saved_tensors
        grad_x = grad_bias = grad_addend = None
        if ctx.needs_input_grad[0]:
            w = dequantize_weight(weight, scale, ctx.dtype) if 0 in kept.stride() else kept
            grad_x = grad.to(ctx.dtype).matmul(w).to(ctx.x_dtype)
        if ctx.bias_needs_grad:
            grad_bias = grad.flatten(0, -2).sum(0)
        if ctx.needs_input_grad[5]:
            grad_addend = grad.to(ctx.addend_dtype)
        return grad_x, None, None, grad_bias, None, grad_addend


def fp8_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    _check_frozen(self)
    return _Fp8Linear.apply(x, self.weight, getattr(self, "weight_scale", None), self.bias, compute_dtype_for(x), None)


def fp8_matmul_plus(self: nn.Linear, x: Tensor, addend: Tensor) -> Tensor:
    """x Wᵀ + addend for an fp8 Linear, the addend (shaped as the output, the bias in it) added
    by the matmul itself: how a LoRA adds its update without a pass over the base output."""
    _check_frozen(self)
    return _Fp8Linear.apply(x, self.weight, getattr(self, "weight_scale", None), None, compute_dtype_for(x), addend)


def _check_frozen(linear: nn.Linear) -> None:
    if linear.weight.requires_grad:
        raise RuntimeError("an fp8-stored Linear weight cannot be trained; it is part of the frozen base model")


@torch.no_grad()
def make_fp8_linear(linear: nn.Linear, scaled: bool = False) -> nn.Linear:
    """Stores ``linear``'s weight in e4m3fn (in place) and routes its forward through the fp8 matmul.

    A weight already stored the way asked (e4m3fn, with a ``weight_scale`` exactly when ``scaled``)
    is kept bit for bit; converting one stored the other way starts from its dequantized values.
    """
    weight = linear.weight.data
    old_scale = linear._buffers.get("weight_scale")
    if weight.dtype != FP8 or (old_scale is not None) != scaled:
        linear._buffers.pop("weight_scale", None)
        if old_scale is not None:
            weight = dequantize_weight(weight, old_scale, torch.float32)
        weight, scale = quantize_weight(weight, scaled)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if scale is not None:
            linear.register_buffer("weight_scale", scale.to(weight.device))
    linear.forward = types.MethodType(fp8_linear_forward, linear)
    return linear


def attach_scaled_weight(linear: nn.Linear, weight: Tensor, scale: Tensor) -> nn.Linear:
    """Gives ``linear`` an already quantized e4m3fn weight and its per-row scales (from :func:`quantize_weight`)."""
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.register_buffer("weight_scale", scale.to(weight.device))
    return make_fp8_linear(linear, scaled=True)  # stored as asked: only the forward is routed


def block_linears(model: nn.Module) -> Iterable[tuple[str, nn.Linear]]:
    """The Linears inside the DiT's double and single blocks (the part stored in fp8)."""
    for list_name in ("double_blocks", "single_blocks"):
        for name, module in getattr(model, list_name, nn.ModuleList()).named_modules(prefix=list_name):
            if isinstance(module, nn.Linear):
                yield name, module


@torch.no_grad()
def quantize_dit_(model: nn.Module, compute_dtype: torch.dtype, scaled: bool = False) -> nn.Module:
    """fp8 storage for a FLUX / Chroma DiT, in place: block Linear weights in e4m3fn (per-row
    scaled with ``scaled``), every other floating tensor in ``compute_dtype``.

    Weights already in e4m3fn (an fp8 checkpoint) are kept bit for bit unless ``scaled``
    asks for new scales (which then cost one dequantize-requantize of that weight).
    """
    linears = dict(block_linears(model))
    fp8_weights = {id(m.weight) for m in linears.values()}
    for p in list(model.parameters()):
        if id(p) not in fp8_weights and p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)
    for name, b in list(model.named_buffers()):
        if b.is_floating_point() and b.dtype != compute_dtype and not name.endswith("weight_scale"):
            b.data = b.data.to(compute_dtype)
    for module in linears.values():
        make_fp8_linear(module, scaled=scaled)
    kept = sum(1 for m in linears.values() if m.weight.dtype == FP8)
    logger.info("fp8%s: %d block Linear weights stored as float8_e4m3fn, the rest in %s",
                " (per-row scaled)" if scaled else "", kept, compute_dtype)  # fmt: skip
    return model


def fp8_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the block Linear weights take now, bytes they would take in fp32)."""
    now = fp32 = 0
    for _, m in block_linears(model):
        now += m.weight.numel() * m.weight.element_size()
        fp32 += m.weight.numel() * 4
    return now, fp32


def dit_load_dtype(ckpt_path: str, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to load a DiT in before :func:`quantize_dit_`.

    A plain fp8 file loads as stored (``None``), so its fp8 weights are never widened and
    narrowed again; everything else, ComfyUI's scaled fp8 files included (their scales are
    applied on load), loads in ``compute_dtype``.
    """
    from library.comfy_fp8 import is_comfy_scaled_fp8
    from library.safetensors_io import checkpoint_files, read_headers

    entries, metadata = read_headers(checkpoint_files(ckpt_path))
    if is_comfy_scaled_fp8(entries, metadata):
        return compute_dtype
    weights = [e["dtype"] for k, e in entries.items() if "blocks." in k and k.endswith(".weight")]
    return None if weights and all(d == "F8_E4M3" for d in weights) else compute_dtype


T5_LINEAR_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


def t5_file_is_plain_fp8(path: str) -> bool:
    """Whether a T5 file stores its Linear weights in e4m3 fp8 without scales (``t5xxl_fp8_e4m3fn``).
    Such weights can stay fp8: widened inside autocast, they give the same outputs as widened on load."""
    from library.comfy_fp8 import is_comfy_scaled_fp8
    from library.safetensors_io import read_headers
    from library.text_encoders import t5xxl_files

    entries, metadata = read_headers(t5xxl_files(path))
    weights = [e["dtype"] for k, e in entries.items() if k.endswith(T5_LINEAR_WEIGHTS)]
    return bool(weights) and all(d == "F8_E4M3" for d in weights) and not is_comfy_scaled_fp8(entries, metadata)


def check_fp8_args(args) -> None:
    """Refuses fp8 option combinations that cannot work (before any model is loaded)."""
    from library.errors import UserError

    fp8 = args.fp8_base or args.fp8_base_unet
    flag = "--fp8_base" if args.fp8_base else "--fp8_base_unet"
    if fp8 and args.mixed_precision not in ("bf16", "fp16"):
        raise UserError(f"{flag} stores weights in fp8 and computes in the mixed-precision dtype: "
                        "add --mixed_precision bf16 (or fp16)")  # fmt: skip
    if getattr(args, "fp8_scaled", False) and not fp8:
        raise UserError("--fp8_scaled chooses how fp8 weights are stored: use it with --fp8_base or --fp8_base_unet")


@torch.no_grad()
def store_linears_in_fp8(encoder: nn.Module, fp8: torch.dtype = FP8) -> nn.Module:
    """What loading a text encoder with an fp8 ``dtype`` gives, for one loaded wider (e.g. to merge base
    weights first): every ``nn.Linear`` weight stored in ``fp8``, T5's activations kept out of it."""
    from library.text_encoders import keep_t5_activations_out_of_fp8

    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = module.weight.data.to(fp8)
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "block"):  # a T5
        keep_t5_activations_out_of_fp8(encoder)
    return encoder
