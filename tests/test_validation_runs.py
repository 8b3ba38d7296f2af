"""Validation runs through the real trainer, in-process on the tiny models: validating leaves the
training unchanged (train mode and a schedule-free optimizer's weights restored), and the loss does
not depend on how the validation images are batched."""

import os

import pytest
import torch

import flux_train_network
from library.safetensors_io import load_safetensors
from tests.training_helpers import base_argv, dataset, logged_scalars


def train(models, tmp_path, steps=2, data_kwargs=None, **flags) -> str:
    out = str(tmp_path / "out")
    argv = base_argv(models, dataset(tmp_path, **(data_kwargs or {})), out, steps=steps, **flags)
    assert flux_train_network.main(argv) == 0
    return out


def lora(out: str) -> dict:
    return load_safetensors(os.path.join(out, "lora.safetensors"))


@pytest.mark.parametrize("flags, atol", [
    ({"network_dropout": 0.3, "network_args": ["rank_dropout=0.2", "module_dropout=0.1"]}, 0),  # train mode restored
    # validated on its eval weights, then switched back to the train weights kept (the optimizer's own
    # round trip of lerps rounds, 1.5e-8 here); without the switch to eval weights the LoRA moves by 2.6e-4
    ({"optimizer_type": "AdamWScheduleFree"}, 0),
])  # fmt: skip
def test_validation_leaves_the_training_unchanged(tiny_model_files, tmp_path, flags, atol):
    outs = []
    for name, when in (("validated", {"validate_every_n_steps": 1}), ("not", {"validate_every_n_epochs": 1000})):
        outs.append(train(tiny_model_files, tmp_path / name, steps=3, data_kwargs={"validation_split": 0.34},
                          network_train_unet_only=True, logging_dir=str(tmp_path / name / "logs"), **when, **flags))
    validated = logged_scalars(tmp_path / "validated" / "logs")
    assert set(validated["loss/validation/step_average"]) == {1, 2, 3}
    assert not any(tag.startswith("loss/validation") for tag in logged_scalars(tmp_path / "not" / "logs"))
    a, b = lora(outs[0]), lora(outs[1])
    assert all(torch.allclose(a[key], b[key], rtol=0, atol=atol) for key in a)


def test_a_schedule_free_optimizer_validates_on_its_eval_weights(tiny_model_files, tmp_path, monkeypatch):
    """Schedule-free training steps on one point and evaluates at another: validation switches to it and back."""
    import schedulefree

    events = []
    for name in ("eval", "train"):
        original = getattr(schedulefree.AdamWScheduleFree, name)
        monkeypatch.setattr(schedulefree.AdamWScheduleFree, name,
                            lambda self, _original=original, _name=name: events.append(_name) or _original(self))
    batch_loss = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, *args, fixed_sigma=None, **kwargs):
        if fixed_sigma is not None:
            events.append("validation")
        return batch_loss(self, ctx, *args, fixed_sigma=fixed_sigma, **kwargs)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    train(tiny_model_files, tmp_path, steps=2, data_kwargs={"validation_split": 0.34},
          optimizer_type="AdamWScheduleFree", validate_every_n_steps=1, network_train_unet_only=True)
    runs = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # consecutive repeats as one
    assert runs.count("validation") == 3  # steps 1 and 2, and the epoch's end
    for i, event in enumerate(runs):
        if event == "validation":
            assert runs[i - 1 : i + 2] == ["eval", "validation", "train"], runs


