"""ComfyUI's fp8 checkpoint layouts, whose weights must be multiplied by a per-tensor scale: the older one
(``<layer>.scale_weight``, files marked by a ``scaled_fp8`` tensor) and comfy-kitchen's (``<layer>.weight_scale``
beside a ``<layer>.comfy_quant`` tensor that holds the layer's format as JSON). Both may carry input scales,
which only fp8 matmul kernels use. A file may list its quantized layers in its
``_quantization_metadata`` instead of ``comfy_quant`` tensors. This project's own scaled fp8 also names its per-row
scales ``weight_scale``, but without either marker."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from library.errors import CheckpointError

FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def metadata_layers(metadata: dict | None) -> dict[str, str]:
    """{layer: format} of the quantized layers a file lists in its ``_quantization_metadata`` (ComfyUI may keep
    the layers' formats there instead of in ``comfy_quant`` tensors)."""
    try:
        layers = json.loads((metadata or {})["_quantization_metadata"])["layers"]
        return {str(name): str(conf.get("format")) for name, conf in layers.items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


def is_comfy_scaled_fp8(keys: Iterable[str], metadata: dict | None = None) -> bool:
    """Whether a file's keys (and metadata) are of one of ComfyUI's scaled fp8 layouts."""
    scaled = any(k == "scaled_fp8" or k.endswith((".scaled_fp8", ".scale_weight", ".comfy_quant")) for k in keys)
    return scaled or bool(metadata_layers(metadata))


def comfy_scale_keys(keys: Iterable[str], metadata: dict | None = None) -> set[str]:
    """The keys of ComfyUI's layouts that hold no weight: markers, per-tensor scales and input scales."""
    keys = set(keys)
    quantized = {k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant")} | set(metadata_layers(metadata))
    return {
        k for k in keys
        if k == "scaled_fp8" or k.endswith((".scaled_fp8", ".scale_weight", ".scale_input", ".comfy_quant"))
        or (k.endswith((".weight_scale", ".input_scale")) and k.rsplit(".", 1)[0] in quantized)
    }  # fmt: skip


def comfy_weight_scale_key(weight_key: str, keys, metadata: dict | None = None) -> str | None:
    """The key of ``weight_key``'s per-tensor scale in ``keys`` (either layout), or None."""
    layer = weight_key.removesuffix(".weight")
    if f"{layer}.scale_weight" in keys:
        return f"{layer}.scale_weight"
    quantized = f"{layer}.comfy_quant" in keys or layer in metadata_layers(metadata)
    return f"{layer}.weight_scale" if quantized and f"{layer}.weight_scale" in keys else None


def dequantize_comfy_scaled_fp8(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint",
                                metadata: dict | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Multiplies each scaled weight by its scale (in fp32, rounded to ``dtype`` once) and drops the markers
    and scales, in place; ``metadata`` is the file's, for layers listed there. A layer quantized otherwise
    (NVFP4, int8, block scales) stops naming ``source``."""
    for key in [k for k in state_dict if k == "scaled_fp8" or k.endswith(".scaled_fp8")]:  # the marker, any prefix
        del state_dict[key]
    scales = {k[: -len("scale_weight")] + "weight": k for k in state_dict if k.endswith(".scale_weight")}
    formats = {k[: -len(".comfy_quant")]: _quant_format(state_dict.pop(k)) for k in list(state_dict)
               if k.endswith(".comfy_quant")}  # fmt: skip
    formats |= {layer: fmt for layer, fmt in metadata_layers(metadata).items()
                if f"{layer}.weight" in state_dict and layer not in formats}  # fmt: skip
    for layer, fmt in formats.items():
        scale = state_dict.get(f"{layer}.weight_scale")
        if fmt not in FP8_FORMATS or (scale is not None and scale.numel() != 1):
            raise CheckpointError(
                f"{source}: {layer} is quantized as {fmt} (ComfyUI's quantized layout), which this trainer does not "
                "read; give a bf16, fp16 or fp8 file"
            )
        if scale is not None:
            scales[f"{layer}.weight"] = f"{layer}.weight_scale"
    for weight_key, scale_key in scales.items():
        scale = state_dict.pop(scale_key)
        if weight_key in state_dict:  # in fp32, rounded once: a bf16 scale would shift every weight
            state_dict[weight_key] = (state_dict[weight_key].float() * scale.float()).to(dtype)
    for key in [k for k in state_dict if k.endswith((".scale_input", ".input_scale"))]:
        del state_dict[key]
    return state_dict


def _quant_format(marker: torch.Tensor) -> str:
    """The ``format`` a ``comfy_quant`` tensor (UTF-8 JSON as uint8) names."""
    try:
        return str(json.loads(bytes(marker.to(torch.uint8).flatten().tolist()))["format"])
    except (ValueError, KeyError, TypeError):
        return "an unreadable format"
