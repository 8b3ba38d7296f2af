"""Which Linears of FLUX / Chroma and the text encoders get a LoRA, under which name, at which rank.

The names are sd-scripts' (spec §g.1): ``lora_unet_`` / ``lora_te1_`` / ``lora_te3_`` plus the
module path with dots as underscores, and CLIP-L paths as transformers 4 spelled them. The rank
rules are spec §g.3–§g.6: a file's ranks, else the last matching ``network_reg_dims`` pattern,
else the type dim or in_dims position, else ``network_dim``; block selections zero out the rest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from library.errors import UserError
from networks.lora_flux_args import TYPE_DIM_KEYS, last_match

logger = logging.getLogger(__name__)

# Substrings a module name must all contain for the type dim at the same position (spec §g.3).
TYPE_IDENTIFIERS = (
    ("img_attn",),
    ("txt_attn",),
    ("img_mlp",),
    ("txt_mlp",),
    ("img_mod",),
    ("txt_mod",),
    ("single_blocks", "linear"),
    ("modulation",),
)
# in_dims positions: img_in, time_in, vector_in, guidance_in, txt_in
IN_LAYERS = (
    ("img_in", ("img_in",)),
    ("time_in", ("time_in.in_layer", "time_in.out_layer")),
    ("vector_in", ("vector_in.in_layer", "vector_in.out_layer")),
    ("guidance_in", ("guidance_in.in_layer", "guidance_in.out_layer")),
    ("txt_in", ("txt_in",)),
)
# Linears no network of ours creates, but other trainers' LoRAs (ai-toolkit's proj_out, norm_out.linear)
# adapt: created when a file has them, so that every tool applies the same modules
FINAL_LAYERS = ("final_layer.linear", "final_layer.adaLN_modulation.1")

_BLOCK_INDEX = re.compile(r"_(double|single)_blocks_(\d+)_")
_SPLIT_TARGET = re.compile(r"_double_blocks_\d+_(img|txt)_attn_qkv$|_single_blocks_\d+_linear1$")


def lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def text_encoder_targets(
    text_encoder: nn.Module, prefix: str, class_names: Sequence[str], clip: bool
) -> Iterator[tuple[str, nn.Linear]]:
    """(name, Linear) of every Linear inside a module whose class is one of ``class_names``."""
    for name, module in text_encoder.named_modules():
        if type(module).__name__ not in class_names:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, nn.Linear):
                path = f"{name}.{child_name}"
                yield lora_name(prefix, clip_file_path(path) if clip else path), child


def dit_targets(
    unet: nn.Module,
    prefix: str,
    block_classes: dict[str, Sequence[str]],
    kinds: Sequence[str],
    in_dims: Sequence[int] | None,
    all_in_layers: bool = False,
) -> Iterator[tuple[str, nn.Linear, str | int]]:
    """(name, Linear, kind) of the DiT's candidates: kind is "double" or "single" for the Linears
    of those blocks (when in ``kinds``), or the in_dims position of a conditioning layer (when
    ``in_dims`` is given, or every one with ``all_in_layers``), or "final" for the final layer's
    Linears (with ``all_in_layers`` only: a file's modules)."""
    for name, module in unet.named_modules():
        cls = type(module).__name__
        kind = next((k for k, classes in block_classes.items() if cls in classes), None)
        if kind not in kinds:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, nn.Linear):
                yield lora_name(prefix, f"{name}.{child_name}"), child, kind
    if not (all_in_layers or in_dims):
        return
    for position, (layer, paths) in enumerate(IN_LAYERS):
        linears = [(path, get_submodule(unet, path)) for path in paths]
        linears = [(path, linear) for path, linear in linears if isinstance(linear, nn.Linear)]
        if not linears and not all_in_layers and in_dims[position]:
            logger.warning(f"in_dims: this model has no {layer} layer; its rank {in_dims[position]} is ignored")
        for path, linear in linears:
            yield lora_name(prefix, path), linear, position
    if all_in_layers:
        for path in FINAL_LAYERS:
            if isinstance(linear := get_submodule(unet, path), nn.Linear):
                yield lora_name(prefix, path), linear, "final"


