"""Attention in the FLUX.1 and Chroma DiTs: the SDPA kernels allowed, RoPE, the fused path from a
block's q/k/v projections to SDPA's inputs (:func:`attention_inputs`), and the key mask of T5 padding.
BFL's own functions (``attention``, ``rope``, ``apply_rope``) keep their names and numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from library.flux_layers import QKNorm

# The SDPA kernels allowed, first choice first. cuDNN's fused attention is left out unless asked
# for (use_cudnn_attention, --cudnn_attention): with torch 2.11 on an H100 its backward ended the
# process with an illegal memory access on diffusers' q/k/v layout and on an earlier one of ours
# (bench/RESULTS.md); flash attention (no mask) and memory-efficient attention (Chroma's mask) take
# its place.
DEFAULT_ATTENTION_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
ATTENTION_BACKENDS = list(DEFAULT_ATTENTION_BACKENDS)


def use_cudnn_attention(enabled: bool) -> None:
    """Puts cuDNN's fused attention first among the SDPA kernels (where the device has it), or
    leaves it out again. Call it before blocks are compiled: a compiled block keeps the kernels
    it was traced with."""
    global ATTENTION_BACKENDS
    ATTENTION_BACKENDS = ([SDPBackend.CUDNN_ATTENTION] if enabled else []) + list(DEFAULT_ATTENTION_BACKENDS)


# The fused attention kernels SDPA dispatches to (its math fallback is a composite of matmuls and
# a softmax). Selective checkpointing (``Flux.checkpoint_keep_attention``) keeps their outputs.
FUSED_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(torch.ops.aten, name)
)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` on (B, H, L, D) heads, restricted to ``ATTENTION_BACKENDS``."""
    with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """BFL's attention on (B, H, L, D) heads; the blocks use :func:`joint_attention` (same numbers, fewer copies)."""
    q, k = apply_rope(q, k, pe)
    x = sdpa(q, k, v, attn_mask)
    return rearrange(x, "B H L D -> B L (H D)")


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    cos, sin = torch.cos(out), torch.sin(out)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    out = rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2)
    return out.float()


def rope_as_complex(pe: Tensor) -> Tensor:
    """BFL's rotation matrices (B, 1, L, D/2, 2, 2) as unit complex numbers cos + i·sin, (B, L, 1, 1, D/2)."""
    return torch.view_as_complex(pe[:, 0, :, :, :, 0].float().contiguous())[:, :, None, None]


