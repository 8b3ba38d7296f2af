"""Training-state folders and saved files: atomic writes, a full disk as one clear error, damaged states
named before any work, the cleanup after a killed run, and what --resume restores."""

import errno
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import flux_train_network
from library.errors import UserError
from library.safetensors_io import load_safetensors
from library.train_state import TrainProgress, load_training_state, save_training_state


def test_failed_state_save_keeps_the_older_state(tmp_path, monkeypatch):
    network = {"w": torch.ones(2)}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = str(tmp_path / "lora-state")
    save_training_state(state, network, optimizer, scheduler, TrainProgress(1, 3, 7))
    import library.safetensors_io

    def fail_on_scheduler(path, *args, **kwargs):  # the disk fills while scheduler.bin is written
        if str(path).endswith("scheduler.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(library.safetensors_io, "open", fail_on_scheduler, raising=False)
    with pytest.raises(OSError):
        save_training_state(state, {"w": torch.zeros(2)}, optimizer, scheduler, TrainProgress(1, 5, 7))
    assert sorted(os.listdir(tmp_path)) == ["lora-state"]
    assert json.loads((tmp_path / "lora-state" / "train_state.json").read_text()) == {
        "current_epoch": 1, "current_step": 3, "optimizer": "torch.optim.sgd.SGD", "seed": 7}  # fmt: skip
    assert torch.equal(load_safetensors(os.path.join(state, "model.safetensors"))["w"], torch.ones(2))


def test_state_keeps_each_process_rng_and_each_process_resumes_its_own(tmp_path, caplog):
    """A multi-process run gathers every process's RNG into random_states_<rank>.pkl; on resume each
    process restores its own, and a process the state has none for keeps its seeded RNG."""
    from library.train_state import capture_rng_states, load_training_state

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    per_process = []
    for seed in (11, 22):
        torch.manual_seed(seed)
        per_process.append(capture_rng_states())
    state = str(tmp_path / "lora-state")
    save_training_state(state, {"w": torch.ones(2)}, optimizer, scheduler, TrainProgress(1, 3), rng_states=per_process)
    assert sorted(f for f in os.listdir(state) if f.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # fmt: skip

    draws = []
    for rank in (0, 1):
        torch.manual_seed(99)
        load_training_state(state, optimizer, scheduler, process_index=rank)
        draws.append(torch.rand(3))
    for seed, drawn in zip((11, 22), draws, strict=True):
        torch.manual_seed(seed)
        assert torch.equal(drawn, torch.rand(3))

    torch.manual_seed(99)
    with caplog.at_level(logging.WARNING):
        load_training_state(state, optimizer, scheduler, process_index=2)
    assert "has no random_states_2.pkl" in caplog.text
    drawn = torch.rand(3)
    torch.manual_seed(99)
    assert torch.equal(drawn, torch.rand(3))


def _sgd_state(tmp_path, lr=0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = str(tmp_path / "lora-state")
    save_training_state(state, {"w": torch.ones(2)}, optimizer, scheduler, TrainProgress(1, 3))
    return state


def test_a_state_from_an_older_optimizer_version_with_fewer_hyper_parameters_loads(tmp_path):
    """Optimizers fill in hyper-parameters added since (torch's own; bitsandbytes reads them with defaults):
    a state without some of them is not a state of another optimizer."""
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 1.0)
    adam.param_groups[0]["params"][0].grad = torch.ones(2)
    adam.step()
    state = str(tmp_path / "lora-state")
    save_training_state(state, {"w": torch.ones(2)}, adam, scheduler, TrainProgress(1, 3))
    saved = torch.load(os.path.join(state, "optimizer.bin"), weights_only=False)
    for key in ("foreach", "capturable", "differentiable", "fused", "maximize"):
        saved["param_groups"][0].pop(key, None)
    torch.save(saved, os.path.join(state, "optimizer.bin"))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    load_training_state(state, fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0))
    fresh.param_groups[0]["params"][0].grad = torch.ones(2)
    fresh.step()


def test_resuming_with_another_learning_rate_says_the_states_rates_go_on(tmp_path, caplog):
    state = _sgd_state(tmp_path, lr=0.1)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)
    with caplog.at_level(logging.WARNING):
        load_training_state(state, sgd, scheduler)
    assert "the schedule goes on at the state's learning rates [0.1], not this run's [0.05]" in caplog.text
    assert sgd.param_groups[0]["lr"] == 0.1  # as in sd-scripts: the state's
    caplog.clear()
    same = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    with caplog.at_level(logging.WARNING):
        load_training_state(state, same, torch.optim.lr_scheduler.LambdaLR(same, lambda s: 1.0))
    assert not caplog.records


