"""Nothing is lost: signals stop at a step boundary and save, disk-full and non-finite losses stop
with one clear message, and interrupted writes never leave a bad file under a final name."""

import errno
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import flux_train_network
from library.errors import UserError
from library.safetensors_io import load_safetensors
from tests.training_helpers import base_argv, dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_training(argv, own_process_group: bool = False):
    """Runs flux_train_network.py as a user would and returns (process, event set once steps run, stderr lines).
    With ``own_process_group`` it leads a process group of its own, which ``os.killpg`` signals whole."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "flux_train_network.py"), *argv],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
                               start_new_session=own_process_group)  # fmt: skip
    started, lines = threading.Event(), []

    def read():
        for line in process.stderr:
            lines.append(line)
            if "start training" in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    return process, started, lines

@pytest.mark.slow
def test_sigint_saves_lora_and_state_at_a_step_boundary_and_the_run_resumes(tiny_model_files, tmp_path):
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=100000, save_state=True, cache_latents=True,
                     network_train_unet_only=True)
    process, started, lines = start_training(argv)
    assert started.wait(120), "".join(lines)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)  # delivered twice, as by a launcher and a kill of the process group
    assert process.wait(120) == 128 + signal.SIGINT
    message = "".join(lines)
    assert "interrupted by SIGINT at step" in message and "Traceback" not in message
    saved = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(saved) == 1 and saved[0].startswith("lora-step")
    state = os.path.join(out, saved[0].replace(".safetensors", "-state"))
    assert f"--resume {state}" in message
    step = int(saved[0][len("lora-step"):-len(".safetensors")])
    assert step >= 1
    assert all(torch.isfinite(t).all() for t in load_safetensors(os.path.join(out, saved[0])).values())
    # the saved state continues to the end of a (shorter) run
    resumed = str(tmp_path / "resumed")
    assert flux_train_network.main(base_argv(tiny_model_files, data, resumed, steps=step + 2, resume=state,
                                             cache_latents=True, network_train_unet_only=True)) == 0
    assert os.path.isfile(os.path.join(resumed, "lora.safetensors"))

def test_processes_agree_on_the_signal_one_of_them_got(monkeypatch):
    """A process that got no signal called it SIGTERM whatever the other one got, and every process printed
    its own "interrupted by" message."""
    from library import interrupts
    from library.errors import TrainingInterrupted

    class TwoProcesses:  # the other process got SIGINT
        num_processes, device = 2, "cpu"

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + torch.tensor([float(s == signal.SIGINT) for s in interrupts.HANDLED])

    stop = interrupts.GracefulStop()
    assert stop.requested(TwoProcesses()) and stop.name == "SIGINT" and stop.exit_code == 130

    class Stopped:
        def train(self, args):
            raise TrainingInterrupted("interrupted by SIGINT at step 2 of 4: saved ...", 130)

    import train_network

    for rank, printed in (("1", ""), ("0", "interrupted by SIGINT at step 2 of 4: saved ...\n")):
        monkeypatch.setenv("RANK", rank)
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        assert train_network.main([], trainer=Stopped()) == 130
        assert stderr.getvalue() == printed


def test_on_windows_a_second_signal_exits_with_the_status_of_a_signal(monkeypatch):
    """os.kill(own pid, SIGINT) is TerminateProcess with exit status 2 on Windows, not 130."""
    from library import interrupts

    exits = []
    monkeypatch.setattr(interrupts.sys, "platform", "win32")
    monkeypatch.setattr(interrupts.os, "_exit", exits.append)
    monkeypatch.setattr(interrupts.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    monkeypatch.setattr(interrupts, "REPEAT_GRACE_S", 0.0)
    with interrupts.GracefulStop() as stop:
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGINT, None)
    assert exits == [130]


def test_a_second_signal_after_the_grace_time_exits_at_once(monkeypatch):
    from library import interrupts

    killed = []
    monkeypatch.setattr(interrupts.os, "kill", lambda pid, signum: killed.append(signum))
    with interrupts.GracefulStop() as stop:
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGTERM, None)  # the same request delivered twice
        assert stop.name == "SIGTERM" and killed == []
        monkeypatch.setattr(interrupts, "REPEAT_GRACE_S", 0.0)
        stop._handle(signal.SIGTERM, None)
        assert killed == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

def test_a_stop_between_micro_batches_saves_the_last_finished_step(tiny_model_files, tmp_path, monkeypatch):
    """With accumulation the loop does not wait for the step to finish (a launcher may kill it first):
    it saves the weights and state of the last finished step, and a resume redoes the partial one."""
    batch_loss, calls = flux_train_network.FluxNetworkTrainer.batch_loss, []

    def signalled_in_step_two(self, ctx, batch, step, indices):
        calls.append(step)
        if len(calls) == 4:  # the first micro-batch of the second step
            os.kill(os.getpid(), signal.SIGINT)
        return batch_loss(self, ctx, batch, step, indices)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", signalled_in_step_two)
    data = dataset(tmp_path, batch_size=1)
    flags = dict(steps=3, gradient_accumulation_steps=3, network_train_unet_only=True, network_dropout=0.3)
    out = str(tmp_path / "out")
    stopped_run = base_argv(tiny_model_files, data, out, save_state=True, **flags)
    assert flux_train_network.main(stopped_run) == 128 + signal.SIGINT
    assert calls == [0, 0, 0, 1]
    assert sorted(os.listdir(out)) == ["lora-step00000001-state", "lora-step00000001.safetensors"]
    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", batch_loss)
    one_step = str(tmp_path / "one_step")
    assert flux_train_network.main(base_argv(tiny_model_files, data, one_step, **{**flags, "steps": 1})) == 0
    stopped = load_safetensors(os.path.join(out, "lora-step00000001.safetensors"))
    for key, value in load_safetensors(os.path.join(one_step, "lora.safetensors")).items():
        torch.testing.assert_close(stopped[key], value, rtol=0, atol=0, msg=key)
    # the state holds the random state of the step's end, so the resumed run redoes the step's start exactly
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert flux_train_network.main(base_argv(tiny_model_files, data, straight, **flags)) == 0
    state = os.path.join(out, "lora-step00000001-state")
    assert flux_train_network.main(base_argv(tiny_model_files, data, resumed, resume=state, **flags)) == 0
    a = load_safetensors(os.path.join(straight, "lora.safetensors"))
    b = load_safetensors(os.path.join(resumed, "lora.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)

@pytest.mark.slow
def test_a_signal_delivered_twice_stops_once_without_half_written_files(tiny_model_files, tmp_path):
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=100000, save_every_n_steps=1, cache_latents=True,
                     network_train_unet_only=True)
    process, started, lines = start_training(argv)
    assert started.wait(120), "".join(lines)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)  # within the grace time: the same request
    assert process.wait(60) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM at step" in "".join(lines)
    for name in os.listdir(out):  # every final name is complete
        if name.endswith(".safetensors") and not name.startswith("."):
            assert load_safetensors(os.path.join(out, name))

def test_non_finite_loss_stops_naming_the_step_and_the_last_good_file(tiny_model_files, tmp_path, capsys):
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=6, learning_rate=1e12, save_every_n_steps=1,
                     network_train_unet_only=True, max_grad_norm=0)
    assert flux_train_network.main(argv) == 1
    err = capsys.readouterr().err
    assert "the loss became" in err and "fp16 overflow" in err and "learning rate too high" in err
    assert "Traceback" not in err
    # the step-1 weights are finite but gave the NaN at step 2: the message says so and names what came before
    assert "the loss became nan at step 2" in err
    assert "lora-step00000001.safetensors, holds the weights that gave this loss" in err
    assert "may be bad too; the one before it is: none\n" in err
    assert not os.path.exists(os.path.join(out, "lora.safetensors"))
    for name in os.listdir(out):
        for tensor in load_safetensors(os.path.join(out, name)).values():
            assert torch.isfinite(tensor).all(), name

def test_nan_latents_of_an_image_are_named_and_trained_on_as_zeros(tiny_model_files, tmp_path, monkeypatch, caplog):
    """Encoded each step (no latent cache), an AE output with NaN names its image and trains on, as
    sd-scripts does (it zeroes them without a name); the cache refuses them before training instead."""
    from library.flux_ae import AutoEncoder

    encode = AutoEncoder.encode

    def nan_for_the_first_image(self, x, sample=True):
        latents = encode(self, x, sample)
        latents[0, 0, 0, 0] = float("nan")
        return latents

    monkeypatch.setattr(AutoEncoder, "encode", nan_for_the_first_image)
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        assert flux_train_network.main(base_argv(tiny_model_files, data, out, steps=1,
                                                 network_train_unet_only=True)) == 0  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "NaN in the latents of" in r.getMessage()]
    assert len(warnings) == 1 and os.path.join(data.image_dir, "") in warnings[0], warnings
    assert "trained on as zeros" in warnings[0]
    for tensor in load_safetensors(os.path.join(out, "lora.safetensors")).values():
        assert torch.isfinite(tensor).all()

@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("-inf"), "inf")])
def test_nan_in_a_latent_cache_written_elsewhere_is_named_too(tiny_model_files, tmp_path, caplog, value, word):
    """A cache file this trainer did not write (this one refuses NaN and inf when it caches) is checked on the
    CPU; inf is zeroed too (it made the loss NaN)."""
    import numpy as np

    data = dataset(tmp_path, batch_size=1)
    flags = dict(network_train_unet_only=True, cache_latents_to_disk=True)
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(tmp_path / "first"), steps=1, **flags)) == 0
    cache = sorted(f for f in os.listdir(data.image_dir) if f.endswith("_flux.npz"))[0]
    path = os.path.join(data.image_dir, cache)
    with np.load(path) as npz:
        arrays = dict(npz)
    key = next(k for k in arrays if k.startswith("latents_"))
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = value
    np.savez(path, **arrays)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        assert flux_train_network.main(base_argv(tiny_model_files, data, out, steps=6, **flags)) == 0
    warnings = [r.getMessage() for r in caplog.records if "in the latents of" in r.getMessage()]
    image = re.sub(r"_\d+x\d+_flux\.npz$", ".png", cache)  # sd-scripts' cache name: <stem>_<W>x<H>_flux.npz
    assert warnings and all(f"{word} in the latents of {os.path.join(data.image_dir, image)} (" in w for w in warnings)
    for tensor in load_safetensors(os.path.join(out, "lora.safetensors")).values():
        assert torch.isfinite(tensor).all()

@pytest.mark.parametrize("raised_by", ["os", "safetensors"])  # safetensors' writer raises its own error type
def test_disk_full_while_saving_is_one_clear_error_and_earlier_files_survive(tiny_model_files, tmp_path, capsys,
                                                                            monkeypatch, raised_by):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def save_until_the_disk_fills(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) >= 2:
            with open(filename, "wb") as f:
                f.write(b"partial")
            if raised_by == "safetensors":
                raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_the_disk_fills)
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=4, save_every_n_steps=1, network_train_unet_only=True)
    assert flux_train_network.main(argv) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "lora-step00000002.safetensors" in err
    assert "No space left on device" in err and "lora-step00000001.safetensors" in err
    assert sorted(os.listdir(out)) == ["lora-step00000001.safetensors"]
    assert load_safetensors(os.path.join(out, "lora-step00000001.safetensors"))

def test_a_foreign_state_is_still_named_after_an_fp16_step_the_scaler_skipped():
    """The first step after --resume may overflow in fp16 and be skipped: the state is known to fit only once
    a step has run, so a later KeyError still gets the --resume message, not a traceback. A skipped step
    leaves the learning-rate schedule where it was (accelerate's scheduler wrapper, which sd-scripts
    steps, does the same)."""
    import types

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from library.training_loop import TrainingLoop

    Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    saved_by = torch.optim.RMSprop([weight], lr=1e-3)  # a state of another optimizer, which torch loads
    weight.grad = torch.ones(2, 2)
    saved_by.step()
    adam = torch.optim.AdamW([weight], lr=1e-3)
    adam.load_state_dict(saved_by.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = AcceleratedOptimizer(adam, device_placement=False, scaler=scaler)

    class Accelerated(types.SimpleNamespace):
        num_processes = 1

        def clip_grad_norm_(self, *args, **kwargs):
            pass

        @property
        def optimizer_step_was_skipped(self):
            return optimizer.step_was_skipped

    ticks = []
    loop = types.SimpleNamespace(
        args=types.SimpleNamespace(max_grad_norm=0, scale_weight_norms=None), accelerator=Accelerated(),
        network=torch.nn.ParameterList([weight]), optimizer=optimizer,
        lr_scheduler=types.SimpleNamespace(step=lambda: ticks.append(1), get_last_lr=lambda: [1e-3]),
        lr_descriptions=["unet"],
        adapts_step_size=False, unchecked_state="lora-state",
    )  # fmt: skip
    loop._checking_resumed_state = types.MethodType(TrainingLoop._checking_resumed_state, loop)
    scaler.scale(torch.tensor(1.0))  # as a scaled loss would
    weight.grad = torch.full((2, 2), float("inf"))  # overflows: the scaler skips the step
    TrainingLoop._optimizer_step(loop)
    assert optimizer.step_was_skipped and loop.unchecked_state == "lora-state"
    assert ticks == []
    scaler.scale(torch.tensor(1.0))
    weight.grad = torch.ones(2, 2)
    with pytest.raises(UserError, match=r"--resume lora-state: its optimizer state does not fit this run's optimizer"):
        TrainingLoop._optimizer_step(loop)

@pytest.mark.parametrize("max_grad_norm", [0, 1e9])
def test_ggpo_reads_unscaled_gradients_and_keeps_its_norms_through_a_skipped_fp16_step(max_grad_norm):
    """GGPO's perturbation follows the gradients' norms: under fp16 they are read unscaled (with or without
    clipping, which unscales too), and a step the scaler skips for inf gradients leaves the last norms (the
    inf ones made every later loss NaN)."""
    import types

    from accelerate.optimizer import AcceleratedOptimizer

    from library.training_loop import TrainingLoop

    weight = torch.nn.Parameter(torch.zeros(2, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([weight], lr=1e-3), device_placement=False, scaler=scaler)
    seen = []

    class Network(torch.nn.ParameterList):
        def update_grad_norms(self):
            seen.append(weight.grad.clone())

        def update_norms(self):
            pass

    class Accelerated(types.SimpleNamespace):
        num_processes = 1

        def clip_grad_norm_(self, params, max_norm):  # as accelerate's under fp16: unscaled, then clipped
            self.unscale_gradients()
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        def unscale_gradients(self):
            scaler.unscale_(optimizer.optimizer)

        @property
        def optimizer_step_was_skipped(self):
            return optimizer.step_was_skipped

    loop = types.SimpleNamespace(
        args=types.SimpleNamespace(max_grad_norm=max_grad_norm, scale_weight_norms=None),
        accelerator=Accelerated(scaler=scaler), network=Network([weight]), optimizer=optimizer,
        lr_scheduler=types.SimpleNamespace(step=lambda: None, get_last_lr=lambda: [1e-3]), lr_descriptions=["unet"],
        adapts_step_size=False, unchecked_state=None,
    )  # fmt: skip
    loop._checking_resumed_state = types.MethodType(TrainingLoop._checking_resumed_state, loop)
    scaler.scale(torch.tensor(1.0))  # as a scaled loss would
    weight.grad = torch.full((2, 2), 3.0) * 2.0**16  # a true gradient of 3, scaled
    TrainingLoop._optimizer_step(loop)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((2, 2), 3.0))
    scaler.scale(torch.tensor(1.0))
    weight.grad = torch.full((2, 2), float("inf"))  # overflows: the scaler skips the step
    TrainingLoop._optimizer_step(loop)
    assert optimizer.step_was_skipped and len(seen) == 1


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_data_loader_workers_still_saves(tiny_model_files, tmp_path):
    """`timeout`, a terminal's Ctrl+C or a launcher signal the whole process group, DataLoader workers included:
    they leave the stop to the trainer, which saves, instead of dying under it mid-batch."""
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=100000, network_train_unet_only=True,
                     max_data_loader_n_workers=2, persistent_data_loader_workers=True)  # fmt: skip
    process, started, lines = start_training(argv, own_process_group=True)
    assert started.wait(120), "".join(lines)
    time.sleep(2.0)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(120) == 128 + signal.SIGTERM, "".join(lines)
    message = "".join(lines)
    assert "interrupted by SIGTERM at step" in message and "Traceback" not in message
    assert any(f.startswith("lora-step") and f.endswith(".safetensors") for f in os.listdir(out))

def test_a_state_that_does_not_fit_on_the_disk_costs_the_state_alone(tiny_model_files, tmp_path, capsys,
                                                                     monkeypatch):
    """The final LoRA is written before the final state: a disk with room for the LoRA keeps it."""
    import library.safetensors_io

    def no_room(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(library.safetensors_io, "write_torch_file", no_room)
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=1, save_state=True, network_train_unet_only=True)
    assert flux_train_network.main(argv) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "lora-state" in err and "Free space on that disk" in err
    assert f"the last good file is {os.path.join(out, 'lora.safetensors')}" in err
    assert sorted(os.listdir(out)) == ["lora.safetensors"]

def test_a_signal_during_the_final_save_lets_it_finish(tiny_model_files, tmp_path, monkeypatch):
    from networks.lora_flux import LoRANetwork

    save = LoRANetwork.save_weights

    def signalled_while_saving(self, file, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save(self, file, *args, **kwargs)

    monkeypatch.setattr(LoRANetwork, "save_weights", signalled_while_saving)
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    assert flux_train_network.main(base_argv(tiny_model_files, data, out, steps=1, network_train_unet_only=True)) == 0
    assert sorted(os.listdir(out)) == ["lora.safetensors"]
    assert load_safetensors(os.path.join(out, "lora.safetensors"))

def test_a_signal_during_a_checkpoint_save_does_not_save_that_step_again(tiny_model_files, tmp_path, monkeypatch):
    from networks.lora_flux import LoRANetwork

    save, saved = LoRANetwork.save_weights, []

    def signalled_while_saving(self, file, *args, **kwargs):
        saved.append(os.path.basename(file))
        if len(saved) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, file, *args, **kwargs)

    monkeypatch.setattr(LoRANetwork, "save_weights", signalled_while_saving)
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=3, save_every_n_steps=1, save_state=True,
                     network_train_unet_only=True)
    assert flux_train_network.main(argv) == 128 + signal.SIGINT
    assert saved == ["lora-step00000001.safetensors"]
    assert sorted(os.listdir(out)) == ["lora-step00000001-state", "lora-step00000001.safetensors"]

@pytest.mark.slow
def test_an_error_in_a_data_loader_worker_ends_the_run_with_its_message(tiny_model_files, tmp_path):
    """Workers ignore SIGTERM (a signal to the process group must not end them before the trainer saves),
    so Python's exit, which terminates them and waits, waited for ever after an error raised in one."""
    data = dataset(tmp_path, batch_size=1)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=3, max_data_loader_n_workers=2,
                     cache_text_encoder_outputs=True, network_train_unet_only=True)
    script = (
        "import sys, torch.utils.data, flux_train_network\n"
        "from library.datasets import DatasetGroup\n"
        "from library.errors import UserError\n"
        "item = DatasetGroup.__getitem__\n"
        "def broken(self, index):\n"
        "    if torch.utils.data.get_worker_info() is not None:\n"
        "        raise UserError('cannot read /data/x.png: truncated')\n"
        "    return item(self, index)\n"
        "DatasetGroup.__getitem__ = broken\n"
        "sys.exit(flux_train_network.main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert "error: cannot read /data/x.png: truncated\n" in done.stderr
    assert "Traceback" not in done.stderr

def test_an_error_subclass_raised_in_a_worker_is_its_own_message():
    from library.errors import CheckpointError
    from library.training_loop import _workers_shut_down_on_error

    wrapped = ("Caught CheckpointError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nlibrary.errors.CheckpointError: /m/a.safetensors: damaged\nsecond line')
    with pytest.raises(CheckpointError) as raised:
        with _workers_shut_down_on_error([]):
            raise CheckpointError(wrapped)
    assert str(raised.value) == "/m/a.safetensors: damaged\nsecond line"


def test_an_older_save_that_cannot_be_pruned_is_said_and_the_run_goes_on(tiny_model_files, tmp_path, monkeypatch,
                                                                          caplog):  # fmt: skip
    """On Windows a file another program has open cannot be removed: the PermissionError ended the run."""
    from library import train_state

    def in_use(path):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(train_state.os, "remove", in_use)
    data = dataset(tmp_path, batch_size=1)
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, data, str(out), steps=3, save_every_n_steps=1, save_last_n_steps=1,
                     network_train_unet_only=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    assert sorted(os.listdir(out)) == ["lora-step00000001.safetensors", "lora-step00000002.safetensors",
                                       "lora-step00000003.safetensors", "lora.safetensors"]  # fmt: skip
    assert f"could not remove the older save {out / 'lora-step00000001.safetensors'} (The process cannot" in caplog.text


def test_an_older_state_with_a_file_in_use_is_kept_whole_and_said(tiny_model_files, tmp_path, monkeypatch, caplog):
    """rmtree ignored its errors: on Windows a state folder with a file open elsewhere was left half deleted."""
    from library import run_saves

    replace = os.replace

    def in_use(src, dst):
        if os.path.basename(str(src)) == "lora-step00000001-state":
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process")  # fmt: skip
        return replace(src, dst)

    monkeypatch.setattr(run_saves.os, "replace", in_use)
    data = dataset(tmp_path, batch_size=1)
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, data, str(out), steps=3, save_every_n_steps=1, save_last_n_steps=1,
                     save_state=True, network_train_unet_only=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    assert "lora-step00000001-state" in os.listdir(out) and not [n for n in os.listdir(out) if n.startswith(".")]
    assert sorted(os.listdir(out / "lora-step00000001-state")) == sorted(os.listdir(out / "lora-state"))  # whole
    assert f"could not remove the older save {out / 'lora-step00000001-state'} (The process cannot" in caplog.text
