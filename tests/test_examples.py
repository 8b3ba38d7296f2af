"""The argument files in examples/ load as a user runs them: through the real parser with
``--config_file``, their dataset TOML through the dataset loader (with a tiny image folder in place
of image_dir), their sample prompts through the prompt reader, and the guide's recipes are what
they say. Nothing is trained: the low-VRAM recipes use options that need a GPU."""

from __future__ import annotations

import argparse
import copy
import glob
import logging
import os

import pytest
import toml

import flux_train_network
from library.config_file import parse_args_with_config
from library.dataset_config import check_caching, load_dataset_configs
from library.sample_prompts import prepare_sample_prompts
from library.train_args import review_compat_flags
from tests.dataset_helpers import make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
ARGUMENT_FILES = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.toml")) if "datasets" not in toml.load(p)
)
DATASET_FILES = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.toml")) if "datasets" in toml.load(p)
)
# The guide's recipes (docs/flux_train_network.md, "VRAM recipes"): file -> (blocks_to_swap, batch size, fp8 T5)
DEV_RECIPES = {
    "flux1_dev_24gb.toml": (None, 2, False),
    "flux1_dev_16gb.toml": (8, 1, False),
    "flux1_dev_12gb.toml": (16, 1, False),
    "flux1_dev_10gb.toml": (22, 1, True),
    "flux1_dev_8gb.toml": (28, 1, True),
}


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return flux_train_network.setup_parser()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    sizes = {"a.png": (64, 64), "b.png": (96, 64), "c.jpg": (64, 80), "d.png": (64, 64), "e.webp": (80, 80)}
    captions = {name: f"a photo of my_subject, picture {i}" for i, name in enumerate(sizes)}
    return make_folder(folder, sizes, captions, ext=".txt")


def parse_example(parser, name: str, caplog) -> argparse.Namespace:
    with caplog.at_level(logging.WARNING, logger="library.config_file"):
        args = parse_args_with_config(parser, ["--config_file", os.path.join("examples", name)])
    unknown = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    assert not unknown, f"{name}: keys the parser does not know: {unknown}"
    return args


def with_image_dir(dataset_toml: str, image_dir: str, out_dir) -> str:
    """A copy of a dataset TOML whose subsets all read ``image_dir`` (distinct folders stay distinct)."""
    config = toml.load(dataset_toml)
    folders: dict[str, str] = {}
    for ds in config["datasets"]:
        for sub in ds["subsets"]:
            if sub["image_dir"] not in folders:
                target = os.path.join(str(out_dir), f"folder{len(folders)}")
                if not os.path.exists(target):
                    os.symlink(image_dir, target)
                folders[sub["image_dir"]] = target
            sub["image_dir"] = folders[sub["image_dir"]]
    path = os.path.join(str(out_dir), os.path.basename(dataset_toml))
    with open(path, "w", encoding="utf-8") as f:
        toml.dump(config, f)
    return path


def load_datasets(args: argparse.Namespace, dataset_toml: str, image_folder: str, tmp_path):
    from library.datasets import build_dataset_groups

    args = copy.copy(args)
    args.dataset_config = with_image_dir(dataset_toml, image_folder, tmp_path)
    configs = load_dataset_configs(args)
    check_caching(configs, args)
    train, val = build_dataset_groups(configs, seed=42)
    assert len(train) > 0
    return configs, train, val


def test_examples_folder_has_every_recipe():
    expected = set(DEV_RECIPES) | {"flux1_schnell.toml", "chroma.toml"}
    assert expected <= set(ARGUMENT_FILES)
    assert {"dataset_1024_bs1.toml", "dataset_1024_bs2.toml"} <= set(DATASET_FILES)


@pytest.mark.parametrize("name", ARGUMENT_FILES)
def test_argument_file_parses_and_its_files_load(parser, name, caplog, monkeypatch, image_folder, tmp_path,
                                                 tiny_model_files):
    monkeypatch.chdir(ROOT)  # the files' paths are relative to the repository root, where users run them
    args = parse_example(parser, name, caplog)

    assert args.network_module == "networks.lora_flux"
    assert args.output_dir and args.output_name
    assert review_compat_flags(args, parser) == []  # no flag that does nothing on FLUX

    from library.flow_matching import FlowMatchingConfig

    FlowMatchingConfig.from_args(args)  # the training-math options are valid together
    from networks.lora_flux_args import check_known_args

    check_known_args(flux_train_network.train_network.parse_network_args(args.network_args))

    assert os.path.isfile(args.dataset_config), f"{name}: dataset_config {args.dataset_config} is not in examples/"
    configs, train, _ = load_datasets(args, str(args.dataset_config), image_folder, tmp_path)
    assert train.num_train_images > 0

    if args.sample_prompts:
        assert os.path.isfile(args.sample_prompts)
        assert prepare_sample_prompts(args)  # readable, and at least one prompt

    trainer_checks(parser, args, tiny_model_files)


