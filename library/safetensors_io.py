"""Reading and writing `.safetensors` files.

The reader parses the header itself and reads each tensor straight into its own buffer
with ``readinto``: no memory map is touched, so loading a checkpoint grows the process by
the size of the tensors kept and nothing more (a memory map would count the file's pages
on top of the copies). Writes go to a temporary name and are renamed into place.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from library.errors import CheckpointError, UserError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# unsigned and newer fp8 types, where this torch has them (a training step counter is stored as U32, say)
DTYPES.update({name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
               ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)})  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
logger = logging.getLogger(__name__)
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Returns ``(tensor_entries, metadata, data_start)`` of a safetensors file.

    Raises CheckpointError naming the file if it is missing, truncated or not safetensors.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder; give a single .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: not a .safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path}: not a .safetensors file, or a damaged one (bad header length); give a .safetensors "
                "file, or download or copy it again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a .safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a .safetensors file (header is not a table)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: damaged header (its __metadata__ is not a table)")
    data_start = 8 + header_len
    data_len = 0
    for name, entry in header.items():
        data_len = max(data_len, _checked_entry(path, name, entry))
    if data_start + data_len > size:
        raise CheckpointError(
            f"{path}: file is truncated ({size} bytes, the header needs {data_start + data_len}); "
            "download or copy it again"
        )
    return header, metadata, data_start


def _checked_entry(path: Path, name: str, entry) -> int:
    """The end of a tensor's data, once its header entry is known to be whole: a shape, a dtype and a byte
    range that holds exactly that many elements (else reading it would return memory never written)."""
    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged header, tensor {name!r}: {why}; download or copy the file again")

    if not isinstance(entry, dict):
        raise damaged("its entry is not a table")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise damaged(f"shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):  # fmt: skip
        raise damaged(f"data_offsets {offsets!r}")
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is not None:  # a dtype this torch lacks stops only if that tensor is read (SafetensorsReader.get)
        needed = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != needed:
            raise damaged(f"its {offsets[1] - offsets[0]} bytes of data are not the {needed} of shape {shape} in "
                          f"{entry['dtype']}")  # fmt: skip
    return offsets[1]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` table of a safetensors file (empty if none)."""
    return read_header(path)[1]


def read_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a safetensors file, without reading any tensor data."""
    return list(read_header(path)[0])


_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


def checkpoint_files(path: str, subfolder: str = "transformer", stem: str = "diffusion_pytorch_model") -> list[str]:
    """The safetensors file(s) behind a path: a file, any shard of a sharded file, the
    ``.safetensors.index.json`` of a sharded file, or a diffusers folder: ``stem*.safetensors`` in
    ``path/subfolder`` (a whole diffusers model) or in ``path`` itself. A missing shard stops here, named."""
    if path.endswith(".index.json") and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a safetensors index (no readable weight_map: {e})") from None
        files = [os.path.join(os.path.dirname(path), name) for name in names]
    elif os.path.isdir(path):
        for folder in (os.path.join(path, subfolder), path):
            files = _diffusers_checkpoint(folder, stem)
            if files:
                break
        else:
            raise CheckpointError(
                f"{path}: a folder without {stem}.safetensors or its shards (nor a {subfolder}/ holding them); "
                "give a .safetensors file or a diffusers model folder"
            )
        if shard := _SHARD.search(files[-1]):  # every shard the names count, present or not
            files = _shards(files[-1][: shard.start()], int(shard.group(2)))
    elif shard := _SHARD.search(path):
        files = _shards(path[: shard.start()], int(shard.group(2)))
    else:
        return [path]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        names = ", ".join(os.path.basename(f) for f in missing)
        raise CheckpointError(f"{path}: {len(missing)} of {len(files)} shards are missing: {names}; download or "
                              "copy them too")  # fmt: skip
    return files


def _diffusers_checkpoint(folder: str, stem: str) -> list[str]:
    """The files of the one checkpoint a diffusers folder holds under ``stem``: ``stem.safetensors``, or its
    shards, or one variant of them (``stem.fp16.safetensors``); two checkpoints there stop, named (their
    tensors would be read together). Other files starting with ``stem`` (``model_t5xxl_fp16.safetensors``) are
    not diffusers' and are ignored."""
    named = re.compile(rf"{re.escape(stem)}(\.[\w]+)?(-\d{{5}}-of-\d{{5}})?\.safetensors")
    checkpoints: dict[tuple[str, bool], list[str]] = {}  # (variant, sharded) -> its files
    for file in sorted(glob.glob(os.path.join(glob.escape(folder), f"{stem}*.safetensors"))):
        if m := named.fullmatch(os.path.basename(file)):  # a whole file beside shards is a second checkpoint
            checkpoints.setdefault((m.group(1) or "", m.group(2) is not None), []).append(file)
    if len(checkpoints) > 1:
        names = ", ".join(os.path.basename(files[0]) for files in checkpoints.values())
        raise CheckpointError(f"{folder}: holds {len(checkpoints)} checkpoints ({names}); give the file of one")
    return next(iter(checkpoints.values()), [])


def _shards(stem: str, total: int) -> list[str]:
    return [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]


