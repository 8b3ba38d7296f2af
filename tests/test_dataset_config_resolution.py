"""How dataset settings are resolved and merged into the final datasets and subsets.

The fallback order subset -> dataset -> [general] -> command line -> default (and the origin recorded for each
value), datasets built from --train_data_dir folders, the guide's examples loaded as written, caching
compatibility checks on the resolved values, and the dataset argument parser.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from library.dataset_config import check_caching, load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import make_args, make_folder, write_toml


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


@pytest.mark.parametrize("flags, extension", [
    (["--caption_extention", ".txt"], ".txt"),  # sd-scripts' old spelling, which old scripts still pass
    (["--caption_extension", ".cap", "--caption_extention", ".txt"], ".txt"),  # it wins there too
    (["--caption_extension", ".cap"], ".cap"),
])
def test_the_old_spelling_of_caption_extension_still_sets_it(tmp_path, flags, extension):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    (d,) = load_dataset_configs(make_args("--dataset_config", cfg, "--resolution", "64", *flags))
    assert d.subsets[0].caption_extension == extension


def test_caption_extension_without_its_dot_gets_one(tmp_path):
    """Spec §c.3 and the guide: a leading '.' is added if missing, so "txt" reads a.txt, not "atxt"."""
    make_folder(tmp_path / "img", {"a.png": (32, 32)}, {"a.png": "from the file"})
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          caption_extension = "txt"
        """)
    configs = load_dataset_configs(make_args("--dataset_config", cfg))
    assert configs[0].subsets[0].caption_extension == ".txt"
    train, _ = build_dataset_groups(configs, seed=0)
    assert [e.caption for e in train.entries()] == ["from the file"]


def test_class_tokens_are_inherited_from_general_and_the_dataset(tmp_path):
    """class_tokens may sit at any level (guide §2, spec §c.2); the nearest wins and captions images without a file."""
    make_folder(tmp_path / "a", {"a.png": (32, 32)})
    make_folder(tmp_path / "b", {"b.png": (32, 32)})
    make_folder(tmp_path / "c", {"c.png": (32, 32)})
    cfg = write_toml(tmp_path / "c.toml", f"""
        [general]
        class_tokens = "general dog"
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'a'}"
        [[datasets]]
        resolution = 32
        class_tokens = "dataset cat"
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'b'}"
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'c'}"
          class_tokens = "subset fox"
        """)
    configs = load_dataset_configs(make_args("--dataset_config", cfg))
    subsets = [s for d in configs for s in d.subsets]
    assert [(s.class_tokens, s.origins["class_tokens"]) for s in subsets] == [
        ("general dog", "[general]"), ("dataset cat", "datasets[1]"), ("subset fox", "datasets[1].subsets[1]")]
    train, _ = build_dataset_groups(configs, seed=0)
    captions = {os.path.basename(e.path): e.caption for e in train.entries()}
    assert captions == {"a.png": "general dog", "b.png": "dataset cat", "c.png": "subset fox"}


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


@pytest.mark.parametrize(
    "general, sub, cli, message",
    [
        ("", "", ["--validation_split", "1.5"], r"^--validation_split 1\.5 is outside \[0\.0, 1\.0\]\.$"),
        ("validation_split = 2.0", "", [], r": \[general\]: validation_split = 2\.0 is outside"),
        ("", "caption_dropout_rate = -0.5", [], r": datasets\[0\]\.subsets\[0\]: caption_dropout_rate = -0\.5 is"),
        ("", "keep_tokens = -1", [], r": datasets\[0\]\.subsets\[0\]: keep_tokens = -1 must be 0 or more\.$"),
        ("token_warmup_step = -1", "", [], r": \[general\]: token_warmup_step = -1\.?0? must be 0 or more"),
        ("", "", ["--caption_dropout_every_n_epochs", "-2"], r"^--caption_dropout_every_n_epochs -2 must be 0 or"),
        ("", "", ["--train_batch_size", "0"], r"^--train_batch_size 0 must be 1 or more\.$"),
        ("batch_size = 0", "", [], r": \[general\]: batch_size = 0 must be 1 or more\.$"),
    ],
)
def test_a_value_out_of_range_names_where_it_was_set(tmp_path, general, sub, cli, message):
    cfg = write_toml(tmp_path / "c.toml", f'[general]\n{general}\n[[datasets]]\nresolution = 64\n'
                     f'[[datasets.subsets]]\nimage_dir = "a"\n{sub}\n')  # fmt: skip
    with pytest.raises(UserError, match=message):
        load_dataset_configs(make_args("--dataset_config", cfg, *cli))


