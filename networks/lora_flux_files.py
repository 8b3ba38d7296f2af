"""LoRA files: reading ``.safetensors`` / ``.pt`` / ``.ckpt`` LoRAs and writing them atomically with
metadata, ModelSpec and sd-scripts' hashes; and the split_qkv alpha convention recorded in them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from library.errors import CheckpointError, UserError
from library.lora_formats import PEFT_METADATA_KEY
from library.lora_names import respelled_key
from library.model_hashes import build_modelspec, precalculate_safetensors_hashes
from library.safetensors_io import (
    load_safetensors,
    read_header,
    read_keys,
    read_metadata,
    replace_file,
    save_safetensors,
    write_torch_file,
)
from networks.lora_flux_targets import is_split_target, split_parts

logger = logging.getLogger(__name__)
PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"  # peft's save_pretrained
SPLIT_QKV_METADATA_KEY = "ss_split_qkv_convention"
SPLIT_QKV_CONVENTION = "fused_alpha_x_splits"  # fused alpha = per-chunk alpha x number of chunks
BASE_MODEL_VERSIONS = ("flux1", "chroma")  # ss_base_model_version of FLUX.1 (dev, schnell) and Chroma LoRAs


def read_lora_file(file: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict, metadata) of a ``.safetensors`` LoRA, or of a ``.pt`` / ``.ckpt`` one (no metadata).

    An sd-scripts split_qkv file comes back as this project writes one (:func:`with_trained_split_alpha`),
    so every tool here applies the strength it was trained at."""
    if os.path.isdir(file):
        raise CheckpointError(f"{file}: a folder; give the LoRA file in it (a peft adapter's is {PEFT_ADAPTER_FILE})")
    if str(file).endswith(".safetensors"):
        state_dict = with_scalar_alphas(load_safetensors(file))
        return with_trained_split_alpha(state_dict, with_peft_config(file, read_metadata(file)))
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: file not found")
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of anything else, a truncated file, or no torch file at all
        raise CheckpointError(
            f"{file}: not a LoRA file: neither .safetensors nor a state dict saved by torch ({e})"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{file}: holds a {type(state_dict).__name__}, not a LoRA state dict of tensors")
    return with_scalar_alphas(state_dict), {}


def with_scalar_alphas(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Alphas saved as one-element tensors (shape [1], as some tools write them) as the 0-dim tensors a network
    holds: loaders read an alpha as a number (ComfyUI's ``.item()``), so such files are valid."""
    return {k: v.reshape(()) if k.endswith(".alpha") and v.dim() and v.numel() == 1 else v
            for k, v in state_dict.items()}  # fmt: skip


def read_lora_file_as_sd_scripts(file: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """:func:`read_lora_file`, in sd-scripts' naming whatever the file's (ai-toolkit / diffusers, ComfyUI,
    OneTrainer, peft): what the trainer's own network reads. Modules without an sd-scripts name are warned
    about and left out."""
    from library.lora_formats import to_sd_scripts

    state_dict, metadata = read_lora_file(file)
    converted = to_sd_scripts(state_dict, metadata, str(file))
    if converted.unsupported:
        logger.warning("%s: left out, as no FLUX.1 / Chroma LoRA module: %s", file, ", ".join(converted.unsupported))
    return converted.state_dict, metadata


def with_peft_config(file: str | os.PathLike, metadata: dict[str, str]) -> dict[str, str]:
    """A peft adapter's metadata with its ``adapter_config.json`` (lora_alpha, alpha_pattern, rsLoRA) added, as
    diffusers records the same settings inside its files; a file without such a config beside it is unchanged."""
    config = Path(file).with_name(PEFT_CONFIG_FILE)
    if Path(file).name != PEFT_ADAPTER_FILE or PEFT_METADATA_KEY in metadata or not config.is_file():
        return metadata
    try:
        text = config.read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config}: the peft adapter's config cannot be read ({e})") from None
    return {**metadata, PEFT_METADATA_KEY: text}


def base_model_version(model_type: str | None) -> str:
    """``ss_base_model_version`` of a model type (``dev``, ``schnell``, ``flux`` or ``chroma``)."""
    return "chroma" if model_type == "chroma" else "flux1"


def warn_if_made_for_another_model(file: str | os.PathLike, flag: str, version: str, metadata=None) -> None:
    """A LoRA of the other base model (a Chroma LoRA on FLUX.1, or the reverse) loads wherever its module names
    match and changes the model by what was learnt for other activations: says so, naming ``flag``. Files
    that record no version, or one of another family, are left alone."""
    if metadata is None:
        metadata = read_metadata(file) if str(file).endswith(".safetensors") else {}
    made_for = metadata.get("ss_base_model_version")
    if made_for in BASE_MODEL_VERSIONS and made_for != version:
        logger.warning("%s %s was trained on %s (ss_base_model_version), and this model is %s", flag, file,
                       made_for, version)  # fmt: skip


def check_lora_file(file: str | os.PathLike, flag: str) -> None:
    """Stops, naming ``flag`` and the file, when ``file`` cannot be read as a LoRA: the header of a
    ``.safetensors`` file is read, a ``.pt`` / ``.ckpt`` one (a pickle has no header) loaded."""
    try:
        if str(file).endswith(".safetensors"):
            read_header(file)
        else:
            read_lora_file(file)
    except CheckpointError as e:
        raise CheckpointError(f"{flag} {e}") from None


DIT_KEYS = ("lora_unet", "transformer.")  # a DiT module's key, in sd-scripts' and in diffusers' naming
TEXT_ENCODER_KEYS = ("lora_te", "text_encoder.")


def lora_files_have_modules(paths, prefixes: str | tuple[str, ...]) -> bool:
    """Whether any LoRA among ``paths`` has a key starting with one of ``prefixes`` (as :func:`lora_file_keys`)."""
    return any(k.startswith(prefixes) for k in lora_file_keys(paths))


def lora_file_keys(paths) -> list[str]:
    """The keys of the LoRA files ``paths``, other tools' spellings in diffusers' (``diffusion_model.*``,
    ``lora_transformer_*`` are ``transformer.*`` keys): a ``.safetensors`` file's header is read, a ``.pt``
    / ``.ckpt`` one (a pickle has no header; LoRAs are small) loaded."""
    return [respelled_key(k) for path in paths for k in (read_keys(path) if str(path).endswith(".safetensors")
                                                         else read_lora_file(path)[0])]  # fmt: skip


def with_trained_split_alpha(
    state_dict: dict[str, Tensor], metadata: dict[str, str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """sd-scripts' split_qkv files keep the per-part alpha on each fused module, so a plain reading
    applies 1/3 (qkv) or 1/4 (linear1) of the trained change (spec §k.7). Such a file's fused alphas
    are multiplied by the number of parts, and its metadata marked, as this project saves them; any
    other file is returned as it is."""
    if split_alpha_multiplied(metadata):
        return state_dict, metadata
    fixed = dict(state_dict)
    for key, alpha in state_dict.items():
        name = key.removesuffix(".alpha")
        if name != key and is_split_target(name):
            fixed[key] = (alpha.float() * split_parts(name)).to(alpha.dtype)
    return fixed, {**metadata, SPLIT_QKV_METADATA_KEY: SPLIT_QKV_CONVENTION}


def split_alpha_multiplied(metadata: dict[str, str]) -> bool:
    """Whether fused split_qkv modules carry alpha x chunks (ours) or the per-chunk alpha (sd-scripts')."""
    if metadata.get(SPLIT_QKV_METADATA_KEY) == SPLIT_QKV_CONVENTION:
        return True
    try:
        network_args = json.loads(metadata.get("ss_network_args", "{}")) or {}
    except json.JSONDecodeError:
        network_args = {}
    return not (isinstance(network_args, dict) and str(network_args.get("split_qkv")) == "True")


def write_lora_file(
    state_dict: dict[str, Tensor], file: str | os.PathLike, metadata: dict | None, model_type: str | None, split: bool
) -> None:
    """``.safetensors`` with the given metadata (kept verbatim, values as strings), ModelSpec defaults and
    hashes; ``.pt`` / ``.ckpt`` without metadata. Always written under a temporary name, then renamed."""
    if not str(file).endswith(".safetensors"):
        _atomic_torch_save(state_dict, file)
        return
    metadata = {k: v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    if split:
        metadata[SPLIT_QKV_METADATA_KEY] = SPLIT_QKV_CONVENTION
    if model_type is not None:
        for key, value in build_modelspec(model_type, title=Path(file).stem).items():
            metadata.setdefault(key, value)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(state_dict, metadata)
    save_safetensors(state_dict, file, metadata)


def _atomic_torch_save(state_dict: dict[str, Tensor], file: str | os.PathLike) -> None:
    path = Path(file)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_torch_file(state_dict, tmp)  # a full disk is an OSError, as for safetensors files
        replace_file(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_weights_fit(file, weights_sd: dict[str, Tensor], network: torch.nn.Module, hint: str) -> None:
    """Stops, naming the file and its first misfits, when a tensor's shape differs from the network's; where
    split_qkv on one side only explains every misfit, the message says so instead of ``hint``."""
    expected = network.state_dict()
    misfits = [k for k, v in weights_sd.items() if k in expected and v.shape != expected[k].shape]
    if misfits:
        listed = [f"{k} {tuple(weights_sd[k].shape)} (network {tuple(expected[k].shape)})" for k in misfits[:3]]
        raise UserError(
            f"{file} does not fit this network: {'; '.join(listed)}"
            + (f" and {len(misfits) - 3} more" if len(misfits) > 3 else "")
            + f". {split_qkv_hint(weights_sd, network, misfits) or hint}"
        )


def split_qkv_hint(weights_sd: dict[str, Tensor], network: torch.nn.Module, misfits: list[str]) -> str | None:
    """Why the file misfits, when only fused projections (qkv, linear1) misfit and by split_qkv's factor:
    a plain file (rank r) for a split_qkv network (chunks x r), or the reverse; None otherwise."""
    children = dict(network.named_children())  # a network's LoRA modules are its children, by lora_name
    modules = [children.get(key.partition(".")[0]) for key in misfits]
    if not all(m is not None and hasattr(m, "split_dims") and is_split_target(m.lora_name) for m in modules):
        return None
    ranks = {}  # module: (the file's rank, this network's fused rank, chunks)
    for module in modules:
        down = weights_sd.get(f"{module.lora_name}.lora_down.weight")
        if down is None or down.dim() != 2 or down.shape[1] != module.org_module.in_features:
            return None
        chunks = split_parts(module.lora_name)
        ranks[module] = (down.shape[0], module.lora_dim * (chunks if module.split_dims else 1), chunks)
    if all(m.split_dims and file * chunks == own for m, (file, own, chunks) in ranks.items()):
        return ("The file was not trained with split_qkv (its fused projections hold one LoRA, not one per "
                "q/k/v part): remove split_qkv=True from --network_args to continue it")
    if all(not m.split_dims and file == own * chunks for m, (file, own, chunks) in ranks.items()):
        return ("The file was trained with split_qkv=True (its fused projections hold one LoRA per part): add "
                "split_qkv=True to --network_args to continue it")
    return None


def nothing_fits_message(file, keys: list[str], has_dit_modules: bool, has_text_encoder_modules: bool) -> str:
    """Why none of a file's ``keys`` belongs to a network: the part the file is for has no modules in this run,
    or the file is for another model."""
    if all(k.startswith("lora_unet") for k in keys) and not has_dit_modules:
        return (f"{file} holds DiT modules only (lora_unet_*), and this network has none: the DiT is not trained "
                "in this run (--network_train_text_encoder_only); train the DiT too, or leave out the file")
    if all(k.startswith("lora_te") for k in keys) and not has_text_encoder_modules:
        return (f"{file} holds text-encoder modules only (lora_te*), and this network has none: no text encoder "
                "is trained in this run (--network_train_unet_only, or Chroma without train_t5xxl=True); train "
                "the text encoders too, or leave out the file")
    return (f"{file}: none of its weights belongs to this network (e.g. {keys[0]}); "
            "give a FLUX/Chroma LoRA in sd-scripts' format trained on this model")
