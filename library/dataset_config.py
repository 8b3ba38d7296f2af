"""The dataset configuration: the TOML/JSON schema, its levels, fallbacks and error messages.

Public API:
    load_dataset_configs(args) -> list[DatasetConfig]
        Reads --dataset_config (TOML or JSON) or, without it, --train_data_dir / --reg_data_dir /
        --in_json, validates every key and resolves each value with sd-scripts' fallback order:
        subset table, dataset table, [general], command line, default. Raises UserError.
    validate_user_config(config: dict, source: str) -> None
    check_caching(datasets, args) -> None
        Refuses options that cannot work with --cache_latents / --cache_text_encoder_outputs and
        warns about those that caching freezes.
    DatasetConfig, SubsetConfig: the resolved settings (dataclasses).

Levels (spec §c.2), plus what the user's guide adds: `validation_split` is accepted in subsets
too (a subset's value wins over its dataset's), and `interpolation_type` is a second name for
`resize_interpolation` at every level.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml

from library.captions import CaptionOptions
from library.dataset_args import parse_resolution
from library.errors import UserError
from library.images import DEFAULT_INTERPOLATION, INTERPOLATIONS, canonical_interpolation

logger = logging.getLogger(__name__)

GENERAL, DATASET, SUBSET = "[general]", "[[datasets]]", "[[datasets.subsets]]"


# --- value types: each returns the converted value or raises _Bad("expected ...") ---------------
class _Bad(Exception):
    pass


def _bool(v):
    if isinstance(v, bool):
        return v
    raise _Bad("expected true or false")


def _int(v):
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise _Bad("expected an integer")


def _float(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise _Bad("expected a number")


def _str(v):
    if isinstance(v, str):
        return v
    raise _Bad("expected a string (in quotes)")


def _separator(v):
    if _str(v) == "":
        raise _Bad("an empty separator cannot split a caption; leave the key out for the default ','")
    return v


def _table(v):
    if isinstance(v, dict):
        return dict(v)
    raise _Bad("expected a table, e.g. { key = value }")


def _float_pair(v):
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (_float(v[0]), _float(v[1]))
    raise _Bad("expected [number, number]")


def _resolution(v):
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (v[0], v[1])
    raise _Bad("expected an integer or [width, height], e.g. resolution = [1024, 1024]")


def _interp(v):
    v = _str(v)
    if v not in INTERPOLATIONS:
        raise _Bad(f"expected one of {', '.join(INTERPOLATIONS)}")
    return canonical_interpolation(v)


ALL3 = (GENERAL, DATASET, SUBSET)
GEN_DS = (GENERAL, DATASET)
SUB = (SUBSET,)
# key -> (type, levels, dreambooth_only)
SCHEMA: dict[str, tuple[Any, tuple[str, ...], bool]] = {
    # subset settings that may be written at any level and are inherited
    "color_aug": (_bool, ALL3, False),
    "face_crop_aug_range": (_float_pair, ALL3, False),
    "flip_aug": (_bool, ALL3, False),
    "num_repeats": (_int, ALL3, False),
    "random_crop": (_bool, ALL3, False),
    "shuffle_caption": (_bool, ALL3, False),
    "keep_tokens": (_int, ALL3, False),
    "keep_tokens_separator": (_str, ALL3, False),
    "secondary_separator": (_str, ALL3, False),
    "caption_separator": (_separator, ALL3, False),
    "enable_wildcard": (_bool, ALL3, False),
    "token_warmup_min": (_int, ALL3, False),
    "token_warmup_step": (_float, ALL3, False),
    "caption_prefix": (_str, ALL3, False),
    "caption_suffix": (_str, ALL3, False),
    "custom_attributes": (_table, ALL3, False),
    "resize_interpolation": (_interp, ALL3, False),
    "interpolation_type": (_interp, ALL3, False),
    "caption_dropout_every_n_epochs": (_int, ALL3, False),
    "caption_dropout_rate": (_float, ALL3, False),
    "caption_tag_dropout_rate": (_float, ALL3, False),
    "validation_split": (_float, ALL3, False),
    # DreamBooth (image_dir + caption files) only
    "caption_extension": (_str, ALL3, True),
    "class_tokens": (_str, ALL3, True),
    "cache_info": (_bool, ALL3, True),
    "is_reg": (_bool, SUB, True),
    # per subset
    "image_dir": (_str, SUB, False),
    "metadata_file": (_str, SUB, False),
    "alpha_mask": (_bool, SUB, False),
    # per dataset
    "batch_size": (_int, GEN_DS, False),
    "bucket_no_upscale": (_bool, GEN_DS, False),
    "bucket_reso_steps": (_int, GEN_DS, False),
    "enable_bucket": (_bool, GEN_DS, False),
    "max_bucket_reso": (_int, GEN_DS, False),
    "min_bucket_reso": (_int, GEN_DS, False),
    "validation_seed": (_int, GEN_DS, False),
    "resolution": (_resolution, GEN_DS, False),
    "network_multiplier": (_float, GEN_DS, False),
}
HINTS = {
    "prior_loss_weight": "it is a command-line option: pass --prior_loss_weight",
    "train_batch_size": "in a dataset config it is called batch_size",
    "dataset_repeats": "in a dataset config it is called num_repeats",
    "conditioning_data_dir": "ControlNet-style conditioning images are not supported by this trainer; "
    "use alpha_mask = true with transparent PNGs for masked loss",
    "seed": "the training seed is the command-line option --seed; the split seed is validation_seed",
}
# (--caption_extention, sd-scripts' old spelling, comes after --caption_extension in the arguments: it wins, as there)
CLI_TO_KEY = {
    "train_batch_size": "batch_size",
    "dataset_repeats": "num_repeats",
    "caption_extention": "caption_extension",
}


def _fail(source: str, path: str, msg: str) -> UserError:
    return UserError(f"{source}: {path}: {msg}")


def _levels_text(levels: tuple[str, ...]) -> str:
    return " and ".join(levels) if len(levels) < 3 else "[general], [[datasets]] and [[datasets.subsets]]"


def _check_table(tbl: dict, level: str, path: str, source: str, dreambooth: bool | None) -> None:
    for key, value in tbl.items():
        where = f"{path}.{key}" if path else key
        if key == "subsets" and level == DATASET:
            continue
        if key in ("datasets", "subsets", "general"):
            raise _fail(
                source,
                where,
                f"a `{key}` table cannot appear in {level}; the layout is [general], "
                "[[datasets]], and [[datasets.subsets]] under each [[datasets]].",
            )
        if key not in SCHEMA:
            hint = HINTS.get(key)
            if hint is None:
                close = difflib.get_close_matches(key, list(SCHEMA) + ["general", "datasets", "subsets"], n=1)
                hint = f"did you mean `{close[0]}`?" if close else "check the spelling against the documentation"
            raise _fail(source, where, f"unknown key `{key}`; {hint}.")
        conv, levels, db_only = SCHEMA[key]
        if level not in levels:
            raise _fail(
                source,
                where,
                f"`{key}` is not allowed in {level}; it is allowed in {_levels_text(levels)}. Move it there.",
            )
        if db_only and dreambooth is False:
            raise _fail(
                source,
                where,
                f"`{key}` applies only to DreamBooth subsets (image_dir with caption files); this dataset's "
                "subsets use metadata_file (fine-tuning). Put captions in the metadata file instead.",
            )
        try:
            conv(value)
        except _Bad as e:
            raise _fail(source, where, f"{e}, got {value!r} ({type(value).__name__}).") from None
    if "resize_interpolation" in tbl and "interpolation_type" in tbl:
        a, b = _interp(tbl["resize_interpolation"]), _interp(tbl["interpolation_type"])
        if a != b:
            raise _fail(
                source,
                path or "top level",
                f"resize_interpolation = {tbl['resize_interpolation']!r} and interpolation_type = "
                f"{tbl['interpolation_type']!r} are two names for one setting and disagree; keep one.",
            )


def validate_user_config(config: dict, source: str) -> None:
    """Checks every key's level and type; raises UserError naming the key's path and the fix."""
    for key, value in config.items():
        if key == "subsets":
            raise _fail(
                source,
                key,
                "subsets must belong to a dataset: write [[datasets.subsets]] after a "
                "[[datasets]] table, not [[subsets]].",
            )
        if key not in ("general", "datasets"):
            if key in SCHEMA:
                conv, levels, _ = SCHEMA[key]
                raise _fail(
                    source,
                    key,
                    f"`{key}` is outside any table; it is allowed in {_levels_text(levels)}. "
                    "Move it under [general] (or into a [[datasets]] entry).",
                )
            _check_table({key: value}, GENERAL, "", source, None)
    general = config.get("general", {})
    if not isinstance(general, dict):
        raise _fail(source, "general", "expected a table: write [general] followed by key = value lines.")
    _check_table(general, GENERAL, "general", source, None)
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise _fail(source, "datasets", "expected at least one [[datasets]] table (note the double brackets).")
    for i, ds in enumerate(datasets):
        subsets = ds.get("subsets")
        if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
            raise _fail(source, f"datasets[{i}]", "expected at least one [[datasets.subsets]] table with an image_dir.")
        with_md = [j for j, s in enumerate(subsets) if "metadata_file" in s]
        if with_md and len(with_md) != len(subsets):
            without = [j for j in range(len(subsets)) if j not in with_md]
            raise _fail(
                source,
                f"datasets[{i}]",
                f"DreamBooth subsets (image_dir + caption files) and fine-tuning subsets (metadata_file) cannot be "
                f"mixed in one dataset: subsets[{with_md[0]}] has metadata_file, subsets[{without[0]}] does not. "
                "Put them in separate [[datasets]].",
            )
        dreambooth = not with_md
        _check_table(ds, DATASET, f"datasets[{i}]", source, dreambooth)
        for j, sub in enumerate(subsets):
            path = f"datasets[{i}].subsets[{j}]"
            _check_table(sub, SUBSET, path, source, dreambooth)
            if dreambooth and "image_dir" not in sub:
                raise _fail(source, path, "required key `image_dir` is missing (or `metadata_file` for fine-tuning).")


# --- resolved settings -----------------------------------------------------------------------
@dataclass
class SubsetConfig:
    """One subset with every value resolved; `origins[key]` says where a value came from."""

    label: str
    kind: str  # "dreambooth" or "finetune"
    image_dir: str | None
    metadata_file: str | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    num_repeats: int = 1
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    custom_attributes: dict = field(default_factory=dict)
    interpolation: str = DEFAULT_INTERPOLATION
    validation_split: float = 0.0
    origins: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the dataset config file (or "command line") it came from

    def key_path(self, key: str) -> str:
        """Where ``key`` of this subset is written, for messages: ``file: datasets[0].subsets[1].key``."""
        return f"{self.source}: {self.label}.{key}" if self.source else f"{self.label}.{key}"

    def describe(self) -> str:
        where = self.image_dir if self.kind == "dreambooth" else self.metadata_file
        return f"{self.label} ({where})"


@dataclass
class DatasetConfig:
    """One [[datasets]] entry: a resolution, a batch size and its subsets."""

    label: str
    kind: str
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    prior_loss_weight: float = 1.0
    validation_seed: int | None = None
    subsets: list[SubsetConfig] = field(default_factory=list)


_CAPTION_FIELDS = [f for f in CaptionOptions.__dataclass_fields__]


class _Resolver:
    def __init__(self, tables: list[tuple[str, dict]]):
        self.tables = tables
        self.origins: dict[str, str] = {}

    def get(self, key: str, default=None):
        for name, tbl in self.tables:
            if tbl.get(key) is not None:
                self.origins[key] = name
                return tbl[key]
        self.origins[key] = "default"
        return default

    def interpolation(self) -> str:
        for name, tbl in self.tables:
            for key in ("interpolation_type", "resize_interpolation"):
                if tbl.get(key) is not None:
                    self.origins["interpolation_type"] = name
                    return canonical_interpolation(tbl[key])
        return DEFAULT_INTERPOLATION


def _cli_flag(key: str) -> str:
    return "--" + next((cli for cli, k in CLI_TO_KEY.items() if k == key), key)


def _cli_table(args: argparse.Namespace) -> dict:
    """The dataset settings given on the command line, checked with the file's value types (an error
    names the flag)."""
    out = {}
    for name, value in vars(args).items():
        key = CLI_TO_KEY.get(name, name)
        if value is None or (key not in SCHEMA and key != "prior_loss_weight"):
            continue
        try:
            if key == "resolution":
                value = parse_resolution(value)
            elif key == "face_crop_aug_range" and isinstance(value, str):
                try:
                    value = tuple(float(x) for x in value.split(","))
                except ValueError:
                    raise _Bad("expected two numbers, e.g. 2.0,4.0") from None
            if key in SCHEMA:
                value = SCHEMA[key][0](value)
        except _Bad as e:
            raise UserError(f"{_cli_flag(key)} {value!r}: {e}") from None
        out[key] = value
    return out


def _range(source: str, path: str, key: str, value: float, lo: float, hi: float, origin: str | None = None) -> None:
    """A value outside [lo, hi] stops the run, naming where it was set: the table, or the command line."""
    if lo <= value <= hi:
        return
    problem = f"must be {lo} or more" if hi == math.inf else f"is outside [{lo}, {hi}]"
    if origin == "command line":
        raise UserError(f"{_cli_flag(key)} {value} {problem}.")
    where = origin if origin not in (None, "default") else path
    raise _fail(source, where, f"{key} = {value} {problem}.")


def _resolve(config: dict, args: argparse.Namespace, source: str) -> list[DatasetConfig]:
    cli = _cli_table(args)
    general = config.get("general", {})
    result = []
    for i, ds in enumerate(config["datasets"]):
        label = f"datasets[{i}]"
        kind = "finetune" if "metadata_file" in ds["subsets"][0] else "dreambooth"
        r = _Resolver([(label, ds), ("[general]", general), ("command line", cli)])
        resolution = r.get("resolution")
        if resolution is None:
            raise _fail(
                source,
                label,
                "resolution is not set; add resolution = [1024, 1024] to this [[datasets]] or [general], "
                "or pass --resolution 1024,1024.",
            )
        resolution = _resolution(resolution) if not isinstance(resolution, tuple) else resolution
        dcfg = DatasetConfig(
            label=label,
            kind=kind,
            resolution=resolution,
            batch_size=r.get("batch_size", 1),
            enable_bucket=r.get("enable_bucket", False),
            min_bucket_reso=r.get("min_bucket_reso", 256),
            max_bucket_reso=r.get("max_bucket_reso", 1024),
            bucket_reso_steps=r.get("bucket_reso_steps", 64),
            bucket_no_upscale=r.get("bucket_no_upscale", False),
            network_multiplier=float(r.get("network_multiplier", 1.0)),
            prior_loss_weight=float(cli.get("prior_loss_weight", 1.0)),
            validation_seed=r.get("validation_seed"),
        )
        _range(source, f"{label}.batch_size", "batch_size", dcfg.batch_size, 1, math.inf, r.origins["batch_size"])
        if min(resolution) <= 0:
            raise _fail(source, f"{label}.resolution", f"resolution {resolution} must be positive.")
        for j, sub in enumerate(ds["subsets"]):
            dcfg.subsets.append(_resolve_subset(sub, ds, general, cli, f"{label}.subsets[{j}]", kind, source))
        result.append(dcfg)
    return result


def _resolve_subset(sub, ds, general, cli, label, kind, source) -> SubsetConfig:
    r = _Resolver([(label, sub), (label.rsplit(".", 1)[0], ds), ("[general]", general), ("command line", cli)])
    cap = CaptionOptions(**{k: r.get(k, CaptionOptions.__dataclass_fields__[k].default) for k in _CAPTION_FIELDS})
    cap = CaptionOptions(
        **{
            **cap.__dict__,
            "caption_dropout_rate": float(cap.caption_dropout_rate),
            "caption_tag_dropout_rate": float(cap.caption_tag_dropout_rate),
        }
    )
    ext = r.get("caption_extension", ".caption") if kind == "dreambooth" else ".caption"
    if ext and not ext.startswith("."):
        ext = "." + ext
    split = float(r.get("validation_split", 0.0))
    for key, value in (("validation_split", split), ("caption_dropout_rate", cap.caption_dropout_rate),
                       ("caption_tag_dropout_rate", cap.caption_tag_dropout_rate)):  # fmt: skip
        _range(source, label, key, value, 0.0, 1.0, r.origins.get(key))
    for key in ("keep_tokens", "token_warmup_min", "token_warmup_step", "caption_dropout_every_n_epochs"):
        _range(source, label, key, getattr(cap, key), 0, math.inf, r.origins.get(key))
    face = r.get("face_crop_aug_range")
    if face is not None:
        raise _fail(
            source,
            label,
            f"face_crop_aug_range = {list(face)} (from {r.origins['face_crop_aug_range']}) is not supported by this "
            "trainer (it needs face boxes in file names and no buckets); remove it.",
        )
    return SubsetConfig(
        label=label,
        kind=kind,
        image_dir=sub.get("image_dir"),
        metadata_file=sub.get("metadata_file"),
        is_reg=bool(sub.get("is_reg", False)),
        class_tokens=r.get("class_tokens") if kind == "dreambooth" else None,
        caption_extension=ext,
        cache_info=bool(r.get("cache_info", False)) if kind == "dreambooth" else False,
        alpha_mask=bool(r.get("alpha_mask", False)),
        num_repeats=r.get("num_repeats", 1),
        caption=cap,
        color_aug=r.get("color_aug", False),
        flip_aug=r.get("flip_aug", False),
        random_crop=r.get("random_crop", False),
        custom_attributes=dict(r.get("custom_attributes", {}) or {}),
        interpolation=r.interpolation(),
        validation_split=split,
        origins=r.origins,
        source=source,
    )


# --- loading ---------------------------------------------------------------------------------
def load_user_config(path: str | os.PathLike) -> dict:
    """Parses a .toml or .json dataset config; errors name the file and the parser's position."""
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise UserError(f"--dataset_config {path}: not a .toml or .json file; rename it or convert it.")
    if not path.is_file():
        raise UserError(f"--dataset_config {path}: file not found.")
    try:
        text = path.read_text(encoding="utf-8-sig")
        config = toml.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--dataset_config {path}: cannot parse it: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"--dataset_config {path}: expected a table at the top level.")
    return config


