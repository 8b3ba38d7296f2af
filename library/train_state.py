"""Saved-file names, old-save removal and the resumable training-state directory.

Names are sd-scripts' (spec §h.2): ``{name}-{epoch:06d}.ext``, ``{name}-step{step:08d}.ext``,
``{name}.ext`` and ``...-state/`` directories. A state directory holds the network weights
(``model.safetensors``), ``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``,
``scaler.pt`` with fp16, and ``train_state.json``; it is written under a temporary name and
renamed into place, so an interrupted save never leaves a half state that ``--resume`` would
take for a good one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
DEFAULT_NAMES = {"epoch": "epoch", "step": "at", "last": "last"}


def model_file_name(output_name: str | None, kind: str, number: int | None = None, ext: str = ".safetensors") -> str:
    """File name of an epoch save, a step save or the final file."""
    if kind == "epoch":
        return f"{output_name or DEFAULT_NAMES['epoch']}-{number:06d}{ext}"
    if kind == "step":
        return f"{output_name or DEFAULT_NAMES['step']}-step{number:08d}{ext}"
    return f"{output_name or DEFAULT_NAMES['last']}{ext}"


def state_dir_name(output_name: str | None, kind: str, number: int | None = None) -> str:
    return model_file_name(output_name, kind, number, ext="") + "-state"


def epoch_to_remove(epoch: int, save_every_n_epochs: int | None, keep_last_n: int | None) -> int | None:
    """The epoch whose save falls out of ``--save_last_n_epochs`` when ``epoch`` is saved."""
    if not keep_last_n or not save_every_n_epochs:
        return None
    old = epoch - save_every_n_epochs * keep_last_n
    return old if old > 0 else None


def step_to_remove(step: int, save_every_n_steps: int | None, keep_last_n_steps: int | None) -> int | None:
    """The step save that falls out of ``--save_last_n_steps`` (a step count, as in sd-scripts)."""
    if not keep_last_n_steps or not save_every_n_steps:
        return None
    old = step - keep_last_n_steps - 1
    old -= old % save_every_n_steps
    return old if old > 0 else None


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


# what save_safetensors and save_training_state write before the rename: ".{final name}.tmp-{pid}" (a folder
# for both), and ".{state}.tmp-{pid}.old" for the state being replaced
_TEMPORARY_NAME = re.compile(r"\.(?P<final>.+)\.tmp-(?P<pid>\d+)(?P<old>\.old)?")


def writer_is_gone(pid: int) -> bool:
    """Whether the process that wrote a temporary is gone. Called before this run writes anything, so
    a temporary named after this very process is a leftover of an earlier one that had its number."""
    if pid == os.getpid():
        return True
    return not (_windows_process_exists(pid) if sys.platform == "win32" else _posix_process_exists(pid))


def _posix_process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process is there
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's; anything else: leave its files alone
        return True
    return True


_STILL_ACTIVE = 259  # GetExitCodeProcess of a running process
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_INVALID_PARAMETER = 87  # OpenProcess of a process id in use by none


def _windows_process_exists(pid: int) -> bool:
    """Asks the kernel: on Windows os.kill(pid, 0) sends Ctrl+C to that process's console group (0 is
    CTRL_C_EVENT), and raises for a process that is gone."""
    import _winapi

    try:
        handle = _winapi.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    except OSError as e:  # access denied: another user's, which is there
        return getattr(e, "winerror", None) != _ERROR_INVALID_PARAMETER
    try:
        return _winapi.GetExitCodeProcess(handle) == _STILL_ACTIVE
    finally:
        _winapi.CloseHandle(handle)


def remove_abandoned_temporaries(output_dir: str, output_name: str | None) -> list[str]:
    """Cleans up after a killed run of the same ``--output_name``: removes the temporaries its saves left
    (hidden, named after the file or state folder they were to become and the process that wrote them,
    which is gone), and puts back a state folder it had moved aside to replace (``.old``) when the
    replacement never arrived. Returns what it removed or put back, relative to ``output_dir``."""
    if not output_name:  # the default names ("last", "at", "epoch") are too generic to claim
        return []
    folder = os.path.join(output_dir, os.path.dirname(output_name))
    base = re.escape(os.path.basename(output_name))
    ours = re.compile(rf"{base}(-step\d+|-\d+)?(-state|\.[A-Za-z0-9]+)")  # model_file_name's, state_dir_name's
    if not os.path.isdir(folder):
        return []
    cleaned = []
    for entry in sorted(os.listdir(folder)):
        match = _TEMPORARY_NAME.fullmatch(entry)
        if not (match and ours.fullmatch(match["final"]) and writer_is_gone(int(match["pid"]))):
            continue
        path, final = os.path.join(folder, entry), os.path.join(folder, match["final"])
        if match["old"] and not os.path.exists(final):  # killed between moving the old state aside and renaming
            os.replace(path, final)
        else:
            remove_path(path)
        cleaned.append(_shown_in(path, output_dir))
    return cleaned


def _shown_in(path: str, folder: str) -> str:
    """``path`` relative to ``folder``, or whole where it cannot be (another drive on Windows)."""
    try:
        return os.path.relpath(path, folder)
    except ValueError:
        return path


@dataclass
class TrainProgress:
    """What ``train_state.json`` records: the epoch in progress, the number of steps done and the
    run's seed (None in states of sd-scripts or of older versions)."""

    current_epoch: int
    current_step: int
    seed: int | None = None


