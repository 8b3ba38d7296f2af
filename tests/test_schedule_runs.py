"""Learning-rate schedules, adaptive and schedule-free optimizers and the pruning of saves, checked in real
(tiny) runs of ``flux_train_network.main``. Expected values come from transformers' schedule functions, written-out
formulas, the optimizers' own packages and sd-scripts' pruning rules, not from the project's code."""

import argparse
import logging
import math
import os

import pytest
import torch
from transformers.optimization import (
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
)

from library.errors import UserError
from library.lr_schedulers import get_scheduler_fix
from library.safetensors_io import load_safetensors
from tests.test_training import run
from tests.training_helpers import base_argv, dataset, logged_scalars


def logged_after_each_step(make_schedule, base_lr: float, steps: int) -> dict[int, float]:
    """{step: lr} as sd-scripts logs it: the scheduler's lr after the optimizer step and the scheduler tick."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler, out = make_schedule(optimizer), {}
    for step in range(1, steps + 1):
        optimizer.step()
        scheduler.step()
        out[step] = scheduler.get_last_lr()[0]
    return out


# ---- the learning rates a run logs ---------------------------------------------------------------


def test_logged_learning_rates_are_the_schedules_values_at_every_step(tiny_model_files, tmp_path):
    logs = tmp_path / "logs"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=8, cache_latents=True,
                     lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=3,
                     text_encoder_lr=5e-4, logging_dir=str(logs))  # fmt: skip
    assert run(argv) == 0
    scalars = logged_scalars(logs)

    def multiplier(k: int) -> float:  # 3 warmup steps, then two hard-restarted cosines over the other 5
        if k < 3:
            return k / 3
        progress = (k - 3) / 5
        return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1)))

    assert [round(multiplier(k), 4) for k in range(1, 9)] == [0.3333, 0.6667, 1.0, 0.6545, 0.0955, 0.9045, 0.3455, 0]
    for tag, lr in (("lr/unet", 1e-3), ("lr/textencoder 1", 5e-4)):  # (the CLIP-L tag: docs §17.6)
        by_hand = {k: lr * multiplier(k) for k in range(1, 9)}
        transformers_values = logged_after_each_step(
            lambda opt: get_cosine_with_hard_restarts_schedule_with_warmup(opt, 3, 8, num_cycles=2), lr, 8
        )
        assert transformers_values == pytest.approx(by_hand, abs=1e-12)
        assert scalars[tag] == pytest.approx(by_hand, rel=1e-6, abs=1e-12), tag  # (TensorBoard stores float32)


def test_prodigy_logs_its_adapted_step_size_times_the_scheduled_lr(tiny_model_files, tmp_path, monkeypatch):
    import prodigyopt

    d_after_step = []
    step = prodigyopt.Prodigy.step

    def recording(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        d_after_step.append(self.param_groups[0]["d"])
        return result

    monkeypatch.setattr(prodigyopt.Prodigy, "step", recording)
    logs = tmp_path / "logs"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=7, cache_latents=True,
                     optimizer_type="Prodigy", optimizer_args=["d0=1e-4"], learning_rate=1.0,
                     lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.5, network_train_unet_only=True,
                     logging_dir=str(logs))  # fmt: skip
    assert run(argv) == 0
    scalars = logged_scalars(logs)
    lrs = logged_after_each_step(lambda opt: get_cosine_with_min_lr_schedule_with_warmup(
        opt, 0, 7, num_cycles=0.5, min_lr_rate=0.5), 1.0, 7)  # fmt: skip
    assert lrs[7] == pytest.approx(0.5) and lrs[1] == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 7)))
    assert scalars["lr/unet"] == pytest.approx(lrs, rel=1e-6)
    assert len(d_after_step) == 7 and d_after_step[0] == 1e-4
    assert d_after_step[-1] > 2 * d_after_step[0]  # d did adapt during the run: a stale d would show
    expected = {k: d_after_step[k - 1] * lrs[k] for k in range(1, 8)}
    assert scalars["lr/d*lr/unet"] == pytest.approx(expected, rel=1e-6)


# ---- schedule-free: eval-mode weights in the LoRA files, train-mode weights in the states --------


def test_schedule_free_lora_files_hold_the_eval_weights_and_states_the_train_weights(tiny_model_files, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    import schedulefree

    from networks import lora_flux

    made = {}
    init = schedulefree.AdamWScheduleFree.__init__
    prepare = lora_flux.LoRANetwork.prepare_optimizer_params_with_multiple_te_lrs

    def recording_init(self, *args, **kwargs):
        made["optimizer"] = self
        init(self, *args, **kwargs)

    def recording_prepare(self, *args, **kwargs):
        made["network"] = self
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(schedulefree.AdamWScheduleFree, "__init__", recording_init)
    monkeypatch.setattr(lora_flux.LoRANetwork, "prepare_optimizer_params_with_multiple_te_lrs", recording_prepare)
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(out), steps=3, cache_latents=True,
                     optimizer_type="AdamWScheduleFree", learning_rate=1e-2, network_train_unet_only=True,
                     save_every_n_steps=2, save_state=True)  # fmt: skip
    assert run(argv) == 0
    # the names of the optimizer's parameters, in its order (the order of optimizer.bin's indices)
    names = {id(p): name for name, p in made["network"].named_parameters()}
    order = [names[id(p)] for group in made["optimizer"].param_groups for p in group["params"]]

    for lora_file, state in (("lora-step00000002.safetensors", "lora-step00000002-state"),
                             ("lora.safetensors", "lora-state")):  # fmt: skip
        saved = load_safetensors(str(out / lora_file))
        state_weights = load_safetensors(str(out / state / "model.safetensors"))
        optimizer_state = torch.load(out / state / "optimizer.bin", weights_only=False)
        assert saved.keys() == state_weights.keys() and len(order) == len(optimizer_state["state"])
        assert all(group["train_mode"] for group in optimizer_state["param_groups"])
        # the eval weights x from the state's y and z, by schedulefree itself: a fresh optimizer, then .eval()
        params = [torch.nn.Parameter(state_weights[name].clone()) for name in order]
        reference = schedulefree.AdamWScheduleFree(params, lr=1.0)
        reference.load_state_dict(optimizer_state)
        reference.eval()
        for name, x in zip(order, params, strict=True):
            assert torch.allclose(saved[name], x.detach(), rtol=0, atol=1e-7), (lora_file, name)
        apart = max((saved[name] - state_weights[name]).abs().max().item() for name in order)
        assert apart > 1e-4, lora_file  # y and x differ: the two files hold different weights
        for name in saved.keys() - set(order):  # the alphas
            assert torch.equal(saved[name], state_weights[name]), name


# ---- --save_last_n_*: what remains after a run ---------------------------------------------------


def saves(out) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(out))
    return [n for n in names if n.endswith(".safetensors")], [n for n in names if n.endswith("-state")]


def test_save_last_n_steps_state_keeps_more_states_than_files(tiny_model_files, tmp_path):
    # saves at 2, 4, ..., 10. sd-scripts removes (step - n - 1) floored to a multiple of 2 after each save:
    # files (n = 2) 0, 2, 4, 6 at steps 4..10; states (n = 5) 2, 4 at steps 8 and 10
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(out), steps=10, cache_latents=True,
                     network_train_unet_only=True, save_every_n_steps=2, save_last_n_steps=2,
                     save_last_n_steps_state=5, save_state=True)  # fmt: skip
    assert run(argv) == 0
    files, states = saves(out)
    assert files == ["lora-step00000008.safetensors", "lora-step00000010.safetensors", "lora.safetensors"]
    assert states == ["lora-state", "lora-step00000006-state", "lora-step00000008-state", "lora-step00000010-state"]


def test_save_last_n_steps_prunes_states_alike_without_the_state_override(tiny_model_files, tmp_path):
    # saves at 3, 6, 9; n = 4: at 9 the save of (9 - 5) floored to a multiple of 3 = 3 goes, files and states
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(out), steps=10, cache_latents=True,
                     network_train_unet_only=True, save_every_n_steps=3, save_last_n_steps=4,
                     save_state=True)  # fmt: skip
    assert run(argv) == 0
    files, states = saves(out)
    assert files == ["lora-step00000006.safetensors", "lora-step00000009.safetensors", "lora.safetensors"]
    assert states == ["lora-state", "lora-step00000006-state", "lora-step00000009-state"]


def test_save_last_n_epochs_state_keeps_more_states_than_files(tiny_model_files, tmp_path):
    # one step an epoch, 6 epochs: epochs 1..5 saved (the 6th is the final save); sd-scripts removes
    # epoch - every * n after each save: files (n = 2) 1, 2, 3; states (n = 3) 1, 2
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, dataset(tmp_path, batch_size=1, num_images=1), str(out), steps=1,
                     cache_latents=True, network_train_unet_only=True, max_train_epochs=6, save_every_n_epochs=1,
                     save_last_n_epochs=2, save_last_n_epochs_state=3, save_state=True)  # fmt: skip
    assert run(argv) == 0
    files, states = saves(out)
    assert files == ["lora-000004.safetensors", "lora-000005.safetensors", "lora.safetensors"]
    assert states == ["lora-000003-state", "lora-000004-state", "lora-000005-state", "lora-state"]


# ---- cosine_warmup_with_min_lr --------------------------------------------------------------------


def make_args(**kw) -> argparse.Namespace:
    base = dict(
        lr_scheduler="cosine_warmup_with_min_lr", lr_scheduler_type="", lr_scheduler_args=None, lr_warmup_steps=2,
        lr_decay_steps=0, lr_scheduler_num_cycles=1, lr_scheduler_power=1.0, lr_scheduler_timescale=None,
        lr_scheduler_min_lr_ratio=0.1, max_train_steps=10, optimizer_type="AdamW",
    )  # fmt: skip
    return argparse.Namespace(**(base | kw))


def lrs_at_steps(make_schedule, n: int) -> list[float]:
    """The lr in effect at optimizer steps 0..n-1 (lr 1.0: the schedule's multiplier)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler, out = make_schedule(optimizer), []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_warmup_with_min_lr_follows_transformers_step_by_step():
    got = lrs_at_steps(lambda opt: get_scheduler_fix(make_args(), opt), 10)
    # transformers' lr-rate variant: the warmup starts at 1/warmup and the cosine at one step in
    by_hand = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 8)) for k in range(2, 10)]
    assert by_hand[-1] == pytest.approx(0.1)
    reference = lrs_at_steps(lambda opt: get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        opt, num_warmup_steps=2, num_training_steps=10, num_cycles=0.5, min_lr_rate=0.1), 10)  # fmt: skip
    assert reference == pytest.approx(by_hand, abs=1e-12)
    assert got == pytest.approx(by_hand, abs=1e-12)
    # --lr_scheduler_num_cycles 2 is half of it, as for cosine_with_min_lr: a whole wave, down and back up
    got = lrs_at_steps(lambda opt: get_scheduler_fix(make_args(lr_scheduler_num_cycles=2), opt), 10)
    by_hand = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(2 * math.pi * (k - 1) / 8)) for k in range(2, 10)]
    assert got == pytest.approx(by_hand, abs=1e-12) and got[5] == pytest.approx(0.1) and got[9] == pytest.approx(1.0)
    # a ratio warmup, and on 2 processes (the schedule ticks twice per step): the same lr per step
    got = lrs_at_steps(lambda opt: get_scheduler_fix(make_args(lr_warmup_steps=0.2), opt, 2), 20)[::2]
    reference = lrs_at_steps(lambda opt: get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        opt, num_warmup_steps=4, num_training_steps=20, num_cycles=0.5, min_lr_rate=0.1), 20)  # fmt: skip
    assert got == pytest.approx(reference[::2], abs=1e-12)
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        get_scheduler_fix(make_args(lr_scheduler_min_lr_ratio=None), torch.optim.SGD([torch.zeros(1)], lr=1.0))