def _config_from_dirs(args: argparse.Namespace) -> dict:
    """sd-scripts' no-TOML layout: <N>_<class tokens> folders, or --in_json for fine-tuning."""
    if args.in_json:
        if getattr(args, "reg_data_dir", None):
            logger.warning("--reg_data_dir %s is ignored with --in_json: a fine-tuning dataset has no "
                           "regularisation images (as in sd-scripts)", args.reg_data_dir)  # fmt: skip
        return {"datasets": [{"subsets": [{"metadata_file": args.in_json, "image_dir": args.train_data_dir}]}]}
    if not args.train_data_dir:
        raise UserError(
            "no dataset given: pass --dataset_config file.toml, or --train_data_dir with "
            "<repeats>_<class tokens> sub-folders, or --in_json metadata.json."
        )
    subsets = []
    for root, is_reg, flag in (
        (args.train_data_dir, False, "--train_data_dir"),
        (getattr(args, "reg_data_dir", None), True, "--reg_data_dir"),
    ):
        if not root:
            continue
        if not os.path.isdir(root):
            raise UserError(f"{flag} {root}: directory not found.")
        found = 0
        for name in sorted(os.listdir(root)):
            if not os.path.isdir(os.path.join(root, name)):
                continue
            head, _, tokens = name.partition("_")
            try:
                repeats = int(head)
            except ValueError:
                logger.warning("%s: ignoring folder %r: its name does not start with <repeats>_", flag, name)
                continue
            subsets.append(
                {
                    "image_dir": os.path.join(root, name),
                    "num_repeats": repeats,
                    "class_tokens": tokens,
                    "is_reg": is_reg,
                }
            )
            found += 1
        if not found:
            raise UserError(
                f"{flag} {root}: no sub-folder named <repeats>_<class tokens> (e.g. "
                f"{'1_person' if is_reg else '10_mychar'}); put the images in such a folder."
            )
    return {"datasets": [{"subsets": subsets}]}


