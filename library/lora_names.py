"""Names of FLUX.1 / Chroma LoRA modules in each tool's spelling: sd-scripts' (``lora_unet_double_blocks_0_
img_attn_qkv``), diffusers' / ai-toolkit's (``transformer.transformer_blocks.0.attn.to_q``), BFL's module
paths (ComfyUI), and the respellings other tools write (peft's ``base_model.model.``, OneTrainer's
``lora_transformer_*`` and ``lora_transformer.*`` (OMI), ComfyUI's ``lora_down`` on module paths).
:mod:`library.lora_formats` reads and converts the weights by these names."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from library.errors import UserError

# sd-scripts module suffix -> the diffusers module(s) it covers, in BFL's concatenation order
DOUBLE_MODULES = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_MODULES = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
# conditioning layers (in_dims) and the final layer; diffusers stores norm_out as (scale, shift)
GLOBAL_MODULES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
SWAPPED = {"final_layer_adaLN_modulation_1"}
CLIP_MODULES = {
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
}

_SDS_BLOCK = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(.+)$")
_SDS_CLIP = re.compile(r"^lora_te1_text_model_encoder_layers_(\d+)_(.+)$")
AIT_BLOCK = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_AIT_CLIP = re.compile(r"^text_encoder\.(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_AIT_PREFIXES = (
    ("transformer.", "transformer."),
    ("diffusion_model.", "transformer."),
    ("text_encoder.", "text_encoder."),
)
_AIT_BARE = (
    "transformer_blocks.", "single_transformer_blocks.", *(f"{v}." for v in GLOBAL_MODULES.values()),
    # BFL's own module paths, as ComfyUI-style peft files name them (diffusion_model.double_blocks.0.img_attn.qkv)
    "double_blocks.", "single_blocks.", "final_layer.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
)  # fmt: skip
SD_SCRIPTS_PREFIXES = ("lora_unet_", "lora_te")
_PEFT_MODEL_PREFIX = "base_model.model."  # peft's own adapter files (adapter_model.safetensors)
_ONETRAINER_DIT_PREFIX = "lora_transformer_"  # diffusers module paths with "_" for "." (OneTrainer)
# OneTrainer's OMI format: BFL module paths under lora_transformer. (transformer. in later versions), a fused
# projection's parts numbered (qkv.0-2: q, k, v; linear1.0-3: q, k, v, MLP input), x_embedder as img_in.proj;
# CLIP-L's and T5's module paths under lora_clip_l. / clip_l. and lora_t5. / t5.
_OMI_PREFIXES = (("lora_transformer.", "transformer."), ("lora_clip_l.", "text_encoder."), ("clip_l.", "text_encoder."))
_OMI_NUMBERED_PART = re.compile(r"^transformer\.(double|single)_blocks\.(\d+)\.((?:img|txt)_attn\.qkv|linear1)\.(\d+)$")
_OMI_T5_PREFIXES = ("lora_t5.", "t5.")
_T5_MODULE = re.compile(r"^encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_[01]|wo))$")
# OneTrainer's legacy names of T5 modules: lora_te2_ (FLUX.1, where CLIP-L is lora_te1_) and lora_te_ (Chroma);
# sd-scripts' are lora_te3_. encoder_block_ is T5's own path (CLIP's are text_model_encoder_layers_, SDXL's CLIP-G
# lora_te2_ ones too), so these names are T5 modules whichever tool wrote them.
_ONETRAINER_T5_PREFIXES = ("lora_te2_encoder_block_", "lora_te_encoder_block_")
_SD_SCRIPTS_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
_RESPELLED_SUFFIXES = {
    ".lora_down.weight": ".lora_A.weight",
    ".lora_up.weight": ".lora_B.weight",
    ".lora_A.weight": ".lora_A.weight",
    ".lora_B.weight": ".lora_B.weight",
    ".alpha": ".alpha",
}
_DIFFUSERS_BLOCK_UNDERSCORED = re.compile(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$")
# diffusers module paths with "_" for "." -> the paths (OneTrainer's names)
_UNDERSCORED_PARTS = {
    block: {p.replace(".", "_"): p for names in table.values() for p in names}
    for block, table in (("transformer_blocks", DOUBLE_MODULES), ("single_transformer_blocks", SINGLE_MODULES))
}
_UNDERSCORED_GLOBALS = {v.replace(".", "_"): v for v in GLOBAL_MODULES.values()}


def _diffusers_path(underscored: str) -> str | None:
    """``transformer_blocks_0_attn_to_q`` -> ``transformer_blocks.0.attn.to_q`` (a FLUX module), or None."""
    if m := _DIFFUSERS_BLOCK_UNDERSCORED.match(underscored):
        block, index, part = m.groups()
        path = _UNDERSCORED_PARTS[block].get(part)
        return f"{block}.{index}.{path}" if path else None
    return _UNDERSCORED_GLOBALS.get(underscored)


def _sd_scripts_t5_name(module: str) -> str | None:
    """sd-scripts' name of a T5 module OneTrainer names ``lora_t5.encoder.block.0.layer.0.SelfAttention.q``
    (OMI) or ``lora_te2_encoder_block_0_layer_0_SelfAttention_q`` (legacy), or None for any other module."""
    for prefix in _OMI_T5_PREFIXES:
        if module.startswith(prefix) and _T5_MODULE.match(module[len(prefix) :]):
            return "lora_te3_" + module[len(prefix) :].replace(".", "_")
    prefix = next((p for p in _ONETRAINER_T5_PREFIXES if module.startswith(p)), None)
    return "lora_te3_encoder_block_" + module[len(prefix) :] if prefix else None


def _omi_dit_module(module: str) -> str | None:
    """A DiT module of OneTrainer's OMI naming (``transformer.double_blocks.0.img_attn.qkv.1``, ``transformer.img_in.
    proj``) as the diffusers part or BFL module it is; None for a numbered part FLUX has not; others unchanged."""
    if module == "transformer.img_in.proj":
        return "transformer.img_in"
    if not (m := _OMI_NUMBERED_PART.match(module)):
        return module
    kind, index, fused, part = m.groups()
    parts = sd_scripts_to_ai_toolkit_names(f"lora_unet_{kind}_blocks_{index}_{fused.replace('.', '_')}")
    return parts[int(part)] if parts and int(part) < len(parts) else None


def respelled_key(key: str) -> str:
    """One key of another tool's spelling of the two formats, in ai-toolkit's spelling (a T5 module's in
    sd-scripts', which has the only T5 naming); others unchanged."""
    suffix = next((s for s in _RESPELLED_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return key
    module = key[: -len(suffix)]
    if t5 := _sd_scripts_t5_name(module):
        return t5 + _SD_SCRIPTS_SUFFIXES.get(suffix, suffix)
    if omi := next((p for p in _OMI_PREFIXES if module.startswith(p[0])), None):
        module = omi[1] + module[len(omi[0]) :]
    elif module.startswith(_PEFT_MODEL_PREFIX):
        module = module[len(_PEFT_MODEL_PREFIX) :]
    elif module.startswith(_ONETRAINER_DIT_PREFIX):
        path = _diffusers_path(module[len(_ONETRAINER_DIT_PREFIX) :])
        if path is None:
            return key
        module = "transformer." + path
    elif "." not in module:
        return key  # sd-scripts' names (lora_unet_*, lora_te1_*) have no dots
    # only a module the reader knows is renamed (to its canonical name): an unknown one keeps its own key
    canonical = ait_module_name(module)
    canonical = _omi_dit_module(canonical) if canonical else None
    return canonical + _RESPELLED_SUFFIXES[suffix] if canonical else key


def respelled_keys(sd: Mapping[str, Tensor], source: str = "LoRA") -> dict[str, Tensor]:
    """A state dict with other tools' spellings of the two formats renamed to ai-toolkit's, so one reader
    serves them: peft's ``base_model.model.`` prefix, ``lora_down`` / ``lora_up`` on module paths
    (ComfyUI's extracted LoRAs: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight``), and
    OneTrainer's: ``lora_transformer_<diffusers path with _>`` and T5's ``lora_te2_`` (legacy), BFL paths with
    numbered parts (OMI; :data:`_OMI_PREFIXES`). sd-scripts' names are left as they are; two keys that name
    one tensor stop with a UserError naming ``source``."""
    out, spelled = {}, {}
    for key, value in sd.items():
        new = respelled_key(key)
        if new in out:
            raise UserError(f"{source}: {spelled[new]} and {key} are one tensor ({new}) in two spellings; "
                            "keep one of them")  # fmt: skip
        out[new], spelled[new] = value, key
    return out


def ait_module_name(module: str) -> str | None:
    """A diffusers-style module path under its canonical component prefix (``transformer.*`` for the DiT,
    ``diffusion_model.*`` and bare paths included; ``text_encoder.*``), or None for any other."""
    for prefix, canonical in _AIT_PREFIXES:
        if module.startswith(prefix):
            return canonical + module[len(prefix) :]
    if (module + ".").startswith(_AIT_BARE):  # the prefixes end in "." and a module may be one ("img_in")
        return "transformer." + module
    return None


# ---- names --------------------------------------------------------------------------------


def sd_scripts_to_ai_toolkit_names(name: str) -> tuple[str, ...] | None:
    """The diffusers module(s) an sd-scripts module covers (several for fused ones), or None."""
    if m := _SDS_BLOCK.match(name):
        kind, index, suffix = m.groups()
        double = kind == "double"
        table = DOUBLE_MODULES if double else SINGLE_MODULES
        block = "transformer_blocks" if double else "single_transformer_blocks"
        if suffix in table:
            return tuple(f"transformer.{block}.{index}.{part}" for part in table[suffix])
        return None
    if name.startswith("lora_unet_") and name[len("lora_unet_") :] in GLOBAL_MODULES:
        return (f"transformer.{GLOBAL_MODULES[name[len('lora_unet_') :]]}",)
    if (m := _SDS_CLIP.match(name)) and m.group(2) in CLIP_MODULES:
        return (f"text_encoder.text_model.encoder.layers.{m.group(1)}.{CLIP_MODULES[m.group(2)]}",)
    return None


def _reverse(table: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, int, int]]:
    return {part: (suffix, i, len(parts)) for suffix, parts in table.items() for i, part in enumerate(parts)}


_DOUBLE_REVERSE = _reverse(DOUBLE_MODULES)
_SINGLE_REVERSE = _reverse(SINGLE_MODULES)
_GLOBAL_REVERSE = {v: k for k, v in GLOBAL_MODULES.items()}
_CLIP_REVERSE = {v: k for k, v in CLIP_MODULES.items()}


def ai_toolkit_to_sd_scripts_name(module: str) -> tuple[str, int, int] | None:
    """(sd-scripts module, part index, number of parts) of a diffusers module, or None."""
    if m := AIT_BLOCK.match(module):
        block, index, part = m.groups()
        double = block == "transformer_blocks"
        found = (_DOUBLE_REVERSE if double else _SINGLE_REVERSE).get(part)
        if found is None:
            return None
        suffix, i, n = found
        return f"lora_unet_{'double' if double else 'single'}_blocks_{index}_{suffix}", i, n
    if module.startswith("transformer.") and module[len("transformer.") :] in _GLOBAL_REVERSE:
        return f"lora_unet_{_GLOBAL_REVERSE[module[len('transformer.') :]]}", 0, 1
    if (m := _AIT_CLIP.match(module)) and m.group(2) in _CLIP_REVERSE:
        return f"lora_te1_text_model_encoder_layers_{m.group(1)}_{_CLIP_REVERSE[m.group(2)]}", 0, 1
    return None


def bfl_module_to_sd_scripts_name(module: str) -> str | None:
    """The sd-scripts module of a peft module named by BFL's path (``transformer.double_blocks.0.img_attn.qkv``,
    read from ``diffusion_model.*`` keys), or None. Its weights already have sd-scripts' layout."""
    if not module.startswith("transformer."):
        return None
    name = "lora_unet_" + module[len("transformer.") :].replace(".", "_")
    return name if sd_scripts_to_ai_toolkit_names(name) is not None else None