def test_validation_loss_does_not_depend_on_how_the_validation_images_are_batched(tiny_model_files, tmp_path,
                                                                                  caplog, capsys):  # fmt: skip
    """Each image's noise comes from the image, and the average is over images: batch size 1 and 3 give
    the same loss for the same (practically untrained) LoRA."""
    import logging
    import re

    data = dataset(tmp_path, validation_split=0.5, batch_size=1)
    with open(data.dataset_toml, encoding="utf-8") as f:
        config = f.read()
    losses, bars = [], []
    for batch_size in (1, 3):
        with open(data.dataset_toml, "w", encoding="utf-8") as f:
            f.write(config.replace("batch_size = 1", f"batch_size = {batch_size}"))
        caplog.clear()
        with caplog.at_level(logging.INFO):
            argv = base_argv(tiny_model_files, data, str(tmp_path / f"b{batch_size}"), steps=1, learning_rate=1e-30,
                             validate_every_n_steps=1, network_train_unet_only=True)  # fmt: skip
            assert flux_train_network.main(argv) == 0
        losses.append([float(v) for v in re.findall(r"validation loss \([^)]*\): ([0-9.]+)", caplog.text)])
        # a progress bar over batches x noise levels (there was none: minutes of silence on a large set)
        bars.append({int(t) for t in re.findall(r"validation: +0%\|[^|]*\| 0/(\d+) ", capsys.readouterr().err)})
    assert losses[0] and losses[0] == losses[1]
    (one_by_one,), (by_three,) = bars  # one bar a validation, its length the same each time
    assert one_by_one % 4 == 0 and by_three == 4 * -(-one_by_one // 4 // 3)  # batches x 4 noise levels


def test_validation_runs_at_the_datasets_network_multiplier(tiny_model_files, tmp_path, monkeypatch):
    """The held-out images are scored with the LoRA at their dataset's multiplier, as they train."""
    seen = []
    original = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, batch, step, sample_indices, fixed_sigma=None):
        seen.append(("validation" if fixed_sigma is not None else "training", ctx.network.multiplier))
        return original(self, ctx, batch, step, sample_indices, fixed_sigma=fixed_sigma)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    data = dataset(tmp_path, validation_split=0.34)
    with open(data.dataset_toml, encoding="utf-8") as f:
        config = f.read().replace("batch_size = 2\n", "batch_size = 2\nnetwork_multiplier = 0.5\n")
    with open(data.dataset_toml, "w", encoding="utf-8") as f:
        f.write(config)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, network_train_unet_only=True,
                     validate_every_n_steps=1)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    kinds = {kind for kind, _ in seen}
    assert kinds == {"training", "validation"}
    assert {m for _, m in seen} == {0.5}


def test_validation_noise_names_are_the_shortest_path_ends_that_tell_images_apart(tmp_path, monkeypatch):
    from library.training_loop import validation_noise_names

    paths = [str(tmp_path / "a" / "x" / "1.png"), str(tmp_path / "b" / "x" / "1.png"), str(tmp_path / "a" / "2.png"),
             str(tmp_path / "c" / "1.jpg")]  # fmt: skip
    assert validation_noise_names(paths + paths[:1]) == {
        paths[0]: "a/x/1.png", paths[1]: "b/x/1.png", paths[2]: "2.png", paths[3]: "1.jpg",
    }  # fmt: skip
    # a unique base name is the name, as before (a moved dataset keeps its noise); relative spellings resolve first
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert validation_noise_names(["1.png", os.path.join("x", "1.png"), os.path.join("..", "a", "1.png")]) == {
        "1.png": "a/1.png", os.path.join("x", "1.png"): "x/1.png", os.path.join("..", "a", "1.png"): "a/1.png",
    }  # fmt: skip


def test_validation_images_that_share_a_file_name_get_different_noise(tiny_model_files, tmp_path, monkeypatch):
    """Two subsets whose folders hold the same file names: each validation image gets noise of its own (they all
    shared the noise of their base name)."""
    import shutil

    seen = {}
    original = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, batch, step, sample_indices, fixed_sigma=None):
        if fixed_sigma is not None:
            seen.update(zip(zip(batch["image_paths"], batch["flippeds"], strict=True), sample_indices, strict=True))
        return original(self, ctx, batch, step, sample_indices, fixed_sigma=fixed_sigma)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    data = dataset(tmp_path, validation_split=0.5)
    twin = data.image_dir + "_twin"
    shutil.copytree(data.image_dir, twin)
    with open(data.dataset_toml, "a", encoding="utf-8") as f:
        f.write(f"\n  [[datasets.subsets]]\n  image_dir = '{twin}'\n")
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, network_train_unet_only=True,
                     validate_every_n_steps=1)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    names = [os.path.basename(path) for path, _ in seen]
    assert len(set(names)) < len(names)  # the split held out some of the same names from both folders
    assert len(set(seen.values())) == len(seen)
