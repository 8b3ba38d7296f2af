"""``--config_file`` (a TOML of arguments) and ``--output_config``, as in sd-scripts.

Sections of the TOML are flattened (``[training] max_train_steps = 10`` sets
``--max_train_steps``), the command line overrides the file, and keys the parser does not know
warn instead of failing, because GUIs write extra keys of their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from library.errors import UserError
from library.run_logging import SECRET_ARGS, first_launched_process
from library.train_args import IGNORED_FOR_FLUX, int_or_float

logger = logging.getLogger(__name__)
_NOT_SAVED = {"config_file", "output_config"}


def _config_path(path: str) -> str:
    return path if path.endswith(".toml") else path + ".toml"


def flatten(table: dict[str, Any]) -> dict[str, Any]:
    """Nested sections -> one level; a key given in two sections keeps the later one."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value))
        else:
            flat[key] = value
    return flat


# a command-line option -> the file's option that would otherwise override it (sd-scripts: epochs beat steps)
_DISPLACES = {"max_train_steps": "max_train_epochs"}
_DEFAULT_KEPT = object()  # the key is read as not given: the option keeps its default


def _convert(action: argparse.Action, value: Any, path: str) -> Any:
    """A TOML value as the command line would give it: converted by the option's type (``max_train_steps =
    10.0`` is the int 10; a quoted ``"false"`` is no true flag). As in sd-scripts, a TOML float up to 1 for a
    step count that takes ratios is a ratio: kohya_ss writes its warmup slider's 100% as ``lr_warmup_steps =
    1.0``, the whole run. GUIs write every option they show (kohya_ss writes ``persistent_data_loader_workers
    = 1``): on/off flags take 0 and 1 too, and a value outside an option's choices warns and leaves the
    default (:data:`_DEFAULT_KEPT`), as does an empty string for a list option (``network_args = ""``)."""

    def bad(v: Any, why: str) -> UserError:
        return UserError(f"{path}: {action.dest} = {v!r}: {why}")

    def one(v: Any) -> Any:
        if isinstance(v, float) and action.type is int_or_float and 0 <= v <= 1:
            return v  # a ratio of the run, 1.0 included
        if isinstance(v, float) and action.type in (int, int_or_float) and v.is_integer():
            v = int(v)  # TOML writers may put 10.0 for 10
        if isinstance(v, bool) and action.type is not None:
            raise bad(v, "expected a value, not true or false")
        if callable(action.type):
            try:
                v = action.type(v if isinstance(v, str) or action.type is str else str(v))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise bad(v, str(e)) from None
        if action.choices is not None and v not in action.choices:
            if action.dest in IGNORED_FOR_FLUX:  # no effect either way (kohya_ss writes max_token_length = 75)
                return _DEFAULT_KEPT
            shown = ", ".join(repr(c) for c in action.choices if c is not None)
            logger.warning("%s: %s = %r is not one of %s; the default %r is used", path, action.dest, v, shown,
                           action.default)  # fmt: skip
            return _DEFAULT_KEPT
        return v

    if action.nargs == 0:  # an on/off flag (store_true): a quoted "false" would be a true string
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise bad(value, "give true or false, without quotes")
    if action.nargs in ("*", "+") and value == "":
        return _DEFAULT_KEPT  # GUIs write an empty list option so; sd-scripts reads it as none given
    if action.nargs in ("*", "+") and not isinstance(value, list):
        value = [value]
    if isinstance(value, list) and action.nargs in (None, "?"):
        if action.dest in ("resolution", "face_crop_aug_range"):  # written as in a dataset config: [1024, 768]
            return one(",".join(str(v) for v in value))
        raise bad(value, "expected one value, not a list")
    if isinstance(value, list):
        items = [one(v) for v in value]
        return _DEFAULT_KEPT if _DEFAULT_KEPT in items else items
    return one(value)


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The known arguments of a config TOML, converted to the parser's types; unknown keys warn."""
    import toml

    path = _config_path(path)
    if not os.path.isfile(path):
        raise UserError(f"--config_file {path}: file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Notepad, PowerShell) is not part of the first key
            table = toml.load(f)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config_file {path}: not valid TOML ({e})") from None
    actions = {a.dest: a for a in parser._actions}
    values = {}
    for key, value in flatten(table).items():
        if key in _NOT_SAVED:
            continue
        if key not in actions:
            logger.warning("%s: unknown key %r ignored", path, key)
            continue
        converted = _convert(actions[key], value, path)
        if converted is not _DEFAULT_KEPT:
            values[key] = converted
    return values


def _toml_encoder():
    """toml's encoder with strings written as JSON writes them (valid TOML basic strings): toml 0.10
    writes a Windows path such as ``D:\\xl\\out`` with escapes it cannot read back."""
    import toml

    encoder = toml.TomlEncoder()
    encoder.dump_funcs[str] = lambda v: json.dumps(v, ensure_ascii=False)
    return encoder


def write_config_file(path: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Writes the arguments that differ from their defaults (sd-scripts' ``--output_config``). API
    keys and tokens stay out of the file, and an existing file is never replaced."""
    import toml

    path = _config_path(path)
    if os.path.exists(path):
        raise UserError(f"--output_config: {path} exists already; name a new file with --config_file")
    values, secrets = {}, []
    for key, value in vars(args).items():
        if value is None or key in _NOT_SAVED or value == parser.get_default(key):
            continue
        if key in SECRET_ARGS:
            secrets.append(key)
            continue
        values[key] = str(value) if isinstance(value, os.PathLike) else value
    if secrets:
        logger.warning("--output_config: %s not written to %s; give it on the command line", ", ".join(secrets), path)
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            toml.dump(values, f, encoder=_toml_encoder())
        os.replace(tmp, path)
    except (OSError, UnicodeEncodeError) as e:  # a path of undecodable bytes has no UTF-8 form to write
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"--output_config: cannot write {path} ({getattr(e, 'strerror', None) or e})") from None
    return path


def _drop_displaced(defaults: dict[str, Any], argv: list[str] | None, parser) -> None:
    """Leaves out the file's options that would override one given on the command line (the command line wins
    over the file, also where one option outranks another: ``--max_train_steps 3`` against the file's
    ``max_train_epochs = 10``)."""
    # argparse fills in a default only where the namespace lacks the attribute: what is still a marker was not typed
    dests = [d for pair in _DISPLACES.items() for d in pair]
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, _DEFAULT_KEPT)))
    for given, displaced in _DISPLACES.items():
        value = getattr(typed, given, _DEFAULT_KEPT)
        if displaced in defaults and value is not _DEFAULT_KEPT and getattr(typed, displaced) is _DEFAULT_KEPT:
            logger.info("--%s %s on the command line: the file's %s = %s is not used", given, value, displaced,
                        defaults.pop(displaced))  # fmt: skip


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line on top of ``--config_file``; handles ``--output_config`` (writes, exits 0)."""
    args = parser.parse_args(argv)
    if not getattr(args, "config_file", None):
        if getattr(args, "output_config", False):
            raise UserError("--output_config needs --config_file to name the file to write")
        return args
    if args.output_config:
        if first_launched_process():  # under accelerate launch every process gets here: one writes
            path = write_config_file(args.config_file, args, parser)
            print(f"wrote the arguments to {path}")
        sys.exit(0)
    defaults = read_config_file(args.config_file, parser)
    _drop_displaced(defaults, argv, parser)
    originals = {k: parser.get_default(k) for k in defaults}
    parser.set_defaults(**defaults)
    try:
        return parser.parse_args(argv)
    finally:
        parser.set_defaults(**originals)
