"""Dataset TOML/JSON schema validation and its error messages.

Which keys are allowed at which level ([general], [[datasets]], [[datasets.subsets]]), value types, required
tables and keys, unknown-key suggestions, and the errors for missing/unparsable config files and image folders.
"""

from __future__ import annotations

import json

import pytest

from library.dataset_config import load_dataset_configs, validate_user_config
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import make_args, make_folder, write_toml


def _err(config: dict) -> str:
    with pytest.raises(UserError) as ei:
        validate_user_config(config, "ds.toml")
    return str(ei.value)


def _ds(subset_extra=None, **dataset_extra) -> dict:
    return {"datasets": [{"resolution": 64, **dataset_extra, "subsets": [{"image_dir": "x", **(subset_extra or {})}]}]}


# --- level rules -------------------------------------------------------------------------------
DATASET_ONLY = [
    "batch_size",
    "bucket_no_upscale",
    "bucket_reso_steps",
    "enable_bucket",
    "max_bucket_reso",
    "min_bucket_reso",
    "validation_seed",
    "resolution",
    "network_multiplier",
]
SAMPLE = {
    "batch_size": 2,
    "bucket_no_upscale": True,
    "bucket_reso_steps": 32,
    "enable_bucket": True,
    "max_bucket_reso": 512,
    "min_bucket_reso": 64,
    "validation_seed": 1,
    "resolution": 64,
    "network_multiplier": 0.5,
}


@pytest.mark.parametrize("key", DATASET_ONLY)
def test_dataset_level_key_in_a_subset_names_its_path_and_levels(key):
    msg = _err(
        {"datasets": [{"resolution": 64, "subsets": [{"image_dir": "a"}, {"image_dir": "b", key: SAMPLE[key]}]}]}
    )
    assert f"ds.toml: datasets[0].subsets[1].{key}:" in msg
    assert "not allowed in [[datasets.subsets]]" in msg
    assert "allowed in [general] and [[datasets]]" in msg


@pytest.mark.parametrize("key", DATASET_ONLY)
def test_dataset_level_key_is_accepted_in_general_and_datasets(key):
    validate_user_config({"general": {key: SAMPLE[key]}, **_ds(**{key: SAMPLE[key]})}, "ds.toml")


@pytest.mark.parametrize(
    "key,value", [("image_dir", "x"), ("is_reg", True), ("alpha_mask", True), ("metadata_file", "m.json")]
)
@pytest.mark.parametrize("level", ["general", "dataset"])
def test_subset_only_key_above_a_subset_is_refused(key, value, level):
    config = _ds() if level == "dataset" else {"general": {key: value}, **_ds()}
    if level == "dataset":
        config["datasets"][0][key] = value
    msg = _err(config)
    path = "general" if level == "general" else "datasets[0]"
    assert f"{path}.{key}:" in msg and "allowed in [[datasets.subsets]]" in msg


@pytest.mark.parametrize(
    "key,value",
    [
        ("flip_aug", True),
        ("keep_tokens", 2),
        ("caption_dropout_rate", 0.1),
        ("custom_attributes", {"a": 1}),
        ("interpolation_type", "lanczos"),
        ("resize_interpolation", "cubic"),
        ("validation_split", 0.5),
        ("caption_extension", ".txt"),
        ("class_tokens", "dog"),
        ("token_warmup_step", 5),
    ],
)
def test_ascendable_keys_are_accepted_at_all_three_levels(key, value):
    config = _ds({key: value}, **{key: value})
    config["general"] = {key: value}
    validate_user_config(config, "ds.toml")


@pytest.mark.parametrize("key", ["validation_seed", "enable_bucket", "resolution", "flip_aug"])
def test_top_level_key_outside_any_table_is_refused(key):
    msg = _err({key: SAMPLE.get(key, True), **_ds()})
    assert msg.startswith(f"ds.toml: {key}: `{key}` is outside any table")
    assert "[general]" in msg


def test_unknown_key_suggests_the_close_name():
    msg = _err(_ds({"flip_agu": True}))
    assert "datasets[0].subsets[0].flip_agu: unknown key `flip_agu`; did you mean `flip_aug`?" in msg


def test_unknown_top_level_table_suggests_the_close_name():
    msg = _err({"generl": {"batch_size": 2}, **_ds()})
    assert msg == "ds.toml: generl: unknown key `generl`; did you mean `general`?"

def test_cli_only_key_in_config_points_to_the_flag():
    msg = _err({"general": {"prior_loss_weight": 1.0}, **_ds()})
    assert "general.prior_loss_weight" in msg and "--prior_loss_weight" in msg


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("batch_size", "2", "expected an integer, got '2' (str)"),
        ("batch_size", True, "expected an integer"),
        ("enable_bucket", 1, "expected true or false, got 1 (int)"),
        ("resolution", "1024", "expected an integer or [width, height]"),
        ("resolution", [1024, 768, 1], "expected an integer or [width, height]"),
        ("network_multiplier", "x", "expected a number"),
    ],
)
def test_wrong_type_names_the_expected_type(key, value, expected):
    msg = _err(_ds(**{key: value}))
    assert f"datasets[0].{key}: {expected}" in msg


