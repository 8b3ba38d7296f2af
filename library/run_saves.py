"""The files a training run writes: LoRA files and training states under sd-scripts' names, the pruning
of older ones (``--save_last_n_*``), and one clear message for a write that fails. The main process
writes; every process keeps the same record of what was saved."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections.abc import Callable

from accelerate.utils import gather_object

from library.errors import UserError
from library.train_metadata import minimal_metadata, per_save_metadata
from library.train_state import (
    TrainProgress,
    capture_rng_states,
    epoch_to_remove,
    model_file_name,
    remove_path,
    save_training_state,
    state_dir_name,
    step_to_remove,
)

logger = logging.getLogger(__name__)


class RunSaves:
    def __init__(self, args, accelerator, network, optimizer, lr_scheduler, metadata: dict, save_dtype,
                 steps_per_epoch: int, eval_mode: Callable[[], None], train_mode: Callable[[], None]):  # fmt: skip
        """``eval_mode`` / ``train_mode`` switch the network (and a schedule-free optimizer, whose
        weights differ between the two) around a save."""
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.args, self.accelerator, self.network = args, accelerator, network
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.metadata, self.save_dtype = metadata, save_dtype
        self.eval_mode, self.train_mode = eval_mode, train_mode
        self.ext = "." + (args.save_model_as or "safetensors")
        self.files: list[tuple[int, str]] = []  # (steps trained, LoRA file), oldest first
        self.states: list[tuple[int, str]] = []  # (steps trained, state folder), oldest first

    @property
    def last_saved(self) -> str | None:
        return self.files[-1][1] if self.files else None

    # ---- what the loop saves when -------------------------------------------------------------
    def at_step(self, step: int, epoch: int) -> None:
        """The save of ``--save_every_n_steps`` after ``step``, and the pruning. ``epoch`` (recorded as ss_epoch)
        is the 0-based epoch the step falls in, i.e. the whole epochs before it, as sd-scripts records step saves."""
        args = self.args
        if not (args.save_every_n_steps and step % args.save_every_n_steps == 0):
            return
        # unlike epoch saves, a step save at the last step is kept (spec §h.2): it prunes the older ones
        self._checkpoint("step", step, step, epoch)
        old = step_to_remove(step, args.save_every_n_steps, args.save_last_n_steps)
        if old:
            self._remove(model_file_name(args.output_name, "step", old, self.ext))
        # states are pruned only by a run that saves them: one that resumed without --save_state must not
        # delete the states it (or the user) may still resume from
        keep_states = args.save_last_n_steps_state or args.save_last_n_steps
        old_state = step_to_remove(step, args.save_every_n_steps, keep_states)
        if old_state and args.save_state:
            self._remove(state_dir_name(args.output_name, "step", old_state))

    def at_epoch_end(self, epoch: int, step: int) -> None:
        """The save of ``--save_every_n_epochs`` at the end of the 1-based ``epoch``, and the pruning
        (the last epoch's save is the final one)."""
        args, n = self.args, self.args.save_every_n_epochs
        if not (n and epoch % n == 0):
            return
        self._checkpoint("epoch", epoch, step, epoch)
        old = epoch_to_remove(epoch, n, args.save_last_n_epochs)
        if old:
            self._remove(model_file_name(args.output_name, "epoch", old, self.ext))
        old_state = epoch_to_remove(epoch, n, args.save_last_n_epochs_state or args.save_last_n_epochs)
        if old_state and args.save_state:
            self._remove(state_dir_name(args.output_name, "epoch", old_state))

    def for_stop(self, step: int, epoch: int, rng_state: dict | None = None) -> str:
        """The LoRA (and with --save_state the state) of the last finished step, unless a save at this
        step has just run; says what was saved. ``rng_state``: the random state at that step's end, when
        the stop came later (inside an accumulation)."""
        if not (self.files and self.files[-1][0] == step):
            self.model(model_file_name(self.args.output_name, "step", step, self.ext), step, epoch)
        saved = f"saved the LoRA to {self.last_saved}"
        if self.args.save_state:
            state = (self.states[-1][1] if self.states and self.states[-1][0] == step
                     else self.state("step", step, step, rng_state))  # fmt: skip
            saved += f" and the training state to {state} (continue with --resume {state})"
        else:
            saved += " (add --save_state to be able to resume)"
        self.accelerator.wait_for_everyone()
        return saved

    def final(self, steps: int) -> str:
        # the LoRA first: a state that does not fit on the disk then costs the state alone
        path = self.model(model_file_name(self.args.output_name, "last", None, self.ext), steps, self._epoch_of(steps))
        if self.args.save_state or self.args.save_state_on_train_end:
            self.state("last", None, steps)
        self.accelerator.wait_for_everyone()
        return path

    def before_failure(self, step: int) -> str:
        """Which saved LoRA to fall back on when the forward after ``step`` steps gave inf/nan: a
        file saved at ``step`` holds the very weights that gave it, so the one before is named too."""
        saved = [(s, p) for s, p in self.files if os.path.exists(p)]
        if not saved:
            return "nothing has been saved yet"
        last_step, last = saved[-1]
        if last_step < step:
            return f"the last good file is: {last}"
        before = saved[-2][1] if len(saved) > 1 else "none"
        return (f"the last file saved, {last}, holds the weights that gave this loss and may be bad too; "
                f"the one before it is: {before}")  # fmt: skip

    # ---- writing ------------------------------------------------------------------------------
    def model(self, file_name: str, steps: int, epoch: int) -> str:
        path = os.path.join(self.args.output_dir, file_name)
        if self.accelerator.is_main_process:
            self.eval_mode()
            with self._writing(path):
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a folder in --output_name too
                self.network.save_weights(path, self.save_dtype, self._metadata(steps, epoch))
            self.train_mode()
            logger.info("saved %s", path)
        self.files.append((steps, path))
        return path

    def state(self, kind: str, number: int | None, steps: int, rng_state: dict | None = None) -> str:
        path = os.path.join(self.args.output_dir, state_dir_name(self.args.output_name, kind, number))
        rng_states = [rng_state or capture_rng_states()]
        if self.accelerator.num_processes > 1:  # every process calls this: gather their RNG states to the main one
            rng_states = gather_object(rng_states)
        if self.accelerator.is_main_process:
            scaler = getattr(self.accelerator, "scaler", None)
            # the epoch the last finished step falls in, counted as --resume counts it (run_start.check_resume_step),
            # not the loop's, from which a stop before an epoch's first step or --initial_step without
            # --skip_until_initial_step set it apart
            progress = TrainProgress(self._epoch_of(steps), steps, self.args.seed)
            with self._writing(path):
                save_training_state(path, self.network.state_dict(), self.optimizer.optimizer, self.lr_scheduler,
                                    progress, scaler, rng_states)
            logger.info("saved the training state to %s", path)
        self.states.append((steps, path))
        return path

    def _epoch_of(self, steps: int) -> int:
        """The 1-based epoch the last of ``steps`` steps falls in."""
        return max(1, math.ceil(steps / self.steps_per_epoch))

    def _checkpoint(self, kind: str, number: int, steps: int, epoch: int) -> None:
        self.model(model_file_name(self.args.output_name, kind, number, self.ext), steps, epoch)
        if self.args.save_state:
            self.state(kind, number, steps)
        self.accelerator.wait_for_everyone()

    def _remove(self, name: str) -> None:
        """Prunes an older save; one that cannot be removed (on Windows, a file another program has open)
        stays, said in a warning: the run goes on."""
        if not self.accelerator.is_main_process:
            return
        path = os.path.join(self.args.output_dir, name)
        try:
            if os.path.isdir(path):  # a state: moved aside first, so that one with a file in use stays whole
                aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
                os.replace(path, aside)  # (what it leaves, the next run's clean-up removes)
                path = aside
            remove_path(path)
        except OSError as e:
            logger.warning("could not remove the older save %s (%s); it stays", path, e.strerror or e)

    def _metadata(self, steps: int, epoch: int) -> dict[str, str] | None:
        if self.ext != ".safetensors":
            return None
        metadata = per_save_metadata(self.metadata, steps, epoch)
        return minimal_metadata(metadata) if self.args.no_metadata else metadata

    @contextlib.contextmanager
    def _writing(self, path: str):
        """Turns a failed write (disk full, permissions) into one clear message; files are written
        under temporary names, so everything saved before is intact."""
        try:
            yield
        except OSError as e:
            earlier = f"the last good file is {self.last_saved}" if self.last_saved else "nothing was saved before"
            remedy = "Free space on that disk or choose" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "Choose"
            raise UserError(
                f"could not write {path}: {e.strerror or e}. {remedy} another --output_dir; {earlier}, and no file "
                "was left half-written."
            ) from None
