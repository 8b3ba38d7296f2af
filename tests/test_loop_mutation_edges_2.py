"""Edges of the training loop (library/training_loop.py) that a mutation round found unpinned: its helpers' numbers
(noise indices, finiteness, a worker's message, the dataset multiplier) and, on stand-ins for what a run builds,
the step loss, the optimizer step's logs, the epoch end's saves and validation, and the validation loss."""

from __future__ import annotations

import types
from argparse import Namespace

import pytest
import torch
from torch import nn

from library.errors import UserError

# ---- training_loop's helpers -------------------------------------------------------------------------------------


def test_the_epoch_sampler_numbers_its_batches_from_its_start():
    from library.training_loop import EpochSampler

    sampler = EpochSampler([7, 3, 5])
    assert len(sampler) == 3 and list(sampler) == [(0, 7), (1, 3), (2, 5)]
    sampler.indices, sampler.start = [3, 5], 1  # a resumed epoch, from its second batch
    assert len(sampler) == 2 and list(sampler) == [(1, 3), (2, 5)]


@pytest.mark.parametrize("tensors, finite", [
    ([], True), ([None], True), ([torch.ones(2), None], True),
    ([torch.ones(2), torch.tensor([1.0, float("inf")])], False),
    ([torch.tensor([float("nan")]), torch.tensor([float("nan")])], False),
])  # fmt: skip
def test_all_finite(tensors, finite):
    from library.training_loop import all_finite

    assert all_finite(tensors) is finite


def test_counts_are_named_in_the_singular_for_one_only():
    from library.training_loop import _count

    assert [_count(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert _count(2, "process", "processes") == "2 processes" and _count(1, "process", "processes") == "1 process"


def test_each_sample_of_a_step_gets_its_own_noise_index_whatever_the_split():
    from library.training_loop import step_sample_indices

    # 2 processes, batches of up to 3 (a short batch of 2 here), accumulating 2: every micro-batch owns 3 indices
    assert list(step_sample_indices(0, 2, 0, 3, 3)) == [0, 1, 2]
    assert list(step_sample_indices(0, 2, 1, 2, 3)) == [3, 4]
    assert list(step_sample_indices(1, 2, 0, 3, 3)) == [6, 7, 8]
    assert list(step_sample_indices(1, 2, 1, 1, 3)) == [9]


def test_a_worker_traceback_is_cut_only_from_a_message_torch_wrapped():
    from library.training_loop import _message_of

    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "library.errors.UserError: a: damaged\nlibrary.errors.UserError: b: damaged")
    assert _message_of(UserError(wrapped)) == "b: damaged"  # the last one: the error the worker raised
    plain = "an image names library.errors.UserError: in its caption"
    assert _message_of(UserError(plain)) == plain


def test_a_batch_that_cannot_be_read_is_told_apart_by_its_message():
    from library.training_loop import _BatchError, _naming_batch_errors

    def batches():
        yield 1
        raise UserError("Caught UserError in DataLoader worker process 0.\nlibrary.errors.UserError: x: damaged")

    read = _naming_batch_errors(batches())
    assert next(read) == 1
    with pytest.raises(_BatchError) as ei:
        next(read)
    assert str(ei.value) == "x: damaged"


def test_the_dataset_multiplier_is_the_batchs_first_and_0_switches_the_lora_off():
    from library.training_loop import _lora_switched_off, dataset_multiplier

    events = []
    net = types.SimpleNamespace(set_multiplier=events.append)
    with dataset_multiplier(net, {"network_multipliers": torch.tensor([0.25, 1.0])}):
        events.append("inside")
    with dataset_multiplier(net, {"network_multipliers": torch.tensor([1.0, 1.0])}):
        events.append("at 1")
    assert events == [0.25, "inside", 1.0, "at 1"]
    assert _lora_switched_off({"network_multipliers": torch.tensor([0.0, 0.0])})
    assert not _lora_switched_off({"network_multipliers": torch.tensor([0.0, 0.5])})
    assert not _lora_switched_off({})


# ---- TrainingLoop's steps, on stand-ins for what a run builds -----------------------------------------------------


class Tracker:
    def __init__(self, name):
        self.name, self.logged = name, []

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))


