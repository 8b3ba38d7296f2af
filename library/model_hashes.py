"""Hashes and ModelSpec metadata written into saved LoRA files (spec §h.1, §h.4).

The hash functions reproduce sd-scripts' values bit for bit, because the A1111 / Forge
"additional networks" indexers and civitai look files up by them:

- ``sshs_model_hash``: sha256 of everything after the safetensors header (the tensor data);
- ``sshs_legacy_hash``: the first 8 hex digits of sha256 of the 64 KiB at offset 1 MiB;
- both computed on the bytes ``safetensors.torch.save(tensors, ss_metadata)`` produces, where
  ``ss_metadata`` keeps only the ``ss_*`` keys (training facts, which never change after saving),
  so editing a title or a description later does not change a file's identity.

``model_hash`` / ``calculate_sha256`` hash a base-model file for ``ss_sd_model_hash`` /
``ss_new_sd_model_hash``. ``build_modelspec`` fills the ``modelspec.*`` keys of
Stability AI's ModelSpec 1.0.1 the way sd-scripts does for FLUX / Chroma LoRAs.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import io
import mimetypes
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future

import torch

MODELSPEC_VERSION = "1.0.1"
ARCHITECTURES = {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "chroma": "chroma"}
IMPLEMENTATIONS = {
    "dev": "https://github.com/black-forest-labs/flux",
    "schnell": "https://github.com/black-forest-labs/flux",
    "chroma": "https://huggingface.co/lodestones/Chroma",
}
PROJECT_NAME = "flux-lora-trainer"
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000
_BLOCK = 1024 * 1024


def addnet_hash_safetensors(stream: io.BufferedIOBase) -> str:
    """sha256 (hex) of a safetensors stream's tensor data, i.e. everything after the header."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_length)
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_BLOCK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_hash_legacy(stream: io.BufferedIOBase) -> str:
    """First 8 hex digits of sha256 of the 64 KiB at offset 1 MiB (empty input for small files)."""
    stream.seek(_LEGACY_OFFSET)
    return hashlib.sha256(stream.read(_LEGACY_LENGTH)).hexdigest()[:8]


def precalculate_safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of the file these tensors and ``ss_*`` keys make."""
    from safetensors.torch import save

    training_metadata = {k: str(v) for k, v in (metadata or {}).items() if k.startswith("ss_")}
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    stream = io.BytesIO(save(contiguous, training_metadata))  # {} too: its "__metadata__":{} moves the legacy window
    return addnet_hash_safetensors(stream), addnet_hash_legacy(stream)


def model_hash(filename: str | os.PathLike) -> str:
    """A1111's legacy 8-hex model hash of a file (``ss_sd_model_hash``), as sd-scripts reports it."""
    try:
        with open(filename, "rb") as f:
            f.seek(_LEGACY_OFFSET)
            return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):  # a diffusers folder (PermissionError on Windows)
        return "IsADirectory"


def calculate_sha256(filename: str | os.PathLike) -> str:
    """Full sha256 (hex) of a file (``ss_new_sd_model_hash``)."""
    digest = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_in_background(filename: str | os.PathLike) -> Future:
    """``calculate_sha256`` in a daemon thread (it never holds up the exit of a failed run)."""
    future: Future = Future()

    def compute() -> None:
        try:
            future.set_result(calculate_sha256(filename))
        except BaseException as e:  # noqa: BLE001 (handed to whoever waits for the result)
            future.set_exception(e)

    threading.Thread(target=compute, name="model-sha256", daemon=True).start()
    return future


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The git commit of this checkout, or None outside one (an unpacked release)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def implementation_version() -> str:
    """``flux-lora-trainer/<git commit>`` of this checkout, or ``flux-lora-trainer/unknown``."""
    return f"{PROJECT_NAME}/{git_commit() or 'unknown'}"


def _resolution(resolution: int | str | tuple[int, ...] | list[int] | None) -> str:
    if resolution is None:
        return "1024x1024"  # FLUX's native size; sd-scripts' default for flux / chroma
    if isinstance(resolution, str):
        resolution = tuple(int(v) for v in resolution.replace("x", ",").split(","))
    if isinstance(resolution, int):
        resolution = (resolution,)
    width, height = (resolution[0], resolution[0]) if len(resolution) == 1 else resolution[:2]
    return f"{width}x{height}"


def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def modelspec_date(timestamp: float) -> str:
    """``modelspec.date``: the local time in ISO format, to the second."""
    return datetime.datetime.fromtimestamp(int(timestamp)).isoformat()


def build_modelspec(
    model_type: str,
    *,
    title: str | None = None,
    timestamp: float | None = None,
    resolution: int | str | tuple[int, ...] | list[int] | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    trigger_phrase: str | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    merged_from: str | None = None,
    timesteps: tuple[int, int] | None = None,
    clip_skip: int | None = None,
) -> dict[str, str]:
    """``modelspec.*`` keys of a LoRA for ``model_type`` ``dev``, ``schnell`` or ``chroma``.

    ``thumbnail`` may be a file path (embedded as a ``data:`` URL) or a data URL already. No
    ``prediction_type`` is written for FLUX, as in sd-scripts.
    """
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type must be one of {sorted(ARCHITECTURES)}, not {model_type!r}")
    timestamp = time.time() if timestamp is None else timestamp
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{ARCHITECTURES[model_type]}/lora",
        "modelspec.implementation": IMPLEMENTATIONS[model_type],
        "modelspec.title": title if title is not None else f"LoRA@{timestamp}",
        "modelspec.resolution": _resolution(resolution),
        "modelspec.date": modelspec_date(timestamp),
        "modelspec.implementation_version": implementation_version(),
    }
    optional = {
        "author": author,
        "description": description,
        "license": license,
        "tags": tags,
        "trigger_phrase": trigger_phrase,
        "usage_hint": usage_hint,
        "merged_from": merged_from,
        "timestep_range": None if timesteps is None else f"{timesteps[0]},{timesteps[1]}",
        "encoder_layer": None if clip_skip is None else str(clip_skip),
    }
    if thumbnail:
        optional["thumbnail"] = thumbnail if thumbnail.startswith("data:") else _data_url(thumbnail)
    spec.update({f"modelspec.{k}": str(v) for k, v in optional.items() if v is not None})
    return spec