def test_resuming_with_other_optimizer_args_says_the_states_go_on(tmp_path, caplog):
    """torch's load_state_dict puts back the saved groups' hyper-parameters: --optimizer_args changed for the
    resumed run were dropped without a word (and ss_optimizer recorded the new ones)."""
    state = _sgd_state(tmp_path)  # momentum 0.9, weight_decay 0
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.5, weight_decay=0.01)
    with caplog.at_level(logging.WARNING):
        load_training_state(state, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0),
                            asked_options=("momentum", "weight_decay", "nesterov"))  # fmt: skip
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 0
    assert ("the optimizer goes on with the state's momentum=0.9, weight_decay=0, not this run's --optimizer_args "
            "momentum=0.5, weight_decay=0.01") in caplog.text
    caplog.clear()
    same = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    with caplog.at_level(logging.WARNING):
        load_training_state(state, same, torch.optim.lr_scheduler.LambdaLR(same, lambda s: 1.0),
                            asked_options=("momentum",))  # fmt: skip
    assert not caplog.records


def test_a_sequence_option_saved_as_a_list_is_the_same_as_a_tuple(tmp_path, caplog):
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1, betas=(0.8, 0.99))
    state = str(tmp_path / "lora-state")
    save_training_state(state, {"w": torch.ones(2)}, adam, torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 1.0),
                        TrainProgress(1, 3))  # fmt: skip
    saved = torch.load(os.path.join(state, "optimizer.bin"), weights_only=False)
    saved["param_groups"][0]["betas"] = [0.8, 0.99]  # as another writer may store it
    torch.save(saved, os.path.join(state, "optimizer.bin"))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1, betas=(0.8, 0.99))
    with caplog.at_level(logging.WARNING):
        load_training_state(state, fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0),
                            asked_options=("betas",))  # fmt: skip
    assert not caplog.records


def test_a_state_whose_step_falls_in_another_epoch_of_this_run_is_said(tmp_path, caplog):
    """Another batch size, repeats or accumulation mapped the state's step onto another epoch without a word."""
    import argparse

    from library.run_start import check_resume_step

    state = _sgd_state(tmp_path)  # step 3, saved in epoch 1
    args = argparse.Namespace(resume=state, max_train_steps=20)
    with caplog.at_level(logging.WARNING):
        check_resume_step(args, None, 3)
        check_resume_step(args, None, 4)
        check_resume_step(args, 6, 2)  # --initial_step given: it wins over the state's step
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        check_resume_step(args, None, 2)
    assert (f"--resume {state}: the state was saved at step 3 in epoch 1, but with this run's 2 steps per epoch that "
            "step falls in epoch 2") in caplog.text
    with pytest.raises(UserError, match="the state is at step 3, and this run has 3 steps"):
        check_resume_step(argparse.Namespace(resume=state, max_train_steps=3), None, 2)


def test_a_state_saved_where_more_gpus_were_visible_resumes_on_fewer(tmp_path, monkeypatch):
    """torch.cuda.get_rng_state_all() holds one state per visible GPU: restoring a 2-GPU machine's state
    on a 1-GPU one raised IndexError, and the state was refused as damaged."""
    import pickle

    from library.train_state import check_state_dir, restore_rng_states

    state = _sgd_state(tmp_path)
    rng_file = os.path.join(state, "random_states_0.pkl")
    with open(rng_file, "rb") as f:
        states = pickle.load(f)
    cuda_states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    with open(rng_file, "wb") as f:
        pickle.dump(states | {"cuda": cuda_states}, f)
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])

    def set_rng_state(new_state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if (index or 0) >= 1:
            raise IndexError("list index out of range")  # as torch on a machine with one GPU
        restored[index or 0] = new_state

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda new_states: [set_rng_state(s, i) for i, s in enumerate(new_states)])  # fmt: skip
    check_state_dir(state)  # not damaged
    restore_rng_states(states | {"cuda": cuda_states})
    assert list(restored) == [0] and torch.equal(restored[0], cuda_states[0])


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"a"'])
def test_a_train_state_json_that_is_not_an_object_is_named(tmp_path, content):
    from library.train_state import check_state_dir

    state = _sgd_state(tmp_path)
    with open(os.path.join(state, "train_state.json"), "w") as f:
        f.write(content)
    with pytest.raises(UserError, match=f"--resume {re.escape(state)}: train_state.json is damaged"):
        check_state_dir(state)


