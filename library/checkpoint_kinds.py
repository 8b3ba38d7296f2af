"""Recognising what a checkpoint is from its key names alone, for errors that say what a file
is when it was given as something else (a T5 file passed as ``--ae``, Chroma as FLUX, ...)."""

from __future__ import annotations

from collections.abc import Iterable

FLUX_PREFIX = "model.diffusion_model."


def strip_prefix(keys: Iterable[str], prefix: str = FLUX_PREFIX) -> list[str]:
    return [k[len(prefix) :] if k.startswith(prefix) else k for k in keys]


def describe_checkpoint(keys: Iterable[str]) -> str:
    """A short phrase naming the kind of model a state dict holds, e.g. "a T5-XXL text encoder"."""
    keys = strip_prefix(keys)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if has("lora_unet_", "lora_te", "transformer.single_transformer_blocks", "diffusion_model.") and any(
        "lora" in k for k in keys
    ):
        return "a LoRA"
    if has("distilled_guidance_layer."):
        return "a Chroma DiT"
    if has("double_blocks.", "single_blocks."):
        return "a FLUX.1 DiT"
    if has("transformer_blocks.", "single_transformer_blocks."):
        return "a diffusers-format FLUX/Chroma transformer"
    if has("encoder.conv_in.", "decoder.conv_in."):
        return "a FLUX autoencoder (ae.safetensors)"
    if has("encoder.block.", "shared.weight"):
        return "a T5-XXL text encoder"
    if has("text_model.", "embeddings.token_embedding.", "encoder.layers."):
        return "a CLIP-L text encoder"
    return "not a recognised FLUX, Chroma, AE, CLIP-L or T5 checkpoint"
