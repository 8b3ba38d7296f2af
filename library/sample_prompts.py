"""Sample prompts for images during training (``--sample_prompts``), in sd-scripts' formats.

Three file formats (spec §i.1):

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
- ``.toml``: a ``[prompt]`` table of shared keys and ``[[prompt.subset]]`` entries, each
  entry's keys overriding the shared ones;
- ``.json``: a list whose items are prompt lines (strings) or dicts.

A prompt line is the prompt followed by options, split on ``" --"``; letters are case-insensitive:
``--w`` width, ``--h`` height, ``--d`` seed (-1: random), ``--s`` steps (clamped to 1..1000), ``--l`` CFG
scale, ``--g`` embedded guidance, ``--n`` negative prompt (the rest of its segment). ``--ss``,
``--cn``, ``--ctr``, ``--rcfg`` and ``--fs`` belong to other models or samplers: they are
accepted and ignored with one warning each. Dict entries use sd-scripts' keys: ``prompt``,
``negative_prompt``, ``width``, ``height``, ``seed``, ``sample_steps``, ``scale`` (CFG) and
``guidance_scale``.

Unlike sd-scripts, which logs and skips what it cannot parse (or crashes mid-run, on a file that
has gone missing), every problem is a :class:`~library.errors.UserError` naming the file, the
entry and the option, raised by :func:`prepare_sample_prompts` when the trainer starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)

MAX_SAMPLE_STEPS = 1000
MAX_SEED = 2**64  # torch.Generator.manual_seed takes 64 bits
RANDOM_SEED = "-1"  # a seed of -1: none fixed, as in A1111 (whose prompts users bring)

# option letter -> sd-scripts' prompt-dict key
_INT_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "sample_steps"}
_FLOAT_OPTIONS = {"l": "scale", "g": "guidance_scale"}
_IGNORED_OPTIONS = {
    "ss": ("sample_sampler", "FLUX always samples with the Euler flow sampler"),
    "cn": ("controlnet_image", "ControlNet sampling is not supported"),
    "ctr": ("cfg_trunc_ratio", "it is a Lumina option"),
    "rcfg": ("renorm_cfg", "it is a Lumina option"),
    "fs": ("flow_shift", "FLUX sampling shifts its schedule by resolution"),
}
_IGNORED_KEYS = {key: (letter, why) for letter, (key, why) in _IGNORED_OPTIONS.items()}
_DICT_KEYS = {"prompt", "negative_prompt", *_INT_OPTIONS.values(), *_FLOAT_OPTIONS.values()}
# written by sd-scripts itself into prompt dicts; harmless in user files
_BOOKKEEPING_KEYS = {"enum", "subset"}

_INT_RE = re.compile(r"(\d+)(?:\.0*)?")  # 1024.0, as GUIs' number fields write it, is 1024
_FLOAT_RE = re.compile(r"\d+(\.\d*)?|\.\d+")
_OPTION_RE = re.compile(r"([A-Za-z]+)(?:\s+(.*))?", re.DOTALL)


@dataclass
class SamplePrompt:
    """One sample prompt. ``None`` means "not given": the sampler applies the model's default."""

    index: int
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    sample_steps: int | None = None
    cfg_scale: float | None = None
    guidance_scale: float | None = None
    ignored: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """sd-scripts' prompt dict (keys as in its ``line_to_prompt_dict``, plus ``enum``)."""
        d: dict[str, Any] = {"prompt": self.prompt, "enum": self.index}
        for key, value in (
            ("negative_prompt", self.negative_prompt),
            ("width", self.width),
            ("height", self.height),
            ("seed", self.seed),
            ("sample_steps", self.sample_steps),
            ("scale", self.cfg_scale),
            ("guidance_scale", self.guidance_scale),
        ):
            if value is not None:
                d[key] = value
        d.update(self.ignored)
        return d


