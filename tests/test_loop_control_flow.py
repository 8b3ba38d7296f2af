"""The training loop's control flow (library/training_loop.py), pinned by a mutation round on stand-ins for what a
run builds: the epochs' batches and steps (resumed, accumulated, an epoch's odd last batch, max steps), the stops
between micro-batches, after a step and at an epoch's end, a batch that cannot be read, a dataset that switches the
LoRA off, ``run``'s start and end, ``_sample``, the data loader's settings and the gradients' average."""

from __future__ import annotations

import collections
import logging
import signal
import types
from argparse import Namespace

import pytest
import torch
from torch import nn

from library import training_loop
from library.errors import UserError
from library.training_loop import EpochSampler, TrainingLoop


class Stopped(Exception):
    """What the stand-in ``_stop`` raises: (step, epoch, rng_state)."""


class Group:
    """The training dataset group: records the epoch and step the loop sets."""

    def __init__(self):
        self.calls = []

    def set_current_epoch(self, epoch):
        self.calls.append(("epoch", epoch))

    def set_current_step(self, step):
        self.calls.append(("step", step))


class Loader:
    """Batches as the sampler orders them; a batch index in ``damaged`` cannot be read."""

    def __init__(self, sampler, damaged=(), multipliers=None):
        self.sampler, self.damaged, self.multipliers = sampler, damaged, multipliers or {}

    def __iter__(self):
        for position, index in self.sampler:
            if index in self.damaged:
                raise UserError(f"Caught UserError in DataLoader worker process 0.\nlibrary.errors.UserError: "
                                f"batch {index}: damaged")  # fmt: skip
            batch = {"index": index, "position": position}
            if index in self.multipliers:
                batch["network_multipliers"] = torch.tensor([self.multipliers[index]])
            yield batch


class Progress:
    def __init__(self):
        self.updates, self.postfixes, self.closed = 0, [], False

    def update(self, n):
        self.updates += n

    def set_postfix(self, **values):
        self.postfixes.append(values)

    def close(self):
        self.closed = True


class Stop:
    name, exit_code = "SIGINT", 130

    def __init__(self, at=lambda calls: False):
        self.at, self.calls = at, 0

    def requested(self, accelerator):
        self.calls += 1
        return self.at(self.calls)


def epochs_loop(monkeypatch, batches=5, accum=2, steps_per_epoch=3, num_epochs=3, max_train_steps=9,
                save_state=False, after_step=lambda epoch, step: False, after_epoch=lambda epoch, step: False):
    """A TrainingLoop whose steps are stand-ins that record what the loop asks of them; batch i's loss is i."""
    rngs = iter(range(1, 100))
    monkeypatch.setattr(training_loop, "capture_rng_states", lambda: {"rng": next(rngs)})
    loop = TrainingLoop.__new__(TrainingLoop)
    rec = types.SimpleNamespace(micro=[], backward=[], optimizer=0, after_step=[], after_epoch=[], epoch_starts=0,
                                step_starts=0, saved=[])  # fmt: skip

    def micro_step(batch, step, micro):
        rec.micro.append((batch["index"], batch["position"], step, micro))
        return torch.tensor(float(batch["index"]))

    def optimizer_step():
        rec.optimizer += 1
        return {"lr/unet": 0.1}

    def stop_run(stop, step, epoch, rng_state=None):
        raise Stopped(step, epoch, rng_state)

    def count(name):
        return lambda: setattr(rec, name, getattr(rec, name) + 1)

    saves = types.SimpleNamespace(for_stop=lambda step, epoch, rng: rec.saved.append((step, epoch, rng)) or "saved")
    values = dict(
        args=Namespace(gradient_accumulation_steps=accum, max_train_steps=max_train_steps, save_state=save_state),
        accelerator=types.SimpleNamespace(num_processes=1, backward=rec.backward.append),
        num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, process_batches=list(range(batches)),
        train_group=Group(), network=nn.Linear(1, 1), network_epoch_start=count("epoch_starts"),
        network_step_start=count("step_starts"), epoch_losses=[], recent_losses=collections.deque(maxlen=3),
        _micro_step=micro_step, _optimizer_step=optimizer_step, _stop=stop_run, saves=saves, first_step=0,
        _after_step=lambda epoch, step, logs, stop: rec.after_step.append((epoch, step, logs))
        or after_step(epoch, step),
        _after_epoch=lambda epoch, step, stop: rec.after_epoch.append((epoch, step)) or after_epoch(epoch, step),
    )  # fmt: skip
    for key, value in values.items():
        setattr(loop, key, value)
    return loop, rec


