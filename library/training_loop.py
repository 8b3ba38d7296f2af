"""The step loop of ``NetworkTrainer.train``: micro-batches, optimizer steps, validation,
sampling, saving and logging, in the order sd-scripts runs them (spec §a.2 steps 34-37)."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import zlib

import torch
from tqdm import tqdm

from library.errors import TrainingInterrupted, UserError
from library.flow_matching import VALIDATION_SIGMAS
from library.interrupts import HANDLED, GracefulStop
from library.network_interop import network_hook
from library.optimizers import is_dadapt_or_prodigy, resolve_optimizer_type
from library.run_saves import RunSaves
from library.sample_prompts import SampleTriggers
from library.train_state import capture_rng_states

logger = logging.getLogger(__name__)


def validation_noise_names(paths) -> dict[str, str]:
    """Each image path's shortest trailing run of path components that no other path ends with: the base name
    where that is unique, else as many folders as tell it apart. Validation noise is seeded from these, so it does
    not change when the dataset moves and two images that share a file name still get different noise."""
    parts = {path: tuple(os.path.normpath(os.path.abspath(path)).split(os.sep)) for path in set(paths)}
    files = set(parts.values())  # one file given in two spellings is one image
    names, pending, depth = {}, set(files), 1
    while pending:
        counts = collections.Counter(file[-depth:] for file in files)
        for file in list(pending):
            if counts[file[-depth:]] == 1 or depth >= len(file):
                names[file] = "/".join(file[-depth:])
                pending.discard(file)
        depth += 1
    return {path: names[file] for path, file in parts.items()}


class EpochSampler(torch.utils.data.Sampler):
    """(position in the epoch, batch index) of the batches this process visits in the current epoch,
    from ``start`` (changed between epochs). The dataset reads the step a batch trains at from its
    position, so DataLoader workers that fetch ahead see the right one."""

    def __init__(self, indices: list[int], start: int = 0):
        self.indices, self.start = indices, start

    def __iter__(self):
        return iter([(self.start + k, index) for k, index in enumerate(self.indices)])

    def __len__(self) -> int:
        return len(self.indices)



def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl+C and SIGTERM: sent to the whole process group (a terminal, ``timeout``,
    a launcher), they would end the workers, and the batch the trainer waits for with them, before it saves.
    The trainer stops them itself when it exits (``_workers_shut_down_on_error``)."""
    del worker_id
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def _workers_shut_down_on_error(loader):
    """An iterator over ``loader`` whose worker processes are shut down as soon as anything goes wrong:
    they ignore SIGTERM (see above), and Python's exit would otherwise wait on them for ever (an error a
    worker raised keeps the iterator alive until then). A worker's UserError comes out as its message
    alone, not inside the worker's traceback."""
    batches = iter(loader)
    try:
        yield batches
    except UserError as e:  # (CheckpointError and the like too)
        _stop_workers(batches)
        if _message_of(e) != str(e):
            raise type(e)(_message_of(e)) from None
        raise
    except BaseException:
        _stop_workers(batches)
        raise


def _message_of(error: UserError) -> str:
    """A UserError's message; of one raised in a DataLoader worker, without the worker's traceback that torch
    puts around it."""
    text, kind = str(error), type(error)
    ending = f"{kind.__module__}.{kind.__qualname__}: "  # how the worker's traceback ends, before the message
    if text.startswith(f"Caught {kind.__name__} in DataLoader worker") and ending in text:
        return text.rsplit(ending, 1)[1].strip()
    return text


def _stop_workers(batches) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator has it
    if shutdown is not None:
        shutdown()


class _BatchError(Exception):
    """A batch could not be read (a damaged cache file, an image changed during the run): its message."""


