"""Validation split: sd-scripts' membership for a fixed seed, no overlap, reg subsets untouched."""

from __future__ import annotations

import json
import os

import pytest

from library.dataset_config import SubsetConfig, load_dataset_configs
from library.dataset_sources import ImageRecord, split_subset, split_train_val
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import make_args, make_folder, write_toml

PATHS = ["path1", "path2", "path3", "path4", "path5", "path6", "path7"]


def test_golden_membership_matches_sd_scripts_test_for_seed_1234():
    # sd-scripts tests/test_validation.py: train [path2, path3, path6, path5, path1, path4], val [path7]
    train, val = split_train_val(PATHS, 0.2, 1234)
    assert train == ["path2", "path3", "path6", "path5", "path1", "path4"]
    assert val == ["path7"]


def test_golden_membership_through_a_real_folder(tmp_path):
    # image_dir listing is sorted like sd-scripts' glob, so files path1..path7 split the same way
    make_folder(tmp_path / "img", {f"{p}.png": (32, 32) for p in PATHS})
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 32
        validation_split = 0.2
        validation_seed = 1234
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img"}"
          num_repeats = 3
        """,
    )
    train, val = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=99)
    names = lambda g: [os.path.basename(e.path)[:-4] for e in g.entries()]  # noqa: E731
    assert names(train) == ["path2", "path3", "path6", "path5", "path1", "path4"]
    assert names(val) == ["path7"]
    assert [e.num_repeats for e in train.entries()] == [3] * 6
    assert [e.num_repeats for e in val.entries()] == [1]  # validation at num_repeats 1


@pytest.mark.parametrize("n,split", [(7, 0.5), (10, 0.3), (3, 0.5), (9, 0.25), (1, 0.5), (5, 1.0), (5, 0.01)])
def test_split_never_overlaps_and_covers_everything(n, split):
    items = list(range(n))
    train, val = split_train_val(items, split, 7)
    assert not set(train) & set(val)
    assert sorted(train + val) == items
    assert len(val) == round(n * split)  # sd-scripts' validation side


def test_validation_side_equals_sd_scripts_when_its_sides_overlap():
    # n=7, split 0.5: sd-scripts trains on ceil(3.5)=4 and validates on the last round(3.5)=4 -> one shared.
    train, val = split_train_val(PATHS, 0.5, 1234)
    shuffled = ["path2", "path3", "path6", "path5", "path1", "path4", "path7"]
    assert val == shuffled[3:] and train == shuffled[:3]


def _two_subsets(tmp_path, extra_dataset="", reg_split=""):
    make_folder(tmp_path / "train", {f"t{i}.png": (32, 32) for i in range(10)})
    make_folder(tmp_path / "reg", {f"r{i}.png": (32, 32) for i in range(4)})
    return write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 32
        validation_split = 0.3
        {extra_dataset}
          [[datasets.subsets]]
          image_dir = "{tmp_path / "train"}"
          [[datasets.subsets]]
          image_dir = "{tmp_path / "reg"}"
          is_reg = true
          {reg_split}
        """,
    )


def test_reg_subsets_are_never_split(tmp_path):
    cfg = _two_subsets(tmp_path, reg_split="validation_split = 0.5")
    train, val = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=3)
    reg_train = [e for e in train.entries() if e.is_reg]
    assert len(reg_train) == 4 and not any(e.is_reg for e in val.entries())
    assert len([e for e in train.entries() if not e.is_reg]) == 7 and len(list(val.entries())) == 3
    # reg repeats extend round-robin until reg samples >= train samples (7): 2, 2, 2, 1
    assert [e.num_repeats for e in reg_train] == [2, 2, 2, 1]


def test_validation_seed_defaults_to_the_training_seed(tmp_path):
    cfg = _two_subsets(tmp_path)
    a = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=11)[1]
    b = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=11, validation_seed=11)[1]
    c = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=12)[1]
    paths = lambda g: [e.path for e in g.entries()]  # noqa: E731
    assert paths(a) == paths(b) and paths(a) != paths(c)


def test_dataset_validation_seed_wins_over_the_argument(tmp_path):
    cfg = _two_subsets(tmp_path, extra_dataset="validation_seed = 5")
    a = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=1, validation_seed=2)[1]
    b = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=9, validation_seed=5)[1]
    assert [e.path for e in a.entries()] == [e.path for e in b.entries()]


def test_subset_split_of_1_makes_the_whole_subset_validation(tmp_path):
    make_folder(tmp_path / "a", {f"a{i}.png": (32, 32) for i in range(3)})
    make_folder(tmp_path / "b", {f"b{i}.png": (32, 32) for i in range(2)})
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / "a"}"
          [[datasets.subsets]]
          image_dir = "{tmp_path / "b"}"
          validation_split = 1.0
        """,
    )
    train, val = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    assert sorted(os.path.basename(e.path) for e in train.entries()) == ["a0.png", "a1.png", "a2.png"]
    assert sorted(os.path.basename(e.path) for e in val.entries()) == ["b0.png", "b1.png"]


def test_no_validation_group_without_a_split(tmp_path):
    make_folder(tmp_path / "a", {"a.png": (32, 32)})
    cfg = write_toml(
        tmp_path / "c.toml", f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\n'
    )
    assert build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[1] is None


def _one_folder(tmp_path, images: int, split: float):
    """The dataset config of one folder of ``images`` images with ``validation_split = split``."""
    make_folder(tmp_path / "a", {f"a{i}.png": (32, 32) for i in range(images)})
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
        validation_split = {split}
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'a'}"
        """)
    return load_dataset_configs(make_args("--dataset_config", cfg))