# ---- --initial_step / --initial_epoch without --resume --------------------------------------------


@pytest.mark.parametrize("start", [dict(initial_step=4, skip_until_initial_step=True), dict(initial_epoch=2)],
                         ids=["initial_step_skipping", "initial_epoch"])  # fmt: skip
def test_without_resume_the_schedule_starts_at_its_beginning_from_the_initial_step(tiny_model_files, tmp_path,
                                                                                   caplog, start):  # fmt: skip
    # 4 steps an epoch (six images in batches of 1, 2, 2, 1), so epoch 2 starts at step 4 too; linear, warmup 2
    # of 8 steps. The steps trained are counted 5..8, at the schedule's steps 1..4, as in sd-scripts
    logs = tmp_path / "logs"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=8, cache_latents=True,
                     network_train_unet_only=True, lr_scheduler="linear", lr_warmup_steps=2, logging_dir=str(logs),
                     **start)  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert run(argv) == 0
    assert "counting steps from 4" in caplog.text and "the lr schedule starts at its beginning" in caplog.text
    expected = {5: 0.5e-3, 6: 1e-3, 7: 1e-3 * 5 / 6, 8: 1e-3 * 4 / 6}
    assert logged_scalars(logs)["lr/unet"] == pytest.approx(expected, rel=1e-6)
