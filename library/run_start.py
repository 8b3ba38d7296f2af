"""Where a run starts and how long it is: --max_train_epochs / --max_train_steps, --initial_step /
--initial_epoch, a --resume state's step, checked against this run's steps and epochs, and each
process's random state for the steps."""

from __future__ import annotations

import logging
import math

from library.errors import UserError

logger = logging.getLogger(__name__)


def run_length(args, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: --max_train_epochs whole epochs when given, else --max_train_steps."""
    if args.max_train_epochs is not None:
        return args.max_train_epochs * steps_per_epoch
    return args.max_train_steps


def initial_step(args, steps_per_epoch: int) -> int | None:
    """--initial_step / --initial_epoch: the step the count starts from, or None when neither is
    given. With --resume it replaces the state's step, as in sd-scripts."""
    if args.initial_step is not None:
        step = args.initial_step
    elif args.initial_epoch is not None:
        step = (args.initial_epoch - 1) * steps_per_epoch
    else:
        return None
    if not 0 <= step < args.max_train_steps:
        raise UserError(f"--initial_step / --initial_epoch give step {step}, outside 0..{args.max_train_steps - 1}")
    logger.info("counting steps from %d (%s); %s", step,
                "skipping the batches before it" if args.skip_until_initial_step else "data from the epoch start",
                "the lr schedule is the state's" if args.resume else "the lr schedule starts at its beginning")
    return step


def seed_each_process(seed: int, process_index: int, num_processes: int) -> None:
    """Gives each of several processes its own random stream for what it draws while training (LoRA
    dropout, rank and module dropout), derived from (seed, process index). Called once the LoRA
    exists, which every process initialises alike from the shared seed. With one seed for all, as
    sd-scripts has, every process dropped the same ranks and modules at every step. One process
    keeps its stream as it is."""
    if num_processes > 1:
        import numpy as np
        from accelerate.utils import set_seed

        set_seed(int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0]))


def check_resume_step(args, given_step: int | None, steps_per_epoch: int) -> None:
    """Before the models load: a --resume state must leave steps to train, and its step should fall in
    the epoch it was saved in. Another batch size, number of repeats or images, gradient accumulation
    or number of processes moves it, and the data order no longer continues the saved run's."""
    from library.train_state import read_progress

    if given_step is not None:  # the given step wins (initial_step says so)
        return
    progress = read_progress(args.resume)
    if progress.current_step >= args.max_train_steps:
        raise UserError(f"--resume {args.resume}: the state is at step {progress.current_step}, and this run has "
                        f"{args.max_train_steps} steps; raise --max_train_steps (or --max_train_epochs)")  # fmt: skip
    epoch_here = math.ceil(progress.current_step / steps_per_epoch)
    if progress.current_step > 0 and progress.current_epoch != epoch_here:
        logger.warning("--resume %s: the state was saved at step %d in epoch %d, but with this run's %d steps per "
                       "epoch that step falls in epoch %d: the dataset, batch size, repeats, gradient accumulation "
                       "or number of processes changed (or the saved run counted its steps from --initial_step or "
                       "a resume without --skip_until_initial_step, as sd-scripts does), so the data order does not "
                       "continue the saved run's", args.resume, progress.current_step, progress.current_epoch,
                       steps_per_epoch, epoch_here)  # fmt: skip


def starting_point(args, given_step: int | None, network, optimizer, lr_scheduler, accelerator) -> tuple[int, bool]:
    """(first step, whether to skip the data before it): step 0, ``given_step`` (--initial_step /
    --initial_epoch), or the step of the --resume state, whose network, optimizer, schedule and loss
    scale are loaded here."""
    first_step, skip_data = given_step or 0, bool(args.skip_until_initial_step)
    if not args.resume:
        return first_step, skip_data
    from library.optimizers import optimizer_arg_names
    from library.train_state import check_state_fits, load_training_state

    check_state_fits(args.resume, network.state_dict())
    network_state, progress = load_training_state(args.resume, optimizer.optimizer, lr_scheduler,
                                                  getattr(accelerator, "scaler", None),  # fp16's loss scale
                                                  accelerator.process_index, optimizer_arg_names(args))  # fmt: skip
    network.load_state_dict(network_state, strict=True)
    if given_step is None:
        first_step, skip_data = progress.current_step, True
    else:  # as in sd-scripts, the given step wins over the state's
        logger.warning("--resume %s: counting from step %d (--initial_step / --initial_epoch), not from the "
                       "state's step %d", args.resume, given_step, progress.current_step)  # fmt: skip
    logger.info("resumed from %s at step %d", args.resume, first_step)
    return first_step, skip_data
