"""The files of the latent and text-encoder caches: sd-scripts' names beside the images, the identity of
the image a file was made from, the JSON records inside, atomic writes, and which process writes which
file. What goes into the files is library/caches.py's."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Iterable

import numpy as np

from library.errors import UserError
from library.images import canonical_path

logger = logging.getLogger(__name__)

LATENT_SUFFIX = "_flux.npz"
TE_SUFFIX = "_flux_te.npz"


def latent_npz_path(image_path: str, size: tuple[int, int]) -> str:
    """`<stem>_<W:04d>x<H:04d>_flux.npz` with the original image size."""
    return os.path.splitext(image_path)[0] + f"_{size[0]:04d}x{size[1]:04d}" + LATENT_SUFFIX


def te_npz_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + TE_SUFFIX


def reso_suffix(bucket: tuple[int, int]) -> str:
    """`_<h>x<w>` of the latent (bucket / 8)."""
    return f"_{bucket[1] // 8}x{bucket[0] // 8}"


def file_fingerprint(path: str | list[str]) -> str:
    """A cheap identity of a model file (name, size, mtime) for cache records; of each shard, for a list."""
    if isinstance(path, list):
        return "|".join(file_fingerprint(file) for file in path)
    st = os.stat(path)
    return f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_identity(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def same_image(path: str, recorded: dict) -> bool:
    st = os.stat(path)
    if st.st_size != recorded.get("size"):
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    return _sha256(path) == recorded.get("sha256")  # touched or copied, maybe not changed


# what np.load raises on a damaged file: an empty one (EOFError, as a crash or an interrupted copy
# leaves), a truncated or garbage one
UNREADABLE_NPZ = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def npz_keys(path: str) -> set[str]:
    """Array names in an npz without reading the arrays."""
    try:
        with zipfile.ZipFile(path) as z:
            return {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return set()


def read_record(npz, key: str) -> dict | None:
    """The JSON record under ``key`` of an npz file (or of its arrays as a dict), None if absent or damaged."""
    if key not in npz:
        return None
    try:
        return json.loads(str(npz[key]))
    except (ValueError, TypeError):
        return None


def _temporary_name(path: str, pid: int) -> str:
    return f"{path}.{pid}.tmp"


_TEMPORARY = re.compile(r"(?P<final>.+)\.(?P<pid>\d+)\.tmp")  # _temporary_name's


# a temporary is written in milliseconds: one this old whose process is gone here is a killed run's, also
# where the folder is shared with other machines (whose process numbers mean nothing here)
HALF_WRITTEN_AFTER_S = 600


def remove_half_written_caches(cache_files: Iterable[str]) -> list[str]:
    """Removes what killed caching runs left beside ``cache_files``: the temporaries of
    :func:`write_npz_atomic` whose process is gone and that are older than ``HALF_WRITTEN_AFTER_S`` (they
    would never become cache files). Call it before this process writes any; returns the paths removed."""
    from library.train_state import writer_is_gone

    wanted: dict[str, set[str]] = {}
    for path in cache_files:
        wanted.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    removed, now = [], time.time()
    for folder, names in wanted.items():
        try:
            entries = os.listdir(folder or ".")
        except OSError:
            continue
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry)
            path = os.path.join(folder, entry)
            if match and match["final"] in names and writer_is_gone(int(match["pid"])) and _older_than(path, now):
                with contextlib.suppress(OSError):  # another process cleaned it first
                    os.remove(path)
                    removed.append(path)
    return removed


def _older_than(path: str, now: float) -> bool:
    try:
        return now - os.path.getmtime(path) > HALF_WRITTEN_AFTER_S
    except OSError:
        return False


def write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary name in the same folder, then os.replace."""
    tmp = _temporary_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(
                f"{path}: cannot write this cache file ({e}); make the folder writable and free "
                "some space, or cache in RAM only (drop the *_to_disk option)."
            ) from None
        raise


def rewrite_record(path: str, key: str, record: dict) -> None:
    """Replaces one JSON record of a cache file; a file that cannot be rewritten keeps its old one (the
    only cost is that the next run checks the image's content again)."""
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays[key] = np.array(json.dumps(record, sort_keys=True))
        write_npz_atomic(path, arrays)
    except (UserError, *UNREADABLE_NPZ) as e:
        logger.debug("%s: record not updated (%s)", path, e)


def owned_paths(paths: Iterable[str], process_index: int, num_processes: int) -> set[str]:
    """The files this process caches: sorted unique paths dealt round-robin (give them canonical)."""
    unique = sorted(set(paths))
    return {p for i, p in enumerate(unique) if i % num_processes == process_index}


def images_to_decode(entries: list, latents_on_disk: bool) -> list[str]:
    """The images to decode before the models load, so that a damaged one stops the run in seconds: all
    of them, except, when latents are cached to disk, those whose cache file is not older than the image
    (training reads the file, not the image; one that proves stale is encoded, and so decoded, during
    caching, which names a damaged image too). Decoding 20,000 photos took minutes on every run."""
    paths = sorted({e.path for e in entries})
    if not latents_on_disk:
        return paths
    cached = {e.path for e in entries if _has_newer_latent_file(e)}
    return [p for p in paths if p not in cached]


def _has_newer_latent_file(entry) -> bool:
    try:
        return os.stat(latent_npz_path(canonical_path(entry.path), entry.size)).st_mtime_ns >= \
            os.stat(entry.path).st_mtime_ns  # fmt: skip
    except OSError:  # no cache file yet
        return False


def check_cache_folders_writable(entries: list, latents_on_disk: bool, te_on_disk: bool) -> None:
    """Before the models load: an image folder with images that have no cache file yet (or a latent file older
    than the image) and that cannot be written (a read-only share, no permission) stops the run, naming the
    folder and the flag. The first write used to fail after minutes of loading. A folder whose cache files all
    exist passes; one of them that proves stale (another setting) is found only when caching."""
    from library.safetensors_io import output_folder_problem

    folders: dict[str, str] = {}  # folder -> the flag that writes there
    for e in entries:
        folder = os.path.dirname(canonical_path(e.path))
        if latents_on_disk and not _has_newer_latent_file(e):
            folders.setdefault(folder, "--cache_latents_to_disk")
        if te_on_disk and not os.path.exists(te_npz_path(canonical_path(e.path))):
            folders.setdefault(folder, "--cache_text_encoder_outputs_to_disk")
    for folder, flag in sorted(folders.items()):
        problem = output_folder_problem(folder)
        if problem:
            raise UserError(f"{flag} writes cache files beside the images, but {problem}. Make the folder writable, "
                            f"or cache in RAM only (drop {flag}).")  # fmt: skip