def accelerator(**overrides):
    import contextlib

    values = dict(num_processes=1, process_index=0, is_main_process=True, trackers=[], device=torch.device("cpu"),
                  autocast=contextlib.nullcontext, wait_for_everyone=lambda: None, optimizer_step_was_skipped=False,
                  scaler=None)  # fmt: skip
    return types.SimpleNamespace(**(values | overrides))


def bare_loop(**attributes):
    """A TrainingLoop with only the attributes a test gives (its __init__ needs a whole run)."""
    import collections

    from library.training_loop import TrainingLoop

    loop = TrainingLoop.__new__(TrainingLoop)
    defaults = dict(accelerator=accelerator(), unchecked_state=None, recent_losses=collections.deque(maxlen=4),
                    epoch_losses=[], first_step=0)  # fmt: skip
    for key, value in (defaults | attributes).items():
        setattr(loop, key, value)
    return loop


def test_a_steps_loss_is_the_mean_of_its_micro_batches_and_a_short_window_counts_its_own():
    saves = types.SimpleNamespace(before_failure=lambda step: f"the last file is lora-{step}")
    loop = bare_loop(saves=saves)
    # the window holds each micro-batch's loss divided by the accumulation (2): micro losses 1.0 and 3.0
    assert loop._step_loss([torch.tensor(0.5), torch.tensor(1.5)], 2, 0) == pytest.approx(2.0)
    assert loop._step_loss([torch.tensor(0.75)], 2, 0) == pytest.approx(1.5)  # an epoch's odd last batch
    with pytest.raises(UserError) as ei:
        loop._step_loss([torch.tensor(float("nan")), torch.tensor(1.0)], 2, 4)
    assert str(ei.value).startswith("the loss became nan at step 5. Likely causes")
    assert str(ei.value).endswith("No weights were written for this step; the last file is lora-4")


def test_wandb_gets_the_step_and_1_based_epoch_and_other_processes_log_nothing():
    wandb, tensorboard = Tracker("wandb"), Tracker("tensorboard")
    bare_loop(accelerator=accelerator(trackers=[wandb, tensorboard]))._log({"loss/current": 1.0}, 7, 2)
    assert wandb.logged == [(7, {"loss/current": 1.0, "global_step": 7, "epoch": 3})]
    assert tensorboard.logged == [(7, {"loss/current": 1.0})]
    other = Tracker("tensorboard")
    bare_loop(accelerator=accelerator(is_main_process=False, trackers=[other]))._log({"loss/current": 1.0}, 7, 2)
    assert other.logged == []


class Stop:
    def __init__(self, requested=False):
        self.asked = requested

    def requested(self, accelerator):
        return self.asked


class Saves:
    def __init__(self):
        self.calls = []

    def at_epoch_end(self, epoch, step):
        self.calls.append(("epoch", epoch, step))

    def at_step(self, step, epoch):
        self.calls.append(("step", step, epoch))


class Triggers:
    def __init__(self, due):
        self.due_at, self.asked = due, []

    def due(self, epoch, step):
        self.asked.append((epoch, step))
        return self.due_at(epoch, step)


