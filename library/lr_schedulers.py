"""Learning-rate scheduler factory with sd-scripts' names and options (spec §b.2).

The schedules themselves are transformers' (``transformers.optimization``) and, for
``piecewise_constant``, diffusers'; this module maps the command line onto them:

- ``--lr_warmup_steps`` / ``--lr_decay_steps``: an int is a number of optimizer steps, a
  float below 1 a ratio of ``--max_train_steps``, and ``"N%"`` a percentage.
- ``cosine_with_min_lr`` gets ``num_cycles/2`` and ``warmup_stable_decay`` gets
  ``num_cycles/2`` and stable = total − warmup − decay, as sd-scripts passes them.
- ``--lr_scheduler_type`` names any ``torch.optim.lr_scheduler`` class or dotted class path,
  built with ``--lr_scheduler_args``.
- schedule-free optimizers get a scheduler that only reports their lr.

One deliberate difference. accelerate steps a prepared scheduler once per process for each
optimizer step, which is why sd-scripts sizes the schedule as ``max_train_steps ×
num_processes``. sd-scripts leaves an integer ``--lr_warmup_steps`` unscaled, so on 2 GPUs a
100-step warmup ends after 50 steps; here integer step counts (warmup, decay, timescale) are
scaled by ``num_processes`` too, so they mean optimizer steps on any number of processes.
Ratios and percentages already behave that way in both. ``--lr_scheduler_args`` (such as
piecewise_constant's ``step_rules``) are passed through unscaled.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from library.errors import UserError
from library.optimizers import is_schedulefree_optimizer, parse_kv_literals
from library.train_args import LR_SCHEDULERS, int_or_float

logger = logging.getLogger(__name__)


class ScheduleFreeDummyScheduler:
    """Stands in for a scheduler with schedule-free optimizers: ``step`` does nothing and
    ``get_last_lr`` reports the optimizer's own lrs (for logging)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def resolve_step_count(value: int | float | str | None, total_steps: int, flag: str, step_ticks: int = 1) -> int:
    """Steps for ``--lr_warmup_steps``-style values: an int (or its text) times ``step_ticks``, a float ≤ 1 or
    ``"N%"`` as a fraction of ``total_steps`` (rounded down). A prepared scheduler ticks once per process and
    optimizer step, so the trainer passes the process count as ``step_ticks`` and counts ``total_steps`` in ticks."""
    if value is None:
        return 0
    bad = f"{flag} {value!r} is not a step count, a ratio below 1 or a percentage like 10%."
    if isinstance(value, str):
        try:
            value = int_or_float(value)
        except Exception:
            raise UserError(bad) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(bad)
    if isinstance(value, float):
        if not 0 <= value <= 1:
            raise UserError(f"{flag} {value}: a ratio must be between 0 and 1 (or give a whole number of steps).")
        return int(value * total_steps)
    if value < 0:
        raise UserError(f"{flag} must not be negative (got {value}).")
    return value * step_ticks


def custom_scheduler_class(type_name: str) -> type:
    """The class ``--lr_scheduler_type`` names: a ``torch.optim.lr_scheduler`` name or a dotted class path."""
    if "." not in type_name:
        module, cls_name = torch.optim.lr_scheduler, type_name
    else:
        module_name, _, cls_name = type_name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--lr_scheduler_type {type_name}: cannot import {module_name!r} ({e}).") from None
    if not hasattr(module, cls_name):
        raise UserError(
            f"--lr_scheduler_type {type_name}: no class {cls_name!r} in {module.__name__}. Give a "
            "torch.optim.lr_scheduler class name (e.g. CosineAnnealingLR) or a full class path."
        )
    return getattr(module, cls_name)