class _Warnings:
    """Collects one warning per ignored option or unknown key per file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            logger.warning("%s", message)


def _bad(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}")


def _parse_int(value: str, where: str, option: str) -> int:
    if not (whole := _INT_RE.fullmatch(value)):
        raise _bad(where, f"{option} needs a whole number of 0 or more, not {value!r}")
    return int(whole.group(1))


def _parse_float(value: str, where: str, option: str) -> float:
    if not _FLOAT_RE.fullmatch(value):
        raise _bad(where, f"{option} needs a number of 0 or more (like 3.5), not {value!r}")
    return float(value)


def line_to_prompt_dict(line: str, where: str = "sample prompt", warnings: _Warnings | None = None) -> dict[str, Any]:
    """Parses one prompt line into sd-scripts' prompt dict (``prompt``, ``width``, ``scale``, ...).

    Unlike sd-scripts, the prompt itself (before the first ``" --"``) is never read as an
    option, a malformed value raises :class:`UserError` naming ``where``, and an unknown option
    is dropped from the prompt with a warning.
    """
    warnings = warnings or _Warnings(where)
    segments = line.split(" --")
    result: dict[str, Any] = {"prompt": segments[0].strip()}
    for segment in segments[1:]:
        segment = segment.strip()
        if not segment:
            continue
        m = _OPTION_RE.fullmatch(segment)
        letter = m.group(1).lower() if m else ""
        value = (m.group(2) or "").strip() if m else ""
        option = f"--{letter}"
        if letter == "n":
            result["negative_prompt"] = value
        elif letter == "d" and value == RANDOM_SEED:  # A1111's "random"; sd-scripts reads no seed from it either
            result.pop("seed", None)
        elif letter in _INT_OPTIONS:
            number = _parse_int(value, where, option)
            if letter == "s":
                number = max(1, min(MAX_SAMPLE_STEPS, number))
            if letter == "d" and number >= MAX_SEED:
                raise _bad(where, f"the seed must be below 2**64, not {number}")
            result[_INT_OPTIONS[letter]] = number
        elif letter in _FLOAT_OPTIONS:
            result[_FLOAT_OPTIONS[letter]] = _parse_float(value, where, option)
        elif letter in _IGNORED_OPTIONS:
            key, why = _IGNORED_OPTIONS[letter]
            result[key] = value
            warnings.once(option, f"{warnings.source}: {option} is ignored for FLUX: {why}")
        else:
            shown = segment if len(segment) <= 40 else segment[:37] + "..."
            warnings.once(f"unknown:{letter}", f"{where}: unknown option '--{shown}' is ignored")
    return result


def _from_dict(entry: Mapping[str, Any], index: int, where: str, warnings: _Warnings) -> SamplePrompt:
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise _bad(where, "each entry needs a 'prompt' string")
    values: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _IGNORED_KEYS:
            letter, why = _IGNORED_KEYS[key]
            ignored[key] = value
            warnings.once(f"--{letter}", f"{warnings.source}: '{key}' is ignored for FLUX: {why}")
        elif key in _BOOKKEEPING_KEYS or key == "prompt" or value is None:  # JSON's null: not given, as sd-scripts
            continue
        elif key not in _DICT_KEYS:
            warnings.once(
                f"key:{key}",
                f"{where}: unknown key '{key}' is ignored (known keys: {', '.join(sorted(_DICT_KEYS))})",
            )
        elif key == "seed" and str(value) == RANDOM_SEED:
            continue
        elif key == "negative_prompt":
            if not isinstance(value, str):
                raise _bad(where, f"'negative_prompt' must be a string, not {value!r}")
            values[key] = value
        else:
            values[key] = _number(key, value, where)
    if values.get("seed", 0) >= MAX_SEED:
        raise _bad(where, f"the seed must be below 2**64, not {values['seed']}")
    return SamplePrompt(
        index=index,
        prompt=prompt,
        negative_prompt=values.get("negative_prompt"),
        width=values.get("width"),
        height=values.get("height"),
        seed=values.get("seed"),
        sample_steps=values.get("sample_steps"),
        cfg_scale=values.get("scale"),
        guidance_scale=values.get("guidance_scale"),
        ignored=ignored,
    )


def _number(key: str, value: Any, where: str) -> int | float:
    is_int_key = key in _INT_OPTIONS.values()
    # bool is an int subclass: `width = true` is a mistake, not 1
    # 1024.0 is a whole number (a GUI's number field may write it so); 64.5 is not
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ok = whole if is_int_key else isinstance(value, (int, float))
    # inf and nan pass JSON and TOML, and made every sample black
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < 0:
        kind = "a whole number" if is_int_key else "a number"
        raise _bad(where, f"'{key}' must be {kind} of 0 or more, not {value!r}")
    if not is_int_key:
        return float(value)
    value = int(value)
    return max(1, min(MAX_SAMPLE_STEPS, value)) if key == "sample_steps" else value


def _from_line(line: str, index: int, where: str, warnings: _Warnings) -> SamplePrompt:
    return _from_dict(line_to_prompt_dict(line, where, warnings), index, where, warnings)


def _read_entries(path: str) -> list[tuple[str, Any]]:
    """(location, str or dict) per entry, in file order."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".toml", ".json"):
        raise UserError(f"--sample_prompts {path}: the file name must end with .txt, .toml or .json")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Notepad, PowerShell) is no part of the first line
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"--sample_prompts {path}: the file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--sample_prompts {path}: cannot read the file ({e}); it must be UTF-8 text") from None

    if ext == ".txt":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                entries.append((f"{path}, line {number}", stripped))
        return entries

    if ext == ".toml":
        import toml

        try:
            data = toml.loads(text)
        except toml.TomlDecodeError as e:
            raise UserError(f"--sample_prompts {path}: not valid TOML ({e})") from None
        shared = data.get("prompt")
        subsets = shared.get("subset") if isinstance(shared, dict) else None
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise UserError(
                f"--sample_prompts {path}: expected a [prompt] table with [[prompt.subset]] entries, "
                'e.g.\n[prompt]\nwidth = 512\n\n[[prompt.subset]]\nprompt = "a cat"'
            )
        common = {k: v for k, v in shared.items() if k != "subset"}
        # sd-scripts builds dict(**shared, **subset), which fails when an entry repeats a shared
        # key; here the entry's value wins, which is what a per-entry key is for.
        return [(f"{path}, [[prompt.subset]] #{i + 1}", {**common, **s}) for i, s in enumerate(subsets)]

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--sample_prompts {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"--sample_prompts {path}: expected a JSON list of prompt strings or objects")
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, (str, dict)):
            raise UserError(f"--sample_prompts {path}, item {i}: expected a prompt string or an object")
        entries.append((f"{path}, item {i}", item.strip() if isinstance(item, str) else item))
    return entries