def test_an_epochs_end_logs_its_average_saves_before_the_last_and_validates_every_n(monkeypatch):
    from library.training_loop import TrainingLoop

    validated, sampled = [], []
    monkeypatch.setattr(TrainingLoop, "_validate", lambda self, kind: validated.append(kind) or {"v": 1.0})
    monkeypatch.setattr(TrainingLoop, "_sample", lambda self, epoch, step: sampled.append((epoch, step)))
    tracker, saves = Tracker("tensorboard"), Saves()
    loop = bare_loop(accelerator=accelerator(trackers=[tracker]), saves=saves, num_epochs=4, steps_per_epoch=3,
                     val_group=[object()], args=Namespace(validate_every_n_epochs=2),
                     triggers=Triggers(lambda epoch, step: epoch == 2), epoch_losses=[1.0, 2.0])  # fmt: skip
    for epoch, step in ((0, 2), (1, 3), (3, 6)):  # the last epoch's save is the final one: none here
        assert loop._after_epoch(epoch, step, Stop()) is False
    assert saves.calls == [("epoch", 1, 2), ("epoch", 2, 3)]
    assert validated == ["epoch", "epoch"] and sampled == [(2, 3)]
    assert [(s, v["loss/epoch_average"]) for s, v in tracker.logged] == [(2, 1.5), (3, 1.5), (6, 1.5)]
    # a stop asked for: the save alone
    saves.calls, validated[:], sampled[:] = [], [], []
    loop.triggers = Triggers(lambda epoch, step: True)
    assert loop._after_epoch(1, 3, Stop(True)) is True
    assert saves.calls == [("epoch", 2, 3)] and validated == [] and sampled == []


def test_without_validate_every_n_epochs_every_epoch_validates(monkeypatch):
    from library.training_loop import TrainingLoop

    validated = []
    monkeypatch.setattr(TrainingLoop, "_validate", lambda self, kind: validated.append(kind) or {})
    loop = bare_loop(saves=Saves(), num_epochs=3, val_group=[object()], args=Namespace(validate_every_n_epochs=None),
                     triggers=Triggers(lambda epoch, step: False))  # fmt: skip
    for epoch in range(3):
        loop._after_epoch(epoch, epoch + 1, Stop())
    assert validated == ["epoch"] * 3


def test_after_a_step_validation_every_n_steps_and_a_stop_skips_sampling_and_validation(monkeypatch):
    from library.training_loop import TrainingLoop

    validated, sampled = [], []
    monkeypatch.setattr(TrainingLoop, "_validate", lambda self, kind: validated.append(kind) or {"v": 2.0})
    monkeypatch.setattr(TrainingLoop, "_sample", lambda self, epoch, step: sampled.append((epoch, step)))
    tracker, saves = Tracker("tensorboard"), Saves()
    loop = bare_loop(accelerator=accelerator(trackers=[tracker]), saves=saves, val_group=[object()],
                     args=Namespace(validate_every_n_steps=2), triggers=Triggers(lambda epoch, step: True))
    for step in (1, 2):
        assert loop._after_step(0, step, {"loss/current": 1.0}, Stop()) is False
    assert validated == ["step"] and sampled == [(None, 1), (None, 2)]
    assert tracker.logged == [(1, {"loss/current": 1.0}), (2, {"loss/current": 1.0, "v": 2.0})]
    assert loop._after_step(0, 4, {}, Stop(True)) is True
    assert validated == ["step"] and sampled == [(None, 1), (None, 2)] and saves.calls[-1] == ("step", 4, 0)


class ValGroup:
    """Validation batches of one image each: (path, flipped, loss weight)."""

    def __init__(self, images):
        self.images, self.epochs = images, []

    def __len__(self):
        return len(self.images)

    def set_current_epoch(self, epoch):
        self.epochs.append(epoch)

    def entries(self):
        return [types.SimpleNamespace(path=path) for path, _, _ in self.images]

    def __getitem__(self, index):
        path, flipped, weight = self.images[index]
        return {"image_paths": [path], "flippeds": [flipped], "loss_weights": torch.tensor([weight])}


