"""Training-time samples: the run's RNG and the models' modes are left as they were, prompts are
shared between processes, files are named as sd-scripts names them, and triggers fire as there."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch
from torch import nn

from library.sample_prompts import SamplePrompt, SampleTriggers
from library.training_samples import sample_image_filename, sample_images
from tests.sampling_helpers import ToyAE, ToyVelocity, fake_encoder


def test_global_rng_is_unaffected_by_sampling(tmp_path):
    model = ToyVelocity(consume_rng=True)
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    sample_images(
        model,
        ToyAE(),
        [SamplePrompt(0, "a", width=64, height=64, sample_steps=3)],
        output_dir=str(tmp_path),
        output_name=None,
        epoch=None,
        steps=5,
        encode_prompts=fake_encoder(),
    )
    assert len(model.calls) == 3  # the model did draw from the global RNG
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_models_are_in_eval_mode_while_sampling_and_restored_after(tmp_path):
    model, network, ae = ToyVelocity(), nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)), ToyAE()
    model.train()
    ae.eval()
    network.train()
    network[1].eval()  # a submodule's own mode is restored too, not overwritten by its parent's
    seen = []
    sample_images(
        model,
        ae,
        [SamplePrompt(0, "a", width=64, height=64, sample_steps=1)],
        output_dir=str(tmp_path),
        output_name=None,
        epoch=1,
        steps=5,
        encode_prompts=fake_encoder(),
        eval_modules=[network],
        on_image=lambda *_: seen.append(network.training),
    )
    assert [c["training"] for c in model.calls] == [False] and seen == [False]
    assert model.training and network.training and network[0].training and not network[1].training
    assert not ae.training


def test_prompts_are_distributed_across_processes(tmp_path):
    prompts = [SamplePrompt(i, f"p{i}", width=64, height=64, seed=i, sample_steps=1) for i in range(5)]
    model = ToyVelocity()
    paths = sample_images(
        model,
        ToyAE(),
        prompts,
        output_dir=str(tmp_path),
        output_name="x",
        epoch=None,
        steps=7,
        encode_prompts=fake_encoder(),
        process_index=1,
        num_processes=2,
    )
    indices = [int(re.match(r"x_000007_(\d\d)_", os.path.basename(p)).group(1)) for p in paths]
    assert indices == [1, 3]


def test_on_image_callback_and_file_names(tmp_path, caplog):
    prompts = [
        SamplePrompt(0, "a", width=64, height=64, seed=42, sample_steps=1),
        SamplePrompt(1, "b", sample_steps=1, width=64, height=64),
    ]
    logged = []
    caplog.set_level(logging.INFO)
    paths = sample_images(
        ToyVelocity(),
        ToyAE(),
        prompts,
        output_dir=str(tmp_path),
        output_name="my_lora",
        epoch=3,
        steps=120,
        encode_prompts=fake_encoder(),
        on_image=lambda p, im, path: logged.append((p.index, im.size, path)),
    )
    names = [os.path.basename(p) for p in paths]
    assert re.fullmatch(r"my_lora_e000003_00_\d{14}_42\.png", names[0])
    assert re.fullmatch(r"my_lora_e000003_01_\d{14}\.png", names[1])
    assert [(i, size) for i, size, _ in logged] == [(0, (64, 64)), (1, (64, 64))]
    assert "generating 2 sample image(s) at epoch 3 (step 120)" in caplog.messages  # the files say e000003
    assert not [f for f in os.listdir(tmp_path / "sample") if not f.endswith(".png")]  # no temporary files left


@pytest.mark.parametrize(
    ("output_name", "epoch", "steps", "index", "seed", "expected"),
    [
        ("my_flux_lora", None, 250, 3, None, "my_flux_lora_000250_03_20250102030405.png"),
        ("my_flux_lora", 2, 250, 0, 7, "my_flux_lora_e000002_00_20250102030405_7.png"),
        (None, 0, 0, 12, 1234, "e000000_12_20250102030405_1234.png"),
    ],
)
def test_sample_file_names_follow_sd_scripts(output_name, epoch, steps, index, seed, expected):
    assert sample_image_filename(output_name, epoch, steps, index, seed, "20250102030405") == expected


@pytest.mark.parametrize(
    ("triggers", "epoch", "steps", "due"),
    [
        (SampleTriggers(at_first=True), 0, 0, True),
        (SampleTriggers(every_n_steps=10), 0, 0, False),
        (SampleTriggers(every_n_steps=10), None, 20, True),
        (SampleTriggers(every_n_steps=10), None, 25, False),
        (SampleTriggers(every_n_steps=10), 2, 20, False),  # epoch ends do not sample with only every_n_steps
        (SampleTriggers(every_n_epochs=2), 2, 17, True),
        (SampleTriggers(every_n_epochs=2), 3, 17, False),
        (SampleTriggers(every_n_epochs=2), None, 20, False),  # steps do not sample with every_n_epochs
        (SampleTriggers(every_n_steps=10, every_n_epochs=2), None, 20, False),  # epochs win, steps ignored
        (SampleTriggers(every_n_steps=10, every_n_epochs=2), 4, 20, True),
        (SampleTriggers(), None, 10, False),
        (SampleTriggers(), 1, 10, False),
    ],
)
def test_sampling_triggers(triggers, epoch, steps, due):
    assert triggers.due(epoch, steps) is due


def test_triggers_from_args():
    import argparse

    args = argparse.Namespace(sample_every_n_steps=5, sample_every_n_epochs=None, sample_at_first=True)
    assert SampleTriggers.from_args(args) == SampleTriggers(5, None, True)


def test_samples_go_to_wandb_as_sd_scripts_logs_them(monkeypatch):
    import sys
    import types

    from PIL import Image

    from library.training_samples import wandb_sample_logger

    logged = []
    fake_wandb = types.SimpleNamespace(Image=lambda image, caption: ("wandb.Image", image.size, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, **kwargs: logged.append((values, kwargs)))
    accelerator = types.SimpleNamespace(trackers=[types.SimpleNamespace(name="tensorboard"), tracker],
                                        get_tracker=lambda name: tracker)  # fmt: skip
    log = wandb_sample_logger(accelerator)
    log(SamplePrompt(index=3, prompt="a red circle"), Image.new("RGB", (16, 8)), "sample/x.png")
    assert logged == [({"sample_3": ("wandb.Image", (16, 8), "a red circle")}, {"commit": False})]
    # no wandb tracker (tensorboard only, or a process without trackers): nothing to log to
    assert wandb_sample_logger(types.SimpleNamespace(trackers=[types.SimpleNamespace(name="tensorboard")])) is None
    assert wandb_sample_logger(types.SimpleNamespace(trackers=[])) is None


@pytest.mark.parametrize(
    "model_type, flags",
    [("flux", {"network_dropout": 0.3}), ("chroma", {"cache_text_encoder_outputs": True})],
    ids=["dev_dropout", "chroma_cached_te"],
)
def test_sampling_during_a_run_leaves_the_trained_lora_exactly_as_without(tiny_model_files, tmp_path, model_type,
                                                                          flags):
    """Samples before the first step and after every step draw nothing from the run's RNG (dropout masks,
    noise, timesteps) and leave every module as it was: the LoRA is bit-identical to the run without."""
    import flux_train_network
    from library.safetensors_io import load_safetensors
    from tests.training_helpers import base_argv, dataset

    data = dataset(tmp_path)
    weights = {}
    for name, sampling in (("with", True), ("without", False)):
        out = tmp_path / name
        more = dict(sample_prompts=data.sample_prompts, sample_every_n_steps=1, sample_at_first=True)
        argv = base_argv(tiny_model_files, data, str(out), model_type=model_type, steps=2, **flags,
                         **(more if sampling else {}))
        assert flux_train_network.main(argv) == 0
        weights[name] = load_safetensors(str(out / "lora.safetensors"))
    # sd-scripts names the set before the first step by epoch 0, the others by step
    names = sorted(re.sub(r"_\d{14}_", "_<time>_", f) for f in os.listdir(tmp_path / "with" / "sample"))
    assert names == [f"lora_{n}_00_<time>_42.png" for n in ("000001", "000002", "e000000")]
    assert not (tmp_path / "without" / "sample").exists()
    assert weights["with"].keys() == weights["without"].keys()
    assert any(v.any() for k, v in weights["with"].items() if k.endswith("lora_up.weight"))  # it did train
    for key, value in weights["without"].items():
        assert torch.equal(weights["with"][key], value), key


PROMPTS_TOML = """
[prompt]
width = 100
height = 72
sample_steps = 2
[[prompt.subset]]
prompt = "a cat"
seed = 5
[[prompt.subset]]
prompt = "a dog"
negative_prompt = "blurry"
scale = 3.0
width = 130
height = 90
seed = 6
"""
PROMPTS_JSON = (
    '["a cat --w 90 --h 130 --s 2 --d 0", '
    '{"prompt": "x", "seed": 18446744073709551615, "sample_steps": 2, "width": 64, "height": 64}]'
)


@pytest.mark.parametrize("model_type", ["flux", "chroma"])
@pytest.mark.parametrize(
    "name, text, expected",
    [
        # shared 100x72 floors to 96x64; the second subset's own 130x90 to 128x80
        ("p.toml", PROMPTS_TOML, [("00", "_5", (96, 64), "5"), ("01", "_6", (128, 80), "6")]),
        # JSON: a prompt line floored the same way, and the largest seed a generator takes, named in full
        ("p.json", PROMPTS_JSON, [("00", "_0", (80, 128), "0"), ("01", f"_{2**64 - 1}", (64, 64), str(2**64 - 1))]),
    ],
    ids=["toml", "json"],
)
def test_prompt_files_give_sample_images_of_floored_sizes_named_by_their_seeds(
    tiny_model_files, tmp_path, model_type, name, text, expected
):
    from PIL import Image

    from library.flux_utils import load_ae, load_flow_model
    from library.sample_prompts import load_prompts

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    checkpoint = {"flux": tiny_model_files.flux_dev, "chroma": tiny_model_files.chroma}[model_type]
    _, dit = load_flow_model(checkpoint, torch.float32, "cpu", model_type=model_type)
    ae = load_ae(tiny_model_files.ae, torch.float32, "cpu")
    paths = sample_images(dit, ae, load_prompts(str(path)), output_dir=str(tmp_path / "out"), output_name="lora",
                          epoch=None, steps=12, encode_prompts=fake_encoder(chroma=model_type == "chroma"),
                          model_type=model_type, apply_t5_attn_mask=model_type == "chroma")  # fmt: skip
    assert len(paths) == len(expected)
    for written, (index, suffix, size, seed) in zip(paths, expected, strict=True):
        assert re.fullmatch(rf"lora_000012_{index}_\d{{14}}{suffix}\.png", os.path.basename(written)), written
        with Image.open(written) as image:
            assert image.size == size
            assert (image.text["width"], image.text["height"], image.text["seed"]) == (*map(str, size), seed)
            assert image.text["steps"] == "2"
            assert f"Seed: {seed}, Size: {size[0]}x{size[1]}," in image.text["parameters"]
