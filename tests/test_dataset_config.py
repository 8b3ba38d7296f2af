"""The dataset TOML/JSON schema: levels, types, fallbacks, the guide's examples and the error messages."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from library.dataset_config import check_caching, load_dataset_configs, validate_user_config
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
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "{tmp_path / "nope"}"
        """,
    )
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]\.image_dir: directory '.*nope' not found"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "{tmp_path / "empty"}"
        """,
    )
    with pytest.raises(UserError, match=r"image_dir: directory '.*empty' contains no images \(\.png"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


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


# --- fallbacks ---------------------------------------------------------------------------------
def _keep_tokens(tmp_path, sub: str, ds: str, gen: str, cli: list[str]):
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [general]
        {gen}
        [[datasets]]
        resolution = 64
        {ds}
          [[datasets.subsets]]
          image_dir = "x"
          {sub}
        """,
    )
    (d,) = load_dataset_configs(make_args("--dataset_config", cfg, *cli))
    return d.subsets[0].caption.keep_tokens, d.subsets[0].origins["keep_tokens"]


def test_fallback_order_is_subset_dataset_general_cli_default(tmp_path):
    cli = ["--keep_tokens", "4"]
    assert _keep_tokens(tmp_path, "keep_tokens = 1", "keep_tokens = 2", "keep_tokens = 3", cli) == (
        1,
        "datasets[0].subsets[0]",
    )
    assert _keep_tokens(tmp_path, "", "keep_tokens = 2", "keep_tokens = 3", cli) == (2, "datasets[0]")
    assert _keep_tokens(tmp_path, "", "", "keep_tokens = 3", cli) == (3, "[general]")
    assert _keep_tokens(tmp_path, "", "", "", cli) == (4, "command line")
    # argparse's default is a value too, as in sd-scripts
    assert _keep_tokens(tmp_path, "", "", "", []) == (0, "command line")


def test_cli_names_map_to_config_names_and_cli_defaults_apply(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    (d,) = load_dataset_configs(
        make_args(
            "--dataset_config",
            cfg,
            "--resolution",
            "96,64",
            "--train_batch_size",
            "3",
            "--dataset_repeats",
            "5",
            "--prior_loss_weight",
            "0.5",
        )
    )
    s = d.subsets[0]
    assert (d.resolution, d.batch_size, s.num_repeats, d.prior_loss_weight) == ((96, 64), 3, 5, 0.5)
    assert (s.caption_extension, s.caption.caption_separator, s.caption.keep_tokens_separator) == (".caption", ",", "")
    assert (d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps) == (256, 1024, 64)


def test_validation_split_in_a_subset_overrides_its_dataset(tmp_path):
    cfg = write_toml(
        tmp_path / "c.toml",
        """
        [general]
        validation_split = 0.1
        [[datasets]]
        resolution = 64
        validation_split = 0.2
          [[datasets.subsets]]
          image_dir = "a"
          validation_split = 1.0
          [[datasets.subsets]]
          image_dir = "b"
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "c"
        """,
    )
    d0, d1 = load_dataset_configs(make_args("--dataset_config", cfg, "--validation_split", "0.3"))
    assert [s.validation_split for s in d0.subsets + d1.subsets] == [1.0, 0.2, 0.1]


def test_validation_split_outside_0_1_is_refused(tmp_path):
    cfg = write_toml(
        tmp_path / "c.toml",
        '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\nvalidation_split = 1.5\n',
    )
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]: validation_split = 1.5 is outside \[0.0, 1.0\]"):
        load_dataset_configs(make_args("--dataset_config", cfg))


def test_interpolation_names_and_cli_flag_are_one_setting(tmp_path):
    cfg = write_toml(
        tmp_path / "c.toml",
        """
        [general]
        resize_interpolation = "cubic"
        [[datasets]]
        resolution = 64
        interpolation_type = "lanczos"
          [[datasets.subsets]]
          image_dir = "a"
          resize_interpolation = "linear"
          [[datasets.subsets]]
          image_dir = "b"
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "c"
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "d"
          interpolation_type = "box"
        """,
    )
    ds = load_dataset_configs(make_args("--dataset_config", cfg, "--resize_interpolation", "nearest"))
    assert [s.interpolation for d in ds for s in d.subsets] == ["bilinear", "lanczos", "bicubic", "area"]
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\n')
    (d,) = load_dataset_configs(make_args("--dataset_config", cfg, "--resize_interpolation", "linear"))
    assert d.subsets[0].interpolation == "bilinear"
    (d,) = load_dataset_configs(make_args("--dataset_config", cfg))
    assert d.subsets[0].interpolation == "bicubic"  # the guide's default


