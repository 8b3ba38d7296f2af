"""FLUX.1 / Chroma LoRA file formats: sd-scripts' (kohya) and ai-toolkit's / diffusers' (peft).

sd-scripts (spec §g.1): ``lora_unet_<BFL module path, dots as _>`` with ``lora_down`` / ``lora_up`` /
``alpha``; the scale is alpha / rank; BFL's fused projections (double-block ``*_attn_qkv``,
single-block ``linear1`` = q, k, v and the MLP input) are one module each. CLIP-L modules are
``lora_te1_text_model_encoder_layers_<i>_...``, T5 modules ``lora_te3_...``.

ai-toolkit / diffusers: ``transformer.<diffusers module path>`` with ``lora_A`` (down) / ``lora_B``
(up) and no alpha (scale 1), q, k, v (and ``proj_mlp``) as separate modules. CLIP-L modules are
``text_encoder.text_model.encoder.layers.<i>...``; the format has no T5 modules. Files written by
diffusers may carry peft's ``lora_alpha`` in their ``lora_adapter_metadata``, and some tools write
``.alpha`` tensors: both are honoured on reading.

Everything here is size-agnostic: block indices come from the key names and split sizes from the
tensors, so pruned, full-depth and tiny models convert alike (sd-scripts hard-codes 19 / 38 blocks,
18 in its merge script, and FLUX.1's widths). The mapping is written once and used by
``convert_flux_lora.py``, ``flux_merge_lora.py`` and ``flux_minimal_inference.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from library.errors import UserError
from library.lora_names import (
    AIT_BLOCK,
    SD_SCRIPTS_PREFIXES,
    SWAPPED,
    ai_toolkit_to_sd_scripts_name,
    ait_module_name,
    bfl_module_to_sd_scripts_name,
    respelled_keys,
    sd_scripts_to_ai_toolkit_names,
)

SD_SCRIPTS = "sd-scripts"
AI_TOOLKIT = "ai-toolkit"
FORMATS = (AI_TOOLKIT, SD_SCRIPTS)
FORMAT_ALIASES = {"diffusers": AI_TOOLKIT, AI_TOOLKIT: AI_TOOLKIT, SD_SCRIPTS: SD_SCRIPTS}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig kwargs, as JSON

# key markers of adapters that are not plain LoRAs: read as one, they would be applied wrongly
_UNSUPPORTED_KINDS = {
    "oft_": "OFT (oft_* keys)",
    "hada_": "LoHa (hada_* keys)",
    "lokr_": "LoKr (lokr_* keys)",
    "dora_scale": "DoRA (dora_scale keys)",
    "lora_magnitude_vector": "DoRA (peft's lora_magnitude_vector keys)",
}


@dataclass
class LoRAWeights:
    """One LoRA module: ``delta W = (alpha / rank) * up @ down``; alpha None means scale 1."""

    down: Tensor
    up: Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if not self.alpha else float(self.alpha) / self.rank

    def delta(self) -> Tensor:
        """The weight change in fp32 (the multiplier not included)."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass
class Converted:
    """A converted state dict, the source modules the target format cannot hold, and notes."""

    state_dict: dict[str, Tensor]
    unsupported: list[str] = field(default_factory=list)
    source_format: str = SD_SCRIPTS
    fused_modules: int = 0  # fused (qkv / linear1) modules written in sd-scripts' format


def canonical_format(name: str) -> str:
    """``ai-toolkit`` / ``diffusers`` (an alias) / ``sd-scripts``; ValueError otherwise."""
    if name not in FORMAT_ALIASES:
        raise ValueError(f"unknown LoRA format {name!r}: expected one of {', '.join(FORMAT_ALIASES)}")
    return FORMAT_ALIASES[name]


def refuse_unsupported_kinds(keys: Iterable[str], source: str = "LoRA") -> None:
    """UserError naming ``source`` if any key belongs to an adapter other than a plain LoRA (DoRA,
    LoKr, LoHa, OFT), even beside LoRA modules: its LoRA keys alone would apply another change."""
    keys = list(keys)
    for marker, kind in _UNSUPPORTED_KINDS.items():
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            raise UserError(f"{source}: {kind} files are not supported; give a LoRA (lora_down/up or lora_A/B keys)")