def test_a_lora_file_given_to_resume_is_told_apart_from_a_missing_folder(tmp_path):
    from library.train_state import check_state_dir

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"x")
    with pytest.raises(UserError) as raised:
        check_state_dir(str(lora))
    assert str(raised.value) == (f"--resume {lora}: a file, not a training state folder. Give a '...-state' folder "
                                 f"written by --save_state, or start a new run from a LoRA file with "
                                 f"--network_weights {lora}.")  # fmt: skip


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a device that is always full")
def test_a_full_disk_while_writing_a_state_file_is_an_oserror_with_its_errno():
    """torch.save's own writer reports a full disk as a RuntimeError without an errno, which the trainer
    did not take for a failed write (a raw traceback, and the final LoRA, saved after the state, lost)."""
    from library.safetensors_io import write_torch_file

    with pytest.raises(RuntimeError):
        torch.save({"m": torch.ones(100000)}, "/dev/full")
    with pytest.raises(OSError) as raised:
        write_torch_file({"m": torch.ones(100000)}, "/dev/full")
    assert raised.value.errno == errno.ENOSPC


def test_safetensors_write_errors_keep_their_errno(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    from library.safetensors_io import save_safetensors

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as raised:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    assert raised.value.errno == errno.ENOSPC and "No space left on device" in str(raised.value)
    assert os.listdir(tmp_path) == []


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # bytes changed in the middle: only a checksum notices
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("name, how", [
    ("optimizer.bin", "truncated"), ("optimizer.bin", "flipped"), ("scheduler.bin", "truncated"),
    ("random_states_0.pkl", "truncated"), ("model.safetensors", "truncated"),
])  # fmt: skip
def test_a_damaged_state_file_stops_before_any_work_naming_it(tmp_path, name, how):
    from library.train_state import check_state_dir

    state = _sgd_state(tmp_path)
    _damage(os.path.join(state, name), how)
    with pytest.raises(UserError, match=f"--resume {re.escape(state)}: {re.escape(name)} is damaged") as raised:
        check_state_dir(state)
    assert ("--network_weights" in str(raised.value)) == (name != "model.safetensors")


def test_random_states_of_the_wrong_kind_are_damage_too(tmp_path):
    import pickle

    from library.train_state import check_state_dir

    state = _sgd_state(tmp_path)
    with open(os.path.join(state, "random_states_0.pkl"), "wb") as f:
        pickle.dump({"python": "not a state", "numpy": None, "torch": torch.zeros(3)}, f)
    before = torch.get_rng_state()
    with pytest.raises(UserError, match="random_states_0.pkl is damaged"):
        check_state_dir(state)
    assert torch.equal(torch.get_rng_state(), before)  # trying the file left the generators as they were


def test_a_state_without_random_states_resumes_with_a_warning(tmp_path, caplog):
    state = _sgd_state(tmp_path)
    os.remove(os.path.join(state, "random_states_0.pkl"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    with caplog.at_level(logging.WARNING):
        load_training_state(state, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    assert "has no random_states_0.pkl" in caplog.text and "not those an uninterrupted run" in caplog.text


def test_temporaries_a_killed_run_left_are_cleaned_up_and_no_others(tmp_path):
    from library.train_state import remove_abandoned_temporaries

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, alive, me = gone.pid, os.getppid(), os.getpid()  # (this process is about to run: its own are leftovers)
    out = tmp_path / "run1"  # --output_name run1/lora writes into a folder of --output_dir
    out.mkdir()
    for name in (f".lora-step00000002.safetensors.tmp-{dead}", f".lora.safetensors.tmp-{me}",  # killed saves
                 f".lora_v2.safetensors.tmp-{dead}", f".other.safetensors.tmp-{dead}",  # other runs'
                 f".lora.safetensors.tmp-{alive}"):  # still being written
        (out / name).mkdir()
        (out / name / ".tmpAbC123").write_bytes(b"x")  # what safetensors writes inside before its rename
    for name in (f".lora-state.tmp-{dead}", f".lora-state.tmp-{dead}.old",  # killed between the two renames
                 f".lora-000001-state.tmp-{dead}", f".lora-000001-state.tmp-{dead}.old", "lora-000001-state"):
        (out / name).mkdir()
    (out / f".lora-state.tmp-{dead}.old" / "model.safetensors").write_bytes(b"the state it replaced")
    cleaned = remove_abandoned_temporaries(str(tmp_path), "run1/lora")
    assert cleaned == [os.path.join("run1", n) for n in sorted([
        f".lora-000001-state.tmp-{dead}", f".lora-000001-state.tmp-{dead}.old", f".lora-state.tmp-{dead}",
        f".lora-state.tmp-{dead}.old", f".lora-step00000002.safetensors.tmp-{dead}", f".lora.safetensors.tmp-{me}"])]
    assert sorted(os.listdir(out)) == sorted([f".lora_v2.safetensors.tmp-{dead}", f".other.safetensors.tmp-{dead}",
                                              f".lora.safetensors.tmp-{alive}", "lora-000001-state", "lora-state"])
    # the state that was being replaced, and whose replacement never arrived, is put back
    assert (out / "lora-state" / "model.safetensors").read_bytes() == b"the state it replaced"
    assert remove_abandoned_temporaries(str(tmp_path), None) == []  # default names are too generic to claim


def test_on_windows_the_writer_of_a_temporary_is_looked_up_without_a_signal(tmp_path, monkeypatch):
    """os.kill(pid, 0) is Ctrl+C to pid's console group on Windows (0 is CTRL_C_EVENT), and raised OSError for a
    process that is gone: every run into that folder then ended in a traceback."""
    import types

    from library import train_state

    processes = {111: 259, 222: 0}  # running (STILL_ACTIVE), exited with 0

    def open_process(access, inherit, pid):
        if pid == 444:
            raise OSError(13, "Access is denied")  # another user's: it is there
        if pid not in processes:
            error = OSError(22, "The parameter is incorrect")
            error.winerror = 87
            raise error
        return pid

    closed = []
    winapi = types.SimpleNamespace(OpenProcess=open_process, GetExitCodeProcess=processes.__getitem__,
                                   CloseHandle=closed.append)  # fmt: skip
    monkeypatch.setitem(sys.modules, "_winapi", winapi)
    monkeypatch.setattr(train_state.sys, "platform", "win32")
    monkeypatch.setattr(train_state.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    for pid in (111, 222, 333, 444):
        (tmp_path / f".lora.safetensors.tmp-{pid}").mkdir()
    cleaned = train_state.remove_abandoned_temporaries(str(tmp_path), "lora")
    assert cleaned == [".lora.safetensors.tmp-222", ".lora.safetensors.tmp-333"]
    assert closed == [111, 222]


def test_a_cleaned_temporary_on_another_drive_is_named_whole(tmp_path, monkeypatch):
    """An absolute --output_name on another drive than --output_dir: relpath raised ValueError on Windows."""
    from library import train_state

    def across_drives(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f".lora.safetensors.tmp-{gone.pid}").mkdir()
    monkeypatch.setattr(train_state.os.path, "relpath", across_drives)
    cleaned = train_state.remove_abandoned_temporaries(str(tmp_path / "out"), str(tmp_path / "lora"))
    assert cleaned == [str(tmp_path / f".lora.safetensors.tmp-{gone.pid}")]


def test_a_safetensors_save_writes_inside_a_folder_of_its_own_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """safetensors writes a temporary of its own naming beside its target: inside a folder named after this
    process, a killed save leaves something the next run recognises."""
    import safetensors.torch

    from library.safetensors_io import save_safetensors

    written = []

    def failing(tensors, filename, metadata=None):
        written.append(filename)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError):
        save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    assert written == [str(tmp_path / f".a.safetensors.tmp-{os.getpid()}" / "a.safetensors")]
    assert os.listdir(tmp_path) == []


def test_the_resume_seed_is_the_states_unless_given_and_another_one_is_said(tmp_path, caplog):
    from library.train_state import resume_seed

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = str(tmp_path / "lora-state")
    save_training_state(state, {"w": torch.ones(2)}, optimizer, scheduler, TrainProgress(1, 3, 1234))
    with caplog.at_level(logging.INFO):
        assert resume_seed(state, None) == 1234
        assert resume_seed(state, 1234) == 1234
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert resume_seed(state, 5) == 5
    assert "--seed 5 is not the seed 1234 of the run that saved it" in caplog.text
    caplog.clear()
    older = _sgd_state(tmp_path / "older")  # sd-scripts' states, and older ones, record no seed
    with caplog.at_level(logging.WARNING):
        assert resume_seed(older, None) is None
    assert "records no seed" in caplog.text and "give that run's --seed" in caplog.text


def test_a_seed_given_for_a_state_without_one_is_used_without_a_warning(tmp_path, caplog):
    from library.train_state import resume_seed

    older = _sgd_state(tmp_path)  # records no seed: there is none to differ from
    with caplog.at_level(logging.INFO):
        assert resume_seed(older, 5) == 5
    assert not caplog.records

def test_network_weights_beside_resume_say_the_state_replaces_them(tmp_path, caplog):
    state = _sgd_state(tmp_path)
    weights = str(tmp_path / "start.safetensors")
    torch.save({}, weights)
    args = flux_train_network.setup_parser().parse_args(
        ["--resume", state, "--network_weights", weights, "--output_dir", str(tmp_path / "out")])
    with caplog.at_level(logging.WARNING):
        flux_train_network.FluxNetworkTrainer().check_inputs_before_loading(args)
    assert f"--network_weights {weights}: its weights are replaced by those of the --resume state" in caplog.text