def test_face_crop_aug_range_is_refused_with_its_origin(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(
        UserError,
        match=r"datasets\[0\]\.subsets\[0\]: face_crop_aug_range = \[2.0, 4.0\] "
        r"\(from command line\) is not supported",
    ):
        load_dataset_configs(make_args("--dataset_config", cfg, "--face_crop_aug_range", "2.0,4.0"))


# --- without a TOML ------------------------------------------------------------------------------
def test_train_data_dir_folders_become_subsets(tmp_path, caplog):
    for name in ("10_sks dog", "2_cat_toy", "misc"):
        make_folder(tmp_path / "train" / name, {"a.png": (64, 64)})
    make_folder(tmp_path / "reg" / "1_dog", {"r.png": (64, 64)})
    args = make_args(
        "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"), "--resolution", "64"
    )
    with caplog.at_level(logging.WARNING):
        (d,) = load_dataset_configs(args)
    got = [(os.path.basename(s.image_dir), s.num_repeats, s.class_tokens, s.is_reg) for s in d.subsets]
    assert got == [("10_sks dog", 10, "sks dog", False), ("2_cat_toy", 2, "cat_toy", False), ("1_dog", 1, "dog", True)]
    assert "ignoring folder 'misc'" in caplog.text


def test_train_data_dir_without_repeat_folders_is_an_error(tmp_path):
    make_folder(tmp_path / "train" / "plain", {"a.png": (64, 64)})
    with pytest.raises(UserError, match=r"--train_data_dir .*train: no sub-folder named <repeats>_<class tokens>"):
        load_dataset_configs(make_args("--train_data_dir", str(tmp_path / "train"), "--resolution", "64"))


def test_dataset_config_wins_over_train_data_dir_with_a_warning(tmp_path, caplog):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with caplog.at_level(logging.WARNING):
        (d,) = load_dataset_configs(make_args("--dataset_config", cfg, "--train_data_dir", "elsewhere"))
    assert d.subsets[0].image_dir == "a" and "--train_data_dir is ignored" in caplog.text


# --- the guide's examples ----------------------------------------------------------------------
def test_guide_6_7_multi_resolution_example_loads_as_written(tmp_path):
    make_folder(tmp_path / "imgs", {"a.png": (96, 64), "b.png": (64, 64)}, {"a.png": "x ||| y, z"})
    text = """
[general]
# Common settings
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
# First resolution settings
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "path/to/image/directory"
  num_repeats = 1

[[datasets]]
# Second resolution settings
batch_size = 3
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "path/to/image/directory"
  num_repeats = 1
""".replace("path/to/image/directory", str(tmp_path / "imgs"))
    d0, d1 = load_dataset_configs(make_args("--dataset_config", write_toml(tmp_path / "c.toml", text)))
    assert (d0.resolution, d0.batch_size, d1.resolution, d1.batch_size) == ((1024, 1024), 2, (768, 768), 3)
    s = d0.subsets[0]
    assert s.flip_aug and s.caption.keep_tokens_separator == "|||" and s.caption_extension == ".txt"
    train, val = build_dataset_groups([d0, d1], seed=0)
    assert val is None and [len(ds.entries) for ds in train.datasets] == [2, 2]
    # a.png is 96x64 (aspect 1.5): nearest buckets (1024, 704) and (896, 640); b.png is square
    buckets = [{os.path.basename(e.path): e.bucket for e in ds.entries} for ds in train.datasets]
    assert buckets == [{"a.png": (1024, 704), "b.png": (1024, 1024)}, {"a.png": (896, 640), "b.png": (768, 768)}]


def test_guide_6_8_validation_example_loads_as_written(tmp_path):
    make_folder(tmp_path / "train", {f"{i}.png": (64, 64) for i in range(10)})
    make_folder(tmp_path / "val", {f"v{i}.png": (64, 64) for i in range(3)})
    text = """
[[datasets]]
enable_bucket = true
resolution = [1024, 1024]
validation_seed = 42 # [Optional] Validation seed, otherwise uses training seed for validation split .

  [[datasets.subsets]]
  image_dir = "path/to/image/directory"
  validation_split = 0.1 # Split between 0.0 and 1.0 where 1.0 will use the full subset as a validation dataset

  [[datasets.subsets]]
  image_dir = "path/to/image/full_validation"
  validation_split = 1.0 # Will use this full subset as a validation subset.
""".replace("path/to/image/directory", str(tmp_path / "train")).replace(
        "path/to/image/full_validation", str(tmp_path / "val")
    )
    (d,) = load_dataset_configs(make_args("--dataset_config", write_toml(tmp_path / "c.toml", text)))
    assert d.validation_seed == 42 and [s.validation_split for s in d.subsets] == [0.1, 1.0]
    train, val = build_dataset_groups([d], seed=0)
    train_paths = {e.path for e in train.entries()}
    val_paths = {e.path for e in val.entries()}
    assert len(train_paths) == 9 and len(val_paths) == 4 and not train_paths & val_paths
    assert {p for p in val_paths if "/val/" in p} == {str(tmp_path / "val" / f"v{i}.png") for i in range(3)}