def run_epochs(loop, first_epoch=0, step=0, skip_data=True, stop=None, **loader):
    sampler = EpochSampler(list(loop.process_batches))
    progress = Progress()
    result = loop._epochs(first_epoch, step, Loader(sampler, **loader), sampler, progress, stop or Stop(), skip_data)
    return result, progress


def test_epochs_step_every_accum_micro_batches_and_at_an_epochs_odd_last_batch(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, max_train_steps=6)
    steps, progress = run_epochs(loop)
    assert steps == 6 and rec.optimizer == 6 and progress.updates == 6
    # batches 0..4 at positions 0..4, micro-batches 0, 1, 0, 1, 0: steps after batches 1, 3 and 4
    assert rec.micro[:5] == [(0, 0, 0, 0), (1, 1, 0, 1), (2, 2, 1, 0), (3, 3, 1, 1), (4, 4, 2, 0)]
    assert rec.micro[5:] == [(0, 0, 3, 0), (1, 1, 3, 1), (2, 2, 4, 0), (3, 3, 4, 1), (4, 4, 5, 0)]
    assert [loss.item() for loss in rec.backward[:5]] == [0.0, 0.5, 1.0, 1.5, 2.0]  # each micro loss / accum
    assert loop.train_group.calls == [("epoch", 1), ("step", 0), ("epoch", 2), ("step", 3)]  # max steps: no 3rd
    assert rec.epoch_starts == 2 and rec.step_starts == 10 and rec.after_epoch == [(0, 3), (1, 6)]
    # each step's loss is its micro-batches' mean; the average is over the last epoch's worth (3) of steps
    assert [(e, s, logs["loss/current"], logs["loss/average"]) for e, s, logs in rec.after_step] == [
        (0, 1, 0.5, 0.5), (0, 2, 2.5, 1.5), (0, 3, 4.0, 7 / 3), (1, 4, 0.5, 7 / 3), (1, 5, 2.5, 7 / 3),
        (1, 6, 4.0, 7 / 3)]  # fmt: skip
    assert all(logs["lr/unet"] == 0.1 for _, _, logs in rec.after_step)
    assert loop.epoch_losses == [0.5, 2.5, 4.0] and list(loop.recent_losses) == [0.5, 2.5, 4.0]
    assert progress.postfixes[1] == {"loss": "2.5000", "avr_loss": "1.5000"}


def test_without_accumulation_every_batch_is_a_step(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, batches=3, accum=1, num_epochs=1, max_train_steps=3)
    assert run_epochs(loop)[0] == 3
    assert [m[2:] for m in rec.micro] == [(0, 0), (1, 0), (2, 0)]
    assert [logs["loss/current"] for _, _, logs in rec.after_step] == [0.0, 1.0, 2.0]


def test_a_resumed_run_skips_the_batches_of_its_steps_in_its_first_epoch_only(monkeypatch):
    loop, rec = epochs_loop(monkeypatch)
    steps, progress = run_epochs(loop, first_epoch=1, step=4)
    # step 4 is one step into epoch 1 (3 steps an epoch): its first 2 batches (one step of 2) are skipped
    assert steps == 9 and progress.updates == 5
    assert rec.micro[:3] == [(2, 2, 4, 0), (3, 3, 4, 1), (4, 4, 5, 0)]
    assert [m[:2] for m in rec.micro[3:]] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert loop.train_group.calls == [("epoch", 2), ("step", 3), ("epoch", 3), ("step", 6)]
    assert rec.after_epoch == [(1, 6), (2, 9)]


def test_a_run_started_at_a_step_without_its_data_reads_its_first_epoch_whole(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, num_epochs=2)
    assert run_epochs(loop, first_epoch=1, step=4, skip_data=False)[0] == 7
    assert [m[:3] for m in rec.micro[:3]] == [(0, 0, 4), (1, 1, 4), (2, 2, 5)]
    assert loop.train_group.calls == [("epoch", 2), ("step", 4)]


def test_max_train_steps_ends_the_run_inside_an_epoch_and_before_any(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, max_train_steps=2)
    assert run_epochs(loop)[0] == 2
    assert [m[0] for m in rec.micro] == [0, 1, 2, 3] and rec.after_epoch == [(0, 2)]
    loop, rec = epochs_loop(monkeypatch, max_train_steps=2)
    assert run_epochs(loop, first_epoch=0, step=2)[0] == 2  # resumed at its last step: nothing to train
    assert rec.micro == [] and loop.train_group.calls == [] and rec.after_epoch == []


