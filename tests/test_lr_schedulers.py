"""LR scheduler factory (library.lr_schedulers): each schedule's values at given steps."""

import argparse
import math

import pytest
import torch

from library.errors import UserError
from library.lr_schedulers import ScheduleFreeDummyScheduler, get_scheduler_fix, resolve_step_count
from library.optimizers import get_optimizer
from library.train_args import int_or_float


def make_args(**kw) -> argparse.Namespace:
    base = dict(
        lr_scheduler="constant", lr_scheduler_type="", lr_scheduler_args=None, lr_warmup_steps=0, lr_decay_steps=0,
        lr_scheduler_num_cycles=1, lr_scheduler_power=1.0, lr_scheduler_timescale=None, lr_scheduler_min_lr_ratio=None,
        max_train_steps=10, optimizer_type="AdamW",
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    # lr 1.0, so the scheduled lr equals the schedule's multiplier
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def lrs(scheduler, n: int, ticks_per_step: int = 1) -> list[float]:
    """The lr in effect at optimizer steps 0..n-1 (the scheduler ticks after each step)."""
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        for _ in range(ticks_per_step):
            scheduler.optimizer.step()
            scheduler.step()
    return out


def schedule(n=12, num_processes=1, **kw) -> list[float]:
    return lrs(get_scheduler_fix(make_args(**kw), sgd(), num_processes), n, num_processes)


def test_constant():
    assert schedule(lr_scheduler="constant") == [1.0] * 12


def test_constant_refuses_warmup():
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        get_scheduler_fix(make_args(lr_scheduler="constant", lr_warmup_steps=2), sgd())


def test_constant_with_warmup():
    assert schedule(6, lr_scheduler="constant_with_warmup", lr_warmup_steps=4) == [0, 0.25, 0.5, 0.75, 1, 1]


def test_linear_with_warmup():
    expected = [0, 0.5] + [(10 - k) / 8 for k in range(2, 11)] + [0.0]
    assert schedule(lr_scheduler="linear", lr_warmup_steps=2) == pytest.approx(expected)


def test_cosine():
    expected = [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    assert schedule(11, lr_scheduler="cosine") == pytest.approx(expected, abs=1e-9)


def test_cosine_with_restarts_restarts_after_each_cycle():
    expected = [0.5 * (1 + math.cos(math.pi * ((2 * k / 10) % 1))) for k in range(10)]
    got = schedule(10, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[5] == pytest.approx(1.0)


def test_polynomial_uses_power():
    end = 1e-7
    expected = [(1 - end) * (1 - k / 10) ** 2 + end for k in range(11)]
    assert schedule(11, lr_scheduler="polynomial", lr_scheduler_power=2.0) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr"])
def test_a_warmup_as_long_as_the_run_warms_up_and_steps_past_the_end(name):
    # the trainer steps the schedule after the last step too: polynomial divided by its 0 decay steps there
    args = make_args(lr_scheduler=name, lr_warmup_steps=1.0, max_train_steps=4, lr_scheduler_min_lr_ratio=0.1)
    scheduler = get_scheduler_fix(args, sgd())
    assert lrs(scheduler, 4) == pytest.approx([0, 0.25, 0.5, 0.75])
    scheduler.step()  # (after the fourth, last step; the lr it gives is never used)


def test_cosine_with_min_lr_ends_at_the_ratio():
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    got = schedule(11, lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1)
    assert got == pytest.approx(expected, abs=1e-9)
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        get_scheduler_fix(make_args(lr_scheduler="cosine_with_min_lr"), sgd())


def test_warmup_stable_decay():
    got = schedule(12, lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=4,
                   lr_scheduler_min_lr_ratio=0.2)  # fmt: skip
    decay = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(4)]
    expected = [0.2, 0.6] + [1.0] * 4 + decay + [0.2, 0.2]  # warmup starts at min ratio, stable = 10-2-4
    assert got == pytest.approx(expected, abs=1e-9)


def test_warmup_stable_decay_that_does_not_fit_is_refused():
    with pytest.raises(UserError, match="--lr_decay_steps"):
        get_scheduler_fix(make_args(lr_scheduler="warmup_stable_decay", lr_warmup_steps=6, lr_decay_steps=6), sgd())


def test_inverse_sqrt():
    got = schedule(17, lr_scheduler="inverse_sqrt", lr_warmup_steps=4)  # timescale defaults to the warmup
    assert got[:4] == [0, 0.25, 0.5, 0.75] and got[4] == 1.0 and got[16] == pytest.approx(0.5)
    got = schedule(13, lr_scheduler="inverse_sqrt", lr_warmup_steps=4, lr_scheduler_timescale=8)
    assert got[12] == pytest.approx(1 / math.sqrt((12 + 4) / 8))


def test_piecewise_constant_uses_step_rules():
    got = schedule(6, lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules='1:2,0.5:4,0.1'"])
    assert got == [1, 1, 0.5, 0.5, 0.1, 0.1]
    with pytest.raises(UserError, match="step_rules"):
        get_scheduler_fix(make_args(lr_scheduler="piecewise_constant"), sgd())


def test_adafactor_scheduler_reports_the_initial_lr_and_needs_adafactor():
    args = argparse.Namespace(**vars(make_args()), learning_rate=1e-3, optimizer_args=None, use_8bit_adam=False,
                              use_lion_optimizer=False, fused_backward_pass=False, max_grad_norm=0.0)  # fmt: skip
    args.optimizer_type = "Adafactor"
    _, _, optimizer = get_optimizer(args, [torch.nn.Parameter(torch.ones(4, 4))])
    assert args.lr_scheduler == "adafactor:0.001"
    scheduler = get_scheduler_fix(args, optimizer)
    assert scheduler.get_last_lr() == [0.001]
    with pytest.raises(UserError, match="Adafactor"):
        get_scheduler_fix(make_args(lr_scheduler="adafactor"), sgd())


def test_lr_scheduler_type_builds_a_torch_scheduler_with_its_args():
    got = schedule(5, lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"])
    assert got == [1, 1, 0.5, 0.5, 0.25]
    got = schedule(3, lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR", lr_scheduler_args=["gamma=0.5"])
    assert got == [1, 0.5, 0.25]
    with pytest.raises(UserError, match="--lr_scheduler_type"):
        get_scheduler_fix(make_args(lr_scheduler_type="NoSuchLR"), sgd())
    with pytest.raises(UserError, match=r"^--lr_scheduler_args \{'step_size': 2, 'gama': 0\.5\} do not fit "
                                        r"--lr_scheduler_type StepLR: "):  # a misspelt key: a TypeError before
        get_scheduler_fix(make_args(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gama=0.5"]), sgd())
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        get_scheduler_fix(make_args(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"],
                                    lr_warmup_steps=3), sgd())  # fmt: skip


def test_schedule_free_optimizers_get_a_reporting_dummy():
    args = make_args(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine")
    import schedulefree

    optimizer = schedulefree.AdamWScheduleFree([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    scheduler = get_scheduler_fix(args, optimizer)
    assert isinstance(scheduler, ScheduleFreeDummyScheduler)
    scheduler.step()
    assert scheduler.get_last_lr() == [0.01] and scheduler.state_dict() == {}


@pytest.mark.parametrize("warmup", [2, 0.2, "20%", "2"])
def test_warmup_as_steps_ratio_or_percent(warmup):
    assert schedule(4, lr_scheduler="constant_with_warmup", lr_warmup_steps=warmup) == [0, 0.5, 1, 1]


@pytest.mark.parametrize("warmup", [2, 0.2, "2", "20%"])  # "2" as text (a value that bypassed argparse): steps too
def test_step_counts_mean_optimizer_steps_on_any_number_of_processes(warmup):
    # accelerate ticks a prepared scheduler once per process per optimizer step
    one = schedule(11, lr_scheduler="linear", lr_warmup_steps=warmup)
    two = schedule(11, num_processes=2, lr_scheduler="linear", lr_warmup_steps=warmup)
    assert two == pytest.approx(one)
    assert one[2] == 1.0


def test_int_or_float_parses_steps_ratios_and_percentages():
    assert int_or_float("100") == 100 and isinstance(int_or_float("100"), int)
    assert int_or_float("0.1") == 0.1 and int_or_float("10%") == pytest.approx(0.1)
    assert int_or_float("1") == 1 and int_or_float("2.0") == 2
    for bad in ("1.5", "abc", "%", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_or_float(bad)


def test_resolve_step_count():
    assert resolve_step_count(0.25, 40, "--x") == 10
    assert resolve_step_count("50%", 40, "--x") == 20
    assert resolve_step_count(7, 40, "--x") == 7 and resolve_step_count(None, 40, "--x") == 0
    for bad in (-1, 1.5, "lots", [3]):
        with pytest.raises(UserError, match="--x"):
            resolve_step_count(bad, 40, "--x")


@pytest.mark.parametrize("name, why", [("no_such_schedule", "is not one of"), ("reduce_lr_on_plateau", "metric")])
def test_unknown_or_metric_driven_schedulers_are_refused(name, why):
    with pytest.raises(UserError, match=f"--lr_scheduler '?{name}'?.*{why}"):
        get_scheduler_fix(make_args(lr_scheduler=name), sgd())


@pytest.mark.parametrize("name", ["cosine", "constant_with_warmup", "inverse_sqrt"])
def test_warmup_longer_than_the_run_is_refused(name):
    # constant_with_warmup and inverse_sqrt need no run length, but a warmup past the end never reaches the lr
    with pytest.raises(UserError, match=r"--lr_warmup_steps 20 is longer than the whole run \(10 steps\)"):
        get_scheduler_fix(make_args(lr_scheduler=name, lr_warmup_steps=20), sgd())
    assert schedule(3, lr_scheduler=name, lr_warmup_steps=10)[1] == pytest.approx(0.1)  # a warmup as long: fine


def _adafactor_args(**kw) -> argparse.Namespace:
    args = argparse.Namespace(**vars(make_args()), learning_rate=1e-3, optimizer_args=None, use_8bit_adam=False,
                              use_lion_optimizer=False, fused_backward_pass=False, max_grad_norm=0.0)  # fmt: skip
    args.optimizer_type = "Adafactor"
    vars(args).update(kw)
    return args


def test_adafactor_schedule_without_relative_step_keeps_the_learning_rates():
    # a bare "adafactor" schedule would set every lr to 0, which Adafactor without relative_step uses as given
    args = _adafactor_args(optimizer_args=["relative_step=False", "scale_parameter=False", "warmup_init=False"],
                           lr_scheduler="adafactor")  # fmt: skip
    weight = torch.nn.Parameter(torch.ones(4, 4))
    _, _, optimizer = get_optimizer(args, [{"params": [weight], "lr": 1e-3}])
    scheduler = get_scheduler_fix(args, optimizer)
    assert scheduler.get_last_lr() == [1e-3]
    weight.grad = torch.ones(4, 4)
    optimizer.step()
    scheduler.step()
    assert not torch.equal(weight, torch.ones(4, 4)) and scheduler.get_last_lr() == [1e-3]


def test_adafactor_with_relative_step_refuses_a_custom_scheduler():
    args = _adafactor_args(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=10"])
    _, _, optimizer = get_optimizer(args, [torch.nn.Parameter(torch.ones(4, 4))])
    with pytest.raises(UserError, match="--lr_scheduler_type CosineAnnealingLR cannot drive Adafactor with "
                                        "relative_step.*relative_step=False"):  # fmt: skip
        get_scheduler_fix(args, optimizer)


def test_schedule_free_optimizers_warn_about_the_schedule_they_do_not_use(caplog):
    import schedulefree

    optimizer = schedulefree.AdamWScheduleFree([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    with caplog.at_level("WARNING"):
        get_scheduler_fix(make_args(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine", lr_warmup_steps=5),
                          optimizer)  # fmt: skip
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("--lr_scheduler cosine, --lr_warmup_steps 5: a schedule-free optimizer schedules itself")
    caplog.clear()
    with caplog.at_level("WARNING"):
        get_scheduler_fix(make_args(optimizer_type="AdamWScheduleFree"), optimizer)
    assert not caplog.records


def test_transformers_own_schedule_checks_are_messages():
    # polynomial decays to lr_end = 1e-7: a learning rate below it is transformers' ValueError
    with pytest.raises(UserError, match=r"--lr_scheduler polynomial: .*lr_end"):
        get_scheduler_fix(make_args(lr_scheduler="polynomial"), sgd(lr=1e-8))


def test_ratios_round_down_and_a_whole_run_ratio_is_all_steps():
    """sd-scripts takes int(ratio × total): floored, and 1.0 (or "100%") is the whole run, not an error."""
    assert resolve_step_count(0.15, 10, "--x") == 1 and resolve_step_count(0.19, 10, "--x") == 1
    assert resolve_step_count(1.0, 10, "--x") == 10 and resolve_step_count("100%", 10, "--x") == 10
    assert schedule(5, lr_scheduler="constant_with_warmup", max_train_steps=4, lr_warmup_steps="100%") == [
        0, 0.25, 0.5, 0.75, 1]  # fmt: skip


def test_warmup_stable_decay_counts_optimizer_steps_on_any_number_of_processes():
    """Integer decay steps, like warmup steps, are optimizer steps whatever the process count."""
    kw = dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=4, lr_scheduler_min_lr_ratio=0.2)
    one, two = schedule(12, **kw), schedule(12, num_processes=2, **kw)
    decay = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(4)]
    assert two == pytest.approx(one) and two == pytest.approx([0.2, 0.6] + [1.0] * 4 + decay + [0.2, 0.2], abs=1e-9)


def test_inverse_sqrt_timescale_counts_optimizer_steps_on_any_number_of_processes():
    """--lr_scheduler_timescale is optimizer steps, so 2 processes give the same lrs as 1."""
    kw = dict(lr_scheduler="inverse_sqrt", lr_warmup_steps=4, lr_scheduler_timescale=8)
    one, two = schedule(13, **kw), schedule(13, num_processes=2, **kw)
    assert two == pytest.approx(one) and two[12] == pytest.approx(1 / math.sqrt((12 + 4) / 8))


@pytest.mark.parametrize("floor", ["min_lr_rate=0.2", "min_lr=0.001"])
def test_a_floor_given_twice_is_refused_naming_both(floor):
    args = make_args(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1, lr_scheduler_args=[floor])
    with pytest.raises(UserError, match=f"--lr_scheduler_min_lr_ratio 0.1 and --lr_scheduler_args {floor} both set "
                                        "the floor of --lr_scheduler cosine_with_min_lr: give one of them"):
        get_scheduler_fix(args, sgd())
    # either alone is the floor (the optimizer's lr is 1)
    assert schedule(11, lr_scheduler="cosine_with_min_lr", lr_scheduler_args=["min_lr_rate=0.2"])[-1] == (
        pytest.approx(0.2))
    assert schedule(11, lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1)[-1] == pytest.approx(0.1)
