"""Building blocks of the FLUX.1 and Chroma DiTs, with Black Forest Labs' module names.

Checkpoint keys come from these attribute names (``img_attn.qkv``, ``txt_mlp.0``,
``modulation.lin``, ...), and third-party LoRA code finds its targets by the class names
``DoubleStreamBlock`` / ``SingleStreamBlock`` and their plain ``nn.Linear`` children.
Blocks built with ``modulated=False`` (Chroma) have no modulation Linears and take their
(shift, scale, gate) vectors from the caller. Their attention is in :mod:`library.flux_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.dtypes import autocast_off
from library.flux_attention import attention_inputs, joint_attention, place_attention, rope


class EmbedND(nn.Module):
    """RoPE frequencies for n-axis positions ids (B, L, n) -> (B, 1, L, D/2, 2, 2)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by ``time_factor``), cos half first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[..., :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale.to(x_dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor | None


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        first, *second = modulations_from_vectors(self.vectors(vec))
        return first, second[0] if self.is_double else None

    def vectors(self, vec: Tensor) -> Tensor:
        """(B, 3 or 6, D): (shift, scale, gate) once or twice, as Chroma's precomputed vectors."""
        return self.lin(F.silu(vec)).unflatten(-1, (self.multiplier, -1))


def _is_tanh_gelu(module: nn.Module) -> bool:
    return type(module) is nn.GELU and module.approximate == "tanh"


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    """(1 + scale) · x + shift, in one kernel."""
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def norm_and_modulate(norm: nn.LayerNorm, x: Tensor, mod: ModulationOut) -> Tensor:
    """(1 + scale) · LayerNorm(x) + shift. Within one sample the modulation is the LayerNorm's
    affine transform, so one fused kernel per sample does it all (forward and backward).

    That kernel runs in x's dtype, outside autocast: it computes in fp32 inside and rounds once,
    as the fp32 LayerNorm that CUDA autocast would pick does, without casting the activation to
    fp32 and back around it (three passes over it in forward and three more in backward)."""
    fusable = type(norm) is nn.LayerNorm and not norm.elementwise_affine
    # compiled, a loop over samples would fix the batch size in the graph, and fusing is inductor's job
    if not fusable or (x.shape[0] > 1 and torch.compiler.is_compiling()):
        return modulate(norm(x), mod)
    with autocast_off(x.device.type):
        # (B or 1, D); reshapes, split and unbind, not indexing: indexing's backward zero-fills
        weight, bias = (1 + mod.scale).to(x.dtype).flatten(1), mod.shift.to(x.dtype).flatten(1)
        if x.shape[0] == 1:
            return F.layer_norm(x, norm.normalized_shape, weight.flatten(), bias.flatten(), norm.eps)
        samples = x.split(1)
        weight, bias = (t.expand(len(samples), -1).unbind() for t in (weight, bias))
        return torch.cat([
            F.layer_norm(sample, norm.normalized_shape, w, b, norm.eps)
            for sample, w, b in zip(samples, weight, bias, strict=True)
        ])  # fmt: skip


def modulations_from_vectors(vectors: Tensor) -> list[ModulationOut]:
    """(B, 3k, D) modulation vectors (Chroma's, or a FLUX block's ``modulation_vectors``) -> k triples
    (shift, scale, gate)."""
    parts = vectors.split(1, dim=1)  # one split: its backward is one cat, where slices would each zero-fill
    return [ModulationOut(*parts[i : i + 3]) for i in range(0, len(parts), 3)]


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over cat(txt, img)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False, modulated=True):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        if modulated:
            self.img_mod = Modulation(hidden_size, double=True)
            self.txt_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
        )
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
        )

    def modulation_vectors(self, vec: Tensor) -> Tensor:
        """(B, 12, hidden): this block's modulation from ``vec`` in ``forward``'s ``mod_vectors`` layout."""
        return torch.cat((self.img_mod.vectors(vec), self.txt_mod.vectors(vec)), dim=1)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor | None,
        pe: Tensor,
        attn_mask: Tensor | None = None,
        mod_vectors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if mod_vectors is None:
            img_mod1, img_mod2 = self.img_mod(vec)
            txt_mod1, txt_mod2 = self.txt_mod(vec)
        else:
            img_mod1, img_mod2, txt_mod1, txt_mod2 = modulations_from_vectors(mod_vectors)

        img_qkv = self.img_attn.qkv(norm_and_modulate(self.img_norm1, img, img_mod1))
        txt_qkv = self.txt_attn.qkv(norm_and_modulate(self.txt_norm1, txt, txt_mod1))
        q, k, v = attention_inputs([txt_qkv, img_qkv], [self.txt_attn.norm, self.img_attn.norm], pe, self.num_heads)
        attn = joint_attention(q, k, v, attn_mask)
        txt_attn, img_attn = attn.split((txt.shape[1], img.shape[1]), dim=1)  # backward: one cat, not two zero-fills

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(norm_and_modulate(self.img_norm2, img, img_mod2)))

        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(norm_and_modulate(self.txt_norm2, txt, txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over cat(txt, img): fused qkv + MLP-in projection, fused attention-out + MLP-out."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, modulated: bool = True):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        if modulated:
            self.modulation = Modulation(hidden_size, double=False)

    def modulation_vectors(self, vec: Tensor) -> Tensor:
        """(B, 3, hidden): this block's modulation from ``vec`` in ``forward``'s ``mod_vectors`` layout."""
        return self.modulation.vectors(vec)

    def forward(
        self,
        x: Tensor,
        vec: Tensor | None,
        pe: Tensor,
        attn_mask: Tensor | None = None,
        mod_vectors: Tensor | None = None,
        output_from: int = 0,
    ) -> Tensor:
        """x (B, L, hidden) -> (B, L − output_from, hidden). Tokens before ``output_from`` still give
        their keys and values to the attention, but get no output: the last block's text tokens,
        which the final layer never reads, cost no query, MLP or output projection."""
        mod = self.modulation(vec)[0] if mod_vectors is None else modulations_from_vectors(mod_vectors)[0]
        projection = self.linear1(norm_and_modulate(self.pre_norm, x, mod))
        if _is_tanh_gelu(self.mlp_act):
            # the GELU output leaves room in front for the attention output: linear2's input without a cat
            q, k, v, mlp = attention_inputs(
                [projection], [self.norm], pe, self.num_heads, True, output_from, rest_room=self.hidden_dim
            )
            output = self.linear2(place_attention(joint_attention(q, k, v, attn_mask), mlp))
        else:
            q, k, v = attention_inputs([projection], [self.norm], pe, self.num_heads, queries_from=output_from)
            mlp = self.mlp_act(projection[:, output_from:, 3 * self.hidden_dim :])
            output = self.linear2(torch.cat((joint_attention(q, k, v, attn_mask), mlp), 2))
        return torch.addcmul(x[:, output_from:], mod.gate, output)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulated: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor | None, mod_vectors: Tensor | None = None) -> Tensor:
        if mod_vectors is None:
            shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
            shift, scale = shift[:, None, :], scale[:, None, :]
        else:
            shift, scale = mod_vectors.split(1, dim=1)
        return self.linear(norm_and_modulate(self.norm_final, x, ModulationOut(shift, scale, None)))
