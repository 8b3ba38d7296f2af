"""Caption files and caption processing (sd-scripts' `process_caption`, spec §c.6).

All randomness comes from the `random.Random` passed in, so a caption depends only on the
sample's seed (see `library.datasets.sample_rng`), never on global state, worker or process.

Differences from sd-scripts, on purpose:
- a UTF-8 byte-order mark at the start of a caption file is dropped;
- `keep_tokens_separator` is honoured (fixed / flexible / fixed-suffix parts re-joined with ", ")
  whenever it occurs in the caption, not only when shuffle/warm-up/tag-dropout is on, so the
  separator text itself never reaches the text encoders.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import random
import re
from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class CaptionOptions:
    """The caption-related settings of one subset (resolved, see library.dataset_config)."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0


def read_utf8(path: str, what: str) -> str:
    """A text file's contents, without a UTF-8 byte-order mark. Not UTF-8: a UserError that names
    ``what`` it is and the first bad byte's offset in the file."""
    with open(path, "rb") as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: {what} is not valid UTF-8 ({e.reason} at byte {bom + e.start}); re-save it as UTF-8."
        ) from None


def read_caption_file(image_path: str, caption_extension: str, enable_wildcard: bool) -> str | None:
    """The caption for `image_path`, or None when it has no caption file.

    Tries `<stem><ext>`, then the face-crop stem (name minus its last 4 `_` fields). Only the first
    line is kept unless `enable_wildcard`, which keeps every non-empty line joined with newlines.
    """
    base = os.path.splitext(image_path)[0]
    candidates = [base + caption_extension]
    tokens = base.split("_")
    if len(tokens) >= 5:
        candidates.append("_".join(tokens[:-4]) + caption_extension)
    for cap_path in candidates:
        if not os.path.isfile(cap_path):
            continue
        lines = io.StringIO(read_utf8(cap_path, "caption file"), newline=None).readlines()
        if enable_wildcard:
            text = "\n".join(line.strip() for line in lines if line.strip())
        else:
            text = lines[0].strip() if lines else ""
        if not text:  # nothing, blank lines, or (without wildcards, which use only the first line) a blank first line
            raise UserError(
                f"{cap_path}: caption file is empty{' (its first line is blank)' if ''.join(lines).strip() else ''}; "
                "write a caption into it, or delete it to use the subset's class_tokens."
            )
        return text
    return None


def _choose_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # `{{` and `}}` are literal braces: park them on characters the caption does not contain
    open_ph, close_ph = "\u2985", "\u2986"
    while open_ph in caption or close_ph in caption:
        open_ph += "\u2985"
        close_ph += "\u2986"
    caption = caption.replace("{{", open_ph).replace("}}", close_ph)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_ph, "{").replace(close_ph, "}")


def _split_tokens(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed_suffix) tokens."""
    sep = opts.caption_separator
    if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(opts.keep_tokens_separator, 1)
        suffix: list[str] = []
        if opts.keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(opts.keep_tokens_separator, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, suffix
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if opts.keep_tokens > 0:
        return tokens[: opts.keep_tokens], tokens[opts.keep_tokens :], []
    return [], tokens, []


def warmup_steps(opts: CaptionOptions, max_train_steps: int) -> float:
    """token_warmup_step below 1 is a fraction of the run, as in sd-scripts; from 1 up it is used as given,
    a fractional 2.5 included (sd-scripts compares the step with it and divides by it unrounded)."""
    step = opts.token_warmup_step
    if step < 1:
        return math.floor(step * max_train_steps)
    return step


def process_caption(
    caption: str,
    opts: CaptionOptions,
    rng: random.Random,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """One sample's caption: prefix/suffix, dropout, wildcards, keep/shuffle/warm-up/tag dropout.

    `epoch` is 1-based as in sd-scripts (caption_dropout_every_n_epochs drops when
    epoch % n == 0); `step` and `max_train_steps` drive token warm-up.
    """
    if opts.caption_prefix or opts.caption_suffix:
        # on every line: with enable_wildcard a line is drawn below, and each must carry the trigger
        # word (sd-scripts adds them to the whole text, so only the first line got the prefix)
        caption = "\n".join(
            " ".join(part for part in (opts.caption_prefix, line, opts.caption_suffix) if part)
            for line in caption.split("\n")
        )

    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    # epoch 0 is "outside training" (validation, caching): no epoch-based dropout there
    every_n = opts.caption_dropout_every_n_epochs
    dropped = dropped or (every_n > 0 and epoch > 0 and epoch % every_n == 0)
    if dropped:
        return ""

    if opts.enable_wildcard:
        caption = _choose_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = warmup_steps(opts, max_train_steps)
    has_kts = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if opts.shuffle_caption or warmup > 0 or opts.caption_tag_dropout_rate > 0 or has_kts:
        fixed, flex, suffix = _split_tokens(caption, opts)
        if warmup and step < warmup:
            n = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min
            flex = flex[:n]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def caption_for_cache(caption: str, opts: CaptionOptions, key: str) -> str:
    """The fixed caption encoded once for the text-encoder cache.

    Applies every deterministic transform (prefix/suffix, first line, keep_tokens_separator
    re-join, secondary separator). Wildcards are resolved once, from a generator seeded by the
    image key, so the cached choice is stable across runs and seeds. The four random options are
    refused earlier (library.dataset_config.check_caching), so they are off here.
    """
    fixed = CaptionOptions(
        caption_prefix=opts.caption_prefix,
        caption_suffix=opts.caption_suffix,
        caption_separator=opts.caption_separator,
        secondary_separator=opts.secondary_separator,
        enable_wildcard=opts.enable_wildcard,
        keep_tokens=opts.keep_tokens,
        keep_tokens_separator=opts.keep_tokens_separator,
    )
    # bytes, so that a file name that is not UTF-8 (kept by Python as surrogates) seeds too; for any
    # other name the seed is the same as the string's
    return process_caption(caption, fixed, random.Random(("wildcard:" + key).encode("utf-8", "surrogateescape")))
