"""A stop request at a step with more work due: the saves an uninterrupted run makes there are made, the
sampling and validation are skipped (a launcher may not wait for them), a stop at the last step ends the run
as finished, and a signal during sampling is acted on before another step runs."""

import json
import os
import signal

import pytest
import torch

import flux_train_network
from library.safetensors_io import load_safetensors
from tests.training_helpers import base_argv, dataset

FLAGS = dict(network_train_unet_only=True, save_state=True)


@pytest.fixture
def recorded(monkeypatch):
    """Steps whose batch loss ran, steps sampled at, and ``signal_at``: (what, step) pairs that send SIGINT."""
    trainer = flux_train_network.FluxNetworkTrainer
    batch_loss, sample_images = trainer.batch_loss, trainer.sample_images
    log = {"steps": [], "samples": [], "signal_at": set()}

    def loss(self, ctx, batch, step, indices, **kwargs):
        log["steps"].append(step)
        if ("step", step) in log["signal_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        return batch_loss(self, ctx, batch, step, indices, **kwargs)

    def sample(self, ctx, epoch, step):
        log["samples"].append(step)
        if ("sample", step) in log["signal_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        return sample_images(self, ctx, epoch, step)

    monkeypatch.setattr(trainer, "batch_loss", loss)
    monkeypatch.setattr(trainer, "sample_images", sample)
    return log


def assert_same_lora(path_a, path_b):
    a, b = load_safetensors(path_a), load_safetensors(path_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_a_stop_in_the_last_step_ends_the_run_as_finished(tiny_model_files, tmp_path, recorded, caplog):
    """It saved lora-step00000003 and its state, exited 130, and the --resume it suggested was refused: the
    state had no steps left, and no final lora.safetensors was ever written."""
    data = dataset(tmp_path, batch_size=1, num_images=2)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=3, sample_prompts=data.sample_prompts,
                     sample_every_n_steps=1, **FLAGS)  # fmt: skip
    recorded["signal_at"].add(("step", 2))
    assert flux_train_network.main(argv) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["lora-state", "lora.safetensors", "sample"]
    assert recorded["samples"] == [1, 2]  # the last step's sampling is skipped
    assert "SIGINT received at the end of the run: it has finished its steps" in caplog.text
    recorded["signal_at"].clear()
    straight = base_argv(tiny_model_files, data, str(tmp_path / "straight"), steps=3, **FLAGS)
    assert flux_train_network.main(straight) == 0
    assert_same_lora(tmp_path / "straight" / "lora.safetensors", tmp_path / "out" / "lora.safetensors")


def test_a_stop_in_an_epochs_last_step_makes_that_epochs_save(tiny_model_files, tmp_path, recorded, capsys):
    """The stop came before the epoch's end: lora-step00000002 was saved, and the resumed run, starting at
    epoch 2, never wrote lora-000001 (nor sampled epoch 1)."""
    data = dataset(tmp_path, batch_size=1, num_images=2)  # 2 steps an epoch
    flags = dict(steps=4, save_every_n_epochs=1, **FLAGS)
    out = tmp_path / "out"
    recorded["signal_at"].add(("step", 1))
    argv = base_argv(tiny_model_files, data, str(out), sample_prompts=data.sample_prompts, sample_every_n_epochs=1,
                     **flags)  # fmt: skip
    assert flux_train_network.main(argv) == 128 + signal.SIGINT
    assert sorted(os.listdir(out)) == ["lora-000001-state", "lora-000001.safetensors"]
    assert recorded["samples"] == []  # the epoch's sampling is skipped
    assert f"continue with --resume {out / 'lora-000001-state'}" in capsys.readouterr().err
    recorded["signal_at"].clear()

    straight = tmp_path / "straight"
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(straight), **flags)) == 0
    assert_same_lora(straight / "lora-000001.safetensors", out / "lora-000001.safetensors")
    resumed = base_argv(tiny_model_files, data, str(out), resume=str(out / "lora-000001-state"), **flags)
    assert flux_train_network.main(resumed) == 0
    assert_same_lora(straight / "lora.safetensors", out / "lora.safetensors")


@pytest.mark.parametrize("every, signalled_sample, saved_at", [
    ("sample_every_n_steps", 1, 1),  # the sampling after step 1
    ("sample_every_n_epochs", 2, 2),  # the sampling at the first epoch's end
])  # fmt: skip
def test_a_signal_during_sampling_stops_before_another_step(tiny_model_files, tmp_path, recorded, every,
                                                           signalled_sample, saved_at):  # fmt: skip
    """It was looked at only after the next step (after the epoch's end: one step of the next epoch)."""
    data = dataset(tmp_path, batch_size=1, num_images=2)
    recorded["signal_at"].add(("sample", signalled_sample))
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=4, sample_prompts=data.sample_prompts,
                     **{every: 1}, **FLAGS)  # fmt: skip
    assert flux_train_network.main(argv) == 128 + signal.SIGINT
    assert recorded["steps"] == list(range(saved_at))
    assert sorted(os.listdir(tmp_path / "out")) == [
        f"lora-step{saved_at:08d}-state", f"lora-step{saved_at:08d}.safetensors", "sample"]  # fmt: skip


