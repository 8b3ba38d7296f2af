"""The dataset configuration: each value resolved through its levels and fallbacks (the schema: library.dataset_schema).

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
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import toml

from library.captions import CaptionOptions
from library.dataset_args import parse_resolution
from library.dataset_schema import (  # noqa: F401 (GENERAL, SUBSET, validate_user_config: public API)
    CLI_TO_KEY,
    GENERAL,
    SCHEMA,
    SUBSET,
    BadValue,
    config_error,
    resolution_value,
    validate_user_config,
)
from library.errors import UserError
from library.images import DEFAULT_INTERPOLATION, canonical_interpolation

logger = logging.getLogger(__name__)


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
    source: str = ""  # the dataset config file (or "command line") it came from

    @property
    def where(self) -> str:
        """This dataset in messages: ``file: datasets[0]``."""
        return f"{self.source}: {self.label}" if self.source else self.label


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
                    raise BadValue("expected two numbers, e.g. 2.0,4.0") from None
            if key in SCHEMA:
                value = SCHEMA[key][0](value)
        except BadValue as e:
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
    raise config_error(source, where, f"{key} = {value} {problem}.")


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
            raise config_error(
                source,
                label,
                "resolution is not set; add resolution = [1024, 1024] to this [[datasets]] or [general], "
                "or pass --resolution 1024,1024.",
            )
        resolution = resolution_value(resolution) if not isinstance(resolution, tuple) else resolution
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
            source=source,
        )
        _range(source, f"{label}.batch_size", "batch_size", dcfg.batch_size, 1, math.inf, r.origins["batch_size"])
        if min(resolution) <= 0:
            raise config_error(source, f"{label}.resolution", f"resolution {resolution} must be positive.")
        for j, sub in enumerate(ds["subsets"]):
            dcfg.subsets.append(_resolve_subset(sub, ds, general, cli, f"{label}.subsets[{j}]", kind, source))
        result.append(dcfg)
    return result


def _check_caption_separator(cap: CaptionOptions, r: _Resolver, label: str, source: str) -> None:
    """An empty caption_separator, as sd-scripts takes it: fine until an option splits the captions by it."""
    if cap.caption_separator != "":
        return
    splitting = {"shuffle_caption": cap.shuffle_caption, "token_warmup_step": cap.token_warmup_step > 0,
                 "caption_tag_dropout_rate": cap.caption_tag_dropout_rate > 0,
                 "keep_tokens_separator": cap.keep_tokens_separator != ""}  # fmt: skip
    splitter = next((key for key, on in splitting.items() if on), None)
    if splitter is None:
        return
    why = f"an empty separator cannot split the captions, which {splitter} (set in {r.origins[splitter]}) splits"
    origin = r.origins["caption_separator"]
    if origin == "command line":
        raise UserError(f"{_cli_flag('caption_separator')} '': {why} in {label}; give a separator such as ','.")
    raise config_error(source, origin, f"caption_separator = '': {why} in {label}; give a separator such as ','.")


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
    _check_caption_separator(cap, r, label, source)
    face = r.get("face_crop_aug_range")
    if face is not None:
        raise config_error(
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
                        "drop --cache_text_encoder_outputs / --cache_text_encoder_outputs_to_disk."
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