def formats_in(keys: Iterable[str], source: str = "LoRA") -> set[str]:
    """The formats whose keys a state dict holds (``sd-scripts``, ``ai-toolkit`` or both: OneTrainer names its
    DiT modules as diffusers does and its text-encoder modules as sd-scripts does); UserError naming ``source``
    for a file of neither or of another kind of adapter."""
    keys = list(keys)
    refuse_unsupported_kinds(keys, source)
    found = set()
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        found.add(SD_SCRIPTS)
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        found.add(AI_TOOLKIT)
    if found:
        return found
    shown = ", ".join(keys[:3]) or "no tensors at all"
    raise UserError(
        f"{source}: not a LoRA in sd-scripts' format (lora_unet_*.lora_down.weight) or ai-toolkit's / "
        f"diffusers' format (transformer.*.lora_A.weight); its first keys are: {shown}"
    )


# ---- reading modules ----------------------------------------------------------------------


def checked_lora_pair(down: Tensor, up: Tensor, name: str, source: str) -> tuple[Tensor, Tensor]:
    """A module's (down, up); a pair whose ranks disagree stops with its name (it multiplies nowhere)."""
    if down.ndim < 2 or up.ndim < 2 or down.shape[0] != up.shape[1]:
        raise UserError(
            f"{source}: module {name} is damaged: its down is {tuple(down.shape)} and its up {tuple(up.shape)}, "
            "so their ranks disagree"
        )
    return down, up


def sd_scripts_modules(sd: Mapping[str, Tensor], source: str = "LoRA") -> tuple[dict[str, LoRAWeights], list[str]]:
    """The modules of an sd-scripts state dict, and the keys that belong to none."""
    modules, used = {}, set()
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up_key, alpha_key = f"{name}.lora_up.weight", f"{name}.alpha"
        if up_key not in sd:
            continue
        alpha = sd.get(alpha_key)
        alpha = None if alpha is None else float(alpha)
        modules[name] = LoRAWeights(*checked_lora_pair(sd[key], sd[up_key], name, source), alpha)
        used.update((key, up_key, alpha_key))
    return modules, [k for k in sd if k not in used]