def apply_rope_complex(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotates the (even, odd) channel pairs of x (B, L, ..., D) by ``freqs`` (see :func:`rope_as_complex`).

    One complex multiply per element instead of BFL's four real ones: the same rotation.
    """
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous()) * freqs
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """BFL's API: q, k (B, H, L, D) and pe (B, 1, L, D/2, 2, 2)."""
    freqs = rope_as_complex(freqs_cis)[:, :, 0]  # (B, L, 1, D/2): heads moved next to the tokens below
    xq_out = apply_rope_complex(xq.transpose(1, 2), freqs).transpose(1, 2)
    xk_out = apply_rope_complex(xk.transpose(1, 2), freqs).transpose(1, 2)
    return xq_out, xk_out


def joint_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """SDPA over heads laid out (B, L, H, D) -> (B, L, H·D); the heads are read through strides, no copy."""
    x = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
    return x.transpose(1, 2).flatten(2)


def attention_inputs(
    projections: list[Tensor],
    norms: list[QKNorm],
    pe: Tensor,
    num_heads: int,
    gelu_rest: bool = False,
    queries_from: int = 0,
    rest_room: int = 0,
) -> list[Tensor]:
    """q, k, v (B, ΣL, H, D) of a joint attention from each stream's fused projection (B, L_s, 3·H·D + rest).

    q and k are RMS-normalised with the stream's scales and rotated by RoPE (``pe``: BFL's rotation
    matrices for all streams' tokens in order); v is gathered from the streams (one stream's is a
    view of its projection). With ``gelu_rest`` the channels after q, k, v (the single block's MLP
    input) go through tanh-GELU and come last in the result. The arithmetic of BFL's ``QKNorm`` +
    ``apply_rope``, computed in fp32 and rounded once.

    Tokens before ``queries_from`` (at most the first stream's) get keys and values only: no query
    row and no GELU output, for a caller that discards their outputs (q is then (B, ΣL − queries_from, H, D)).
    ``rest_room`` leaves that many channels before each GELU output for :func:`place_attention` to
    fill: the single block's ``linear2`` input is then written in place, not concatenated.

    Eager, this is one autograd node (:class:`_AttentionInputs`) whose backward writes each stream's
    gradient into one tensor, where autograd's split, cat and stack would copy it three times more.
    It reads bf16 projections without an fp32 copy and multiplies by 1/rms after the rotation,
    in the product that writes q and k (``bench/bench_traffic.py`` counts what that saves).
    Under ``torch.compile`` it is written out in real arithmetic instead, for the compiler to fuse
    (it can trace neither that node's in-place backward nor complex numbers).
    """
    if not 0 <= queries_from <= projections[0].shape[1]:
        raise ValueError(
            f"queries_from={queries_from} lies outside the first stream's {projections[0].shape[1]} tokens"
        )
    if torch.compiler.is_compiling():
        return _attention_inputs_composed(projections, norms, pe, num_heads, gelu_rest, queries_from, rest_room)
    scales = [torch.stack((n.query_norm.scale, n.key_norm.scale))[:, None, :] for n in norms]  # (2, 1, D)
    pairs = [t for pair in zip(projections, scales, strict=True) for t in pair]
    options = (num_heads, gelu_rest, queries_from, rest_room)
    return list(_AttentionInputs.apply(rope_as_complex(pe), options, *pairs))


def place_attention(attention: Tensor, mlp: Tensor) -> Tensor:
    """cat((attention, MLP activation), -1), written into the channels ``attention_inputs(...,
    rest_room=...)`` left free in front of the MLP activation ``mlp``: one copy of the attention
    output instead of a copy of both. Eager it is in place (``mlp`` is consumed); compiled, a cat."""
    width = attention.shape[-1]
    if torch.compiler.is_compiling():
        return torch.cat((attention, mlp[..., width:]), dim=-1)
    return _PlaceAttention.apply(mlp, attention)


class _PlaceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp: Tensor, attention: Tensor):
        ctx.width = attention.shape[-1]
        mlp[..., : ctx.width] = attention
        ctx.mark_dirty(mlp)
        return mlp

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the channels the attention overwrote pass their gradient to it alone; the node that made
        # ``mlp`` reads only the channels after them
        return grad, grad[..., : ctx.width]


def _query_rows(rows: slice, queries_from: int) -> tuple[slice, slice]:
    """The tokens of a stream (``rows`` of the joint sequence) that have a query: as rows of the
    stream, and as rows of q, which starts at token ``queries_from``."""
    first = max(queries_from - rows.start, 0)
    return slice(first, None), slice(rows.start + first - queries_from, rows.stop - queries_from)


def _attention_inputs_composed(
    projections: list[Tensor],
    norms: list[QKNorm],
    pe: Tensor,
    num_heads: int,
    gelu_rest: bool,
    queries_from: int = 0,
    rest_room: int = 0,
) -> list[Tensor]:
    cos, sin = pe[:, 0, :, None, None, :, 0, 0], pe[:, 0, :, None, None, :, 1, 0]  # (B, L, 1, 1, D/2)
    qs, ks, vs, rests, start = [], [], [], [], 0
    for proj, norm in zip(projections, norms, strict=True):
        rows = slice(start, start + proj.shape[1])
        start = rows.stop
        head_dim = norm.query_norm.scale.shape[0]
        inner = 3 * num_heads * head_dim
        heads = proj[..., :inner].unflatten(-1, (3, num_heads, head_dim))
        x = heads[:, :, :2].float()  # (B, L, 2, H, D): q and k
        scale = torch.stack((norm.query_norm.scale, norm.key_norm.scale)).float()[:, None, :]
        x = x * torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / head_dim + 1e-6) * scale
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, rows], sin[:, rows]
        rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)
        rotated = rotated.to(proj.dtype)
        qs.append(rotated[:, :, 0])
        ks.append(rotated[:, :, 1])
        vs.append(heads[:, :, 2])
        if gelu_rest:
            asked, _ = _query_rows(rows, queries_from)
            rests.append(F.pad(F.gelu(proj[:, asked, inner:], approximate="tanh"), (rest_room, 0)))
    return [torch.cat(qs, dim=1)[:, queries_from:], torch.cat(ks, dim=1), torch.cat(vs, dim=1), *rests]