def load_prompts(path: str | os.PathLike) -> list[SamplePrompt]:
    """Reads a ``.txt``, ``.toml`` or ``.json`` prompts file; problems raise :class:`UserError`.

    ``SamplePrompt.index`` is the entry's position among the prompts (sd-scripts' ``enum``),
    which names the image files.
    """
    path = os.fspath(path)
    warnings = _Warnings(path)
    prompts = []
    for location, entry in _read_entries(path):
        if isinstance(entry, str):
            prompts.append(_from_line(entry, len(prompts), location, warnings))
        else:
            prompts.append(_from_dict(entry, len(prompts), location, warnings))
    return prompts


def _sample_interval(args: Any, unit: str) -> int | None:
    """``--sample_every_n_{unit}``, or None when it is unset or 0 or less (off)."""
    value = getattr(args, f"sample_every_n_{unit}", None)
    return value if value is not None and value > 0 else None


def prepare_sample_prompts(args: Any) -> list[SamplePrompt] | None:
    """Validates the sample options of a run at start; returns the prompts, or None when not sampling.

    Reads ``args.sample_prompts``, ``sample_every_n_steps``, ``sample_every_n_epochs`` and
    ``sample_at_first``. A missing or unreadable prompts file, or a malformed entry, is a
    :class:`UserError` now rather than a failure hours into training. Options that would
    silently do nothing (a trigger without a file, a file without a trigger, a file without
    prompts) each warn once.
    """
    path = getattr(args, "sample_prompts", None)
    for unit in ("steps", "epochs"):
        if (value := getattr(args, f"sample_every_n_{unit}", None)) is not None and value <= 0:
            logger.warning("--sample_every_n_%s %d: no sampling by %s (0 or less turns it off, as in sd-scripts)",
                           unit, value, unit)  # fmt: skip
    every_steps, every_epochs = _sample_interval(args, "steps"), _sample_interval(args, "epochs")
    at_first = bool(getattr(args, "sample_at_first", False))
    triggers = [
        name
        for name, on in (
            ("--sample_every_n_steps", every_steps is not None),
            ("--sample_every_n_epochs", every_epochs is not None),
            ("--sample_at_first", at_first),
        )
        if on
    ]
    if not path:
        if triggers:
            logger.warning("%s has no effect without --sample_prompts: no sample images will be made", triggers[0])
        return None
    prompts = load_prompts(path)
    if not triggers and prompts:
        logger.warning(
            "--sample_prompts %s is given but no --sample_every_n_steps, --sample_every_n_epochs or "
            "--sample_at_first: no sample images will be made",
            path,
        )
    if every_steps is not None and every_epochs is not None:
        logger.warning("--sample_every_n_epochs is set, so --sample_every_n_steps is ignored (as in sd-scripts)")
    if not prompts and triggers:  # (an empty file and no trigger: a GUI that always writes one, sampling off)
        logger.warning("--sample_prompts %s contains no prompts: no sample images will be made", path)
    return prompts


@dataclass(frozen=True)
class SampleTriggers:
    """When the trainer samples (sd-scripts' rules, spec §i.1).

    The trainer asks :meth:`due` with ``epoch=0, steps=0`` before training, ``epoch=None`` after
    each optimiser step, and ``epoch=E`` (1-based) at the end of epoch E.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False

    @classmethod
    def from_args(cls, args: Any) -> SampleTriggers:
        return cls(
            _sample_interval(args, "steps"),
            _sample_interval(args, "epochs"),
            bool(getattr(args, "sample_at_first", False)),
        )

    def due(self, epoch: int | None, steps: int) -> bool:
        if steps == 0:
            return self.at_first
        if self.every_n_epochs is not None:  # then every_n_steps is ignored, as in sd-scripts
            return epoch is not None and epoch % self.every_n_epochs == 0
        if self.every_n_steps is not None:
            return epoch is None and steps % self.every_n_steps == 0
        return False