def test_wrong_type_in_a_subset_names_the_subset_path():
    msg = _err({"datasets": [{"subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": 1.5}]}]})
    assert "datasets[0].subsets[1].num_repeats: expected an integer, got 1.5 (float)" in msg


def test_unknown_interpolation_lists_the_choices():
    msg = _err(_ds(interpolation_type="spline"))
    assert "datasets[0].interpolation_type: expected one of lanczos, nearest, bilinear, linear, bicubic" in msg


def test_both_interpolation_names_with_different_values_is_an_error():
    msg = _err(_ds(interpolation_type="lanczos", resize_interpolation="area"))
    assert "datasets[0]: resize_interpolation = 'area' and interpolation_type = 'lanczos'" in msg
    validate_user_config(_ds(interpolation_type="bilinear", resize_interpolation="linear"), "ds.toml")


def test_dreambooth_and_finetuning_subsets_cannot_be_mixed():
    msg = _err({"datasets": [{"subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]})
    assert "datasets[0]: DreamBooth subsets (image_dir + caption files) and fine-tuning subsets" in msg
    assert "subsets[1] has metadata_file, subsets[0] does not" in msg


@pytest.mark.parametrize("key,value", [("caption_extension", ".txt"), ("class_tokens", "dog"), ("cache_info", True)])
def test_dreambooth_only_keys_are_refused_in_finetuning_datasets(key, value):
    msg = _err({"datasets": [{key: value, "subsets": [{"metadata_file": "m.json"}]}]})
    assert f"datasets[0].{key}: `{key}` applies only to DreamBooth subsets" in msg


def test_missing_image_dir_is_named():
    msg = _err({"datasets": [{"subsets": [{"num_repeats": 2}]}]})
    assert "datasets[0].subsets[0]: required key `image_dir` is missing" in msg


def test_missing_datasets_and_subsets_tables():
    assert "expected at least one [[datasets]] table" in _err({"general": {}})
    assert "datasets[0]: expected at least one [[datasets.subsets]]" in _err({"datasets": [{"resolution": 64}]})
    assert "[[datasets.subsets]]" in _err({"subsets": [{"image_dir": "a"}], **_ds()})


# --- files and directories ---------------------------------------------------------------------
def test_missing_and_empty_image_dir_name_the_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    for folder, message in (
        ("nope", r"c\.toml: datasets\[0\]\.subsets\[0\]\.image_dir: directory '.*nope' not found"),
        ("empty", r"c\.toml: datasets\[0\]\.subsets\[0\]\.image_dir: directory '.*empty' contains no images \(\.png"),
    ):
        cfg = write_toml(
            tmp_path / "c.toml",
            f"""
            [[datasets]]
            resolution = 64
              [[datasets.subsets]]
              image_dir = "{tmp_path / folder}"
            """,
        )
        with pytest.raises(UserError, match=message):
            build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


def test_unreadable_image_stops_the_build_with_its_path(tmp_path):
    make_folder(tmp_path / "img", {"good.png": (32, 32)})
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = write_toml(
        tmp_path / "c.toml", f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n'
    )
    with pytest.raises(UserError, match=r"img/broken\.png: cannot read this image"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


def test_every_unreadable_image_is_named_in_one_error(tmp_path):
    from library.images import verify_images

    make_folder(tmp_path / "img", {"good.png": (32, 32)})
    for name in ("empty.png", "html.jpg"):
        (tmp_path / "img" / name).write_bytes(b"" if name == "empty.png" else b"<html>not found</html>")
    cfg = write_toml(
        tmp_path / "c.toml", f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n'
    )
    with pytest.raises(UserError, match=r"^2 images cannot be used:\n  .*empty\.png: cannot read this image.*\n  "
                                        r".*html\.jpg: cannot read this image"):  # fmt: skip
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    good = tmp_path / "img" / "good.png"
    cut = [tmp_path / "img" / f"cut{i}.png" for i in range(2)]
    for path in cut:
        path.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UserError, match=r"^2 images cannot be used:\n  .*cut0\.png: cannot decode.*\n  .*cut1\.png"):
        verify_images([str(good), *map(str, cut)])


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"--dataset_config .*c\.yaml: not a \.toml or \.json file"):
        load_dataset_configs(make_args("--dataset_config", str(tmp_path / "c.yaml")))
    with pytest.raises(UserError, match=r"--dataset_config .*missing\.toml: file not found"):
        load_dataset_configs(make_args("--dataset_config", str(tmp_path / "missing.toml")))
    bad = write_toml(tmp_path / "bad.toml", "[[datasets]\nresolution = 1\n")
    with pytest.raises(UserError, match=r"bad\.toml: cannot parse it"):
        load_dataset_configs(make_args("--dataset_config", bad))


def test_missing_resolution_says_where_to_put_it(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    with pytest.raises(UserError, match=r"datasets\[0\]: resolution is not set.*--resolution"):
        load_dataset_configs(make_args("--dataset_config", cfg))


def test_json_config_loads_like_toml(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {"general": {"flip_aug": True}, "datasets": [{"resolution": [96, 64], "subsets": [{"image_dir": "x"}]}]}
        )
    )
    (ds,) = load_dataset_configs(make_args("--dataset_config", str(path)))
    assert ds.resolution == (96, 64) and ds.subsets[0].flip_aug is True