@pytest.mark.parametrize("save_state, accum, rng", [(True, 2, {"rng": 2}), (False, 2, None)])
def test_a_stop_between_micro_batches_keeps_the_last_step_and_its_windows_rng(monkeypatch, save_state, accum, rng):
    loop, rec = epochs_loop(monkeypatch, save_state=save_state, accum=accum)
    with pytest.raises(Stopped) as ei:
        run_epochs(loop, stop=Stop(at=lambda calls: calls == 2))  # asked during step 2's window
    assert ei.value.args == (1, 0, rng) and [m[0] for m in rec.micro] == [0, 1, 2]
    assert rec.optimizer == 1


def test_a_stop_is_not_checked_between_steps_or_before_an_epochs_odd_last_batch(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, batches=3, accum=1, num_epochs=1, max_train_steps=3, save_state=True)
    stop = Stop(at=lambda calls: True)
    assert run_epochs(loop, stop=stop)[0] == 3 and stop.calls == 0
    loop, rec = epochs_loop(monkeypatch, batches=3, num_epochs=1, max_train_steps=2)
    stop = Stop(at=lambda calls: calls > 1)  # only the first check (batch 0) lets the run go on
    assert run_epochs(loop, stop=stop)[0] == 2 and stop.calls == 1


def test_a_stop_after_a_step_inside_an_epoch_skips_its_end(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, after_step=lambda epoch, step: step == 2)
    with pytest.raises(Stopped) as ei:
        run_epochs(loop)
    assert ei.value.args == (2, 0, None) and rec.after_epoch == [] and [m[0] for m in rec.micro] == [0, 1, 2, 3]


def test_a_stop_at_an_epochs_last_step_runs_its_end_then_stops(monkeypatch):
    # (a stop asked for during a step is still asked for at the epoch's end)
    loop, rec = epochs_loop(monkeypatch, after_step=lambda epoch, step: step == 3, after_epoch=lambda e, s: True)
    with pytest.raises(Stopped) as ei:
        run_epochs(loop)
    assert ei.value.args == (3, 0, None) and rec.after_epoch == [(0, 3)] and rec.optimizer == 3


def test_a_stop_at_an_epochs_end_stops_before_the_next_and_at_the_last_step_finishes(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, after_epoch=lambda epoch, step: True)
    with pytest.raises(Stopped) as ei:
        run_epochs(loop)
    assert ei.value.args == (3, 0, None) and loop.train_group.calls == [("epoch", 1), ("step", 0)]
    loop, rec = epochs_loop(monkeypatch, max_train_steps=3, after_step=lambda epoch, step: step == 3,
                            after_epoch=lambda epoch, step: True)  # fmt: skip
    assert run_epochs(loop)[0] == 3 and rec.after_epoch == [(0, 3)]  # the last step: the run ends as finished
    loop, rec = epochs_loop(monkeypatch, max_train_steps=2, after_step=lambda epoch, step: step == 2)
    assert run_epochs(loop)[0] == 2 and rec.after_epoch == [(0, 2)]  # max steps inside the epoch, stop asked too


@pytest.mark.parametrize("damaged, saved_rng", [(3, {"rng": 2}), (2, None)])
def test_a_batch_that_cannot_be_read_saves_the_steps_before_it_and_names_it(monkeypatch, damaged, saved_rng):
    loop, rec = epochs_loop(monkeypatch, save_state=True)
    with pytest.raises(UserError) as ei:
        run_epochs(loop, damaged={damaged})
    assert str(ei.value) == f"batch {damaged}: damaged Before stopping, saved."
    assert rec.saved == [(1, 0, saved_rng)]  # the rng of the window's start only while a window is open


