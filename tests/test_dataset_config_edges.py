"""Dataset configuration edges a mutation round found unpinned: which level wins, encodings and suffixes of the
file, what the folder layout of --train_data_dir admits, and the refusals that name the key or flag at fault
(each gave a traceback, or silently another dataset, without its check)."""

import logging
import os

import pytest

from library.dataset_args import parse_resolution
from library.dataset_config import SubsetConfig, check_caching, load_dataset_configs
from library.dataset_sources import ImageRecord, split_subset
from library.errors import UserError
from tests.dataset_helpers import make_args, make_folder, write_toml

ONE_DATASET = '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "x"\n'


def load(tmp_path, text, *cli, name="c.toml"):
    return load_dataset_configs(make_args("--dataset_config", write_toml(tmp_path / name, text), *cli))


# ---- levels and values ---------------------------------------------------------------------------


def test_a_datasets_own_values_win_over_general(tmp_path):
    (d,) = load(tmp_path, '[general]\nbatch_size = 4\nresolution = 512\n[[datasets]]\nbatch_size = 2\n'
                          'resolution = [256, 128]\n[[datasets.subsets]]\nimage_dir = "x"\n')  # fmt: skip
    assert (d.batch_size, d.resolution) == (2, (256, 128))


def test_a_resolution_with_a_zero_side_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"datasets\[0\]\.resolution.*positive"):
        load(tmp_path, '[[datasets]]\nresolution = [0, 512]\n[[datasets.subsets]]\nimage_dir = "x"\n')


def test_the_command_lines_alpha_mask_is_the_fallback_a_subset_may_override(tmp_path):
    (d,) = load(tmp_path, ONE_DATASET + '[[datasets.subsets]]\nimage_dir = "y"\nalpha_mask = false\n', "--alpha_mask")
    assert [s.alpha_mask for s in d.subsets] == [True, False]
    assert d.subsets[0].origins["alpha_mask"] == "command line"


def test_resolutions_are_read_as_sd_scripts_reads_them():
    assert parse_resolution("1024x768") == (1024, 768)
    with pytest.raises(UserError):
        parse_resolution("1024,768,512")  # a third number was dropped silently


# ---- the file ------------------------------------------------------------------------------------


def test_an_upper_case_suffix_and_a_byte_order_mark_read_as_toml(tmp_path):
    (d,) = load(tmp_path, ONE_DATASET, name="c.TOML")
    assert d.resolution == (64, 64)
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + ONE_DATASET.encode())  # Notepad's UTF-8
    (d,) = load_dataset_configs(make_args("--dataset_config", str(tmp_path / "bom.toml")))
    assert d.resolution == (64, 64)


@pytest.mark.parametrize("name, content, message", [
    ("c.toml", ONE_DATASET.encode() + b'class_tokens = "caf\xe9"\n', "cannot parse"),  # Latin-1, not UTF-8
    ("c.json", b"[1, 2]", "expected a table at the top level"),
    ("c.json", b'{"datasets": []}', "datasets"),
])  # fmt: skip
def test_a_file_that_is_no_dataset_table_is_one_message(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_dataset_configs(make_args("--dataset_config", str(tmp_path / name)))


@pytest.mark.parametrize("text, message", [
    (ONE_DATASET + 'custom_attributes = ["a"]\n', r"custom_attributes.*expected a table"),
    ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = "m.json"\nis_reg = true\n',
     r"subsets\[0\]\.is_reg.*DreamBooth"),
    ('[general]\n[[general.subsets]]\nimage_dir = "y"\n' + ONE_DATASET, r"general\.subsets"),  # was ignored
])  # fmt: skip
def test_keys_in_the_wrong_place_or_shape_are_named(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, text)


# ---- --train_data_dir and the flags around it ------------------------------------------------------


def test_without_any_dataset_or_with_a_missing_folder_the_message_says_so(tmp_path):
    with pytest.raises(UserError, match="no dataset given"):
        load_dataset_configs(make_args())
    with pytest.raises(UserError, match="--train_data_dir .*directory not found"):
        load_dataset_configs(make_args("--train_data_dir", str(tmp_path / "nope")))


def test_train_data_dir_takes_its_repeat_folders_in_name_order_and_no_files(tmp_path):
    for name in ("3_c", "2_b", "1_a"):
        make_folder(tmp_path / "td" / name, {"a.png": (32, 32)})
    (tmp_path / "td" / "5_notes.txt").write_text("x")
    (d,) = load_dataset_configs(make_args("--train_data_dir", str(tmp_path / "td"), "--resolution", "32"))
    assert [os.path.basename(s.image_dir) for s in d.subsets] == ["1_a", "2_b", "3_c"]


def test_dataset_class_is_refused(tmp_path):
    with pytest.raises(UserError, match="--dataset_class"):
        load(tmp_path, ONE_DATASET, "--dataset_class", "my.Dataset")


@pytest.mark.parametrize("flag", ["--cache_latents", "--cache_latents_to_disk"])
def test_either_latent_cache_flag_refuses_color_aug(tmp_path, flag):
    args = make_args("--dataset_config", write_toml(tmp_path / "c.toml", ONE_DATASET + "color_aug = true\n"), flag)
    with pytest.raises(UserError, match="color_aug"):
        check_caching(load_dataset_configs(args), args)


def test_a_split_of_0_or_1_keeps_the_order_and_does_not_warn(caplog):
    records = [ImageRecord(f"/x/{i}.png", "") for i in range(5)]
    with caplog.at_level(logging.WARNING):
        assert split_subset(records, SubsetConfig("s", "dreambooth", "/x", validation_split=0.0), 1) == (records, [])
        train, val = split_subset(records, SubsetConfig("s", "dreambooth", "/x", validation_split=1.0), 1)
    assert (len(train), len(val)) == (0, 5) and "validation_split" not in caplog.text


@pytest.mark.parametrize("given, kept", [('"txt"', ".txt"), ('".txt"', ".txt"), ('""', "")])
def test_a_caption_extension_gets_its_dot_and_an_empty_one_stays_empty(tmp_path, given, kept):
    """An empty extension names caption files by the image's stem alone, as in sd-scripts (not '<stem>.')."""
    (d,) = load(tmp_path, ONE_DATASET + f"caption_extension = {given}\n")
    assert d.subsets[0].caption_extension == kept