def test_guide_7_2_interpolation_example_loads_as_written(tmp_path):
    text = """
[[datasets]]
resolution = [1024, 1024]
enable_bucket = true
interpolation_type = "lanczos" # Example: Use Lanczos interpolation
# ...
  [[datasets.subsets]]
  image_dir = "x"
"""
    (d,) = load_dataset_configs(make_args("--dataset_config", write_toml(tmp_path / "c.toml", text)))
    assert d.subsets[0].interpolation == "lanczos" and d.enable_bucket


# --- caching compatibility ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,line",
    [
        ("caption_dropout_rate", "caption_dropout_rate = 0.1"),
        ("shuffle_caption", "shuffle_caption = true"),
        ("token_warmup_step", "token_warmup_step = 10"),
        ("caption_tag_dropout_rate", "caption_tag_dropout_rate = 0.2"),
    ],
)
def test_text_encoder_caching_refuses_the_four_random_caption_options(tmp_path, option, line):
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "a"
          [[datasets.subsets]]
          image_dir = "b"
          {line}
        """,
    )
    args = make_args("--dataset_config", cfg, "--cache_text_encoder_outputs")
    with pytest.raises(UserError) as ei:
        check_caching(load_dataset_configs(args), args)
    msg = str(ei.value)
    assert msg.startswith(f"--cache_text_encoder_outputs cannot be used with {option} = ")
    assert "in datasets[0].subsets[1] (b) (set in datasets[0].subsets[1])" in msg


def test_text_encoder_caching_warns_about_wildcards_and_dropout_every_n_epochs(tmp_path, caplog):
    cfg = write_toml(
        tmp_path / "c.toml",
        """
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "a"
          enable_wildcard = true
          caption_dropout_every_n_epochs = 3
        """,
    )
    args = make_args("--dataset_config", cfg, "--cache_text_encoder_outputs_to_disk")
    with caplog.at_level(logging.WARNING):
        check_caching(load_dataset_configs(args), args)
    assert "enable_wildcard with --cache_text_encoder_outputs" in caplog.text
    assert "caption_dropout_every_n_epochs has no effect" in caplog.text


@pytest.mark.parametrize("option", ["color_aug", "random_crop"])
def test_latent_caching_refuses_color_aug_and_random_crop(tmp_path, option):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\n')
    args = make_args("--dataset_config", cfg, "--cache_latents", f"--{option}")
    with pytest.raises(
        UserError,
        match=rf"--cache_latents cannot be used with {option} = true in "
        r"datasets\[0\]\.subsets\[0\] \(a\) \(set in command line\)",
    ):
        check_caching(load_dataset_configs(args), args)


# --- the argument parser -----------------------------------------------------------------------
def test_dataset_arguments_have_sd_scripts_names_and_defaults():
    a = make_args()
    expected = dict(
        resolution=None,
        enable_bucket=False,
        min_bucket_reso=256,
        max_bucket_reso=1024,
        bucket_reso_steps=64,
        bucket_no_upscale=False,
        caption_extension=".caption",
        caption_separator=",",
        shuffle_caption=False,
        keep_tokens=0,
        keep_tokens_separator="",
        secondary_separator=None,
        enable_wildcard=False,
        caption_prefix=None,
        caption_suffix=None,
        color_aug=False,
        flip_aug=False,
        face_crop_aug_range=None,
        random_crop=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
        token_warmup_min=1,
        token_warmup_step=0,
        resize_interpolation=None,
        cache_latents=False,
        cache_latents_to_disk=False,
        vae_batch_size=1,
        skip_cache_check=False,
        cache_info=False,
        train_data_dir=None,
        reg_data_dir=None,
        in_json=None,
        dataset_repeats=1,
        prior_loss_weight=1.0,
        cache_text_encoder_outputs=False,
        cache_text_encoder_outputs_to_disk=False,
        text_encoder_batch_size=None,
        validation_split=0.0,
        validation_seed=None,
        dataset_config=None,
    )
    assert {k: getattr(a, k) for k in expected} == expected
    b = make_args("--token_warmup_step", "0.5", "--vae_batch_size", "4", "--resize_interpolation", "area")
    assert (b.token_warmup_step, b.vae_batch_size, b.resize_interpolation) == (0.5, 4, "area")


def test_dataset_args_module_does_not_import_torch():
    code = "import sys, library.dataset_args; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_unreadable_image_stops_the_build_with_its_path(tmp_path):
    make_folder(tmp_path / "img", {"good.png": (32, 32)})
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = write_toml(tmp_path / "c.toml", f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n'
                                          f'image_dir = "{tmp_path / "img"}"\n')
    with pytest.raises(UserError, match=r"img/broken\.png: cannot read this image"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


def test_dataset_arguments_compose_with_parsers_that_share_flags():
    import argparse

    from library.dataset_args import add_dataset_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--validation_split", type=float, default=0.25)
    add_dataset_arguments(parser)
    add_dataset_arguments(parser)  # twice: no conflict
    args = parser.parse_args(["--flip_aug"])
    assert args.validation_split == 0.25 and args.flip_aug and args.caption_extension == ".caption"
