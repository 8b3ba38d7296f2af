"""Loading FLUX.1 / Chroma models from users' files, and latent packing helpers.

The function names and parameters are sd-scripts' (``library/flux_utils.py``), because tools
built on sd-scripts import them. Every loader reads the key names and shapes first, so a
wrong, truncated or mismatched file is reported before any weights are read, then builds the
model on the meta device and assigns the loaded tensors (weights are never allocated twice).
"""

from __future__ import annotations

import logging
import re

import torch
from einops import rearrange
from torch import Tensor, nn

from library.checkpoint_kinds import FLUX_PREFIX, describe_checkpoint, incomplete_checkpoint, not_the_expected_kind
from library.chroma_models import Chroma, ChromaParams, infer_chroma_params, is_chroma_state_dict
from library.comfy_fp8 import comfy_scale_keys, dequantize_comfy_scaled_fp8, is_comfy_scaled_fp8
from library.errors import CheckpointError
from library.flux_ae import AutoEncoder, AutoEncoderParams, infer_ae_params
from library.flux_key_mapping import diffusers_to_bfl, is_diffusers_state_dict
from library.flux_models import Flux, FluxParams, infer_flux_params
from library.safetensors_io import SafetensorsReader, checkpoint_files, read_headers
from library.text_encoders import load_clip_l, load_t5xxl  # noqa: F401  (sd-scripts' import path)

logger = logging.getLogger(__name__)

MODEL_TYPES = ("flux", "chroma")