def warn_type_dims_without_layers(unet: nn.Module, type_dims: Sequence[int | None]) -> None:
    """One warning per type dim (``img_mod_dim=4``, ...) that names layers this model lacks: Chroma has no
    modulation Linears, so its ``*_mod_dim`` would otherwise change nothing in silence."""
    paths = [name for name, module in unet.named_modules() if isinstance(module, nn.Linear)]
    for key, identifiers, dim in zip(TYPE_DIM_KEYS, TYPE_IDENTIFIERS, type_dims, strict=True):
        if dim is not None and not any(all(i in path for i in identifiers) for path in paths):
            logger.warning(f"{key}: this model has no {' '.join(identifiers)} layers; its rank {dim} is ignored")


@dataclass
class RankRules:
    """The (rank, alpha) of a candidate module; rank 0 means no LoRA (spec §g.3–§g.6)."""

    lora_dim: int
    alpha: float | Tensor | None
    reg_dims: list[tuple[re.Pattern, float]] | None = None
    type_dims: list[int | None] | None = None
    in_dims: list[int] | None = None
    train_double_block_indices: list[bool] | None = None
    train_single_block_indices: list[bool] | None = None
    modules_dim: dict[str, int] | None = None  # a file's ranks decide everything
    modules_alpha: dict[str, Tensor | float] = field(default_factory=dict)

    def rank(self, name: str, kind: str | int) -> tuple[int, Tensor | float | None]:
        if self.modules_dim is not None:
            return self.modules_dim.get(name, 0), self.modules_alpha.get(name)
        if self.reg_dims and (match := last_match(self.reg_dims, name)) is not None:
            return match[1], self.alpha
        dim = self.in_dims[kind] if isinstance(kind, int) else self.lora_dim
        if kind in ("double", "single"):
            if self.type_dims is not None:
                for identifiers, type_dim in zip(TYPE_IDENTIFIERS, self.type_dims, strict=True):
                    if type_dim is not None and all(i in name for i in identifiers):
                        dim = type_dim
                        break
            selection = self.train_double_block_indices if kind == "double" else self.train_single_block_indices
            if dim and selection is not None and not selection[int(_BLOCK_INDEX.search(name).group(2))]:
                dim = 0
        return dim, self.alpha


def is_split_target(name: str) -> bool:
    """Whether ``split_qkv`` splits this module: a fused q, k, v projection (with the MLP input in single blocks)."""
    return _SPLIT_TARGET.search(name) is not None


def split_parts(name: str) -> int:
    """How many LoRAs ``split_qkv`` trains in a split target: q, k, v, and the MLP input in single blocks."""
    return 3 if "_double_blocks_" in name else 4


def split_dims(name: str, linear: nn.Linear) -> list[int] | None:
    """The output chunks ``split_qkv`` gives a fused Linear: q, k, v (and the single block's MLP input)."""
    if not is_split_target(name):
        return None
    hidden = linear.in_features
    return [hidden] * 3 + ([linear.out_features - 3 * hidden] if name.endswith("linear1") else [])


def check_block_selection(unet: nn.Module, double: list[bool] | None, single: list[bool] | None) -> None:
    for key, selection, blocks in (
        ("train_double_block_indices", double, getattr(unet, "double_blocks", ())),
        ("train_single_block_indices", single, getattr(unet, "single_blocks", ())),
    ):
        if selection is not None and len(selection) != len(blocks):
            raise UserError(f"{key}: {len(selection)} flags given for a model with {len(blocks)} blocks")


def compile_patterns(pairs, key: str) -> list[tuple[re.Pattern, float]] | None:
    """``network_reg_dims`` / ``network_reg_lrs`` pairs with their patterns compiled (errors name the arg)."""
    if not pairs:
        return None
    items = pairs.items() if isinstance(pairs, dict) else pairs
    compiled = []
    for pattern, value in items:
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as e:
            raise UserError(f"--network_args {key}: {pattern!r} is not a valid regular expression ({e})") from None
    return compiled


def clip_file_path(path: str) -> str:
    # transformers 5's CLIPTextModel has no `text_model` level; the names other tools load do
    m = re.search(r"(?:^|\.)(encoder\.layers\.\d+\..*)$", path)
    return "text_model." + m.group(1) if m else path


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
