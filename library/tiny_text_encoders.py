"""Tiny random CLIP-L and T5 files in the real single-file layouts (ComfyUI-style ``text_model.*`` and
``encoder.*`` keys, optionally plain or scaled fp8), for the tests and the demo: they load through the code
that loads users' ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors``."""

from __future__ import annotations

import os

import torch
from torch import nn

from library.safetensors_io import save_safetensors
from library.text_encoders import CLIP_FILE_PREFIX, CLIP_HEADS_METADATA_KEY


def _random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights that keep activations O(1) and make every tensor matter (no 1/0 norms)."""
    g = torch.Generator().manual_seed(seed)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    result = {}
    for key, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=g)
        if key in linear_weights:
            result[key] = noise / meta.shape[1] ** 0.5
        elif "norm" in key and key.endswith("weight"):
            result[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias") and "relative_attention_bias" not in key:
            result[key] = 0.02 * noise
        else:  # embeddings and T5's relative-position table
            result[key] = 0.5 * noise
    return result


def _quantize(tensors: dict[str, torch.Tensor], linear_weights: set[str], fp8: str | None) -> dict[str, torch.Tensor]:
    if fp8 is None:
        return tensors
    if fp8 == "plain":  # what `model.to(torch.float8_e4m3fn)` then saving produces
        return {k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}
    if fp8 != "scaled":
        raise ValueError(f"fp8 must be None, 'plain' or 'scaled', not {fp8!r}")
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}  # ComfyUI's marker
    for k, v in tensors.items():
        if k in linear_weights:
            scale = v.abs().max().float() / 448.0  # e4m3fn's largest value
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


def write_tiny_clip_l(
    path: str | os.PathLike,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab: int = 49408,
    max_positions: int = 77,
    intermediate: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
) -> dict[str, torch.Tensor]:
    """Writes a random CLIP text encoder with ``clip_l.safetensors``' key layout (``text_model.*``).

    Size ``vocab`` to the tokenizer that will feed it (``write_tiny_tokenizers`` returns it).
    The head count goes in the file's metadata: tiny widths are not multiples of 64.
    ``fp8``: None, "plain" (every tensor e4m3fn) or "scaled" (ComfyUI's scaled-fp8 layout).
    Returns the written tensors, keyed as in the file.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    linear = {CLIP_FILE_PREFIX + n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = {CLIP_FILE_PREFIX + k: v.to(dtype) for k, v in _random_state_dict(model, seed).items()}
    tensors = _quantize(tensors, linear, fp8)
    save_safetensors(tensors, path, metadata={CLIP_HEADS_METADATA_KEY: str(heads)})
    return tensors


def write_tiny_t5(
    path: str | os.PathLike,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 2,
    d_kv: int = 16,
    d_ff: int = 64,
    vocab: int = 32128,
    buckets: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
) -> dict[str, torch.Tensor]:
    """Writes a random T5 v1.1 encoder with ``t5xxl_fp16.safetensors``' key layout.

    ``encoder.*`` and ``shared.weight``, without the tied ``encoder.embed_tokens.weight``.
    ``fp8`` as in :func:`write_tiny_clip_l`. Returns the written tensors, keyed as in the file.
    """
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.device("meta"):
        model = T5EncoderModel(config)
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = _random_state_dict(model, seed)
    del tensors["encoder.embed_tokens.weight"]
    tensors = _quantize({k: v.to(dtype) for k, v in tensors.items()}, linear, fp8)
    save_safetensors(tensors, path)
    return tensors
