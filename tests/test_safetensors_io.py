"""The safetensors reader against the safetensors package: every dtype it holds, and damaged headers
refused with the file named instead of returning memory that was never written."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import CheckpointError
from library.safetensors_io import load_safetensors, read_header


def _raw_file(path, header: dict, data: bytes) -> str:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.int16])
def test_every_dtype_the_package_writes_is_read_the_same(tmp_path, dtype):
    # a training step counter stored as U32 beside the weights must not make the whole file unreadable
    tensors = {"w": torch.randn(3, 4), "step": torch.arange(6).reshape(2, 3).to(dtype)}
    save_file(tensors, str(tmp_path / "f.safetensors"))
    ours, theirs = load_safetensors(tmp_path / "f.safetensors"), load_file(str(tmp_path / "f.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key].view(torch.uint8),
                                                                    theirs[key].view(torch.uint8))  # fmt: skip


@pytest.mark.parametrize("entry, why", [
    ("a string", "its entry is not a table"),
    ({"dtype": "F32", "shape": [4]}, "data_offsets None"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 0]}, "its 0 bytes of data are not the 16 of shape [4] in F32"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "its 16 bytes of data are not the 8 of shape [2] in F32"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "shape [-4]"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "data_offsets [16, 0]"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "shape [2.0]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}, "data_offsets [0, 4, 8]"),
])
def test_a_damaged_tensor_entry_names_the_file_and_the_tensor(tmp_path, entry, why):
    path = _raw_file(tmp_path / "bad.safetensors", {"w": entry}, bytes(16))
    with pytest.raises(CheckpointError) as e:
        load_safetensors(path)
    assert str(e.value) == f"{path}: damaged header, tensor 'w': {why}; download or copy the file again"


def test_a_metadata_entry_that_is_not_a_table_is_a_damaged_header(tmp_path):
    path = _raw_file(tmp_path / "bad.safetensors", {"__metadata__": "x", "w": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: damaged header \(its __metadata__ is not a table\)"):
        read_header(path)


def test_a_dtype_this_torch_lacks_stops_only_the_tensor_that_has_it(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "odd": {"dtype": "F4_FUTURE", "shape": [2], "data_offsets": [4, 5]}}  # fmt: skip
    path = _raw_file(tmp_path / "f.safetensors", header, struct.pack("<f", 1.5) + bytes(1))
    assert set(read_header(path)[0]) == {"w", "odd"}
    assert load_safetensors(path, keys=["w"])["w"].item() == 1.5
    with pytest.raises(CheckpointError, match=r"tensor 'odd' has the dtype 'F4_FUTURE', which this torch .* cannot"):
        load_safetensors(path)


def test_an_output_on_a_drive_that_is_not_there_is_named_not_walked_up_for_ever(tmp_path, monkeypatch):
    """On Windows the parent of "Z:\\" is itself: an unplugged drive ended the walk up to an existing
    folder never (seen here with nothing existing, so that the walk reaches the root)."""
    import os
    import signal

    from library import safetensors_io
    from library.errors import UserError

    assert safetensors_io.output_folder_problem(tmp_path) is None
    (tmp_path / "f").write_text("x")
    assert safetensors_io.output_folder_problem(tmp_path / "f" / "sub") == f"{tmp_path / 'f'} is a file, not a folder"
    monkeypatch.setattr(safetensors_io.os.path, "exists", lambda path: False)
    signal.signal(signal.SIGALRM, lambda *args: pytest.fail("the walk up did not end"))
    signal.alarm(5)
    try:
        problem = safetensors_io.output_folder_problem(os.path.join(os.sep, "gone", "out"))
    finally:
        signal.alarm(0)
    assert problem == f"{os.sep} does not exist (a drive or share that is not connected?)"
    with pytest.raises(UserError, match=r"^--save_to .*m\.safetensors: .* does not exist"):
        safetensors_io.check_output_file(os.path.join(os.sep, "gone", "m.safetensors"), "--save_to")


def test_same_file_sees_through_spellings_and_links(tmp_path):
    from library.safetensors_io import same_file

    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "tuned.safetensors"
    model.write_bytes(b"x")
    os.link(model, tmp_path / "models" / "Tuned.safetensors")  # what a case-insensitive file system makes of it
    os.symlink(tmp_path / "models", tmp_path / "linked")
    assert same_file(model, tmp_path / "models" / "Tuned.safetensors")
    assert same_file(model, tmp_path / "linked" / "tuned.safetensors")
    assert same_file(tmp_path / "linked" / "new.safetensors", tmp_path / "models" / "new.safetensors")  # not there yet
    assert not same_file(model, tmp_path / "models" / "other.safetensors")


def test_on_windows_a_folder_is_tried_with_a_file_not_asked_with_os_access(tmp_path, monkeypatch):
    """There os.access reads only the read-only attribute, which folders ignore: a folder an ACL protects passed,
    and the first save failed hours later."""
    import tempfile

    from library import safetensors_io

    monkeypatch.setattr(safetensors_io.sys, "platform", "win32")
    monkeypatch.setattr(safetensors_io.os, "access", lambda *a: pytest.fail("os.access on Windows"))
    assert safetensors_io.output_folder_problem(tmp_path / "new") is None
    assert os.listdir(tmp_path) == []  # the trial file is gone

    def denied(**kwargs):
        raise PermissionError(13, "Access is denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert safetensors_io.output_folder_problem(tmp_path / "new") == (
        f"cannot write in {tmp_path} (no permission, or a read-only disk)")  # fmt: skip


def test_on_windows_a_save_onto_a_file_in_use_for_a_moment_is_tried_again(tmp_path, monkeypatch):
    """A virus scanner or indexer holding the file just saved made the next save's rename fail, and the final
    LoRA was lost; elsewhere a refused rename is an error at once."""
    from library import safetensors_io

    replace, calls = os.replace, []

    def busy_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "Access is denied")
        replace(src, dst)

    monkeypatch.setattr(safetensors_io.os, "replace", busy_twice)
    monkeypatch.setattr(safetensors_io.time, "sleep", lambda s: None)
    monkeypatch.setattr(safetensors_io.sys, "platform", "win32")
    target = tmp_path / "lora.safetensors"
    safetensors_io.save_safetensors({"w": torch.ones(2)}, target)
    assert len(calls) == 3 and torch.equal(load_safetensors(target)["w"], torch.ones(2))
    monkeypatch.setattr(safetensors_io.sys, "platform", "linux")
    calls.clear()
    with pytest.raises(PermissionError):
        safetensors_io.save_safetensors({"w": torch.zeros(2)}, target)
    assert len(calls) == 1 and torch.equal(load_safetensors(target)["w"], torch.ones(2))


def test_an_output_folder_that_cannot_be_searched_is_refused(tmp_path, monkeypatch):
    """Writable but without search (execute) permission: no file can be created in it."""
    from library.safetensors_io import output_folder_problem

    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK)  # as a folder of mode 0o666 answers
    assert output_folder_problem(tmp_path) == f"cannot write in {tmp_path} (no permission, or a read-only disk)"