def test_a_split_that_rounds_to_no_image_says_so(tmp_path, caplog):
    configs = _one_folder(tmp_path, 4, 0.1)
    with caplog.at_level("WARNING"):
        _, val = build_dataset_groups(configs, seed=0)
    assert val is None
    assert "validation_split = 0.1 of its 4 images rounds to none" in caplog.text
    assert "0.25 holds out one" in caplog.text


def test_a_split_that_rounds_to_every_image_says_so(tmp_path, caplog):
    configs = _one_folder(tmp_path, 6, 0.95)
    with caplog.at_level("WARNING"), pytest.raises(UserError) as raised:
        build_dataset_groups(configs, seed=0)
    assert "validation_split = 0.95 of its 6 images rounds to all of them, so none of them trains; 0.83 keeps one" \
        in caplog.text
    assert str(raised.value) == ("no image is left for training: validation_split holds out every image of every "
                                 "subset; lower it (or leave it out) in some subsets.")  # fmt: skip
    assert split_train_val(list(range(6)), 0.83, 0)[0] != []  # the suggested value does keep one


@pytest.mark.parametrize("n, split, suggested", [(6, 0.95, "0.83"), (300, 0.999, "0.997"), (20000, 0.99999, "0.99995")])
def test_the_suggested_split_keeps_exactly_one_image_at_any_count(caplog, n, split, suggested):
    records = [ImageRecord(f"{i}.png", "c", (32, 32)) for i in range(n)]  # no files: splitting reads none
    sub = SubsetConfig(label="datasets[0].subsets[0]", kind="dreambooth", image_dir="img", validation_split=split)
    with caplog.at_level("WARNING"):
        assert split_subset(records, sub, 0)[0] == []
    assert f"rounds to all of them, so none of them trains; {suggested} keeps one for training" in caplog.text
    sub.validation_split = float(suggested)
    assert len(split_subset(records, sub, 0)[0]) == 1


def test_finetuning_datasets_are_split_without_duplication(tmp_path):
    make_folder(tmp_path / "img", {f"f{i}.png": (32, 32) for i in range(8)})
    meta = {f"f{i}.png": {"caption": f"cap {i}", "tags": "t1, t2"} for i in range(8)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 32
        validation_split = 0.25
          [[datasets.subsets]]
          metadata_file = "{tmp_path / "meta.json"}"
          image_dir = "{tmp_path / "img"}"
        """,
    )
    train, val = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=4)
    t = [e.path for e in train.entries()]
    v = [e.path for e in val.entries()]
    assert len(t) == 6 and len(v) == 2 and not set(t) & set(v)
    expected_train, expected_val = split_train_val([str(tmp_path / "img" / f"f{i}.png") for i in range(8)], 0.25, 4)
    assert (t, v) == (expected_train, expected_val)
    assert next(train.entries()).caption.endswith(",t1, t2")  # caption + caption_separator + tags


def test_val_datasets_use_a_fixed_order(tmp_path):
    cfg = _two_subsets(tmp_path)
    _, val = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=2)
    first = [val[i]["image_keys"] for i in range(len(val))]
    val.set_current_epoch(5)
    assert [val[i]["image_keys"] for i in range(len(val))] == first


def test_validation_batches_mix_the_buckets_in_one_fixed_order(tmp_path):
    """--max_validation_steps takes the first batches: they must not all come from one bucket (or dataset)."""
    sizes = {f"p{i}.png": (32, 64) for i in range(6)} | {f"l{i}.png": (64, 32) for i in range(6)}
    make_folder(tmp_path / "a", sizes)
    cfg = write_toml(tmp_path / "c.toml", f"""
        [general]
        enable_bucket = true
        bucket_reso_steps = 16
        min_bucket_reso = 16
        max_bucket_reso = 96
        [[datasets]]
        resolution = 48
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'a'}"
          validation_split = 1.0
          [[datasets.subsets]]
          image_dir = "{tmp_path / 't'}"
        """)
    make_folder(tmp_path / "t", {"t.png": (48, 48)})

    def first_half():
        _, val = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
        val.set_current_epoch(1)
        assert {tuple(val[i]["bucket_reso"]) for i in range(len(val))} == {(32, 64), (64, 32)}  # two buckets
        return [os.path.basename(val[i]["image_paths"][0])[0] for i in range(len(val) // 2)]

    order = first_half()
    assert set(order) == {"p", "l"} and first_half() == order


def test_a_one_image_subset_split_to_all_says_to_leave_the_split_out(caplog):
    """No validation_split keeps one of one image: the advice is to leave it out, not a split of 0."""
    from library.dataset_config import SubsetConfig
    from library.dataset_sources import ImageRecord, split_subset

    sub = SubsetConfig(label="datasets[0].subsets[0]", kind="dreambooth", image_dir="img", validation_split=0.9)
    with caplog.at_level("WARNING"):
        train, val = split_subset([ImageRecord("a.png", "c", (32, 32))], sub, 0)
    assert (train, len(val)) == ([], 1)
    assert ("validation_split = 0.9 of its 1 images rounds to all of them, so none of them trains; leave it out "
            "to train on the image") in caplog.text  # fmt: skip
    assert "keeps one for training" not in caplog.text


def test_a_dataset_of_regularisation_images_only_names_its_config_file(tmp_path):
    from library.dataset_config import load_dataset_configs
    from library.datasets import build_dataset_groups

    make_folder(tmp_path / "img", {"a.png": (64, 64)})
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          is_reg = true
        """)  # fmt: skip
    with pytest.raises(UserError) as raised:
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    assert str(raised.value).startswith(f"{cfg}: datasets[0]: only regularisation images (is_reg = true)")