@pytest.mark.parametrize(
    "cli, message",
    [
        (["--face_crop_aug_range", "a,b"], r"^--face_crop_aug_range 'a,b': expected two numbers"),
        (["--face_crop_aug_range", "2.0"], r"^--face_crop_aug_range \(2\.0,\): expected \[number, number\]"),
    ],
)
def test_command_line_settings_pass_the_files_checks(tmp_path, cli, message):
    cfg = write_toml(tmp_path / "c.toml", '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(UserError, match=message):
        load_dataset_configs(make_args("--dataset_config", cfg, *cli))


@pytest.mark.parametrize(
    "general, sub, cli, message",
    [
        # sd-scripts takes "" as long as no option splits the captions by it (GUIs write it so)
        ('caption_separator = ""', "", [], None),
        ("", "", ["--caption_separator", ""], None),
        ('caption_separator = ""', "", ["--shuffle_caption"], r": \[general\]: caption_separator = '': an empty "
         r"separator cannot split the captions, which shuffle_caption \(set in command line\) splits in "
         r"datasets\[0\]\.subsets\[0\]; give a separator such as ','\.$"),
        ("shuffle_caption = true", "", ["--caption_separator", ""], r"^--caption_separator '': an empty separator "
         r"cannot split the captions, which shuffle_caption \(set in \[general\]\) splits in datasets\[0\]"),
        ("", 'caption_separator = ""\ncaption_tag_dropout_rate = 0.1', [], r": datasets\[0\]\.subsets\[0\]: "
         r"caption_separator = '': .* which caption_tag_dropout_rate \(set in datasets\[0\]\.subsets\[0\]\)"),
        ("", 'caption_separator = ""\ntoken_warmup_step = 5', [], r"which token_warmup_step"),
        ("", 'caption_separator = ""\ntoken_warmup_step = 0.5', [], r"which token_warmup_step"),  # half the run
        ("", 'caption_separator = ""\nkeep_tokens_separator = "|||"', [], r"which keep_tokens_separator"),
        # the command line's "" is only a fallback: a subset with its own separator does not use it
        ("", 'caption_separator = ";"\nshuffle_caption = true', ["--caption_separator", ""], None),
    ],
)
def test_an_empty_caption_separator_stops_only_where_captions_are_split(tmp_path, general, sub, cli, message):
    cfg = write_toml(tmp_path / "c.toml", f'[general]\n{general}\n[[datasets]]\nresolution = 64\n'
                     f'[[datasets.subsets]]\nimage_dir = "a"\n{sub}\n')  # fmt: skip
    args = make_args("--dataset_config", cfg, *cli)
    if message is None:
        (d,) = load_dataset_configs(args)
        assert d.subsets[0].caption.caption_separator == (";" if "shuffle" in sub else "")
    else:
        with pytest.raises(UserError, match=message):
            load_dataset_configs(args)


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
    make_folder(tmp_path / "good" / "10_dog", {"a.png": (64, 64)})
    make_folder(tmp_path / "reg", {"r.png": (64, 64)})  # images straight in the folder: no regularisation at all
    with pytest.raises(UserError, match=r"--reg_data_dir .*reg: no sub-folder named <repeats>_<class tokens>"):
        load_dataset_configs(make_args("--train_data_dir", str(tmp_path / "good"), "--reg_data_dir",
                                       str(tmp_path / "reg"), "--resolution", "64"))  # fmt: skip


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
        ("token_warmup_step", "token_warmup_step = 0.5"),  # a fraction of the run is a warm-up too
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


@pytest.mark.parametrize("cache_flag", ["--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"])
@pytest.mark.parametrize(
    "general, cli, option, value, origin",
    [
        ("shuffle_caption = true", [], "shuffle_caption", "True", "[general]"),
        ("caption_dropout_rate = 0.1", [], "caption_dropout_rate", "0.1", "[general]"),
        (None, ["--shuffle_caption"], "shuffle_caption", "True", "command line"),
        (None, ["--caption_dropout_rate", "0.1"], "caption_dropout_rate", "0.1", "command line"),
    ],
)
def test_text_encoder_caching_refuses_random_captions_set_in_general_or_on_the_command_line(
    tmp_path, cache_flag, general, cli, option, value, origin
):
    """The refusal reads resolved values, so a [general] key or a --train_data_dir run's flag is caught too."""
    folder = make_folder(tmp_path / "train" / "1_cls", {"a.png": (32, 32)}, {"a.png": "x, y, z"})
    if general is None:
        argv = ["--train_data_dir", str(tmp_path / "train"), "--resolution", "32", *cli]
    else:
        toml = f'[general]\n{general}\n[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{folder}"\n'
        argv = ["--dataset_config", write_toml(tmp_path / "c.toml", toml)]
    args = make_args(*argv, cache_flag, "--cache_latents")
    with pytest.raises(UserError) as ei:
        check_caching(load_dataset_configs(args), args)
    assert str(ei.value) == (
        f"--cache_text_encoder_outputs cannot be used with {option} = {value} in datasets[0].subsets[0] ({folder}) "
        f"(set in {origin}): the captions are encoded once, so a caption that changes every step cannot be "
        f"cached. Remove {option} for this subset or drop --cache_text_encoder_outputs / "
        "--cache_text_encoder_outputs_to_disk."  # both: dropping only the flag not given changed nothing
    )


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


def test_dataset_arguments_compose_with_parsers_that_share_flags():
    import argparse

    from library.dataset_args import add_dataset_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--validation_split", type=float, default=0.25)
    add_dataset_arguments(parser)
    add_dataset_arguments(parser)  # twice: no conflict
    args = parser.parse_args(["--flip_aug"])
    assert args.validation_split == 0.25 and args.flip_aug and args.caption_extension == ".caption"