def test_a_stop_before_an_epochs_first_step_records_the_epoch_of_the_last_finished_one(tiny_model_files, tmp_path,
                                                                                       recorded, caplog):  # fmt: skip
    """The state said epoch 2 for step 1 of a 1-step epoch, which a resume then took for a changed dataset."""
    data = dataset(tmp_path, batch_size=1, num_images=2)  # with accumulation 2: one step an epoch
    flags = dict(steps=3, gradient_accumulation_steps=2, **FLAGS)
    out = tmp_path / "out"
    recorded["signal_at"].add(("step", 1))  # the first micro-batch of epoch 2's step
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(out), **flags)) == 128 + signal.SIGINT
    assert recorded["steps"] == [0, 0, 1]
    state = out / "lora-step00000001-state"
    assert json.loads((state / "train_state.json").read_text())["current_epoch"] == 1
    recorded["signal_at"].clear()
    caplog.clear()
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(out), resume=str(state), **flags)) == 0
    assert "falls in epoch" not in caplog.text


def test_a_state_of_a_run_started_at_initial_step_resumes_without_a_layout_warning(tiny_model_files, tmp_path,
                                                                                   recorded, caplog):  # fmt: skip
    """Without --skip_until_initial_step the loop's epoch is not the one the step falls in: the state recorded
    the loop's, and resuming it said that the dataset or batch size had changed."""
    data = dataset(tmp_path, batch_size=1, num_images=4)  # with accumulation 2: two steps an epoch
    flags = dict(steps=6, gradient_accumulation_steps=2, **FLAGS)
    out = tmp_path / "out"
    recorded["signal_at"].add(("step", 3))  # the first micro-batch after --initial_step 3
    argv = base_argv(tiny_model_files, data, str(out), initial_step=3, **flags)
    assert flux_train_network.main(argv) == 128 + signal.SIGINT
    state = out / "lora-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["current_epoch"] == 2  # step 3 of 2-step epochs
    recorded["signal_at"].clear()
    caplog.clear()
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(out), resume=str(state), **flags)) == 0
    assert "falls in epoch" not in caplog.text


def test_a_batch_that_cannot_be_read_keeps_the_steps_trained_before_it(tiny_model_files, tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    """A cache file damaged inside (found when read) ended the run with every step since the last save lost."""
    from library.datasets import DatasetGroup
    from library.errors import UserError

    item, fetched = DatasetGroup.__getitem__, []

    def damaged_third(self, index):
        fetched.append(index)
        if len(fetched) == 3:
            raise UserError("/data/c_0064x0064_flux.npz: this cache file is damaged (...); delete it to re-cache it.")
        return item(self, index)

    monkeypatch.setattr(DatasetGroup, "__getitem__", damaged_third)
    data = dataset(tmp_path, batch_size=1)
    out = tmp_path / "out"
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(out), steps=4, **FLAGS)) == 1
    state = out / "lora-step00000002-state"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # the last line: the progress bar went first
        "error: /data/c_0064x0064_flux.npz: this cache file is damaged (...); delete it to re-cache it. Before "
        f"stopping, saved the LoRA to {out / 'lora-step00000002.safetensors'} and the training state to {state} "
        f"(continue with --resume {state}).")  # fmt: skip
    assert sorted(os.listdir(out)) == ["lora-step00000002-state", "lora-step00000002.safetensors"]
    fetched.clear()
    monkeypatch.setattr(DatasetGroup, "__getitem__", damaged_third)
    flags = dict(FLAGS, save_state=False)
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(tmp_path / "first"), steps=4, **flags)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("(add --save_state to be able to resume).")


@pytest.fixture
def validations(monkeypatch, recorded):
    """The kinds of validation run ("step", "epoch"); ("validate", kind) in ``signal_at`` sends SIGINT during one."""
    from library.training_loop import TrainingLoop

    validate, log = TrainingLoop._validate, []

    def recording(self, kind):
        log.append(kind)
        if ("validate", kind) in recorded["signal_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        return validate(self, kind)

    monkeypatch.setattr(TrainingLoop, "_validate", recording)
    return log


def test_a_signal_during_a_steps_sampling_skips_the_validation_after_it(tiny_model_files, tmp_path, recorded,
                                                                        validations):  # fmt: skip
    """The validation due at the same step ran after the signal: time a launcher that kills 30 s after
    passing the signal on may not give."""
    data = dataset(tmp_path, batch_size=1, num_images=4, validation_split=0.5)
    recorded["signal_at"].add(("sample", 1))
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=4, sample_prompts=data.sample_prompts,
                     sample_every_n_steps=1, validate_every_n_steps=1, **FLAGS)  # fmt: skip
    assert flux_train_network.main(argv) == 128 + signal.SIGINT
    assert recorded["samples"] == [1] and validations == []
    assert sorted(os.listdir(tmp_path / "out")) == ["lora-step00000001-state", "lora-step00000001.safetensors",
                                                     "sample"]  # fmt: skip


def test_a_signal_during_an_epochs_validation_skips_its_sampling_and_keeps_its_save(tiny_model_files, tmp_path,
                                                                                    recorded, validations):  # fmt: skip
    data = dataset(tmp_path, batch_size=1, num_images=4, validation_split=0.5)  # 2 training images: 2 steps an epoch
    recorded["signal_at"].add(("validate", "epoch"))
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=4, sample_prompts=data.sample_prompts,
                     sample_every_n_epochs=1, save_every_n_epochs=1, **FLAGS)  # fmt: skip
    assert flux_train_network.main(argv) == 128 + signal.SIGINT
    assert validations == ["epoch"] and recorded["samples"] == []
    assert sorted(os.listdir(tmp_path / "out")) == ["lora-000001-state", "lora-000001.safetensors"]