def load_dataset_configs(args: argparse.Namespace) -> list[DatasetConfig]:
    """The resolved datasets for these arguments (see the module docstring)."""
    if getattr(args, "dataset_class", None):
        raise UserError("--dataset_class is not supported by this trainer; describe the data with --dataset_config.")
    if getattr(args, "dataset_config", None):
        for flag in ("train_data_dir", "reg_data_dir", "in_json"):
            if getattr(args, flag, None):
                logger.warning("--%s is ignored because --dataset_config is given", flag)
        source = str(args.dataset_config)
        config = load_user_config(args.dataset_config)
    else:
        source = "command line"
        config = _config_from_dirs(args)
    validate_user_config(config, source)
    return _resolve(config, args, source)


def check_caching(datasets: list[DatasetConfig], args: argparse.Namespace) -> None:
    """Refuses what caching cannot honour (naming the option and the subset); warns about what it freezes."""
    cache_latents = getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)
    cache_te = getattr(args, "cache_text_encoder_outputs", False) or getattr(
        args, "cache_text_encoder_outputs_to_disk", False
    )
    for ds in datasets:
        for sub in ds.subsets:
            if cache_latents:
                for opt in ("color_aug", "random_crop"):
                    if getattr(sub, opt):
                        raise UserError(
                            f"--cache_latents cannot be used with {opt} = true in {sub.describe()} (set in "
                            f"{sub.origins.get(opt)}): cached latents are encoded once. Turn {opt} off for this "
                            "subset or drop --cache_latents / --cache_latents_to_disk."
                        )
            if not cache_te:
                continue
            cap = sub.caption
            for opt, on in (
                ("caption_dropout_rate", cap.caption_dropout_rate > 0),
                ("shuffle_caption", cap.shuffle_caption),
                ("token_warmup_step", cap.token_warmup_step > 0),
                ("caption_tag_dropout_rate", cap.caption_tag_dropout_rate > 0),
            ):
                if on:
                    raise UserError(
                        f"--cache_text_encoder_outputs cannot be used with {opt} = {getattr(cap, opt)} in "
                        f"{sub.describe()} (set in {sub.origins.get(opt)}): the captions are encoded once, so a "
                        f"caption that changes every step cannot be cached. Remove {opt} for this subset or "
                        "drop --cache_text_encoder_outputs."
                    )
            if cap.enable_wildcard:
                logger.warning(
                    "%s: enable_wildcard with --cache_text_encoder_outputs: each caption's wildcard "
                    "choice is made once and then fixed by the cache",
                    sub.describe(),
                )
            if cap.caption_dropout_every_n_epochs > 0:
                logger.warning(
                    "%s: caption_dropout_every_n_epochs has no effect with "
                    "--cache_text_encoder_outputs (the cached caption is always used)",
                    sub.describe(),
                )