def test_validation_averages_weighted_losses_over_images_and_sigmas_with_noise_named_by_image(tmp_path):
    import zlib

    from library.flow_matching import VALIDATION_SIGMAS

    calls, modes = [], []
    losses = {0.2: 1.0, 0.4: 2.0, 0.6: 3.0, 0.8: 4.0}

    def batch_loss(ctx, batch, step, indices, fixed_sigma):
        calls.append((step, tuple(indices), fixed_sigma))
        return torch.tensor([losses[round(fixed_sigma, 1)]])

    images = [(str(tmp_path / "a" / "1.png"), False, 1.0), (str(tmp_path / "b" / "1.png"), True, 0.5),
              (str(tmp_path / "c.png"), False, 1.0)]  # fmt: skip
    group = ValGroup(images)
    network = types.SimpleNamespace(eval=lambda: modes.append("eval"), train=lambda: modes.append("train"))
    loop = bare_loop(args=Namespace(max_validation_steps=2), val_group=group, network=network, ctx=None,
                     trainer=types.SimpleNamespace(batch_loss=batch_loss), optimizer_eval=lambda: modes.append("opt"),
                     optimizer_train=lambda: modes.append("opt train"))  # fmt: skip
    loop.recent_losses.extend([2.0, 4.0])
    logs = loop._validation_logs("epoch")
    # 2 of the 3 images, at each σ: (1 + 2 + 3 + 4) at weight 1 and at weight 0.5, over 8 losses
    assert logs["loss/validation/epoch_average"] == pytest.approx(15.0 / 8)
    assert logs["loss/validation/epoch_divergence"] == pytest.approx(15.0 / 8 - 3.0)
    assert group.epochs == [1] and modes == ["opt", "eval", "opt train", "train"]
    assert [c[2] for c in calls] == [*VALIDATION_SIGMAS, *VALIDATION_SIGMAS] and {c[0] for c in calls} == {0}
    assert [c[1] for c in calls[::4]] == [(zlib.crc32(b"a/1.png|False"),), (zlib.crc32(b"b/1.png|True"),)]
    # with no training loss yet the divergence is 0; max_validation_steps above the count validates them all
    loop = bare_loop(args=Namespace(max_validation_steps=5), val_group=ValGroup(images[:1]), network=network,
                     ctx=None, trainer=types.SimpleNamespace(batch_loss=batch_loss), optimizer_eval=lambda: None,
                     optimizer_train=lambda: None)  # fmt: skip
    logs = loop._validation_logs("step")
    assert logs == {"loss/validation/step_average": pytest.approx(2.5), "loss/validation/step_divergence": 0.0}


def test_a_keyerror_of_the_first_optimizer_step_after_resume_names_the_state():
    loop = bare_loop(unchecked_state="out/lora-state")
    with pytest.raises(UserError) as ei, loop._checking_resumed_state():
        raise KeyError("exp_avg_sq")
    assert str(ei.value).startswith("--resume out/lora-state: its optimizer state does not fit this run's optimizer "
                                    "(it has no 'exp_avg_sq')")  # fmt: skip
    with pytest.raises(KeyError), bare_loop()._checking_resumed_state():  # not resuming: the error as it is
        raise KeyError("exp_avg_sq")


def test_a_batch_that_cannot_be_read_saves_only_a_one_process_run_that_took_steps():
    saved = []
    saves = types.SimpleNamespace(for_stop=lambda step, epoch, rng: saved.append((step, epoch, rng)) or "saved it")
    assert bare_loop(saves=saves, first_step=2)._save_before_failing(3, 0, None) == " Before stopping, saved it."
    assert bare_loop(saves=saves, first_step=3)._save_before_failing(3, 0, None) == ""
    assert bare_loop(saves=saves, accelerator=accelerator(num_processes=2))._save_before_failing(3, 0, None) == ""
    assert saved == [(3, 0, None)]


class Schedule:
    def __init__(self, lrs):
        self.lrs, self.steps = lrs, 0

    def step(self):
        self.steps += 1

    def get_last_lr(self):
        return self.lrs