class _AttentionInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, freqs: Tensor, options: tuple[int, bool, int, int], *pairs: Tensor):
        num_heads, gelu_rest, queries_from, rest_room = options
        projections, scales = pairs[0::2], pairs[1::2]
        head_dim = scales[0].shape[-1]
        inner = 3 * num_heads * head_dim
        first = projections[0]
        batch, total = first.shape[0], sum(p.shape[1] for p in projections)
        # q and k (B, L, H, D) contiguous, the layout every SDPA kernel is written for
        q = first.new_empty(batch, total - queries_from, num_heads, head_dim)
        k = first.new_empty(batch, total, num_heads, head_dim)
        # one stream (the single blocks): v is a view of the projection, not a copy (SDPA reads
        # strided heads); the joint streams' v is gathered into one tensor
        v = None if len(projections) == 1 else first.new_empty(batch, total, num_heads, head_dim)
        rests, rrms_list, start = [], [], 0
        for proj, scale in zip(projections, scales, strict=True):
            rows = slice(start, start + proj.shape[1])
            start = rows.stop
            asked, q_rows = _query_rows(rows, queries_from)
            heads = proj[..., :inner].unflatten(-1, (3, num_heads, head_dim))
            x = heads[:, :, :2]  # read in its own dtype: the fp32 results below come from type promotion
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
            rrms = torch.rsqrt(norm.square_().div_(head_dim).add_(1e-6))
            # rotate(x·rrms·scale) = rotate(x·scale)·rrms (one rrms per head, a linear rotation): the
            # last multiply then writes q and k themselves, in their dtype
            y = torch.view_as_complex((x * scale.float()).unflatten(-1, (-1, 2)))
            rotated = torch.view_as_real(y.mul_(freqs[:, rows])).flatten(-2)
            torch.mul(rotated[:, asked, 0], rrms[:, asked, 0], out=q[:, q_rows])
            torch.mul(rotated[:, :, 1], rrms[:, :, 1], out=k[:, rows])
            if v is None:
                v = heads[:, :, 2]
            else:
                v[:, rows] = heads[:, :, 2]
            rrms_list.append(rrms)
            if gelu_rest:
                x = proj[:, asked, inner:]
                rest = x.new_empty(*x.shape[:-1], rest_room + x.shape[-1])
                torch.ops.aten.gelu.out(x, approximate="tanh", out=rest[..., rest_room:])
                rests.append(rest)
        ctx.options = options
        ctx.save_for_backward(freqs, *projections, *scales, *rrms_list)
        return (q, k, v, *rests)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, *grad_rests: Tensor):
        freqs, *saved = ctx.saved_tensors  # unpacked once: checkpointing allows no second unpack
        n = len(saved) // 3
        projections, scales, rrms_list = saved[:n], saved[n : 2 * n], saved[2 * n :]
        num_heads, gelu_rest, queries_from, rest_room = ctx.options
        head_dim = scales[0].shape[-1]
        inner = 3 * num_heads * head_dim
        grads, start = [None, None], 0
        for s, (proj, scale, rrms) in enumerate(zip(projections, scales, rrms_list, strict=True)):
            rows = slice(start, start + proj.shape[1])
            start = rows.stop
            needs_proj, needs_scale = ctx.needs_input_grad[2 + 2 * s], ctx.needs_input_grad[3 + 2 * s]
            if not (needs_proj or needs_scale):
                grads += [None, None]
                continue
            asked, q_rows = _query_rows(rows, queries_from)
            heads = proj[..., :inner].unflatten(-1, (3, num_heads, head_dim))
            grad_proj = torch.empty_like(proj)
            grad_heads = grad_proj[..., :inner].unflatten(-1, (3, num_heads, head_dim))
            if asked.start:  # tokens without a query
                grad_heads[:, : asked.start, 0].zero_()
            grad_scale = torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
            conj = torch.conj_physical(freqs[:, rows, 0])
            for i, (grad, own, grad_rows) in enumerate(((grad_q, asked, q_rows), (grad_k, slice(None), rows))):
                if grad is None:
                    grad_heads[:, own, i].zero_()
                    continue
                x, r = heads[:, own, i], rrms[:, own, i]
                h = torch.view_as_complex(grad[:, grad_rows].float().contiguous().unflatten(-1, (-1, 2))) * conj[:, own]
                h = torch.view_as_real(h).flatten(-2)  # rotated back: the gradient of rrms·(x·scale)
                if needs_scale:
                    grad_scale[i, 0] = (h * x).mul_(r).flatten(0, -2).sum(0)
                h.mul_(scale[i])
                # d/dx of rrms·u (u = x·scale, h its gradient): rrms·h − rrms³/D · Σ(h·x) · x
                coef = (h * x).sum(-1, keepdim=True).mul_(r.square()).div_(-head_dim)
                torch.mul(torch.addcmul(h, x, coef), r, out=grad_heads[:, own, i])
            if grad_v is None:
                grad_heads[:, :, 2].zero_()
            else:
                grad_heads[:, :, 2] = grad_v[:, rows]
            if gelu_rest:
                if asked.start:
                    grad_proj[:, : asked.start, inner:].zero_()
                if grad_rests[s] is None:
                    grad_proj[:, asked, inner:].zero_()
                else:
                    torch.ops.aten.gelu_backward.grad_input(
                        grad_rests[s][..., rest_room:],
                        proj[:, asked, inner:],
                        approximate="tanh",
                        grad_input=grad_proj[:, asked, inner:],
                    )
            elif proj.shape[-1] > inner:
                grad_proj[..., inner:].zero_()  # channels this node does not read
            grads += [grad_proj if needs_proj else None, grad_scale.to(scale.dtype) if needs_scale else None]
        return tuple(grads)