def _read_shapes(files: list[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    entries, metadata = read_headers(files)
    return {name: tuple(entry["shape"]) for name, entry in entries.items()}, metadata


_BLOCK_GROUP = re.compile(r"^(?:double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+\.")


def _block_group(key: str) -> str:
    """The block a (prefix-stripped) key belongs to ("" outside the blocks): tensors are read, converted
    and cast one such group at a time."""
    m = _BLOCK_GROUP.match(key)
    return m.group(0) if m else ""


def _load_tensors(files: list[str], device, dtype, dtype_of=None, scaled_fp8_keys=frozenset(),
                  convert=None, prefix: str = FLUX_PREFIX) -> dict[str, Tensor]:  # fmt: skip
    """Reads every tensor, without ``prefix``, one block at a time: applies ComfyUI's fp8 scales, ``convert``
    (e.g. diffusers' keys to BFL's) and then casts each result to ``dtype_of(key)`` if that gives a dtype, else
    to ``dtype``; one named in ``scaled_fp8_keys`` is quantized to e4m3fn with per-row scales, stored beside it
    as ``<name>_scale``. So the peak stays near the size of the result plus one block as the file stores it.
    A file with keys under ``prefix`` holds other models too (ComfyUI's whole checkpoints): only those are read."""
    from contextlib import ExitStack

    where: dict[str, SafetensorsReader] = {}
    metadata: dict[str, str] = {}
    with ExitStack() as stack:
        for file in files:
            reader = stack.enter_context(SafetensorsReader(file))
            where.update((key, reader) for key in reader.keys())
            metadata.update(reader.metadata)
        if prefix and any(key.startswith(prefix) for key in where):
            where = {key: reader for key, reader in where.items() if key.startswith(prefix)}
        groups: dict[str, list[str]] = {}
        for key in where:
            groups.setdefault(_block_group(key[len(prefix) :] if key.startswith(prefix) else key), []).append(key)
        scaled_fp8 = is_comfy_scaled_fp8(where, metadata)
        device = torch.device(device)
        sd: dict[str, Tensor] = {}
        for keys in groups.values():
            group = {key: where[key].get(key) for key in keys}
            if scaled_fp8:
                group = dequantize_comfy_scaled_fp8(group, dtype or torch.float32, files[0], metadata)
            group = _strip(group, prefix)
            if convert is not None:
                group = convert(group)
            while group:  # each source tensor is dropped as its cast is made: about one block alive at a time
                key, tensor = group.popitem()
                if key in scaled_fp8_keys:
                    from library.fp8 import quantize_weight

                    tensor, sd[f"{key}_scale"] = quantize_weight(tensor, scaled=True)
                target = (dtype_of(key) if dtype_of else None) or dtype
                if target is not None and tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
                sd[key] = tensor.to(device) if device.type != "cpu" else tensor
    return sd


def _strip(sd: dict, prefix: str = FLUX_PREFIX) -> dict:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}


def assign_state_dict(model: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """Assigns tensors to a meta-device model; missing keys stop with their names, extra keys warn once."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - sd.keys())
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise CheckpointError(
            f"{source}: missing keys: {shown}. The file is incomplete or not the model it was given as"
        )
    unexpected = sorted(sd.keys() - expected)
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 10 else "")
        logger.warning("%s: ignoring unexpected keys: %s", source, shown)
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=True, assign=True)


def dit_on_meta(params: FluxParams) -> Flux:
    """The DiT ``params`` describe (Chroma for ``ChromaParams``) on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return Chroma(params) if isinstance(params, ChromaParams) else Flux(params)


def _dit_layout(ckpt_path: str, model_type: str) -> tuple[list[str], dict, dict, dict, bool, bool]:
    """(files, shapes and dtypes without prefix, metadata, is diffusers layout, is Chroma) from the headers
    alone; a file that is no DiT, or not of ``model_type``, stops here."""
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"--model_type must be one of {', '.join(MODEL_TYPES)}, not {model_type!r}")
    files = checkpoint_files(ckpt_path)
    entries, metadata = read_headers(files)
    if any(k.startswith(FLUX_PREFIX) for k in entries):  # a whole checkpoint: its DiT only
        entries = {k: e for k, e in entries.items() if k.startswith(FLUX_PREFIX)}
    entries = _strip(entries)
    shapes = {k: tuple(e["shape"]) for k, e in entries.items()}
    dtypes = {k: e["dtype"] for k, e in entries.items()}
    diffusers = is_diffusers_state_dict(shapes)
    if not diffusers and "img_in.weight" not in shapes:
        raise CheckpointError(not_the_expected_kind(ckpt_path, "a FLUX.1 or Chroma DiT", list(shapes),
                                                    "--pretrained_model_name_or_path", "img_in.weight"))  # fmt: skip
    chroma = is_chroma_state_dict(shapes)
    if chroma and model_type != "chroma":
        raise CheckpointError(f"{ckpt_path} is a Chroma model: add --model_type chroma (and --apply_t5_attn_mask)")
    if not chroma and model_type == "chroma":
        raise CheckpointError(f"{ckpt_path} is a FLUX.1 model, not Chroma: use --model_type flux (the default)")
    return files, shapes, dtypes, metadata, diffusers, chroma


def check_flow_model_file(ckpt_path: str, model_type: str = "flux") -> FluxParams:
    """The checks :func:`load_flow_model` makes before reading any weight (milliseconds); returns
    the model's hyper-parameters, read from the header. A diffusers file whose keys are not all
    FLUX's (another model, a LoRA) or a file without a tensor the model needs stops here."""
    return _checked_dit(ckpt_path, model_type)[1]


def _checked_dit(ckpt_path: str, model_type: str) -> tuple[list[str], FluxParams, bool]:
    """(files, hyper-parameters in BFL's names whatever the layout, is diffusers layout) of a checked DiT."""
    files, shapes, dtypes, metadata, diffusers, chroma = _dit_layout(ckpt_path, model_type)
    if diffusers:
        scale_keys = comfy_scale_keys(shapes, metadata)
        row_scaled = sorted(k for k in shapes if k.endswith(".weight_scale") and k not in scale_keys)
        if row_scaled:  # per-row scales of diffusers' separate q, k, v would have to be fused with them
            raise CheckpointError(
                f"{ckpt_path}: a diffusers-layout DiT with per-row fp8 scales ({row_scaled[0]}, ...) is not "
                "supported; give the BFL-layout file (flux1-dev.safetensors) or one without weight_scale tensors"
            )
        # ComfyUI's fp8 scales are applied before the keys are mapped
        stand_ins = {k: torch.empty(shape, device="meta") for k, shape in shapes.items() if k not in scale_keys}
        try:
            shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(stand_ins).items()}
        except KeyError as e:
            kind = describe_checkpoint(shapes)
            if not kind.startswith("a LoRA"):
                kind = f"a diffusers transformer that is not FLUX.1 or Chroma ({e.args[0]})"
            raise CheckpointError(
                f"{ckpt_path}: expected a FLUX.1 or Chroma DiT, but this file looks like {kind}"
            ) from None
    try:
        params = infer_chroma_params(shapes, metadata) if chroma else infer_flux_params(shapes, metadata)
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt_path}: incomplete DiT checkpoint (no {e}); the file is damaged or cut short"
        ) from None
    _check_against_model(ckpt_path, shapes, dtypes, params, diffusers)
    return files, params, diffusers