class GgpoNet(nn.Module):
    """A network with GGPO's and max-norm's methods, recording their calls."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.calls = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3)), []

    def update_grad_norms(self):
        self.calls.append("grad norms")

    def update_norms(self):
        self.calls.append("norms")

    def apply_max_norm_regularization(self, cap, device):
        self.calls.append(("max norm", cap))
        return 2, torch.tensor(0.5).item(), torch.tensor(0.75).item()

    def weight_norms(self):
        return torch.tensor([1.0, 3.0])

    def grad_norms(self):
        return torch.tensor([2.0, 4.0])

    def combined_weight_norms(self):
        return None


def optimizer_step_loop(net, skipped=False, **args):
    optimizer = torch.optim.SGD([{"params": [net.a], "lr": 0.1, "d": 3.0}, {"params": [net.b], "lr": 0.2}])
    clipped = []
    acc = accelerator(optimizer_step_was_skipped=skipped,
                      clip_grad_norm_=lambda params, norm: clipped.append((len(params), norm)),
                      unscale_gradients=lambda: clipped.append("unscaled"))  # fmt: skip
    defaults = dict(max_grad_norm=0.0, scale_weight_norms=None)
    loop = bare_loop(args=Namespace(**(defaults | args)), accelerator=acc, network=net, optimizer=optimizer,
                     lr_scheduler=Schedule([0.1, 0.2]), lr_descriptions=["unet ", "textencoder"],
                     adapts_step_size=True, unchecked_state="state")  # fmt: skip
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    return loop, clipped


def test_an_optimizer_step_clips_steps_the_schedule_clears_gradients_and_logs_rates_and_norms():
    net = GgpoNet()
    loop, clipped = optimizer_step_loop(net, max_grad_norm=1.0, scale_weight_norms=2.0)
    logs = loop._optimizer_step()
    assert clipped == [(2, 1.0)] and net.calls == ["grad norms", "norms", ("max norm", 2.0)]
    torch.testing.assert_close(net.a.detach(), torch.full((2,), 0.9))
    torch.testing.assert_close(net.b.detach(), torch.full((3,), 0.8))
    assert net.a.grad is None and net.b.grad is None
    assert loop.lr_scheduler.steps == 1 and loop.unchecked_state is None
    assert logs == {"lr/unet": 0.1, "lr/d*lr/unet": pytest.approx(0.3), "lr/textencoder": 0.2,
                    "max_norm/keys_scaled": 2, "max_norm/max_key_norm": 0.75, "norm/avg_key_norm": 0.5,
                    "norm/avg_grad_norm": 3.0}  # fmt: skip


def test_a_step_the_scaler_skipped_keeps_the_schedule_and_the_state_check():
    net = GgpoNet()
    loop, clipped = optimizer_step_loop(net, skipped=True)
    logs = loop._optimizer_step()
    assert clipped == [] and loop.lr_scheduler.steps == 0 and loop.unchecked_state == "state"
    assert net.calls == ["grad norms", "norms"]  # no scaler: the gradients are the real ones
    assert logs["norm/avg_key_norm"] == 2.0 and logs["norm/avg_grad_norm"] == 3.0
    assert "norm/avg_combined_norm" not in logs


def test_ggpo_with_fp16_unscales_and_skips_its_norms_after_an_overflow():
    net = GgpoNet()
    loop, clipped = optimizer_step_loop(net)
    loop.accelerator.scaler = object()
    net.a.grad = torch.tensor([1.0, float("inf")])
    loop._optimizer_step()
    assert clipped == ["unscaled"] and net.calls == []


def test_a_micro_batchs_loss_is_its_weighted_mean_with_the_noise_indices_of_its_place_in_the_step():
    calls = []

    def batch_loss(ctx, batch, step, indices):
        calls.append((step, indices))
        return torch.tensor([2.0, 4.0])

    loop = bare_loop(accelerator=accelerator(num_processes=2, process_index=1), sample_stride=3, ctx=None,
                     trainer=types.SimpleNamespace(batch_loss=batch_loss))  # fmt: skip
    batch = {"captions": ["a", "b"], "loss_weights": torch.tensor([1.0, 0.5])}
    assert loop._micro_step(batch, 5, 1).item() == pytest.approx(2.0)  # (2 * 1 + 4 * 0.5) / 2
    assert calls == [(5, [9, 10])]  # micro-batch 1 of process 1 of 2, 3 indices each
