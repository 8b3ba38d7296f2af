"""CLIP-L and T5-XXL text encoders from their single-file checkpoints, and FLUX's text encoding.

Users bring the files ComfyUI distributes: ``clip_l.safetensors`` (``text_model.*`` keys) and
``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` / ``t5xxl_fp8_e4m3fn_scaled.safetensors``
(``encoder.*`` and ``shared.weight``). They load into transformers' ``CLIPTextModel`` and
``T5EncoderModel`` with every size read from the weights, so tiny test models and the real
ones go through the same path.

Differences from sd-scripts, on purpose:

* CLIP-L runs ``quick_gelu``, the activation it was trained with and the one ComfyUI and BFL's
  code use. sd-scripts' config dict repeats ``hidden_act`` and so runs exact GELU (spec §k.11).
* ComfyUI's scaled-fp8 files have their per-tensor scales applied; sd-scripts drops them silently.
* ``dtype`` set to an fp8 type stores only the ``nn.Linear`` weights in fp8; embeddings, norms,
  biases and T5's relative-position table stay in ``compute_dtype`` (sd-scripts'
  ``prepare_text_encoder_fp8`` does the same, later). fp8 weights compute under autocast.
"""

from __future__ import annotations

import logging
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from library.checkpoint_kinds import incomplete_checkpoint, not_the_expected_kind
from library.comfy_fp8 import comfy_scale_keys, dequantize_comfy_scaled_fp8
from library.dtypes import FP8_DTYPES
from library.errors import CheckpointError
from library.safetensors_io import checkpoint_files, load_sharded, read_headers

if TYPE_CHECKING:  # transformers is imported when a model is built: it costs seconds
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

logger = logging.getLogger(__name__)

CLIP_FILE_PREFIX = "text_model."  # transformers 5's CLIPTextModel has no such level; files do
CLIP_HEADS_METADATA_KEY = "num_attention_heads"  # not stored in the weights: tiny files record it
CHROMA_DUMMY_POOLED_SHAPE = (77, 1)  # sd-scripts' DummyCLIPL output, kept so TE caches interchange

# Parts of larger files that are not the text encoder proper: skipped with one note.
_CLIP_EXTRAS = ("text_projection.", "logit_scale", "vision_model.", "visual_projection.")
_T5_EXTRAS = ("decoder.", "lm_head.")
_TIED_COPIES = ("shared.weight", "encoder.embed_tokens.weight")  # T5 files may store its embedding under both

Shapes = Mapping[str, Sequence[int]]


def _prefixes(keys: Sequence[str], anchor: str) -> list[str]:
    """What precedes ``anchor`` in each key ending with it, in file order: one per encoder the file holds."""
    return list(dict.fromkeys(k[: -len(anchor)] for k in keys if k.endswith(anchor)))


def _wrong_kind(path: str, wanted: str, keys: Sequence[str], flag: str, anchor: str) -> CheckpointError:
    return CheckpointError(not_the_expected_kind(path, wanted, keys, flag, anchor))