def _peft_alphas(metadata: Mapping[str, str] | None):
    """A function (module, rank) -> alpha from diffusers' ``lora_adapter_metadata``, or None."""
    raw = (metadata or {}).get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None

    def alpha(module: str, rank: int) -> float | None:
        component, _, path = module.partition(".")
        get = lambda k: config.get(f"{component}.{k}", config.get(k))  # noqa: E731  (pipeline or model files)
        lora_alpha = get("lora_alpha")
        for pattern, value in (get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", path):
                lora_alpha = value
                break  # the first pattern that matches wins, as in peft's get_pattern_key
        if lora_alpha is None:
            return None
        # peft's scale is lora_alpha / r (or / sqrt(r) with rsLoRA); as an sd-scripts alpha: scale * rank
        return float(lora_alpha) * (rank**0.5 if get("use_rslora") else 1.0)

    return alpha


def ai_toolkit_modules(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
) -> tuple[dict[str, LoRAWeights], list[str]]:
    """The modules of an ai-toolkit / diffusers state dict (names with ``transformer.`` / ``text_encoder.``)."""
    peft_alpha = _peft_alphas(metadata)
    modules, used = {}, set()
    for key in sd:
        if not key.endswith(".lora_A.weight"):
            continue
        raw = key[: -len(".lora_A.weight")]
        up_key, alpha_key = f"{raw}.lora_B.weight", f"{raw}.alpha"
        name = ait_module_name(raw)
        if up_key not in sd or name is None:
            continue
        down, up = checked_lora_pair(sd[key], sd[up_key], raw, source)
        alpha = sd.get(alpha_key)
        if alpha is not None:
            alpha = float(alpha)
        elif peft_alpha is not None:
            alpha = peft_alpha(name, down.shape[0])
        if name in modules:  # e.g. transformer.x_embedder and a bare x_embedder: one would replace the other
            raise UserError(f"{source}: {name} is in it twice, under two spellings; keep one of them")
        modules[name] = LoRAWeights(down, up, alpha)
        used.update((key, up_key, alpha_key))
    return modules, [k for k in sd if k not in used]


# ---- conversion ---------------------------------------------------------------------------


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _mlp_hidden_hint(modules: Mapping[str, LoRAWeights]) -> int | None:
    """The MLP width, read from any MLP module of a diffusers LoRA (for a linear1 without proj_mlp)."""
    for name, w in modules.items():
        if name.endswith(("ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp")):
            return w.up.shape[0]
        if name.endswith(("ff.net.2", "ff_context.net.2")):
            return w.down.shape[1]
        if AIT_BLOCK.match(name) and name.endswith(".proj_out"):
            return w.down.shape[1] - w.up.shape[0]
    return None


def _fuse(parts: dict[int, LoRAWeights], n: int, mlp_hidden: int | None, name: str, source: str) -> LoRAWeights:
    """The sd-scripts module ``name`` from the parts of a fused projection (missing parts stay zero).

    down = concatenated downs, up = block-diagonal of the ups each times its part's scale, and
    alpha = the total rank (scale 1): the same weight change, part by part. Parts of other input widths,
    or a q, k or v part whose output is not that width, stop naming ``source`` and the module.
    """
    any_part = next(iter(parts.values()))
    hidden = any_part.down.shape[1]
    part_names = sd_scripts_to_ai_toolkit_names(name)
    if any(w.down.shape[1] != hidden or (i < 3 and w.up.shape[0] != hidden) for i, w in parts.items()):
        shapes = ", ".join(f"{part_names[i]} {w.down.shape[1]} -> {w.up.shape[0]}" for i, w in sorted(parts.items()))
        raise UserError(
            f"{source}: module {name} is damaged: its parts are {shapes} (inputs -> outputs), but they must share one "
            "input width and q, k, v must give out as many as they take in"
        )
    outs = [hidden] * 3 + ([mlp_hidden or 4 * hidden] if n == 4 else [])
    for i, w in parts.items():
        outs[i] = w.up.shape[0]
    order = sorted(parts)
    down = torch.cat([parts[i].down for i in order], dim=0)
    up = torch.zeros(sum(outs), down.shape[0], dtype=any_part.up.dtype, device=any_part.up.device)
    column = 0
    for i in order:
        w = parts[i]
        row = sum(outs[:i])
        block = w.up if w.scale == 1.0 else (w.up.float() * w.scale).to(w.up.dtype)
        up[row : row + outs[i], column : column + w.rank] = block
        column += w.rank
    return LoRAWeights(down, up, float(down.shape[0]))


def to_sd_scripts(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
) -> Converted:
    """Any supported LoRA state dict in sd-scripts' format (unchanged if it already is).

    A plain module keeps its weights; its alpha is the file's, or the rank (scale 1). The parts of
    a fused projection become one module (see :func:`_fuse`); parts a file lacks stay zero.
    """
    sd = respelled_keys(sd, source)
    if AI_TOOLKIT not in formats_in(sd.keys(), source):
        return Converted(sd, source_format=SD_SCRIPTS)
    modules, leftover = ai_toolkit_modules(sd, metadata, source)
    groups: dict[str, tuple[int, dict[int, LoRAWeights]]] = {}
    # sd-scripts' own modules beside diffusers' (OneTrainer names text-encoder modules as sd-scripts does)
    native = {k: sd[k] for k in leftover if k.startswith(SD_SCRIPTS_PREFIXES)}
    out: dict[str, Tensor] = dict(native)
    unsupported = [k for k in leftover if k not in native]
    for name, w in modules.items():
        target = ai_toolkit_to_sd_scripts_name(name)
        if target is None and (sds_name := bfl_module_to_sd_scripts_name(name)):
            _refuse_twice(out, sds_name, name, source)
            out[f"{sds_name}.lora_down.weight"], out[f"{sds_name}.lora_up.weight"] = w.down, w.up
            out[f"{sds_name}.alpha"] = torch.tensor(w.alpha or float(w.rank), dtype=torch.float32, device="cpu")
            continue
        if target is None:
            unsupported.append(name)
            continue
        sds_name, index, n = target
        parts = groups.setdefault(sds_name, (n, {}))[1]
        if index in parts:  # text_encoder.text_model.encoder... and text_encoder.encoder...: one module
            raise UserError(f"{source}: {name} is in it twice, under two spellings; keep one of them")
        parts[index] = w
    mlp_hidden = _mlp_hidden_hint(modules)
    fused = 0
    for sds_name, (n, parts) in groups.items():
        if n == 1:
            w = parts[0]
            up = _swap_halves(w.up) if sds_name[len("lora_unet_") :] in SWAPPED else w.up
            w = LoRAWeights(w.down, up, w.alpha if w.alpha else float(w.rank))
        else:
            w = _fuse(parts, n, mlp_hidden, sds_name, source)
            fused += 1
        _refuse_twice(out, sds_name, " / ".join(sd_scripts_to_ai_toolkit_names(sds_name)), source)
        out[f"{sds_name}.lora_down.weight"] = w.down
        out[f"{sds_name}.lora_up.weight"] = w.up
        out[f"{sds_name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32, device="cpu")
    if not out:
        halves = [k for k in sd if k.endswith(".lora_A.weight") and k.replace(".lora_A.", ".lora_B.") not in sd]
        if halves:  # not "no FLUX module": the module is one, its lora_B is missing
            raise UserError(f"{source}: {halves[0]} has no lora_B beside it; the file is incomplete")
        raise UserError(
            f"{source}: none of its {sum(k.endswith('.lora_A.weight') for k in sd)} LoRA modules "
            f"(e.g. {next(iter(unsupported), 'none')}) is a "
            "FLUX.1 / Chroma module in diffusers' or BFL's naming"
        )
    source_format = f"{AI_TOOLKIT} and {SD_SCRIPTS}" if native else AI_TOOLKIT
    return Converted(out, sorted(unsupported), source_format, fused)


def _refuse_twice(out: Mapping[str, Tensor], sds_name: str, other_name: str, source: str) -> None:
    """A module a file holds in both namings (sd-scripts' and another): one would silently replace the other."""
    if f"{sds_name}.lora_down.weight" in out:
        raise UserError(f"{source}: {sds_name} and {other_name} are one module in two namings; keep one of them")


def _fold_scale(scale: float) -> tuple[float, float]:
    """sd-scripts' split of alpha / rank between down and up (their product is the scale). The split is of
    its size: a negative alpha's sign goes to down (sd-scripts' loop never ends on a negative scale)."""
    scale_down, scale_up = abs(scale), 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return (-scale_down if scale < 0 else scale_down), scale_up


def _times(t: Tensor, factor: float) -> Tensor:
    return t if factor == 1.0 else (t.float() * factor).to(t.dtype)


def _diagonal_blocks(up: Tensor, outs: list[int]) -> list[tuple[int, int]] | None:
    """Column range of each row block if ``up`` is block-diagonal in order ((0, 0) for an all-zero block)."""
    ranges, column, row = [], 0, 0
    for out in outs:
        used = up[row : row + out].ne(0).any(dim=0).nonzero().flatten()
        row += out
        if used.numel() == 0:
            ranges.append((column, column))
            continue
        start, end = int(used[0]), int(used[-1]) + 1
        if start < column:
            return None
        ranges.append((start, end))
        column = end
    if column != up.shape[1]:
        return None
    # blocks that tile the columns split the rank exactly (sd-scripts' split_qkv layout); otherwise the module
    # is split the other way, which reproduces the product too
    covered = sum(end - start for start, end in ranges)
    return ranges if covered == up.shape[1] else None


def _split_fused(w: LoRAWeights, name: str, names: tuple[str, ...], source: str) -> dict[str, tuple[Tensor, Tensor]]:
    """(A, B) per diffusers part of the fused sd-scripts module ``name``, scale folded in; a module whose
    output is not q, k, v (and an MLP input) of its input width stops naming ``source`` and the module."""
    hidden, rows = w.down.shape[1], w.up.shape[0]
    if len(names) == 4 and rows <= 3 * hidden:
        raise UserError(
            f"{source}: module {name} is damaged: its up has {rows} rows, but a linear1 of input width {hidden} "
            f"has more than {3 * hidden} (q, k, v of {hidden} each and the MLP input)"
        )
    if len(names) == 3 and rows != 3 * hidden:
        raise UserError(
            f"{source}: module {name} is damaged: its up has {rows} rows, but a q, k, v projection of input width "
            f"{hidden} has {3 * hidden} ({hidden} each)"
        )
    outs = [hidden] * 3 + ([rows - 3 * hidden] if len(names) == 4 else [])
    scale_down, scale_up = _fold_scale(w.scale)
    down, up = _times(w.down, scale_down), _times(w.up, scale_up)
    ranges = _diagonal_blocks(w.up, outs)
    result, row = {}, 0
    for i, name in enumerate(names):
        rows = up[row : row + outs[i]]
        row += outs[i]
        if ranges is None:  # a plain LoRA on the fused Linear: every part gets the whole down
            result[name] = (down.clone(), rows.clone())
        elif ranges[i][1] > ranges[i][0]:  # split_qkv-style: each part has its own ranks
            start, end = ranges[i]
            result[name] = (down[start:end].clone(), rows[:, start:end].clone())  # no shared storage in files
    return result


def to_ai_toolkit(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
) -> Converted:
    """Any supported LoRA state dict in ai-toolkit's / diffusers' format (scale folded into the weights).

    sd-scripts modules with no diffusers counterpart (T5 ``lora_te3_*``, unknown names) are
    returned in ``unsupported``.
    """
    sd = respelled_keys(sd, source)
    formats = formats_in(sd.keys(), source)
    if SD_SCRIPTS not in formats:
        return Converted(sd, source_format=AI_TOOLKIT)
    unsupported = []
    if AI_TOOLKIT in formats:  # both: into one naming first
        first = to_sd_scripts(sd, metadata, source)
        sd, unsupported = first.state_dict, list(first.unsupported)
    modules, leftover = sd_scripts_modules(sd, source)
    out: dict[str, Tensor] = {}
    unsupported += leftover
    for name, w in modules.items():
        names = sd_scripts_to_ai_toolkit_names(name)
        if names is None:
            unsupported.append(name)
            continue
        if len(names) == 1:
            scale_down, scale_up = _fold_scale(w.scale)
            up = _swap_halves(w.up) if name[len("lora_unet_") :] in SWAPPED else w.up
            pairs = {names[0]: (_times(w.down, scale_down), _times(up, scale_up))}
        else:
            pairs = _split_fused(w, name, names, source)
        for part, (a, b) in pairs.items():
            out[f"{part}.lora_A.weight"] = a
            out[f"{part}.lora_B.weight"] = b
    return Converted(out, sorted(unsupported), SD_SCRIPTS)


def merge_identical_downs(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undoes the copy of one down into every part: a fused module whose parts all share one down
    (a plain LoRA on qkv / linear1 that went through ai-toolkit's format) gets its original shape back.
    """
    modules, _ = sd_scripts_modules(sd)
    for name, w in modules.items():
        names = sd_scripts_to_ai_toolkit_names(name)
        if names is None or len(names) == 1 or w.rank % len(names):
            continue
        downs = w.down.chunk(len(names), dim=0)
        if not all(torch.equal(d, downs[0]) for d in downs[1:]):
            continue
        r = downs[0].shape[0]
        hidden = w.down.shape[1]
        outs = [hidden] * 3 + ([w.up.shape[0] - 3 * hidden] if len(names) == 4 else [])
        ranges = _diagonal_blocks(w.up, outs)
        if ranges is None or any(end - start != r for start, end in ranges):
            continue
        up = torch.cat([w.up[sum(outs[:i]) : sum(outs[: i + 1]), s:e] for i, (s, e) in enumerate(ranges)], dim=0)
        sd[f"{name}.lora_down.weight"] = downs[0].contiguous()
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(float(w.alpha or w.rank) / len(names), dtype=torch.float32, device="cpu")
    return sd


def convert(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None, src: str, dst: str, source: str = "LoRA"
) -> Converted:
    """Converts between formats; the file's real format must be ``src``."""
    src, dst = canonical_format(src), canonical_format(dst)
    sd = respelled_keys(sd, source)
    found = formats_in(sd.keys(), source)
    if src not in found:
        (other,) = found
        raise UserError(f"{source} is in {other}'s format, not {src}'s: pass --src {other}")
    if dst == SD_SCRIPTS:
        converted = to_sd_scripts(sd, metadata, source)
        converted.state_dict = merge_identical_downs(converted.state_dict)
        return converted
    return to_ai_toolkit(sd, metadata, source)
