"""FLUX's tokenizers: CLIP-L and T5-XXL, where they come from, and how captions become ids.

Like sd-scripts, ``--tokenizer_cache_dir DIR`` reads ``DIR/openai_clip-vit-large-patch14`` and
``DIR/google_t5-v1_1-xxl`` when present and otherwise downloads them and saves them there, so a
machine without network can be given a copy. transformers 5, offline and without a local copy,
returns a placeholder tokenizer (2 or 104 tokens) instead of raising: every tokenizer is checked
after loading and a placeholder stops the run with a message that says what to do.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

CLIP_L_TOKENIZER_ID = "openai/clip-vit-large-patch14"
T5_XXL_TOKENIZER_ID = "google/t5-v1_1-xxl"
CLIP_MAX_LENGTH = 77
_PROBE_TEXT = "a photo of a cat"


def tokenizer_cache_path(tokenizer_cache_dir: str | os.PathLike, model_id: str) -> Path:
    """Where sd-scripts keeps ``model_id`` under ``--tokenizer_cache_dir``: ``/`` becomes ``_``."""
    return Path(tokenizer_cache_dir) / model_id.replace("/", "_")


def _how_to_fix() -> str:
    return (
        f"FLUX needs the tokenizers {CLIP_L_TOKENIZER_ID!r} and {T5_XXL_TOKENIZER_ID!r} (Chroma only the second), "
        "from the Hugging Face hub or a local copy. Without network, copy them into "
        f"DIR/{CLIP_L_TOKENIZER_ID.replace('/', '_')} and DIR/{T5_XXL_TOKENIZER_ID.replace('/', '_')} and pass "
        "--tokenizer_cache_dir DIR (one run with network and --tokenizer_cache_dir DIR saves them there; "
        "HF_HUB_OFFLINE=1 skips the minutes of network retries)."
    )


def placeholder_reason(tokenizer) -> str | None:
    """Why ``tokenizer`` is transformers' empty placeholder rather than a real one (None if real).

    Placeholders hold only special tokens (CLIP: 2, T5: 4 plus 100 sentinels) and turn text
    into unknown tokens.
    """
    regular = len(tokenizer) - len(set(tokenizer.all_special_ids))
    if regular < 8:
        return f"it has {len(tokenizer)} tokens, almost all special: a placeholder, not the real vocabulary"
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        return f"it turns {_PROBE_TEXT!r} into unknown tokens only"
    return None


def load_tokenizer(cls, model_id: str, tokenizer_cache_dir: str | os.PathLike | None = None, **kwargs):
    """Loads tokenizer class ``cls`` for ``model_id`` (sd-scripts' ``_load_tokenizer``).

    With ``tokenizer_cache_dir`` it reads ``DIR/<model_id with / as _>`` if that exists, else
    loads from the hub and saves a copy there. Without, it uses the Hugging Face cache, then
    the hub. ``kwargs`` go to ``from_pretrained`` (e.g. ``model_max_length=77``).
    Raises UserError, naming both FLUX tokenizer ids and ``--tokenizer_cache_dir``, when no
    real tokenizer can be had.
    """
    local = tokenizer_cache_path(tokenizer_cache_dir, model_id) if tokenizer_cache_dir is not None else None
    if local is not None and local.is_dir():
        try:
            tokenizer = cls.from_pretrained(str(local), **kwargs)
            reason = placeholder_reason(tokenizer)
        except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            raise UserError(
                f"{local}: not a usable copy of the tokenizer {model_id!r} ({reason}). Delete the folder so a run "
                f"with network downloads it again, or copy a complete tokenizer there. {_how_to_fix()}"
            )
        logger.info("tokenizer %s from %s", model_id, local)
        return tokenizer

    tokenizer, reason = _from_hub(cls, model_id, **kwargs)
    if tokenizer is None:
        raise UserError(f"Could not load the tokenizer {model_id!r}: {reason}. {_how_to_fix()}")
    if local is not None:
        _save_atomically(tokenizer, local)
    return tokenizer


def _from_hub(cls, model_id: str, **kwargs):
    """(tokenizer, None) from the Hugging Face cache, else the hub; (None, reason) if neither works."""
    reason = "not found"
    for local_files_only in (True, False):
        try:
            tokenizer = cls.from_pretrained(model_id, local_files_only=local_files_only, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, corrupt cache: all end the same way
            reason = f"{type(e).__name__}: {e}"
            continue
        reason = placeholder_reason(tokenizer)
        if reason is None:
            logger.info("tokenizer %s from the Hugging Face %s", model_id, "cache" if local_files_only else "hub")
            return tokenizer, None
    return None, f"neither the Hugging Face cache nor the hub gave it ({reason})"


def _save_atomically(tokenizer, target: Path) -> None:
    """Writes under a temporary name, then renames: a crash never leaves a half-written copy."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
        logger.info("saved tokenizer to %s", target)
    except OSError as e:
        # The tokenizer is loaded: failing to keep a copy should not stop training.
        logger.warning("could not save the tokenizer to %s (%s); it will be downloaded again next time", target, e)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clip_text(text: str) -> str:
    """A caption as CLIP's own (slow) tokenizer sees it, which sd-scripts uses: ftfy's fix_text first, so curly
    quotes, HTML entities, full-width characters and ligatures give the ids CLIP-L was trained on. transformers
    5 has only the fast tokenizer, which skips this step (its whitespace and case handling are the same)."""
    import ftfy

    return ftfy.fix_text(text)


class FluxTokenizeStrategy:
    """Captions to CLIP-L and T5 ids (sd-scripts' ``FluxTokenizeStrategy``).

    ``use_clip_l=False`` (Chroma) loads no CLIP tokenizer and returns None for the CLIP ids.
    """

    def __init__(
        self,
        t5xxl_max_length: int | None = 512,
        tokenizer_cache_dir: str | os.PathLike | None = None,
        use_clip_l: bool = True,
    ) -> None:
        from transformers import CLIPTokenizer, T5TokenizerFast

        self.t5xxl_max_length = t5xxl_max_length or 512
        self.clip_l = None
        if use_clip_l:
            self.clip_l = load_tokenizer(
                CLIPTokenizer, CLIP_L_TOKENIZER_ID, tokenizer_cache_dir, model_max_length=CLIP_MAX_LENGTH
            )
        self.t5xxl = load_tokenizer(T5TokenizerFast, T5_XXL_TOKENIZER_ID, tokenizer_cache_dir)

    def tokenize(self, text: str | list[str]) -> list[torch.Tensor | None]:
        """Returns ``[clip_ids (B, 77) or None, t5_ids (B, L), t5_attn_mask (B, L)]``.

        Both pad to their full length and truncate; the T5 mask is 1 on the tokens and the EOS.
        """
        text = [text] if isinstance(text, str) else list(text)
        clip_ids = None
        if self.clip_l is not None:
            clip_ids = self.clip_l(
                [clip_text(t) for t in text], max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                return_tensors="pt",
            )["input_ids"]
        t5 = self.t5xxl(
            text, max_length=self.t5xxl_max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        return [clip_ids, t5["input_ids"], t5["attention_mask"]]


# ---------------------------------------------------------------------------------------------
# Tiny real tokenizers (tests, demo)

_WORDS = (
    "a photo of the cat dog on table red blue green painting in style with and tree house "
    "woman man sitting standing under sky city night light old young portrait close up"
).split()
_CLIP_MERGED_WORDS = ("a", "photo", "of", "the", "cat", "dog", "painting", "style")


class TinyTokenizerSizes(NamedTuple):
    """Vocabulary sizes of the tiny tokenizers: size the tiny text encoders' embeddings to them."""

    clip_l: int
    t5xxl: int


def _tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout in miniature: bytes, bytes + ``</w>``, merges, then the specials.

    The specials come last as in CLIP-L (49406, 49407), so ``<|endoftext|>`` is the largest id
    and CLIP's argmax pooling finds it.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP's byte alphabet

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _CLIP_MERGED_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
            symbols = [merged, *symbols[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_tokenizers(directory: str | os.PathLike) -> TinyTokenizerSizes:
    """Writes small real CLIP and T5 tokenizers laid out as ``--tokenizer_cache_dir`` expects.

    ``directory/openai_clip-vit-large-patch14``: byte-level BPE with CLIP's pre-tokenizer and a
    few merges (any text tokenizes, pad = EOS as in OpenAI's). ``directory/google_t5-v1_1-xxl``:
    a sentencepiece unigram model trained here on generated sentences, plus T5's 100 sentinels.
    Deterministic, well under a second.
    """
    import sentencepiece as spm
    from transformers import CLIPTokenizer, T5TokenizerFast

    directory = Path(directory)
    clip_dir = tokenizer_cache_path(directory, CLIP_L_TOKENIZER_ID)
    t5_dir = tokenizer_cache_path(directory, T5_XXL_TOKENIZER_ID)
    clip_dir.mkdir(parents=True, exist_ok=True)
    t5_dir.mkdir(parents=True, exist_ok=True)

    vocab, merges = _tiny_clip_vocab()
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    clip.save_pretrained(str(clip_dir))
    # The hub copy also has the slow-tokenizer files; other tools may read those.
    (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=32,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (t5_dir / "spiece.model").write_bytes(model.getvalue())
    t5 = T5TokenizerFast.from_pretrained(str(t5_dir), extra_ids=100)
    t5.save_pretrained(str(t5_dir))
    return TinyTokenizerSizes(clip_l=len(clip), t5xxl=len(t5))