def capture_rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


_ACCELERATE_RNG_KEYS = {"random_state": "python", "numpy_random_seed": "numpy", "torch_manual_seed": "torch",
                        "torch_cuda_manual_seed": "cuda"}  # fmt: skip


def read_rng_states(path: str) -> dict:
    """A ``random_states_<rank>.pkl``: this project's pickle, or the ``torch.save`` of accelerate's
    ``save_state`` (so a state directory written by sd-scripts resumes too)."""
    if zipfile.is_zipfile(path):
        states = torch.load(path, weights_only=False)
        return {ours: states[theirs] for theirs, ours in _ACCELERATE_RNG_KEYS.items() if theirs in states}
    with open(path, "rb") as f:
        return pickle.load(f)


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # one state per GPU the saving machine saw: a machine with fewer (or more) restores those both have
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def save_training_state(
    state_dir: str,
    network_state: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    progress: TrainProgress,
    scaler=None,
    rng_states: list[dict] | None = None,
) -> None:
    """Writes a complete state directory atomically (temporary directory, then rename).

    ``rng_states`` holds every process's RNG states in rank order (``random_states_<rank>.pkl``,
    as accelerate names them); by default this process's alone, as rank 0."""
    from library.safetensors_io import replace_file, save_safetensors, write_torch_file

    parent = os.path.dirname(os.path.abspath(state_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(state_dir)}.tmp-{os.getpid()}")
    remove_path(tmp)
    os.makedirs(tmp)
    try:
        save_safetensors(network_state, os.path.join(tmp, "model.safetensors"))
        write_torch_file(optimizer.state_dict(), os.path.join(tmp, "optimizer.bin"))
        write_torch_file(lr_scheduler.state_dict(), os.path.join(tmp, "scheduler.bin"))
        for rank, states in enumerate(rng_states or [capture_rng_states()]):
            with open(os.path.join(tmp, f"random_states_{rank}.pkl"), "wb") as f:
                pickle.dump(states, f)
        if scaler is not None:
            write_torch_file(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        with open(os.path.join(tmp, TRAIN_STATE_FILE), "w", encoding="utf-8") as f:
            # sd-scripts reads the first two; the optimizer lets --resume with another one stop with a message
            # (and the seed lets a resume without --seed keep the data order, noise and validation split)
            json.dump({"current_epoch": progress.current_epoch, "current_step": progress.current_step,
                       "optimizer": optimizer_class_path(optimizer), "seed": progress.seed}, f)  # fmt: skip
        old = None
        if os.path.exists(state_dir):  # replace an older state only once the new one is complete
            old = tmp + ".old"
            replace_file(state_dir, old)
        replace_file(tmp, state_dir)
        if old:
            remove_path(old)
    finally:
        remove_path(tmp)


def check_state_dir(state_dir: str) -> None:
    """Stops before any work if ``--resume`` does not name a complete training state."""
    if os.path.isfile(state_dir):
        raise UserError(f"--resume {state_dir}: a file, not a training state folder. Give a '...-state' folder "
                        f"written by --save_state, or start a new run from a LoRA file with --network_weights "
                        f"{state_dir}.")  # fmt: skip
    if not os.path.isdir(state_dir):
        raise UserError(f"--resume {state_dir}: no such directory. Give a '...-state' folder written by --save_state.")
    # (scheduler.bin may be missing: sd-scripts writes none with a schedule-free optimizer)
    needed = ("model.safetensors", "optimizer.bin", TRAIN_STATE_FILE)
    missing = [n for n in needed if not os.path.exists(os.path.join(state_dir, n))]
    if missing:
        raise UserError(
            f"--resume {state_dir}: not a training state (missing {', '.join(missing)}). "
            "Give a '...-state' folder written by --save_state."
        )
    read_progress(state_dir)
    for name in sorted(os.listdir(state_dir)):
        problem = _damage(os.path.join(state_dir, name))
        if problem:
            raise _damaged(state_dir, name, problem)


_TORCH_ZIP_MAGIC = b"PK\x03\x04"


def _damage(path: str) -> str | None:
    """What is wrong with a state file, read in full (they are small beside the models): None if nothing."""
    from library.errors import CheckpointError
    from library.safetensors_io import read_header

    name = os.path.basename(path)
    try:
        if name.endswith(".safetensors"):
            read_header(path)
        elif name.endswith((".bin", ".pt")):
            with open(path, "rb") as f:
                is_zip = f.read(4) == _TORCH_ZIP_MAGIC
            if is_zip:  # torch.save's format: every member's checksum is read
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad:
                    return f"a bad checksum in {bad}"
        elif name.startswith("random_states_") and name.endswith(".pkl"):
            return _rng_file_damage(path)
    except (CheckpointError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, RuntimeError, ValueError,
            OSError) as e:  # fmt: skip
        return f"{type(e).__name__}: {e}"
    return None


def _rng_file_damage(path: str) -> str | None:
    """A damaged pickle can fail in any way while read, or give values the generators refuse: it is
    read and tried on the generators (which are then put back as they were)."""
    current = capture_rng_states()
    try:
        restore_rng_states(read_rng_states(path))
    except Exception as e:  # noqa: BLE001 (whatever the damage raises, the file is what is named)
        return f"{type(e).__name__}: {e}"
    finally:
        restore_rng_states(current)
    return None


def _damaged(state_dir: str, name: str, problem: str) -> UserError:
    weights = os.path.join(state_dir, "model.safetensors")
    fallback = "" if name == "model.safetensors" else f", or start a new run from its LoRA: --network_weights {weights}"
    return UserError(f"--resume {state_dir}: {name} is damaged ({problem}); resume from another state{fallback}.")


def read_progress(state_dir: str) -> TrainProgress:
    """The epoch and step a state was saved at (its ``train_state.json``)."""
    path = os.path.join(state_dir, TRAIN_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        seed = data.get("seed")
        return TrainProgress(int(data["current_epoch"]), int(data["current_step"]), None if seed is None else int(seed))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"--resume {state_dir}: {TRAIN_STATE_FILE} is damaged ({type(e).__name__}: {e}); resume from another "
            "state, or start again with --network_weights set to a LoRA file of this run."
        ) from None


def resume_seed(state_dir: str, seed: int | None) -> int | None:
    """The seed of a run resumed from ``state_dir``: ``--seed`` if given, else the state's. The seed
    orders the data, draws the noise and splits off the validation images, so another seed than the
    saved run's is said (held-out images may then have been trained on)."""
    saved = read_progress(state_dir).seed
    if seed is None and saved is not None:
        logger.info("--resume %s: using the seed %d of the run that saved it", state_dir, saved)
        return saved
    if seed is None:
        logger.warning("--resume %s: the state records no seed (saved by sd-scripts or an older version) and no "
                       "--seed is given: this run draws a new one, so its data order, noise and validation split "
                       "differ from the saved run's; give that run's --seed", state_dir)  # fmt: skip
    elif saved is not None and saved != seed:
        logger.warning("--resume %s: --seed %d is not the seed %d of the run that saved it: the data order, noise "
                       "and validation split change from here (held-out images may have been trained on)",
                       state_dir, seed, saved)  # fmt: skip
    return seed


def optimizer_class_path(optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}"


def check_state_optimizer(state_dir: str, class_path: str) -> None:
    """Stops when the state was saved with another optimizer than this run builds (``class_path``): its
    moments would be read under other names, and the first step would fail. States without the record
    (sd-scripts', or older ones) stop with a message at that first step (``TrainingLoop._optimizer_step``)."""
    try:
        with open(os.path.join(state_dir, TRAIN_STATE_FILE), encoding="utf-8") as f:
            saved = json.load(f).get("optimizer")
    except (OSError, ValueError, AttributeError):
        return  # read_progress names a damaged file
    # the class names: a package that moves a class to another module must not stop a resume
    if isinstance(saved, str) and saved.rpartition(".")[2] != class_path.rpartition(".")[2]:
        raise UserError(
            f"--resume {state_dir}: the state was saved with the optimizer {saved}, and this run uses {class_path}. "
            "Resume with the --optimizer_type (and --optimizer_args) of the run that saved it, or start a new run "
            "from its LoRA with --network_weights."
        )


def check_state_fits(state_dir: str, network_state: dict[str, torch.Tensor]) -> None:
    """Stops, before the state is loaded (its header is enough), when the state's LoRA has other
    modules or shapes than this run's network (another --network_dim, --network_args or
    text-encoder choice)."""
    from library.safetensors_io import read_header

    saved = {k: tuple(v["shape"]) for k, v in read_header(os.path.join(state_dir, "model.safetensors"))[0].items()}
    ours = {k: tuple(v.shape) for k, v in network_state.items()}
    problems = sorted(f"{k} {saved[k]} (network {ours[k]})" for k in ours.keys() & saved.keys() if saved[k] != ours[k])
    problems += [f"{k} not in this network" for k in sorted(saved.keys() - ours.keys())]
    problems += [f"{k} missing" for k in sorted(ours.keys() - saved.keys())]
    if problems:
        raise UserError(
            f"--resume {state_dir}: its LoRA does not fit this run's network ({'; '.join(problems[:3])}"
            + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
            + "). Resume with the network options of the run that saved it (--network_dim, --network_alpha, "
            "--network_args, --network_train_unet_only)."
        )


def load_training_state(
    state_dir: str, optimizer, lr_scheduler, scaler=None, process_index: int = 0, asked_options=()
) -> tuple[dict, TrainProgress]:
    """Restores optimizer, scheduler, this process's RNG and scaler; returns the network weights and
    the progress. A process the state has no RNG file for (it was saved by fewer processes) keeps
    its seeded RNG. ``asked_options``: the names this run's ``--optimizer_args`` set, said where the
    state's values differ. The folder is not checked again here: :func:`check_state_dir` reads every
    file in full, and the trainer calls it before the models load."""
    from library.safetensors_io import load_safetensors

    network_state = load_safetensors(os.path.join(state_dir, "model.safetensors"))
    asked_rates = list(getattr(lr_scheduler, "base_lrs", []))
    asked_groups = [dict(group) for group in optimizer.param_groups]
    try:
        # torch takes any optimizer's state whose group sizes match: one of another optimizer is stopped before
        # loading by its record (check_state_optimizer), or at the first step without one (TrainingLoop)
        optimizer.load_state_dict(_load_torch(state_dir, "optimizer.bin"))
        if os.path.exists(os.path.join(state_dir, "scheduler.bin")):
            lr_scheduler.load_state_dict(_load_torch(state_dir, "scheduler.bin"))
        elif lr_scheduler.state_dict():  # a schedule to continue (a schedule-free optimizer's stand-in has none)
            raise UserError(f"--resume {state_dir}: the state has no scheduler.bin, as sd-scripts saves it for a "
                            "schedule-free optimizer, and this run's optimizer has a learning-rate schedule to "
                            "continue. Resume with the optimizer the state was saved with.")  # fmt: skip
    except (ValueError, KeyError) as e:  # torch: "... parameter group that doesn't match the size of ..."
        raise UserError(
            f"--resume {state_dir}: its optimizer or scheduler state does not fit this run ({e}). Resume with the "
            "optimizer, learning-rate and network options of the run that saved it."
        ) from None
    state_rates = list(getattr(lr_scheduler, "base_lrs", []))
    if asked_rates != state_rates:
        logger.warning("--resume %s: the schedule goes on at the state's learning rates %s, not this run's %s "
                       "(the metadata records this run's); to train at new rates, start a run from the state's LoRA "
                       "with --network_weights %s", state_dir, state_rates, asked_rates,
                       os.path.join(state_dir, "model.safetensors"))  # fmt: skip
    _say_changed_optimizer_options(state_dir, asked_groups, optimizer.param_groups, asked_options)
    rng_file = os.path.join(state_dir, f"random_states_{process_index}.pkl")
    if os.path.exists(rng_file):
        restore_rng_states(read_rng_states(rng_file))
    elif process_index == 0:
        logger.warning("--resume %s: the state has no random_states_0.pkl, so the resumed run's random draws "
                       "(dropout, caption shuffles) are not those an uninterrupted run would have made", state_dir)
    else:
        logger.warning("%s has no random_states_%d.pkl (it was saved by fewer processes): process %d keeps "
                       "its seeded random state", state_dir, process_index, process_index)  # fmt: skip
    scaler_file = os.path.join(state_dir, "scaler.pt")
    if scaler is not None and os.path.exists(scaler_file):
        scaler.load_state_dict(_load_torch(state_dir, "scaler.pt"))
    return network_state, read_progress(state_dir)


def _say_changed_optimizer_options(state_dir: str, asked: list[dict], loaded: list[dict], names) -> None:
    """torch's ``load_state_dict`` puts back the saved groups' hyper-parameters, so changed ``--optimizer_args``
    do not take effect: said as the learning rates are."""
    for before, after in zip(asked, loaded, strict=False):
        changed = [n for n in names if n in before and n in after and _differs(before[n], after[n])]
        if changed:  # every group got the same --optimizer_args: the first that differs tells it
            logger.warning("--resume %s: the optimizer goes on with the state's %s, not this run's --optimizer_args "
                           "%s; to train with new ones, start a run from the state's LoRA with --network_weights %s",
                           state_dir, ", ".join(f"{n}={after[n]}" for n in changed),
                           ", ".join(f"{n}={before[n]}" for n in changed),
                           os.path.join(state_dir, "model.safetensors"))  # fmt: skip
            return


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # betas=(0.9, 0.999) may come back a list
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b, strict=False))
    try:
        return bool(a != b)
    except (RuntimeError, TypeError, ValueError):  # tensors of several elements
        return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _load_torch(state_dir: str, name: str):
    try:
        # on the CPU: a state saved on a GPU loads on any machine; load_state_dict moves it to the parameters
        return torch.load(os.path.join(state_dir, name), map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise _damaged(state_dir, name, f"{type(e).__name__}: {e}") from None