def _naming_batch_errors(batches):
    """The batches, with an error in reading one told apart from errors in training on it."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as e:
            raise _BatchError(_message_of(e)) from None
        yield batch


def dataset_multiplier(network, batch: dict):
    """A context in which the network runs at the batch's dataset ``network_multiplier`` (1.0 unless a
    dataset sets it). The trainer holds it through the backward too: checkpointed blocks run their
    forward again there, and must see the multiplier the first pass saw."""
    multipliers = batch.get("network_multipliers")
    if multipliers is None or not hasattr(network, "set_multiplier") or bool((multipliers == 1.0).all()):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def applied():
        network.set_multiplier(float(multipliers[0]))
        try:
            yield
        finally:
            network.set_multiplier(1.0)

    return applied()


def _lora_switched_off(batch: dict) -> bool:
    """A batch of a dataset with network_multiplier 0: the LoRA is off and the batch adds no gradient."""
    multipliers = batch.get("network_multipliers")
    return multipliers is not None and not bool(multipliers.any())


def average_gradients(params: list[torch.Tensor], all_reduce, processes: int, device) -> None:
    """Each gradient's mean over the processes, in one buffer per dtype; ``all_reduce`` sums a tensor
    in place across them (``torch.distributed.all_reduce``).

    A parameter some process has no gradient for (module dropout skipped it there) counts as zero
    there; one no process has a gradient for keeps none, as in a one-process run. Every process
    therefore joins the same collectives even when their dropout draws differ. Each gradient is
    freed as it is copied into the buffer: at most two copies exist (accelerate's reduce of a cat held three).
    """
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
    all_reduce(has_grad)
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, count in zip(params, has_grad.tolist(), strict=True):
        if count > 0:
            groups.setdefault(p.dtype, []).append(p)
    for dtype, group in groups.items():
        flat = torch.empty(sum(p.numel() for p in group), dtype=dtype, device=device)
        chunks = flat.split([p.numel() for p in group])
        for p, chunk in zip(group, chunks, strict=True):
            if p.grad is None:
                chunk.zero_()
            else:
                chunk.copy_(p.grad.reshape(-1))
                p.grad = None
        all_reduce(flat)
        flat.div_(processes)
        for p, chunk in zip(group, chunks, strict=True):
            p.grad = chunk.view_as(p)


def all_finite(tensors) -> bool:
    """Whether every element of the given tensors (None for a parameter without a gradient) is finite."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    return not checks or bool(torch.stack(checks).all())


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def step_sample_indices(micro: int, num_processes: int, process_index: int, batch_size: int, stride: int) -> range:
    """The indices, unique within an optimizer step, that seed each sample's noise and σ: every
    micro-batch of every process owns ``stride`` (the largest batch size) of them, so a short last
    batch or another dataset's batch size cannot reuse a neighbour's, and the indices do not depend
    on how the step is split between processes and accumulation."""
    first = (micro * num_processes + process_index) * stride
    return range(first, first + batch_size)


class TrainingLoop:
    def __init__(
        self,
        trainer,
        ctx,
        train_group,
        val_group,
        optimizer,
        lr_scheduler,
        lr_descriptions,
        optimizer_train,
        optimizer_eval,
        process_batches,
        steps_per_epoch,
        num_epochs,
        metadata,
        save_dtype,
    ):
        self.trainer, self.ctx, self.args = trainer, ctx, ctx.args
        self.accelerator, self.network = ctx.accelerator, ctx.network
        self.train_group, self.val_group = train_group, val_group
        self.sample_stride = max(d.batch_size for d in train_group.datasets)
        self.optimizer, self.lr_scheduler, self.lr_descriptions = optimizer, lr_scheduler, lr_descriptions
        self.optimizer_train, self.optimizer_eval = optimizer_train, optimizer_eval
        self.process_batches = process_batches
        self.steps_per_epoch, self.num_epochs = steps_per_epoch, num_epochs
        self.saves = RunSaves(self.args, self.accelerator, self.network, optimizer, lr_scheduler, metadata, save_dtype,
                              steps_per_epoch, self._set_eval_mode, self._set_train_mode)  # fmt: skip
        self.triggers = SampleTriggers.from_args(self.args) if ctx.sample_prompts else SampleTriggers(None, None, False)
        self.epoch_losses: list[float] = []
        # loss/average: sd-scripts' moving average over the last epoch's worth of steps
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=max(steps_per_epoch, 1))
        self.adapts_step_size = is_dadapt_or_prodigy(resolve_optimizer_type(self.args))
        self.unchecked_state = self.args.resume  # a state's optimizer moments are known to fit after one step
        # the network's own hooks, as sd-scripts calls them: each epoch's start, and each micro-batch's
        targets = trainer.network_targets(ctx)
        self.network_epoch_start = network_hook(self.network, "on_epoch_start", *targets)
        self.network_step_start = network_hook(self.network, "on_step_start", *targets)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, first_step: int, skip_data: bool = True) -> str:
        """Trains from ``first_step``; with ``skip_data`` the batches before it are skipped (resume)."""
        args, accelerator = self.args, self.accelerator
        global_step = self.first_step = first_step
        first_epoch = first_step // self.steps_per_epoch
        loader, sampler = self._data_loader()
        progress = tqdm(
            total=args.max_train_steps,
            initial=first_step,
            desc="steps",
            smoothing=0,
            disable=not accelerator.is_local_main_process,
        )
        logger.info("start training: %s in %s of %s, %s", _count(args.max_train_steps, "step"),
                    _count(self.num_epochs, "epoch"), _count(self.steps_per_epoch, "step"),
                    _count(accelerator.num_processes, "process", "processes"))  # fmt: skip
        self._set_train_mode()
        if self.triggers.due(0, 0):  # a resumed run too, as sd-scripts; named by the step its LoRA is at
            self._sample(epoch=0 if first_step == 0 else None, step=first_step)
        with GracefulStop() as stop:  # a signal during the final save waits for it too
            try:
                global_step = self._epochs(first_epoch, global_step, loader, sampler, progress, stop, skip_data)
            finally:  # before the message of a stop or an error
                progress.close()
            if stop.signum:
                logger.warning("%s received at the end of the run: it has finished its steps, so it saves its "
                               "final files as usual (skipping any sampling and validation still due)",
                               stop.name)  # fmt: skip
            return self.saves.final(global_step)

    def _epochs(self, first_epoch, global_step, loader, sampler, progress, stop, skip_data) -> int:
        args, accelerator = self.args, self.accelerator
        accum = args.gradient_accumulation_steps
        try:
            for epoch in range(first_epoch, self.num_epochs):
                if global_step >= args.max_train_steps:
                    break
                self.train_group.set_current_epoch(epoch + 1)
                self.network_epoch_start()
                skip = (global_step - epoch * self.steps_per_epoch) * accum if skip_data else 0
                skip_data = False  # later epochs start at their beginning
                sampler.indices, sampler.start = self.process_batches[skip:], skip
                # the step of the epoch's first batch: each batch's is this plus its position // accum
                self.train_group.set_current_step(global_step - skip // accum)
                self.epoch_losses = []
                window: list[float] = []
                window_rng, stopping, epoch_done = None, False, False
                with _workers_shut_down_on_error(loader) as batches:
                    for position, batch in enumerate(_naming_batch_errors(batches), start=skip):
                        micro = position % accum
                        if micro == 0 and accum > 1 and args.save_state:  # a stop inside this window saves its start's
                            window_rng = capture_rng_states()
                        self.network_step_start()
                        with dataset_multiplier(self.network, batch):
                            loss = self._micro_step(batch, global_step, micro) / accum
                            if _lora_switched_off(batch):  # zero gradients, not none: fp16's scaler and the
                                # gradient averaging across processes expect every step to have some
                                loss = loss + sum(p.sum() for p in self.network.parameters() if p.requires_grad) * 0.0
                            accelerator.backward(loss)
                        window.append(loss.detach())
                        if micro != accum - 1 and position != len(self.process_batches) - 1:
                            # a stop between micro-batches keeps the last finished step: a launcher may not wait
                            # out a whole accumulation (torch elastic kills its workers 30 s after a signal)
                            if stop.requested(accelerator):
                                self._stop(stop, global_step, epoch, window_rng)
                            continue
                        step_loss = self._step_loss(window, accum, global_step)
                        window = []
                        logs = self._optimizer_step()
                        global_step += 1
                        self.epoch_losses.append(step_loss)
                        self.recent_losses.append(step_loss)
                        logs |= {"loss/current": step_loss, "loss/average": self._moving_average()}
                        progress.update(1)
                        progress.set_postfix(loss=f"{step_loss:.4f}", avr_loss=f"{logs['loss/average']:.4f}")
                        # a stop still makes the saves due at this step, not its sampling and validation (a launcher
                        # may not wait for them); a signal during those is acted on before another step runs
                        stopping = self._after_step(epoch, global_step, logs, stop)
                        epoch_done = position == len(self.process_batches) - 1
                        if stopping or global_step >= args.max_train_steps:
                            break
                if stopping and not epoch_done and global_step < args.max_train_steps:
                    self._stop(stop, global_step, epoch)
                stopping = self._after_epoch(epoch, global_step, stop)
                if global_step >= args.max_train_steps:  # a stop at the last step ends the run as finished
                    break
                if stopping:
                    self._stop(stop, global_step, epoch)
        except _BatchError as e:  # a batch that cannot be read: the steps trained so far are kept
            saved = self._save_before_failing(global_step, epoch, window_rng if window else None)
            raise UserError(f"{e}{saved}") from None
        return global_step

    def _stop(self, stop: GracefulStop, step: int, epoch: int, rng_state: dict | None = None) -> None:
        """Saves the LoRA (and the state with --save_state) of the last finished step, then ends the run.
        ``rng_state``: the random state at that step's end, when the stop came later (inside an accumulation)."""
        saved = self.saves.for_stop(step, epoch, rng_state)
        raise TrainingInterrupted(f"interrupted by {stop.name} at step {step} of {self.args.max_train_steps}: {saved}",
                                  stop.exit_code)

    def _save_before_failing(self, step: int, epoch: int, rng_state: dict | None) -> str:
        """After a batch that cannot be read, saves the steps trained so far, as a stop does; says what it
        saved. Not with several processes: the others go on to the next collective and would wait here."""
        if self.accelerator.num_processes > 1 or step == self.first_step:
            return ""
        return f" Before stopping, {self.saves.for_stop(step, epoch, rng_state)}."

    def _micro_step(self, batch: dict, step: int, micro: int) -> torch.Tensor:
        accelerator = self.accelerator
        indices = step_sample_indices(micro, accelerator.num_processes, accelerator.process_index,
                                      len(batch["captions"]), self.sample_stride)  # fmt: skip
        with accelerator.autocast():
            losses = self.trainer.batch_loss(self.ctx, batch, step, list(indices))
        return (losses * batch["loss_weights"].to(losses.device, non_blocking=True)).mean()

    def _step_loss(self, window: list[torch.Tensor], accum: int, step: int) -> float:
        """The step's mean loss over micro-batches and processes; stops before the optimizer on inf/nan."""
        loss = torch.stack(window).sum() * accum / len(window)
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss, reduction="mean")
        if not torch.isfinite(loss):
            raise UserError(
                f"the loss became {loss.item()} at step {step + 1}. Likely causes: fp16 overflow (use "
                "--mixed_precision bf16), or a learning rate too high (lower --learning_rate / --unet_lr). "
                f"No weights were written for this step; {self.saves.before_failure(step)}"
            )
        return loss.item()

    def _optimizer_step(self) -> dict:
        args, accelerator, network = self.args, self.accelerator, self.network
        params = [p for p in network.parameters() if p.requires_grad]
        if accelerator.num_processes > 1:
            average_gradients(params, torch.distributed.all_reduce, accelerator.num_processes, accelerator.device)
        ggpo, scaler = hasattr(network, "update_grad_norms"), getattr(accelerator, "scaler", None)
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)  # (fp16's gradients are unscaled first)
        elif ggpo and scaler is not None:
            accelerator.unscale_gradients()  # GGPO reads the gradients' norms, not the loss scale's
        # GGPO's perturbation follows the norms; a step fp16's scaler skips (inf or NaN gradients) keeps the last ones
        if ggpo and (scaler is None or all_finite(p.grad for p in params)):
            network.update_grad_norms()
            network.update_norms()
        with self._checking_resumed_state():
            self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # (fp16's scaler skips a step that overflowed)
            self.unchecked_state = None
            self.lr_scheduler.step()  # the schedule counts the steps taken, as accelerate's wrapper in sd-scripts
        self.optimizer.zero_grad(set_to_none=True)
        logs = {}
        if args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(
                args.scale_weight_norms, accelerator.device
            )
            # sd-scripts' tags; with GGPO on too, its avg_key_norm is this one (the update norms after the cap)
            logs |= {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm,
                     "norm/avg_key_norm": mean_norm}  # fmt: skip
        if hasattr(network, "grad_norms"):
            norms = {key: values.mean() for key, values in (("norm/avg_key_norm", network.weight_norms()),
                                                            ("norm/avg_grad_norm", network.grad_norms()),
                                                            ("norm/avg_combined_norm", network.combined_weight_norms()))
                     if values is not None and key not in logs}  # fmt: skip
            if norms:  # read in one transfer
                logs |= dict(zip(norms, torch.stack(list(norms.values())).tolist(), strict=True))
        groups = self.optimizer.param_groups
        for i, (description, lr) in enumerate(zip(self.lr_descriptions, self.lr_scheduler.get_last_lr(), strict=False)):
            logs[f"lr/{description}".rstrip()] = lr
            if self.adapts_step_size and i < len(groups) and "d" in groups[i]:
                logs[f"lr/d*lr/{description}".rstrip()] = groups[i]["d"] * groups[i]["lr"]
        return logs

    # ---- between steps and epochs --------------------------------------------------------------
    def _after_step(self, epoch: int, step: int, logs: dict, stop: GracefulStop) -> bool:
        """Sampling, saves and validation due after ``step``: the saves alone once a stop is requested,
        before or during the others. Returns whether one was (every process takes the same path)."""
        args, accelerator = self.args, self.accelerator
        stopping = stop.requested(accelerator)
        if self.triggers.due(None, step) and not stopping:
            self._sample(epoch=None, step=step)
            stopping = stop.requested(accelerator)
        self.saves.at_step(step, epoch)  # ss_epoch: the whole epochs before this one, as sd-scripts records it
        if self.val_group and args.validate_every_n_steps and step % args.validate_every_n_steps == 0 and not stopping:
            logs |= self._validate("step")
            stopping = stop.requested(accelerator)
        self._log(logs, step, epoch)
        return stopping or stop.requested(accelerator)  # (a signal during the save)

    def _log(self, logs: dict, step: int, epoch: int) -> None:
        """``accelerator.log``, where wandb's values also carry ``global_step`` and ``epoch`` (1-based), as
        sd-scripts logs them: dashboards made for its runs plot against them."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            values = logs | {"global_step": step, "epoch": epoch + 1} if tracker.name == "wandb" else logs
            tracker.log(values, step=step)

    def _after_epoch(self, epoch: int, step: int, stop: GracefulStop) -> bool:
        """Validation, saves and sampling due at an epoch's end: the saves alone once a stop is requested,
        before or during the others. Returns whether one was."""
        args, accelerator = self.args, self.accelerator
        stopping = stop.requested(accelerator)
        logs = {}
        if self.epoch_losses:
            logs["loss/epoch_average"] = sum(self.epoch_losses) / len(self.epoch_losses)
        every = args.validate_every_n_epochs or 1
        if self.val_group and (epoch + 1) % every == 0 and not stopping:
            logs |= self._validate("epoch")
            stopping = stop.requested(accelerator)
        if logs:
            self._log(logs, step, epoch)
        if epoch + 1 < self.num_epochs:  # the last epoch's save is the final one
            self.saves.at_epoch_end(epoch + 1, step)
        if self.triggers.due(epoch + 1, step) and not stopping:
            self._sample(epoch=epoch + 1, step=step)
        return stopping or stop.requested(accelerator)

    def _validate(self, kind: str) -> dict:
        """Mean loss over the validation batches at σ = 0.2, 0.4, 0.6, 0.8 with fixed noise (main process)."""
        logs = self._validation_logs(kind) if self.accelerator.is_main_process else {}
        self.accelerator.wait_for_everyone()
        return logs

    def _validation_logs(self, kind: str) -> dict:
        args = self.args
        self._set_eval_mode()
        self.val_group.set_current_epoch(1)
        count = len(self.val_group)
        if args.max_validation_steps is not None:
            count = min(count, args.max_validation_steps)
        total, n = 0.0, 0
        names = validation_noise_names(e.path for e in self.val_group.entries())
        bar = tqdm(total=count * len(VALIDATION_SIGMAS), desc="validation", leave=False)
        with torch.no_grad(), self.accelerator.autocast(), bar:
            for index in range(count):
                batch = self.val_group[index]
                # noise seeded by the image's name (and its flip), not its place in a batch: the same image
                # gets the same noise at any batch size, and the average is over images, so batching changes nothing
                indices = [zlib.crc32(f"{names[path]}|{flipped}".encode()) for path, flipped
                           in zip(batch["image_paths"], batch["flippeds"], strict=True)]  # fmt: skip
                for sigma in VALIDATION_SIGMAS:
                    with dataset_multiplier(self.network, batch):
                        losses = self.trainer.batch_loss(self.ctx, batch, 0, indices, fixed_sigma=sigma)
                    total += (losses * batch["loss_weights"].to(losses.device)).sum().item()
                    n += len(losses)
                    bar.update()
        self._set_train_mode()
        average = total / max(n, 1)
        train_average = self._moving_average() if self.recent_losses else average
        logger.info("validation loss (%s): %.5f", kind, average)
        return {
            f"loss/validation/{kind}_average": average,
            f"loss/validation/{kind}_divergence": average - train_average,
        }

    def _moving_average(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses)

    def _set_eval_mode(self) -> None:
        self.optimizer_eval()
        self.network.eval()

    def _set_train_mode(self) -> None:
        with self._checking_resumed_state():
            self.optimizer_train()  # a schedule-free optimizer reads its state here first
        self.network.train()

    @contextlib.contextmanager
    def _checking_resumed_state(self):
        """Until the first optimizer step after ``--resume`` has run, a KeyError from the optimizer means a state
        saved by another optimizer (torch loads any whose group sizes match): one message, no traceback. States
        that record their optimizer were checked before loading (``train_state.check_state_optimizer``)."""
        try:
            yield
        except KeyError as e:
            if not self.unchecked_state:
                raise
            raise UserError(
                f"--resume {self.unchecked_state}: its optimizer state does not fit this run's optimizer (it has no "
                f"{e}): it was saved with another --optimizer_type or --optimizer_args. Resume with those of the run "
                "that saved it, or start a new run from its LoRA with --network_weights."
            ) from None

    def _sample(self, epoch: int | None, step: int) -> None:
        """Samples on the main process only (only it writes files); the others wait."""
        if self.accelerator.is_main_process:
            self._set_eval_mode()
            try:
                self.trainer.sample_images(self.ctx, epoch, step)
            finally:
                self._set_train_mode()
        self.accelerator.wait_for_everyone()

    def _data_loader(self):
        args = self.args
        sampler = EpochSampler(self.process_batches)
        self.train_group.set_accumulation(args.gradient_accumulation_steps)  # before workers copy the dataset
        workers = min(args.max_data_loader_n_workers or 0, os.cpu_count() or 1)
        from library.datasets import collate_first

        if workers > 0:
            import multiprocessing

            epoch_value, step_value = multiprocessing.Value("i", 1), multiprocessing.Value("i", 0)
            self.train_group.use_shared_counters(epoch_value, step_value)
        loader = torch.utils.data.DataLoader(
            self.train_group,
            batch_size=1,
            sampler=sampler,
            collate_fn=collate_first,
            num_workers=workers,
            pin_memory=self.accelerator.device.type == "cuda",  # so that batches go to the GPU without a wait
            persistent_workers=bool(args.persistent_data_loader_workers and workers > 0),
            # each iterator (epoch) draws its workers' base seed from here, not from the global RNG that
            # dropout draws from: a resumed run starts its iterator at another point of that stream
            generator=torch.Generator().manual_seed(self.ctx.seed),
            worker_init_fn=_leave_stop_signals_to_the_trainer if workers > 0 else None,
        )
        return loader, sampler