def _count_blocks(keys: Sequence[str], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _shape(shapes: Shapes, key: str, path: str, prefix: str) -> list[int]:
    if key not in shapes:
        raise CheckpointError(
            f"{path}: incomplete checkpoint, missing key {prefix + key!r} (it gives the model's size)"
        )
    return list(shapes[key])


# ---------------------------------------------------------------------------------------------
# CLIP-L


def infer_clip_l_config(
    shapes: Shapes, metadata: Mapping[str, str] | None = None, path: str = "CLIP-L", prefix: str = ""
) -> CLIPTextConfig:
    """``CLIPTextConfig`` from tensor shapes keyed without the ``text_model.`` prefix.

    The head count is not in the weights: a ``num_attention_heads`` metadata entry wins, else
    ``hidden / 64`` (CLIP-L: 768 -> 12, CLIP-G: 1280 -> 20). ``path`` and ``prefix`` only name
    the file and its keys in errors.
    """
    from transformers import CLIPTextConfig

    vocab, hidden = _shape(shapes, "embeddings.token_embedding.weight", path, prefix)
    max_positions = _shape(shapes, "embeddings.position_embedding.weight", path, prefix)[0]
    layers = _count_blocks(list(shapes), r"encoder\.layers\.(\d+)\.")
    intermediate = _shape(shapes, "encoder.layers.0.mlp.fc1.weight", path, prefix)[0]
    heads_text = (metadata or {}).get(CLIP_HEADS_METADATA_KEY)
    if heads_text is not None:
        heads = int(heads_text)
    elif hidden % 64 == 0:
        heads = hidden // 64
    else:
        raise CheckpointError(
            f"{path}: cannot infer the CLIP head count (hidden size {hidden} is not a multiple of 64 "
            f"and the file has no {CLIP_HEADS_METADATA_KEY!r} metadata)"
        )
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # eos 2 selects transformers' legacy pooling: the position of the largest id, which is
        # <|endoftext|> (49407) in CLIP's vocabulary, as the original CLIP-L pools.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def clip_l_files(path: str) -> list[str]:
    """The file(s) behind a ``--clip_l`` path: a file, or a diffusers model's ``text_encoder`` folder
    (or that model's own folder)."""
    return checkpoint_files(path, "text_encoder", "model")


def t5xxl_files(path: str) -> list[str]:
    """The file(s) behind a ``--t5xxl`` path: a file, any shard or the ``.safetensors.index.json`` of a
    sharded one, or a diffusers model's ``text_encoder_2`` folder (or that model's own folder)."""
    return checkpoint_files(path, "text_encoder_2", "model")


_ENCODER_FILES = {"--clip_l": clip_l_files, "--t5xxl": t5xxl_files}


def _encoder_keys(
    path: str, state_dict, anchor: str, wanted: str, flag: str
) -> tuple[list, str, dict, dict[str, str]]:
    """(the file's keys, the prefix before ``anchor``, the shapes under that prefix without it, the
    metadata) from the header alone; a file with no key ending in ``anchor`` is not ``wanted``."""
    file_shapes, metadata = _shapes_of(_ENCODER_FILES[flag](path), state_dict)
    file_keys = list(file_shapes)
    prefixes = _prefixes(file_keys, anchor)
    if not prefixes:
        raise _wrong_kind(path, wanted, file_keys, flag, anchor)
    if len(prefixes) > 1:  # a whole pipeline's file (SD3's clip_g, clip_l, t5xxl): the one named for the flag
        named = [p for p in prefixes if flag.removeprefix("--") in p.lower()]
        if len(named) != 1:
            raise CheckpointError(f"{path} holds {len(prefixes)} text encoders (keys under "
                                  f"{', '.join(repr(p) for p in prefixes)}) and {'more than one' if named else 'none'} "
                                  f"is named for {flag}: give "
                                  f"{flag} a file of {wanted.split(' (')[0]} alone")  # fmt: skip
        prefixes = named
    prefix = prefixes[0]
    shapes = {k[len(prefix) :]: v for k, v in file_shapes.items() if k.startswith(prefix)}
    return file_keys, prefix, shapes, metadata


def _clip_l_layout(path: str, state_dict: dict[str, torch.Tensor] | None = None) -> tuple[list, str, CLIPTextConfig]:
    """(the file's keys, the prefix before ``embeddings.``, the config) from the header alone."""
    file_keys, prefix, shapes, metadata = _encoder_keys(
        path, state_dict, "embeddings.token_embedding.weight",
        "a CLIP-L text encoder (keys 'text_model.encoder.layers.*')", "--clip_l",
    )  # fmt: skip
    return file_keys, prefix, infer_clip_l_config(shapes, metadata, path, prefix)


def _clip_l_model(path: str, state_dict: dict[str, torch.Tensor] | None = None):
    """(the file's keys, prefix, config, the model on the meta device, model key -> file key)."""
    from transformers import CLIPTextModel

    file_keys, prefix, config = _clip_l_layout(path, state_dict)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return file_keys, prefix, config, model, {k: prefix + k for k in model.state_dict()}


def clip_l_on_meta(path: str) -> CLIPTextModel:
    """The CLIP text model the file describes, on the meta device (shapes only: no weight is read)."""
    return _clip_l_model(path)[3]


def check_clip_l_file(path: str) -> CLIPTextConfig:
    """The checks :func:`load_clip_l` makes before reading any weight (milliseconds); the config."""
    file_keys, _, config, _, key_map = _clip_l_model(path)
    _refuse_missing_keys(path, key_map, file_keys)
    return config


def load_clip_l(
    ckpt_path: str | os.PathLike | None,
    dtype: torch.dtype | None,
    device: str | torch.device,
    disable_mmap: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> CLIPTextModel:
    """Loads CLIP-L (or any CLIP text tower) from a single file into ``transformers.CLIPTextModel``.

    Keys may carry ``text_model.`` (ComfyUI, sd-scripts) or any longer prefix ending in it, or none.
    ``dtype``: the parameters' dtype; ``None`` keeps the file's. An fp8 ``dtype`` (or an fp8 file
    with ``None``) stores only Linear weights in fp8 and the rest in ``compute_dtype``.
    ``state_dict``, if given, is used instead of reading the file (``ckpt_path`` names it in errors).
    Returns the model in eval mode on ``device``.
    """
    path = str(ckpt_path)
    file_keys, prefix, config, model, key_map = _clip_l_model(path, state_dict)
    source = state_dict if state_dict is not None else clip_l_files(path)
    _load_into(model, key_map, prefix, path, source, file_keys, dtype, compute_dtype, device, _CLIP_EXTRAS)
    del disable_mmap  # accepted for sd-scripts' signature: files are never memory-mapped
    # position_ids is a non-persistent buffer that meta construction left empty; some old files
    # carry a float copy of it, which is ignored (those copies are known to drift).
    positions = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
    model.embeddings.position_ids = positions
    _check_materialized(model, path)
    logger.info(
        "CLIP text encoder from %s: hidden %d, %d layers, %d heads, vocab %d",
        path,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.vocab_size,
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------
# T5


def infer_t5xxl_config(shapes: Shapes, path: str = "T5", prefix: str = "") -> T5Config:
    """``T5Config`` (v1.1 encoder: gated GELU, no biases) from tensor shapes of the file layout."""
    from transformers import T5Config

    embed_key = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab, d_model = _shape(shapes, embed_key, path, prefix)
    buckets, heads = _shape(
        shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", path, prefix
    )
    inner = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", path, prefix)[0]
    d_ff = _shape(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", path, prefix)[0]
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=_count_blocks(list(shapes), r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # gelu_new, as T5 v1.1
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _t5xxl_layout(path: str, state_dict: dict[str, torch.Tensor] | None = None) -> tuple[list, str, dict, T5Config]:
    """(the file's keys, the prefix before ``encoder.``, shapes without it, the config) from the header alone."""
    file_keys, prefix, shapes, _ = _encoder_keys(
        path, state_dict, "encoder.block.0.layer.0.SelfAttention.q.weight",
        "a T5 text encoder (keys 'encoder.block.*', 'shared.weight')", "--t5xxl",
    )  # fmt: skip
    if any(re.fullmatch(r"encoder\.block\.[1-9]\d*\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", k)
           for k in shapes):  # fmt: skip
        raise CheckpointError(
            f"{path}: a UMT5 encoder (every block has its own position bias, as Wan's umt5-xxl), not the T5-XXL "
            "that FLUX.1 and Chroma were trained with (t5xxl_fp16.safetensors)"
        )
    return file_keys, prefix, shapes, infer_t5xxl_config(shapes, path, prefix)


def _t5xxl_model(path: str, state_dict: dict[str, torch.Tensor] | None = None):
    """(the file's keys, prefix, config, the model on the meta device, model key -> file key)."""
    from transformers import T5EncoderModel

    file_keys, prefix, shapes, config = _t5xxl_layout(path, state_dict)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    key_map = {k: prefix + k for k in model.state_dict()}
    # The embedding is stored once, under either name (or under both, as one tied tensor): both model keys read it.
    embed_key = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    key_map["shared.weight"] = key_map["encoder.embed_tokens.weight"] = prefix + embed_key
    return file_keys, prefix, config, model, key_map


def t5xxl_on_meta(path: str) -> T5EncoderModel:
    """The T5 encoder the file(s) describe, on the meta device (shapes only: no weight is read)."""
    return _t5xxl_model(path)[3]


def check_t5xxl_file(path: str) -> T5Config:
    """The checks :func:`load_t5xxl` makes before reading any weight (milliseconds); the config."""
    file_keys, _, config, _, key_map = _t5xxl_model(path)
    _refuse_missing_keys(path, key_map, file_keys)
    return config


def load_t5xxl(
    ckpt_path: str | os.PathLike | None,
    dtype: torch.dtype | None,
    device: str | torch.device,
    disable_mmap: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> T5EncoderModel:
    """Loads a T5 encoder (T5-XXL or smaller) from a single file into ``transformers.T5EncoderModel``.

    Accepts ``t5xxl_fp16``-style files, plain fp8 files and ComfyUI's scaled-fp8 files (scales
    applied). ``encoder.embed_tokens.weight`` is tied to ``shared.weight``; either may be absent.
    ``dtype``, ``compute_dtype`` and ``state_dict`` as in :func:`load_clip_l`.
    """
    path = str(ckpt_path)
    file_keys, prefix, config, model, key_map = _t5xxl_model(path, state_dict)
    source = state_dict if state_dict is not None else t5xxl_files(path)
    _load_into(model, key_map, prefix, path, source, file_keys, dtype, compute_dtype, device, _T5_EXTRAS)
    del disable_mmap  # accepted for sd-scripts' signature: files are never memory-mapped
    model.encoder.set_input_embeddings(model.shared)
    _check_materialized(model, path)
    if model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype in FP8_DTYPES:
        keep_t5_activations_out_of_fp8(model)
    logger.info(
        "T5 encoder from %s: d_model %d, %d layers, %d heads x %d, d_ff %d, vocab %d",
        path,
        config.d_model,
        config.num_layers,
        config.num_heads,
        config.d_kv,
        config.d_ff,
        config.vocab_size,
    )
    return model.eval()


def keep_t5_activations_out_of_fp8(model: T5EncoderModel) -> None:
    """Replaces each gated feed-forward's ``forward`` with one that leaves ``wo``'s input dtype alone.

    transformers casts the activations to ``wo``'s weight dtype before ``wo`` (meant to keep an
    fp32 ``wo`` in int8 models); with fp8 weights that rounds the activations to fp8. Autocast
    casts the weight instead. sd-scripts' ``prepare_text_encoder_fp8`` makes the same change.
    Call it after casting a loaded T5 to fp8; :func:`load_t5xxl` does when it stores fp8.
    """
    for block in model.encoder.block:
        ff = block.layer[-1].DenseReluDense
        ff.forward = types.MethodType(_gated_ff_forward_fp8, ff)


def _gated_ff_forward_fp8(self, hidden_states: torch.Tensor) -> torch.Tensor:
    hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    return self.wo(self.dropout(hidden))


# ---------------------------------------------------------------------------------------------
# Shared loading


def _shapes_of(files: list[str], state_dict: dict[str, torch.Tensor] | None) -> tuple[dict, dict[str, str]]:
    """(shapes, metadata) of the file or shards, from their headers only (or from ``state_dict``)."""
    if state_dict is not None:
        return {k: list(v.shape) for k, v in state_dict.items()}, {}
    header, metadata = read_headers(files)
    return {k: e["shape"] for k, e in header.items()}, metadata


def _refuse_missing_keys(path: str, key_map: dict[str, str], file_keys: list[str]) -> None:
    missing = set(key_map.values()) - set(file_keys)
    if missing:
        raise CheckpointError(incomplete_checkpoint(path, missing))


_SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")


def _load_into(
    model: nn.Module,
    key_map: dict[str, str],
    prefix: str,
    path: str,
    source: dict[str, torch.Tensor] | list[str],
    file_keys: list[str],
    dtype: torch.dtype | None,
    compute_dtype: torch.dtype,
    device: str | torch.device,
    extras: tuple[str, ...],
) -> None:
    """Checks keys, reads the needed tensors, casts them and assigns them to the meta ``model``.

    ``key_map`` maps each model key to the file key holding it (several may share one). ``source`` is
    a state dict, or the file(s) to read (``path``, or its shards).
    """
    _refuse_missing_keys(path, key_map, file_keys)
    used = set(key_map.values())
    state_dict = source if isinstance(source, dict) else None
    metadata = read_headers(source)[1] if state_dict is None else None  # may list ComfyUI's quantized layers
    scale_keys = comfy_scale_keys(file_keys, metadata)
    scaled = bool(scale_keys)
    ignored, unexpected = [], []
    for k in file_keys:
        if k in used or k in scale_keys:
            continue
        inner = k[len(prefix) :]
        if inner in _TIED_COPIES:
            continue  # the second name of one tied tensor (T5's embedding): read under the other
        if not k.startswith(prefix) or inner.endswith("position_ids") or inner.startswith(extras):
            ignored.append(k)  # other parts of a bigger file, or a buffer that is rebuilt
        else:
            unexpected.append(k)
    if ignored:
        logger.info(
            "%s: ignoring %d tensors that are not part of the text encoder, e.g. %s", path, len(ignored), ignored[0]
        )
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 10 else "")
        logger.warning("%s: %d unexpected keys, ignored: %s", path, len(unexpected), shown)

    wanted = [k for k in file_keys if k in used or k in scale_keys]
    if state_dict is not None:
        tensors = {k: state_dict[k].to(device) for k in wanted}
    else:
        tensors = load_sharded(source, wanted, device)

    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp8_storage = dtype if dtype in FP8_DTYPES else None
    if dtype is None:  # keep the file's dtype: fp8 Linear weights stay fp8
        fp8_storage = next(
            (tensors[key_map[k]].dtype for k in sorted(linear_weights) if tensors[key_map[k]].dtype in FP8_DTYPES), None
        )
    if scaled and fp8_storage is not None:
        logger.info("%s: scaled fp8 weights are dequantized, then stored as %s (a plain fp8 file's precision)",
                    path, fp8_storage)  # fmt: skip
    scale_dtype = compute_dtype if dtype is None or dtype in FP8_DTYPES else dtype  # as ComfyUI multiplies them

    def take(file_key: str) -> torch.Tensor:
        """The file's tensor, times its scale when it has one: one weight widened at a time."""
        if not scaled:
            return tensors.pop(file_key)
        layer = file_key.removesuffix(".weight")
        part = {k: tensors.pop(k) for k in [file_key, *(layer + s for s in _SCALE_SUFFIXES)] if k in tensors}
        return dequantize_comfy_scaled_fp8(part, scale_dtype, path, metadata)[file_key]

    def cast(model_key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if fp8_storage is not None:
            return tensor.to(fp8_storage if model_key in linear_weights else compute_dtype)
        if dtype is not None:
            return tensor.to(dtype)
        return tensor.to(compute_dtype) if tensor.dtype in FP8_DTYPES else tensor

    # One tensor at a time, dropping the file's copy as its cast appears: the peak stays near one model.
    by_file_key: dict[str, torch.Tensor] = {}
    converted = {}
    for model_key, file_key in key_map.items():
        if file_key not in by_file_key:
            by_file_key[file_key] = cast(model_key, take(file_key))
        converted[model_key] = by_file_key[file_key]
    model.load_state_dict(converted, strict=True, assign=True)


def _check_materialized(model: nn.Module, path: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error loading {path}: tensors left on the meta device: {left[:5]}")


# ---------------------------------------------------------------------------------------------
# FLUX text encoding


class FluxTextEncodingStrategy:
    """Turns FLUX token ids into the DiT's text inputs (sd-scripts' ``FluxTextEncodingStrategy``)."""

    def __init__(self, apply_t5_attn_mask: bool | None = None) -> None:
        self.apply_t5_attn_mask = bool(apply_t5_attn_mask)

    def encode_tokens(
        self,
        tokenize_strategy: object,
        models: Sequence[nn.Module | None],
        tokens: Sequence[torch.Tensor | None],
        apply_t5_attn_mask: bool | None = None,
    ) -> list[torch.Tensor | None]:
        """Returns ``[l_pooled, t5_out, txt_ids, t5_attn_mask]``.

        ``models`` is ``[clip]``, ``[clip, t5]`` or ``[clip, None]``; ``tokens`` is what
        ``FluxTokenizeStrategy.tokenize`` returned. CLIP gives its pooled (EOS) state (B, 768);
        T5 its last hidden state (B, L, D), seeing the padding mask only with
        ``apply_t5_attn_mask``. Without T5, ``t5_out``, ``txt_ids`` and the mask are None.
        A CLIP slot of None (Chroma, which has no CLIP) gives zeros of shape (B, 77, 1): the
        output of sd-scripts' ``DummyCLIPL``, which Chroma's DiT never reads, kept in that shape
        so text-encoder cache files are the same as sd-scripts'.
        """
        if apply_t5_attn_mask is None:
            apply_t5_attn_mask = self.apply_t5_attn_mask
        clip_l = models[0]
        t5xxl = models[1] if len(models) > 1 else None
        l_tokens, t5_tokens = tokens[0], tokens[1]
        t5_attn_mask = tokens[2] if len(tokens) > 2 else None

        t5_out = txt_ids = None
        if t5xxl is not None and t5_tokens is not None:
            t5_device = t5xxl.device
            mask = t5_attn_mask.to(t5_device) if apply_t5_attn_mask and t5_attn_mask is not None else None
            t5_out = t5xxl(t5_tokens.to(t5_device), attention_mask=mask, return_dict=True).last_hidden_state
            txt_ids = torch.zeros(t5_out.shape[0], t5_out.shape[1], 3, device=t5_out.device)
        else:
            t5_attn_mask = None

        if clip_l is not None and l_tokens is not None:
            l_pooled = clip_l(l_tokens.to(clip_l.device), return_dict=True).pooler_output
        elif clip_l is None:
            batch = (t5_tokens if t5_tokens is not None else l_tokens).shape[0]
            device = t5_out.device if t5_out is not None else torch.device("cpu")
            dtype = t5_out.dtype if t5_out is not None else torch.float32
            l_pooled = torch.zeros(batch, *CHROMA_DUMMY_POOLED_SHAPE, device=device, dtype=dtype)
        else:
            l_pooled = None
        return [l_pooled, t5_out, txt_ids, t5_attn_mask]