def _custom_scheduler(args, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> Any:
    type_name: str = args.lr_scheduler_type
    scheduler_class = custom_scheduler_class(type_name)
    logger.info("use %s | %s as lr_scheduler", type_name, kwargs)
    try:
        return scheduler_class(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler_args {kwargs} do not fit --lr_scheduler_type {type_name}: {e}") from None


def get_scheduler_fix(args, optimizer: torch.optim.Optimizer, num_processes: int = 1, build_custom: bool = True) -> Any:
    """Build the lr scheduler named by ``args.lr_scheduler`` (or ``args.lr_scheduler_type``).

    ``num_processes`` is the number of training processes: a prepared scheduler is stepped
    that many times per optimizer step, so every step count is multiplied by it. With
    ``build_custom=False`` an ``--lr_scheduler_type`` class is found and checked but not built
    (returns None): its arguments may be per parameter group, which only the real optimizer has.
    """
    if is_schedulefree_optimizer(optimizer, args):
        unused = (("lr_scheduler", ("constant", None)), ("lr_scheduler_type", (None, "")),
                  ("lr_warmup_steps", (0, None)))  # fmt: skip
        asked = [f"--{flag} {getattr(args, flag)}" for flag, unset in unused if getattr(args, flag, None) not in unset]
        if asked:
            logger.warning("%s: a schedule-free optimizer schedules itself, so these are not used (its warmup is "
                           "--optimizer_args warmup_steps=N)", ", ".join(asked))  # fmt: skip
        return ScheduleFreeDummyScheduler(optimizer)
    name: str = getattr(args, "lr_scheduler", None) or "constant"
    try:
        return _build_scheduler(args, optimizer, num_processes, name, build_custom)
    except ValueError as e:  # transformers' own checks (polynomial's lr_end above the lr, ...)
        raise UserError(f"--lr_scheduler {name}: {e}") from None
    except TypeError as e:  # an --lr_scheduler_args key the schedule does not take
        if not getattr(args, "lr_scheduler_args", None):
            raise
        raise UserError(f"--lr_scheduler {name} with --lr_scheduler_args {args.lr_scheduler_args}: {e}") from None


def _build_scheduler(args, optimizer: torch.optim.Optimizer, num_processes: int, name: str, build_custom: bool) -> Any:
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    max_train_steps = getattr(args, "max_train_steps", None) or 0
    total = max_train_steps * num_processes
    warmup_value = getattr(args, "lr_warmup_steps", 0)
    decay_value = getattr(args, "lr_decay_steps", 0)
    # whole numbers are optimizer steps, scaled to scheduler ticks; ratios are of `total`, in ticks already
    warmup = resolve_step_count(warmup_value, total, "--lr_warmup_steps", num_processes)
    decay = resolve_step_count(decay_value, total, "--lr_decay_steps", num_processes)
    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    power = getattr(args, "lr_scheduler_power", 1.0)
    timescale = getattr(args, "lr_scheduler_timescale", None)
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    kwargs = parse_kv_literals(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")

    def no_warmup(what: str) -> None:
        if warmup:
            raise UserError(
                f"{what} does not use --lr_warmup_steps (got {warmup_value}): set it to 0, or use "
                "--lr_scheduler constant_with_warmup for a constant lr after a warmup."
            )

    if getattr(args, "lr_scheduler_type", None):
        if name.startswith("adafactor"):  # set so by Adafactor's relative_step (or asked for)
            raise UserError(
                f"--lr_scheduler_type {args.lr_scheduler_type} cannot drive Adafactor with relative_step, which "
                "computes its own step size: add relative_step=False scale_parameter=False warmup_init=False to "
                "--optimizer_args, or drop --lr_scheduler_type."
            )
        no_warmup(f"--lr_scheduler_type {args.lr_scheduler_type}")
        if not build_custom:
            custom_scheduler_class(args.lr_scheduler_type)
            return None
        return _custom_scheduler(args, optimizer, kwargs)

    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise UserError("--lr_scheduler adafactor works only with --optimizer_type Adafactor.")
        no_warmup("--lr_scheduler adafactor")
        _, _, initial = name.partition(":")
        try:
            initial_lr = float(initial) if initial and initial != "None" else None
        except ValueError:
            raise UserError(f"--lr_scheduler {name}: expected adafactor or adafactor:<initial lr>.") from None
        if initial_lr is None and not optimizer.defaults.get("relative_step"):
            # the schedule would set every group's lr to 0, which Adafactor then uses as given: train at the
            # learning rates the groups have instead (sd-scripts stops here with a traceback)
            logger.info("--lr_scheduler adafactor with relative_step=False: the learning rates are kept constant")
            return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType.CONSTANT](optimizer)
        return AdafactorSchedule(optimizer, initial_lr or 0.0)

    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        if "step_rules" not in kwargs:
            raise UserError(
                "--lr_scheduler piecewise_constant needs --lr_scheduler_args \"step_rules='1:100,0.1:200,0.01'\" "
                "(lr multiplier:until step, ..., final multiplier)."
            )
        return get_piecewise_constant_schedule(optimizer, **kwargs)

    if name in ("reduce_lr_on_plateau", "greedy"):
        raise UserError(f"--lr_scheduler {name} steps on a metric, which LoRA training does not provide; pick another.")
    if name not in LR_SCHEDULERS:
        raise UserError(f"--lr_scheduler {name!r} is not one of: {', '.join(LR_SCHEDULERS)}.")
    kind = SchedulerType(name)
    schedule_func = TYPE_TO_SCHEDULER_FUNCTION[kind]

    if kind == SchedulerType.CONSTANT:
        no_warmup("--lr_scheduler constant")
        return schedule_func(optimizer, **kwargs)
    if total > 0 and warmup > total:  # the learning rate would never reach its value
        raise UserError(f"--lr_warmup_steps {warmup_value} is longer than the whole run ({max_train_steps} steps).")
    if kind == SchedulerType.CONSTANT_WITH_WARMUP:
        return schedule_func(optimizer, num_warmup_steps=warmup, **kwargs)
    if kind == SchedulerType.INVERSE_SQRT:
        ts = None if timescale is None else timescale * num_processes
        return schedule_func(optimizer, num_warmup_steps=warmup, timescale=ts, **kwargs)

    if total <= 0:
        raise UserError(f"--lr_scheduler {name} needs --max_train_steps (or --max_train_epochs) to be set.")
    common = dict(num_warmup_steps=warmup, num_training_steps=total)

    if kind == SchedulerType.COSINE_WITH_RESTARTS:
        return schedule_func(optimizer, num_cycles=num_cycles, **common, **kwargs)
    if kind == SchedulerType.POLYNOMIAL:
        if warmup == total:  # no step left to decay, and transformers divides by their number after the last one
            return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType.CONSTANT_WITH_WARMUP](optimizer, num_warmup_steps=warmup)
        return schedule_func(optimizer, power=power, **common, **kwargs)
    if kind in (SchedulerType.COSINE_WITH_MIN_LR, SchedulerType.COSINE_WARMUP_WITH_MIN_LR):
        if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise UserError(f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio (for example 0.1).")
        if min_lr_ratio is not None:
            given = [f"{k}={kwargs[k]}" for k in ("min_lr", "min_lr_rate") if k in kwargs]
            if given:  # sd-scripts passes both on, and the schedule refuses them with a traceback
                raise UserError(f"--lr_scheduler_min_lr_ratio {min_lr_ratio} and --lr_scheduler_args {given[0]} both "
                                f"set the floor of --lr_scheduler {name}: give one of them")  # fmt: skip
            kwargs["min_lr_rate"] = min_lr_ratio
        return schedule_func(optimizer, num_cycles=num_cycles / 2, **common, **kwargs)
    if kind in (SchedulerType.LINEAR, SchedulerType.COSINE):
        return schedule_func(optimizer, **common, **kwargs)
    if kind == SchedulerType.WARMUP_STABLE_DECAY:
        stable = total - warmup - decay
        if stable < 0:
            raise UserError(
                f"--lr_warmup_steps {warmup_value} plus --lr_decay_steps {decay_value} exceed the run "
                f"({max_train_steps} steps)."
            )
        return schedule_func(
            optimizer,
            num_warmup_steps=warmup,
            num_stable_steps=stable,
            num_decay_steps=decay,
            num_cycles=num_cycles / 2,
            min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0,
            **kwargs,
        )
    raise AssertionError(f"LR_SCHEDULERS lists {name} but nothing builds it")
