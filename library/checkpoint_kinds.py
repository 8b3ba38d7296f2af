"""Recognising what a checkpoint is from its key names alone, for errors that say what a file
is when it was given as something else (a T5 file passed as ``--ae``, Chroma as FLUX, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

FLUX_PREFIX = "model.diffusion_model."
# the other parts of a file that holds a whole model beside its DiT (ComfyUI's checkpoint format)
ALL_IN_ONE_PARTS = ("first_stage_model.", "vae.", "text_encoders.", "cond_stage_model.", "conditioner.")


def strip_prefix(keys: Iterable[str], prefix: str = FLUX_PREFIX) -> list[str]:
    return [k[len(prefix) :] if k.startswith(prefix) else k for k in keys]


def describe_checkpoint(keys: Sequence[str]) -> str:
    """What a checkpoint looks like, from its key names, for error messages."""

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("lora_down") or has("lora_up") or has(".lora_A.") or has(".lora_B."):
        return "a LoRA file, not a base model"
    if has("input_blocks.") or has("joint_blocks.") or has("down_blocks.1.attentions."):  # not an AE: no attentions
        return "a Stable Diffusion model (SD 1.x, SDXL or SD3), not FLUX.1 or Chroma"
    if has(FLUX_PREFIX) and any(has(p) for p in ALL_IN_ONE_PARTS):
        return ("a whole FLUX checkpoint (DiT, autoencoder and text encoders in one file, as ComfyUI saves them); "
                "give it as --pretrained_model_name_or_path, and --ae, --clip_l, --t5xxl may name it too")
    if has("vision_model.") and not has("text_model."):  # a vision tower has self_attn.q_proj too
        return "a CLIP vision model, not a text encoder"
    if has("SelfAttention.q.weight") or has("encoder.block.0."):  # before language models: T5 has embed_tokens
        return "a T5 text encoder (give it as --t5xxl)"
    if has("embed_tokens.weight") or (has("self_attn.q_proj.weight") and not has("encoder.layers.")):
        return "a large language model's text encoder (Qwen, Llama, Gemma ...), which FLUX.1 and Chroma do not use"
    if has("embeddings.token_embedding.weight") or has("self_attn.q_proj.weight"):
        return "a CLIP text encoder (give it as --clip_l)"
    if has("distilled_guidance_layer."):
        return "a Chroma DiT (the main model: --pretrained_model_name_or_path with --model_type chroma)"
    if has("double_blocks.") or has("single_transformer_blocks."):
        return "a FLUX DiT (the main model: --pretrained_model_name_or_path)"
    if has("single_blocks."):  # a shard of a BFL-layout DiT holding single blocks only
        return "a part of a FLUX or Chroma DiT (single blocks only: one shard of a split checkpoint?)"
    if has("decoder.conv_in.") or has("decoder.up."):
        return "an autoencoder (give it as --ae)"
    shown = ", ".join(list(keys)[:3]) or "no tensors at all"
    return f"no known model (first keys: {shown})"


def not_the_expected_kind(path: str, wanted: str, keys: Sequence[str], flag: str, anchor: str) -> str:
    """The error message for a file without ``anchor``, the key ``wanted`` always has. When the file
    still looks like what ``flag`` takes, saying "give it as ``flag``" would contradict itself: the
    message says instead what such a file may be."""
    kind = describe_checkpoint(keys)
    if flag not in kind:
        return f"{path}: expected {wanted}, but this file looks like {kind}"
    prefix = next((k[: -len(anchor)] for k in keys if k.endswith(anchor)), None)
    if prefix:
        return (f"{path}: its keys begin with {prefix!r} ({prefix}{anchor}, ...), which {flag} does not read: "
                "save it without that prefix")  # fmt: skip
    return (
        f"{path}: looks like {kind.split(' (')[0]} but has no {anchor!r}, which {wanted} has: it may be one part "
        "of a model saved in several files (give the whole model in one file), or a variant this trainer does not "
        "read"
    )


def incomplete_checkpoint(path: str, missing: Sequence[str], shown: int = 20) -> str:
    """The error message for a file without some of the tensors its model needs (sorted, the first ``shown``)."""
    missing = sorted(missing)
    listed = ", ".join(missing[:shown]) + (f" ... ({len(missing)} in all)" if len(missing) > shown else "")
    return f"{path}: incomplete checkpoint, missing keys: {listed}"
