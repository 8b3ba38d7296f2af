"""BFL <-> diffusers key mapping for the FLUX.1 and Chroma transformers, at any width and depth.

diffusers splits what BFL fuses (q, k, v; and in single blocks also the MLP input), names the
modulation Linears after norms, and stores the final layer's modulation as (scale, shift)
where BFL stores (shift, scale). Widths are read from the tensors, so pruned and tiny models
convert as well as full-size ones.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_DOUBLE = "transformer_blocks.{i}.", "double_blocks.{i}."
_SINGLE = "single_transformer_blocks.{i}.", "single_blocks.{i}."
_APPROX = "distilled_guidance_layer.", "distilled_guidance_layer."

# (diffusers prefix, BFL prefix): a key is renamed by its longest matching prefix.
_RENAMES = [
    ("x_embedder.", "img_in."),
    ("context_embedder.", "txt_in."),
    ("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
    ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
    ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
    ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
    ("proj_out.", "final_layer.linear."),
    *[
        (_DOUBLE[0] + d, _DOUBLE[1] + b)
        for d, b in [
            ("norm1.linear.", "img_mod.lin."),
            ("norm1_context.linear.", "txt_mod.lin."),
            ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
            ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
            ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
            ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
            ("attn.to_out.0.", "img_attn.proj."),
            ("attn.to_add_out.", "txt_attn.proj."),
            ("ff.net.0.proj.", "img_mlp.0."),
            ("ff.net.2.", "img_mlp.2."),
            ("ff_context.net.0.proj.", "txt_mlp.0."),
            ("ff_context.net.2.", "txt_mlp.2."),
        ]
    ],
    *[
        (_SINGLE[0] + d, _SINGLE[1] + b)
        for d, b in [
            ("norm.linear.", "modulation.lin."),
            ("attn.norm_q.weight", "norm.query_norm.scale"),
            ("attn.norm_k.weight", "norm.key_norm.scale"),
            ("proj_out.", "linear2."),
        ]
    ],
    *[
        (_APPROX[0] + d, _APPROX[1] + b)
        for d, b in [
            ("in_proj.", "in_proj."),
            ("out_proj.", "out_proj."),
            ("layers.{i}.linear_1.", "layers.{i}.in_layer."),
            ("layers.{i}.linear_2.", "layers.{i}.out_layer."),
            ("norms.{i}.weight", "norms.{i}.scale"),
        ]
    ],
]
# diffusers' separate projections, concatenated in this order into one BFL Linear
_FUSED = [
    (_DOUBLE[0], ("attn.to_q", "attn.to_k", "attn.to_v"), _DOUBLE[1] + "img_attn.qkv"),
    (_DOUBLE[0], ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _DOUBLE[1] + "txt_attn.qkv"),
    (_SINGLE[0], ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), _SINGLE[1] + "linear1"),
]
# stored as (scale, shift) by diffusers and (shift, scale) by BFL
_SWAPPED = ("norm_out.linear.", "final_layer.adaLN_modulation.1.")


def is_diffusers_state_dict(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_FORWARD = [(_template_regex(d), b) for d, b in _RENAMES]
_BACKWARD = [(_template_regex(b), d) for d, b in _RENAMES]


def _rename(key: str, table) -> str | None:
    best = None
    for pattern, target in table:
        m = pattern.match(key)
        if m and (best is None or m.end() > best[0].end()):
            best = (m, target)
    if best is None:
        return None
    m, target = best
    return target.replace("{i}", m.groupdict().get("i") or "") + key[m.end() :]


def _block_indices(sd: dict, prefix_template: str) -> list[int]:
    pattern = _template_regex(prefix_template)
    return sorted({int(m.group("i")) for k in sd if (m := pattern.match(k))})


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Converts a diffusers FLUX/Chroma transformer state dict to BFL keys. Unknown keys raise KeyError."""
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    for block_template, parts, target_template in _FUSED:
        for i in _block_indices(sd, block_template):
            src, target = block_template.format(i=i), target_template.format(i=i)
            for kind in ("weight", "bias"):
                names = [f"{src}{p}.{kind}" for p in parts]
                present = [n for n in names if n in sd]
                if present and len(present) != len(names):
                    missing = sorted(set(names) - set(present))
                    raise KeyError(f"incomplete fused projection {target}: missing {missing}")
                if present:
                    out[f"{target}.{kind}"] = torch.cat([sd.pop(n) for n in names], dim=0)
    for key, tensor in sd.items():
        if key.startswith(_SWAPPED[0]):
            out[_SWAPPED[1] + key[len(_SWAPPED[0]) :]] = _swap_halves(tensor)
            continue
        renamed = _rename(key, _FORWARD)
        if renamed is None:
            raise KeyError(f"unknown diffusers transformer key: {key}")
        out[renamed] = tensor
    return out


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`diffusers_to_bfl`; split sizes are read from the tensors."""
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    hidden = sd["img_in.weight"].shape[0]
    for block_template, parts, target_template in _FUSED:
        block_prefix = target_template.split("{i}")[0] + "{i}."
        for i in _block_indices(sd, block_prefix):
            dst, source = block_template.format(i=i), target_template.format(i=i)
            for kind in ("weight", "bias"):
                tensor = sd.pop(f"{source}.{kind}", None)
                if tensor is None:
                    continue
                sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(parts) == 4 else [])
                for part, piece in zip(parts, tensor.split(sizes, dim=0), strict=True):
                    out[f"{dst}{part}.{kind}"] = piece.clone()
    for key, tensor in sd.items():
        if key.startswith(_SWAPPED[1]):
            out[_SWAPPED[0] + key[len(_SWAPPED[1]) :]] = _swap_halves(tensor)
            continue
        renamed = _rename(key, _BACKWARD)
        if renamed is None:
            raise KeyError(f"unknown BFL transformer key: {key}")
        out[renamed] = tensor
    return out
