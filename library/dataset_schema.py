"""The dataset configuration's schema: each key's value type and the levels it may appear at.

``validate_user_config`` checks a parsed TOML/JSON file against it (spec §c.1–c.2) and names the
key's path and the fix in every error; ``library.dataset_config`` resolves the values.
"""

from __future__ import annotations

import difflib
from typing import Any

from library.errors import UserError
from library.images import INTERPOLATIONS, canonical_interpolation

GENERAL, DATASET, SUBSET = "[general]", "[[datasets]]", "[[datasets.subsets]]"


# --- value types: each returns the converted value or raises BadValue("expected ...") ---------------
class BadValue(Exception):
    """A value of the wrong type or form; its message says what was expected."""


def _bool(v):
    if isinstance(v, bool):
        return v
    raise BadValue("expected true or false")


def _int(v):
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise BadValue("expected an integer")


def _float(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise BadValue("expected a number")


def _str(v):
    if isinstance(v, str):
        return v
    raise BadValue("expected a string (in quotes)")


def _table(v):
    if isinstance(v, dict):
        return dict(v)
    raise BadValue("expected a table, e.g. { key = value }")


def _float_pair(v):
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (_float(v[0]), _float(v[1]))
    raise BadValue("expected [number, number]")


def resolution_value(v):
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (v[0], v[1])
    raise BadValue("expected an integer or [width, height], e.g. resolution = [1024, 1024]")


def interpolation_value(v):
    v = _str(v)
    if v not in INTERPOLATIONS:
        raise BadValue(f"expected one of {', '.join(INTERPOLATIONS)}")
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
    "caption_separator": (_str, ALL3, False),  # "" only where no caption is split (checked per subset)
    "enable_wildcard": (_bool, ALL3, False),
    "token_warmup_min": (_int, ALL3, False),
    "token_warmup_step": (_float, ALL3, False),
    "caption_prefix": (_str, ALL3, False),
    "caption_suffix": (_str, ALL3, False),
    "custom_attributes": (_table, ALL3, False),
    "resize_interpolation": (interpolation_value, ALL3, False),
    "interpolation_type": (interpolation_value, ALL3, False),
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
    "resolution": (resolution_value, GEN_DS, False),
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


def config_error(source: str, path: str, msg: str) -> UserError:
    return UserError(f"{source}: {path}: {msg}")


def _levels_text(levels: tuple[str, ...]) -> str:
    return " and ".join(levels) if len(levels) < 3 else "[general], [[datasets]] and [[datasets.subsets]]"


def _check_table(tbl: dict, level: str, path: str, source: str, dreambooth: bool | None) -> None:
    for key, value in tbl.items():
        where = f"{path}.{key}" if path else key
        if key == "subsets" and level == DATASET:
            continue
        if key in ("datasets", "subsets", "general"):
            raise config_error(
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
            raise config_error(source, where, f"unknown key `{key}`; {hint}{'' if hint.endswith('?') else '.'}")
        conv, levels, db_only = SCHEMA[key]
        if level not in levels:
            raise config_error(
                source,
                where,
                f"`{key}` is not allowed in {level}; it is allowed in {_levels_text(levels)}. Move it there.",
            )
        if db_only and dreambooth is False:
            raise config_error(
                source,
                where,
                f"`{key}` applies only to DreamBooth subsets (image_dir with caption files); this dataset's "
                "subsets use metadata_file (fine-tuning). Put captions in the metadata file instead.",
            )
        try:
            conv(value)
        except BadValue as e:
            raise config_error(source, where, f"{e}, got {value!r} ({type(value).__name__}).") from None
    if "resize_interpolation" in tbl and "interpolation_type" in tbl:
        a, b = interpolation_value(tbl["resize_interpolation"]), interpolation_value(tbl["interpolation_type"])
        if a != b:
            raise config_error(
                source,
                path or "top level",
                f"resize_interpolation = {tbl['resize_interpolation']!r} and interpolation_type = "
                f"{tbl['interpolation_type']!r} are two names for one setting and disagree; keep one.",
            )


def validate_user_config(config: dict, source: str) -> None:
    """Checks every key's level and type; raises UserError naming the key's path and the fix."""
    for key, value in config.items():
        if key == "subsets":
            raise config_error(
                source,
                key,
                "subsets must belong to a dataset: write [[datasets.subsets]] after a "
                "[[datasets]] table, not [[subsets]].",
            )
        if key not in ("general", "datasets"):
            if key in SCHEMA:
                conv, levels, _ = SCHEMA[key]
                raise config_error(
                    source,
                    key,
                    f"`{key}` is outside any table; it is allowed in {_levels_text(levels)}. "
                    "Move it under [general] (or into a [[datasets]] entry).",
                )
            _check_table({key: value}, GENERAL, "", source, None)
    general = config.get("general", {})
    if not isinstance(general, dict):
        raise config_error(source, "general", "expected a table: write [general] followed by key = value lines.")
    _check_table(general, GENERAL, "general", source, None)
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise config_error(source, "datasets", "expected at least one [[datasets]] table (note the double brackets).")
    for i, ds in enumerate(datasets):
        subsets = ds.get("subsets")
        if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
            raise config_error(
                source, f"datasets[{i}]", "expected at least one [[datasets.subsets]] table with an image_dir."
            )
        with_md = [j for j, s in enumerate(subsets) if "metadata_file" in s]
        if with_md and len(with_md) != len(subsets):
            without = [j for j in range(len(subsets)) if j not in with_md]
            raise config_error(
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
                raise config_error(
                    source, path, "required key `image_dir` is missing (or `metadata_file` for fine-tuning)."
                )