def text_key_mask(txt_attention_mask: Tensor | None, num_img_tokens: int, extra_tokens: int = 0) -> Tensor | None:
    """Boolean SDPA mask (B, 1, 1, L_txt + L_img) that hides T5 padding from every query.

    ``extra_tokens`` keeps that many padding tokens after the last real one visible (Chroma
    attends to one). Image tokens are always visible, so no query row is ever fully masked.
    """
    if txt_attention_mask is None:
        return None
    txt_mask = _visible_text(txt_attention_mask, extra_tokens)
    img_mask = torch.ones(txt_mask.shape[0], num_img_tokens, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([txt_mask, img_mask], dim=1)[:, None, None, :]


def _visible_text(txt_attention_mask: Tensor, extra_tokens: int) -> Tensor:
    """(B, L_txt) bool: the text tokens the attention sees."""
    txt_mask = txt_attention_mask.bool()
    if extra_tokens:
        lengths = txt_mask.sum(dim=1, keepdim=True) + extra_tokens
        positions = torch.arange(txt_mask.shape[1], device=txt_mask.device)[None]
        txt_mask = positions < lengths
    return txt_mask


def without_hidden_text(
    txt: Tensor,
    txt_ids: Tensor,
    txt_attention_mask: Tensor | None,
    num_img_tokens: int,
    extra_tokens: int = 0,
    compiled: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(txt, txt_ids, key mask) for the joint attention, the text tokens after the last one any sample of
    the batch lets the attention see cut off. No query sees those as keys and the model's output is the
    image tokens', so they change nothing but the cost: T5 pads to 512 tokens where a prompt is often 30
    to 100. The mask is None where nothing is left to hide (one prompt, or prompts of one length), which
    lets SDPA use its flash kernel, as it cannot with a mask. Without a mask nothing is cut: then the
    padding is seen. Nor for ``compiled`` blocks: a graph is traced for a mask and for none, and for a text
    length dynamo specialises (1) or finds equal to another size (the batch, the head width), which with
    several buckets and a last short batch ran past dynamo's recompile limit, after which blocks run
    uncompiled.

    The cut is decided where the mask is: the trainer and the sampler keep it on the host, so that
    deciding costs the device no wait (a mask on the GPU costs three); the key mask goes to txt's device."""
    if txt_attention_mask is None or compiled:
        mask = text_key_mask(txt_attention_mask, num_img_tokens, extra_tokens)
        return txt, txt_ids, None if mask is None else mask.to(txt.device, non_blocking=True)
    visible = _visible_text(txt_attention_mask, extra_tokens)
    seen = visible.any(dim=0).nonzero()
    keep = max(int(seen.max()) + 1, 1) if seen.numel() else 1
    visible, txt, txt_ids = visible[:, :keep], txt[:, :keep], txt_ids[:, :keep]
    if bool(visible.all()):
        return txt, txt_ids, None
    return txt, txt_ids, text_key_mask(visible, num_img_tokens).to(txt.device, non_blocking=True)