_NOT_FLOAT = ("I8", "U8", "I16", "I32", "I64", "BOOL")


def _check_against_model(ckpt_path: str, shapes: dict, dtypes: dict, params, diffusers: bool) -> None:
    """Every tensor the model the header describes needs is there, in its shape and as floats; else the load
    would stop after reading the whole file (a missing tensor) or with torch's own error (int8, NF4).
    ``shapes`` are in BFL's names, ``dtypes`` in the file's."""
    expected = {k: tuple(v.shape) for k, v in dit_on_meta(params).state_dict().items()}
    packed = sorted(k for k, d in dtypes.items() if d in _NOT_FLOAT and k.endswith(".weight")
                    and (diffusers or k in expected))  # fmt: skip
    if packed:
        raise CheckpointError(
            f"{ckpt_path}: {packed[0]} is stored as {dtypes[packed[0]]}: an int8 or 4-bit quantized file "
            "(bitsandbytes, NF4), which this trainer does not read; give a bf16, fp16 or fp8 file (--fp8_base "
            "quantizes on load)"
        )
    missing = expected.keys() - shapes.keys()
    if missing:
        raise CheckpointError(incomplete_checkpoint(ckpt_path, missing))
    wrong = [k for k in sorted(expected) if tuple(shapes[k]) != expected[k]]
    if wrong:
        raise CheckpointError(
            f"{ckpt_path}: {len(wrong)} tensors are not of the shape the rest of the file gives them, e.g. {wrong[0]} "
            f"{list(shapes[wrong[0]])} where {list(expected[wrong[0]])}: a damaged or repacked (quantized) file"
        )


def load_flow_model(
    ckpt_path: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
    disable_mmap: bool = False,
    model_type: str = "flux",
    fp8_block_linears: bool = False,
    fp8_scaled: bool = False,
) -> tuple[bool, Flux]:
    """Loads a FLUX.1 (dev, schnell, pruned) or Chroma DiT; returns ``(is_schnell, model)``.

    BFL single files (with or without the ``model.diffusion_model.`` prefix), sharded files and
    diffusers folders or files are accepted; hyper-parameters come from the weights.
    ``dtype=None`` keeps the file's dtype (fp8 files stay fp8). ``fp8_block_linears`` stores the
    blocks' Linear weights as float8_e4m3fn as they are read (``--fp8_base``), so loading a bf16
    file never holds it whole in bf16; with ``fp8_scaled`` each gets its per-row scales as it is
    read (``--fp8_scaled``). Weights stored in fp8 in the file are kept as they are.
    """
    del disable_mmap  # the reader never memory-maps
    files, params, diffusers = _checked_dit(ckpt_path, model_type)
    chroma = model_type == "chroma"  # (the file's kind was checked against it)
    dtype_of, scaled_keys = None, frozenset()
    if fp8_block_linears:
        from library.fp8 import FP8, block_linears

        fp8_keys = {f"{name}.weight" for name, _ in block_linears(dit_on_meta(params))}

        def dtype_of(key: str) -> torch.dtype | None:
            return FP8 if key in fp8_keys else None

        if fp8_scaled and dtype is not None:
            scaled_keys = frozenset(fp8_keys)
    sd = _load_tensors(files, device, dtype, dtype_of, scaled_keys, diffusers_to_bfl if diffusers else None)
    scales = {k[: -len("_scale")]: sd.pop(k) for k in [k for k in sd if k.endswith(".weight_scale")]}
    model = dit_on_meta(params)
    assign_state_dict(model, sd, ckpt_path)
    if scales:
        from library.fp8 import attach_scaled_weight

        for key, scale in scales.items():
            linear = model.get_submodule(key[: -len(".weight")])
            attach_scaled_weight(linear, linear.weight.data, scale)
    is_schnell = not chroma and not params.guidance_embed
    logger.info(
        "loaded %s from %s: %d double + %d single blocks, hidden %d, %d heads",
        "Chroma" if chroma else ("FLUX.1 schnell" if is_schnell else "FLUX.1 dev"),
        ckpt_path,
        params.depth,
        params.depth_single_blocks,
        params.hidden_size,
        params.num_heads,
    )
    return is_schnell, model