def test_a_batch_that_switches_the_lora_off_still_gives_zero_gradients(monkeypatch):
    loop, rec = epochs_loop(monkeypatch, batches=2, accum=1, num_epochs=1, max_train_steps=2)
    events, losses = [], []
    loop.network = nn.Linear(2, 1)
    loop.network.weight.requires_grad_(False)
    loop.network.set_multiplier = events.append
    loop.accelerator.backward = lambda loss: events.append("backward") or loss.backward()

    def micro_step(batch, step, micro):
        events.append(f"micro {batch['index']}")
        losses.append(torch.tensor(1.0, requires_grad=True))
        return losses[-1]

    loop._micro_step = micro_step
    assert run_epochs(loop, multipliers={1: 0.0})[0] == 2
    assert events == ["micro 0", "backward", 0.0, "micro 1", "backward", 1.0]
    assert [loss.grad.item() for loss in losses] == [1.0, 1.0]  # the batch's own loss is backpropagated too
    loop, rec = epochs_loop(monkeypatch, batches=1, accum=1, num_epochs=1, max_train_steps=1)
    loop.network, loop._micro_step = nn.Linear(2, 1), micro_step
    loop.network.weight.requires_grad_(False)
    loop.accelerator.backward = lambda loss: loss.backward()
    assert run_epochs(loop, multipliers={0: 0.0})[0] == 1
    torch.testing.assert_close(loop.network.bias.grad, torch.zeros(1))  # the LoRA's parameters, at zero
    assert loop.network.weight.grad is None


# ---- run, _sample and the data loader ----------------------------------------------------------------------------


class FakeStop:
    signum, name = None, "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run_loop(monkeypatch, first_step, due=True, epochs=lambda *a: 7, signum=None, is_main=True):
    bars, calls = [], []
    monkeypatch.setattr(training_loop, "tqdm", lambda **kwargs: bars.append(kwargs) or Progress())
    monkeypatch.setattr(training_loop, "GracefulStop", type("Stop", (FakeStop,), {"signum": signum}))
    loop = TrainingLoop.__new__(TrainingLoop)
    values = dict(
        args=Namespace(max_train_steps=12), steps_per_epoch=4, num_epochs=3,
        accelerator=types.SimpleNamespace(is_local_main_process=is_main, num_processes=1),
        _data_loader=lambda: ("loader", "sampler"), _set_train_mode=lambda: calls.append("train mode"),
        _sample=lambda epoch, step: calls.append(("sample", epoch, step)),
        triggers=types.SimpleNamespace(due=lambda epoch, step: calls.append(("due", epoch, step)) or due),
        _epochs=lambda *a: calls.append(("epochs", a[0], a[1], a[2], a[3], a[6])) or epochs(*a),
        saves=types.SimpleNamespace(final=lambda step: f"final at {step}"),
    )  # fmt: skip
    for key, value in values.items():
        setattr(loop, key, value)
    return loop, bars, calls


@pytest.mark.parametrize("first_step, first_epoch, sampled_epoch", [(0, 0, 0), (5, 1, None), (4, 1, None)])
def test_run_starts_at_its_epoch_samples_first_and_ends_with_the_final_save(monkeypatch, first_step, first_epoch,
                                                                           sampled_epoch):
    loop, bars, calls = run_loop(monkeypatch, first_step)
    assert loop.run(first_step, skip_data=False) == "final at 7"
    assert loop.first_step == first_step
    assert calls == ["train mode", ("due", 0, 0), ("sample", sampled_epoch, first_step),
                     ("epochs", first_epoch, first_step, "loader", "sampler", False)]  # fmt: skip
    assert bars == [dict(total=12, initial=first_step, desc="steps", smoothing=0, disable=False)]


def test_run_without_samples_due_closes_its_bar_on_an_error_and_tells_of_a_late_signal(monkeypatch, caplog):
    loop, bars, calls = run_loop(monkeypatch, 0, due=False, is_main=False)
    with caplog.at_level(logging.WARNING, logger="library.training_loop"):
        assert loop.run(0) == "final at 7" and ("sample", 0, 0) not in calls and calls[-1][-1] is True
    assert "received" not in caplog.text  # no signal: no word of one
    assert bars[0]["disable"] is True

    def failing(first_epoch, step, loader, sampler, progress, stop, skip):
        progresses.append(progress)
        raise Stopped()

    progresses = []
    loop, bars, calls = run_loop(monkeypatch, 0, epochs=failing)
    with pytest.raises(Stopped):
        loop.run(0)
    assert progresses[0].closed
    loop, bars, calls = run_loop(monkeypatch, 0, signum=signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="library.training_loop"):
        assert loop.run(0) == "final at 7"
    assert "SIGTERM received at the end of the run" in caplog.text