def read_headers(files: Iterable[str | os.PathLike]) -> tuple[dict, dict[str, str]]:
    """``(tensor_entries, metadata)`` of several files (a sharded checkpoint's) taken together."""
    entries, metadata = {}, {}
    for file in files:
        header, file_metadata, _ = read_header(file)
        entries.update(header)
        metadata.update(file_metadata)
    return entries, metadata


class SafetensorsReader:
    """Reads tensors one at a time from a safetensors file whose header is parsed once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.header, self.metadata, self._data_start = read_header(path)
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115  (closed by close / __exit__)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, key: str) -> torch.dtype:
        name = self.header[key].get("dtype")
        if name not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has the dtype {name!r}, which this torch "
                                  f"({torch.__version__}) cannot hold")  # fmt: skip
        return DTYPES[name]

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=self.dtype(key), device="cpu")  # whatever the current device
        if end > begin:
            self._file.seek(self._data_start + begin)
            if self._file.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                raise CheckpointError(f"{self.path}: file is truncated while reading {key!r}")
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)


def load_safetensors(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    disable_mmap: bool = False,
    dtype: torch.dtype | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Loads tensors (all, or ``keys``) from a safetensors file.

    With ``dtype`` floating-point tensors are cast one at a time, so the peak stays near
    the size of the result. ``disable_mmap`` is accepted for sd-scripts compatibility: this
    reader never memory-maps.
    """
    del disable_mmap
    result = {}
    with SafetensorsReader(path) as reader:
        for name in reader.keys() if keys is None else list(keys):
            tensor = reader.get(name)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            result[name] = tensor.to(device) if torch.device(device).type != "cpu" else tensor
    return result


def load_sharded(files: list[str], keys: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Loads ``keys`` from the shards ``files`` of one checkpoint, each from the file that holds it."""
    keys = set(keys)
    result = {}
    for file in files:
        with SafetensorsReader(file) as reader:
            for name in keys.intersection(reader.keys()):
                result[name] = reader.get(name, device)
    return result


def write_safetensors_streaming(
    path: str | os.PathLike,
    layout: dict[str, tuple[list[int], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors as they come (``layout`` gives each key's shape and dtype, in file order), so a
    checkpoint of any size is rewritten with one tensor in memory; temporary name, then rename."""
    entries, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for key, tensor in tensors:
                data = tensor.to("cpu", layout[key][1]).contiguous().reshape(-1)
                if data.numel():
                    f.write(memoryview(data.view(torch.uint8).numpy()))
        replace_file(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# Windows refuses to replace a file another program has open without sharing its deletion (a virus scanner
# or indexer looking at the file just saved, for a moment): the rename is tried again for about a second
_REPLACE_TRIES, _REPLACE_WAIT_S = 10, 0.1


def replace_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace``, tried again for a while on Windows while ``dst`` is in use."""
    for attempt in range(_REPLACE_TRIES):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if sys.platform != "win32" or attempt == _REPLACE_TRIES - 1:
                raise
            time.sleep(_REPLACE_WAIT_S)


def output_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (created where missing), or None."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:  # a drive or network share that is not there (Windows)
            return f"{existing} does not exist (a drive or share that is not connected?)"
        existing = parent
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not _can_write_in(existing):
        return f"cannot write in {existing} (no permission, or a read-only disk)"
    return None


def _can_write_in(folder: str) -> bool:
    if sys.platform != "win32":
        return os.access(folder, os.W_OK | os.X_OK)
    # there os.access reads only the read-only attribute, which folders ignore (ACLs, Controlled Folder Access
    # and read-only shares are found at the first save, hours later): a file is written and removed instead
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    except OSError:
        return False
    os.close(handle)
    with contextlib.suppress(OSError):
        os.remove(probe)
    return True


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """An output file's path, refused before any work if it is a folder or its folder cannot be
    created or written in (found at the end, it would waste a long merge or extraction)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; give a file name, e.g. {os.path.join(path, 'out.safetensors')}")
    problem = output_folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise UserError(f"{flag} {path}: {problem}; choose another path")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: spelled another way, through a link, or in another case where the
    file system ignores it (for files that exist; for others, Windows' case rule). Comparing absolute paths
    missed the last two, and an output written over its input destroyed it."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there (yet)
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def warn_unless_safetensors_name(path: str | os.PathLike, flag: str) -> None:
    """The helper tools write safetensors only: a ``.ckpt`` (or other) name would mislead other tools."""
    if not str(path).lower().endswith(".safetensors"):
        logger.warning(
            f"{flag} {path}: the file is written in safetensors format whatever its name; "
            "name it .safetensors so that other tools read it as one"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes tensors under a temporary name, then renames: a crash never leaves a partial file.
    A failed write (a full disk, say) is an OSError, whichever layer noticed it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    # a folder of this process's own: safetensors writes into a temporary file of its own naming beside the
    # target, which a killed save would leave with a name nobody recognises
    tmp_dir = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    tmp = tmp_dir / path.name
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    try:
        try:
            save_file(contiguous, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors' writer reports I/O errors as its own type, errno in the text
            code = re.search(r"os error (\d+)", str(e))
            raise (OSError(int(code.group(1)), str(e)) if code else OSError(str(e))) from e
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors 0.8 writes 0600, which other users could not read
        replace_file(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_torch_file(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through a buffer: torch's own file writer reports a full disk as a RuntimeError
    without an errno, Python's file write raises the OSError it is."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