AE_PREFIXES = ("first_stage_model.", "vae.")  # the autoencoder inside a whole checkpoint (ComfyUI's)


def _ae_prefix(shapes) -> str:
    return next((p for p in AE_PREFIXES if f"{p}encoder.conv_in.weight" in shapes), "")


def check_ae_file(ckpt_path: str) -> AutoEncoderParams:
    """The autoencoder's widths and depths from the header alone; a file that is no FLUX AE stops here."""
    shapes, _ = _read_shapes([ckpt_path])
    if prefix := _ae_prefix(shapes):
        shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    for anchor in ("encoder.conv_in.weight", "decoder.conv_in.weight"):
        if anchor not in shapes:
            raise CheckpointError(not_the_expected_kind(ckpt_path, "the FLUX autoencoder (ae.safetensors)",
                                                        list(shapes), "--ae", anchor))  # fmt: skip
    if any(k.startswith("encoder.down_blocks.") for k in shapes):
        raise CheckpointError(
            f"{ckpt_path}: an autoencoder in diffusers' layout (vae/diffusion_pytorch_model.safetensors); give "
            "BFL's ae.safetensors"
        )
    if "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes:
        raise CheckpointError(
            f"{ckpt_path}: a Stable Diffusion VAE ({shapes['decoder.conv_in.weight'][1]} latent channels, with "
            "quant_conv), not the FLUX autoencoder; give FLUX's ae.safetensors"
        )
    try:
        params = infer_ae_params(shapes)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt_path}: unsupported autoencoder layout ({e})") from None
    with torch.device("meta"):
        missing = AutoEncoder(params).state_dict().keys() - shapes.keys()
    if missing:
        raise CheckpointError(incomplete_checkpoint(ckpt_path, missing))
    return params


def load_ae(
    ckpt_path: str, dtype: torch.dtype | None, device: str | torch.device, disable_mmap: bool = False
) -> AutoEncoder:
    """Loads ``ae.safetensors`` (BFL keys), or the autoencoder of a whole checkpoint; widths and depths read
    from the file."""
    del disable_mmap
    params = check_ae_file(ckpt_path)
    sd = _load_tensors([ckpt_path], device, dtype, prefix=_ae_prefix(_read_shapes([ckpt_path])[0]))
    with torch.device("meta"):
        ae = AutoEncoder(params)
    assign_state_dict(ae, sd, ckpt_path)
    return ae


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C * 4) tokens of 2x2 patches, channel order (c, ph, pw)."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(x: Tensor, packed_latent_height: int, packed_latent_width: int) -> Tensor:
    """The inverse of :func:`pack_latents`; sizes are in patches (latent size / 2)."""
    return rearrange(
        x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=packed_latent_height, w=packed_latent_width, ph=2, pw=2
    )


def prepare_img_ids(batch_size: int, packed_latent_height: int, packed_latent_width: int) -> Tensor:
    """Position ids (B, h * w, 3) of the image tokens: (0, row, column)."""
    img_ids = torch.zeros(packed_latent_height, packed_latent_width, 3)
    img_ids[..., 1] = torch.arange(packed_latent_height)[:, None]
    img_ids[..., 2] = torch.arange(packed_latent_width)[None, :]
    return img_ids.reshape(1, -1, 3).repeat(batch_size, 1, 1)