def sample_loop(is_main, fail=False):
    events = []

    def sample_images(ctx, epoch, step):
        events.append(("sample", ctx, epoch, step))
        if fail:
            raise RuntimeError("sampling failed")

    loop = TrainingLoop.__new__(TrainingLoop)
    values = dict(
        accelerator=types.SimpleNamespace(is_main_process=is_main, wait_for_everyone=lambda: events.append("wait")),
        ctx="ctx", trainer=types.SimpleNamespace(sample_images=sample_images), unchecked_state=None,
        optimizer_eval=lambda: events.append("opt eval"), optimizer_train=lambda: events.append("opt train"),
        network=types.SimpleNamespace(eval=lambda: events.append("eval"), train=lambda: events.append("train")),
    )  # fmt: skip
    for key, value in values.items():
        setattr(loop, key, value)
    return loop, events


def test_sampling_runs_in_eval_mode_on_the_main_process_and_every_process_waits():
    loop, events = sample_loop(True)
    loop._sample(epoch=2, step=6)
    assert events == ["opt eval", "eval", ("sample", "ctx", 2, 6), "opt train", "train", "wait"]
    loop, events = sample_loop(False)
    loop._sample(epoch=None, step=6)
    assert events == ["wait"]
    loop, events = sample_loop(True, fail=True)
    with pytest.raises(RuntimeError):
        loop._sample(epoch=None, step=1)
    assert events == ["opt eval", "eval", ("sample", "ctx", None, 1), "opt train", "train"]


class LoaderGroup:
    def __init__(self):
        self.calls = []

    def set_accumulation(self, steps):
        self.calls.append(("accumulation", steps))

    def use_shared_counters(self, epoch_value, step_value):
        self.calls.append(("shared", epoch_value.value, step_value.value))


@pytest.mark.parametrize("workers, cpus, persistent, device, expected", [
    (8, 3, True, "cuda", dict(num_workers=3, persistent_workers=True, pin_memory=True)),
    (2, 3, False, "cpu", dict(num_workers=2, persistent_workers=False, pin_memory=False)),
    (None, 3, True, "cpu", dict(num_workers=0, persistent_workers=False, pin_memory=False)),
    (2, None, True, "cpu", dict(num_workers=1, persistent_workers=True, pin_memory=False)),
])  # fmt: skip
def test_the_data_loader_settings(monkeypatch, workers, cpus, persistent, device, expected):
    from library.datasets import collate_first

    made = []
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda dataset, **kwargs: made.append((dataset, kwargs)))
    monkeypatch.setattr(training_loop.os, "cpu_count", lambda: cpus)
    loop = TrainingLoop.__new__(TrainingLoop)
    group = LoaderGroup()
    loop.args = Namespace(gradient_accumulation_steps=4, max_data_loader_n_workers=workers,
                          persistent_data_loader_workers=persistent)  # fmt: skip
    loop.train_group, loop.process_batches, loop.ctx = group, [3, 1, 2], types.SimpleNamespace(seed=1234)
    loop.accelerator = types.SimpleNamespace(device=types.SimpleNamespace(type=device))
    _, sampler = loop._data_loader()
    (dataset, kwargs), = made
    assert dataset is group and kwargs["sampler"] is sampler and list(sampler) == [(0, 3), (1, 1), (2, 2)]
    assert kwargs["batch_size"] == 1 and kwargs["collate_fn"] is collate_first
    assert {key: kwargs[key] for key in expected} == expected
    assert kwargs["generator"].initial_seed() == 1234
    threaded = expected["num_workers"] > 0
    assert kwargs["worker_init_fn"] is (training_loop._leave_stop_signals_to_the_trainer if threaded else None)
    assert group.calls == [("accumulation", 4)] + ([("shared", 1, 0)] if threaded else [])


def test_data_loader_workers_ignore_the_stop_signals():
    previous = {signum: signal.getsignal(signum) for signum in training_loop.HANDLED}
    try:
        training_loop._leave_stop_signals_to_the_trainer(0)
        assert all(signal.getsignal(signum) == signal.SIG_IGN for signum in training_loop.HANDLED)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_gradient_another_process_has_counts_as_zero_here(monkeypatch):
    """One process's view of a two-process average: the other's flags and buffer are added by the reduce."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))  # no zeros by chance
    a, b, c = (nn.Parameter(torch.zeros(n)) for n in (2, 3, 1))
    a.grad = torch.full((2,), 2.0)
    others = iter([torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 4.0, 4.0, 4.0])])
    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor.clone())
        tensor.add_(next(others))

    training_loop.average_gradients([a, b, c], all_reduce, 2, "cpu")
    torch.testing.assert_close(reduced[1], torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(a.grad, torch.full((2,), 1.0))
    torch.testing.assert_close(b.grad, torch.full((3,), 2.0))
    assert c.grad is None and len(reduced) == 2