def trainer_checks(parser, args, models) -> None:
    """The trainer's own start-up checks. The model files the recipe names are not here: tiny ones
    of the same kinds stand in (their headers are checked), and the bound on --blocks_to_swap, read
    from the checkpoint, is checked against FLUX.1's depth (19 double, 38 single blocks) instead."""
    args = copy.copy(args)
    named = os.path.basename(args.pretrained_model_name_or_path).lower()
    args.pretrained_model_name_or_path = (models.chroma if args.model_type == "chroma"
                                          else models.flux_schnell if "schnell" in named else models.flux_dev)
    args.clip_l = models.clip_l if args.clip_l else None
    args.t5xxl, args.ae = models.t5xxl, models.ae
    blocks, args.blocks_to_swap = args.blocks_to_swap, None
    flux_train_network.FluxNetworkTrainer(parser).check_args(args)
    if blocks:
        from library.offloading import swap_split

        swap_split(blocks, 19, 38)


@pytest.mark.parametrize("name", sorted(DEV_RECIPES))
def test_dev_recipes_follow_the_guide(parser, name, caplog, monkeypatch, image_folder, tmp_path):
    monkeypatch.chdir(ROOT)
    args = parse_example(parser, name, caplog)
    blocks, batch_size, fp8_t5 = DEV_RECIPES[name]
    assert args.model_type == "flux" and args.clip_l
    assert (args.timestep_sampling, args.model_prediction_type, args.guidance_scale) == ("shift", "raw", 1.0)
    assert args.discrete_flow_shift == pytest.approx(3.1582)
    assert args.fp8_base and args.mixed_precision == "bf16" and args.gradient_checkpointing
    assert args.optimizer_type.lower() == "adamw8bit"
    assert args.cache_latents_to_disk and args.cache_text_encoder_outputs_to_disk and args.network_train_unet_only
    assert args.blocks_to_swap == blocks
    assert ("fp8" in args.t5xxl) == fp8_t5
    configs, _, _ = load_datasets(args, str(args.dataset_config), image_folder, tmp_path)
    assert [c.batch_size for c in configs] == [batch_size]
    assert [c.resolution for c in configs] == [(1024, 1024)]


def test_chroma_recipe_uses_the_guides_chroma_settings(parser, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = parse_example(parser, "chroma.toml", caplog)
    assert args.model_type == "chroma" and args.apply_t5_attn_mask and args.clip_l is None
    assert (args.timestep_sampling, args.model_prediction_type, args.guidance_scale) == ("sigmoid", "raw", 0.0)
    prompts = prepare_sample_prompts(args)
    assert all(p.negative_prompt and p.guidance_scale == 0.0 and p.cfg_scale == 4.0 for p in prompts)


def test_schnell_recipe_samples_in_four_steps(parser, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = parse_example(parser, "flux1_schnell.toml", caplog)
    assert "schnell" in args.pretrained_model_name_or_path and args.model_type == "flux"
    assert all(p.sample_steps == 4 for p in prepare_sample_prompts(args))


def test_command_line_overrides_the_argument_file(parser, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = parse_args_with_config(
        parser, ["--config_file", "examples/flux1_dev_24gb.toml", "--network_dim", "32", "--output_name", "x"]
    )
    assert (args.network_dim, args.output_name, args.network_alpha) == (32, "x", 1.0)


@pytest.mark.parametrize("name", DATASET_FILES)
def test_dataset_file_loads_with_a_real_image_folder(parser, name, image_folder, tmp_path):
    args = parser.parse_args(["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"])
    configs, train, val = load_datasets(args, os.path.join(EXAMPLES, name), image_folder, tmp_path)
    assert all(c.enable_bucket and c.bucket_reso_steps % 16 == 0 for c in configs)
    if name == "dataset_multires.toml":
        assert [(c.resolution, c.batch_size) for c in configs] == [((1024, 1024), 2), ((768, 768), 3)]
    if name == "dataset_validation.toml":
        assert val is not None and len(val) > 0
    else:
        assert val is None
