"""Latent and text-encoder caches, in RAM or in sd-scripts' npz files beside the images.

Public API:
    LatentCacher(encoder, ae_fingerprint, to_disk, batch_size=1, skip_cache_check=False,
                 process_index=0, num_processes=1).cache(groups) -> CacheStats
        encoder.encode(x: (B, 3, H, W) in [-1, 1]) -> (B, 16, H/8, W/8) scaled latents; its device
        and dtype are read from .device/.dtype or its parameters.
    TextEncoderCacher(encode_captions, fingerprint, apply_t5_attn_mask, to_disk, batch_size=None,
                      skip_cache_check=False, process_index=0, num_processes=1).cache(groups)
        encode_captions(list[str]) -> list[{l_pooled, t5_out, txt_ids, t5_attn_mask}] (numpy).
    check_disk_caches_complete(groups, latents=True, te=False)
        after a barrier in multi-process runs: every entry's file is there.
    load_latents(entry), load_te_outputs(npz_path); the files themselves: library/cache_files.py

Files and keys are sd-scripts' (spec §f.4). Beyond sd-scripts, each file carries a JSON record
(`cache_record_<h>x<w>` in latent files, `cache_record` in text-encoder files) of what it was
made from: the image's size, mtime and SHA-256, the AE fingerprint, resize settings; the caption
text and the text-encoder settings. An entry is re-cached when any of these changed. Latent files
without a record (sd-scripts') get sd-scripts' key checks; text-encoder files without one are
re-encoded once (sd-scripts encoded raw captions, with another CLIP activation).
`--skip_cache_check` trusts any existing file that has the needed arrays.

Disk caching is sharded by image file (all resolutions of one image go to one process, so no two
processes write one file); every process caches in RAM everything it needs. Files are written
to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from library.buckets import crop_ltrb
from library.cache_files import (
    LATENT_SUFFIX,
    TE_SUFFIX,
    UNREADABLE_NPZ,
    image_identity,
    latent_npz_path,
    npz_keys,
    owned_paths,
    read_record,
    remove_half_written_caches,
    reso_suffix,
    rewrite_record,
    same_image,
    te_npz_path,
    write_npz_atomic,
)
from library.captions import caption_for_cache
from library.datasets import DatasetGroup, ImageEntry
from library.errors import UserError
from library.images import canonical_path, is_turned_by_exif, prepare_image

logger = logging.getLogger(__name__)

TE_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")
RECORD_VERSION = 1


@dataclass
class CacheStats:
    encoded: int = 0
    reused: int = 0
    other_processes: int = 0
    legacy_reencoded: int = 0


def _same_source(old: dict | None, new: dict) -> bool:
    """Whether two cache records are of the same image file, encoder and resize (the flags aside; the
    interpolation too when the image keeps its size, which ``new`` records as None)."""
    ignored = ("flip_aug", "alpha_mask") + (("interpolation",) if new.get("interpolation") is None else ())
    return old is not None and all(old.get(k) == v for k, v in new.items() if k not in ignored)


def _clean_up_after_killed_runs(cache_files: Iterable[str]) -> None:
    removed = remove_half_written_caches(cache_files)
    if removed:
        logger.info("removed %d half-written cache file(s) of a killed run (e.g. %s)", len(removed), removed[0])


def _device_dtype(encoder) -> tuple[torch.device, torch.dtype]:
    device, dtype = getattr(encoder, "device", None), getattr(encoder, "dtype", None)
    if device is None or dtype is None:
        p = next(encoder.parameters())
        device, dtype = device or p.device, dtype or p.dtype
    return torch.device(device), dtype


def _all_entries(groups) -> list[ImageEntry]:
    return [e for g in groups if g is not None for e in (g.entries() if isinstance(g, DatasetGroup) else g)]


def non_finite(values) -> str:
    """'NaN' or 'inf': what a tensor or array that is not all finite holds, for messages."""
    return "NaN" if bool((values != values).any()) else "inf"


# --- latents ------------------------------------------------------------------------------------
def _refuse_shared_slots(entries: list[ImageEntry]) -> None:
    """A latent file holds one image's latents, one per bucket. Two images whose names differ only in
    the extension (``a.png``, ``a.jpg``) and that have one size would share a file, and the same image
    in the same bucket resized two ways (two datasets with other interpolation or upscaling settings)
    would share a latent."""
    owner: dict[str, str] = {}
    for e in entries:
        other = owner.setdefault(e.latents_npz, e.path)
        if canonical_path(other) != canonical_path(e.path):
            raise UserError(
                f"{other} and {e.path} would share the latent cache {os.path.basename(e.latents_npz)} (caches are "
                "named by the image's name without its extension, as sd-scripts names them); rename one of them, "
                "or cache in RAM only (drop --cache_latents_to_disk)."
            )
    first: dict[tuple[str, tuple[int, int]], ImageEntry] = {}
    for e in entries:
        other = first.setdefault((e.latents_npz, e.bucket), e)
        if (other.resized, _resampling(other)) != (e.resized, _resampling(e)):
            raise UserError(
                f"{e.path} is resized two ways for one {e.bucket[0]}x{e.bucket[1]} bucket ({other.subset.label}: "
                f"to {other.resized[0]}x{other.resized[1]} with {other.subset.interpolation}; {e.subset.label}: "
                f"to {e.resized[0]}x{e.resized[1]} with {e.subset.interpolation}); {LATENT_SUFFIX} holds one latent "
                "per bucket. Use the same interpolation and bucket settings for both, or cache in RAM only "
                "(drop --cache_latents_to_disk)."
            )


def _resampling(e: ImageEntry) -> str | None:
    """The interpolation e's latents depend on: none when the image keeps its size."""
    return None if tuple(e.resized) == tuple(e.size) else e.subset.interpolation


def _read_cache_arrays(path: str, keys: list[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a cache file that exist, read in full: a damaged member (which the checks
    before training, reading the file's directory only, let pass) stops with the file named."""
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in keys if k in npz.files}
    except UNREADABLE_NPZ as e:
        raise UserError(f"{path}: this cache file is damaged ({e}); delete it to re-cache it.") from None


def load_latents(entry: ImageEntry) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(latents, flipped latents or None, alpha mask or None) of an entry's disk cache.

    The flipped latents and the mask are read only when the entry's subset asks for them: the file
    may hold them from another dataset, or from a run with other settings, of this image."""
    sfx, sub = reso_suffix(entry.bucket), entry.subset
    keys = ["latents" + sfx]
    if sub.flip_aug:
        keys.append("latents_flipped" + sfx)
    if sub.alpha_mask:
        keys.append("alpha_mask" + sfx)
    arrays = _read_cache_arrays(entry.latents_npz, keys)
    if "latents" + sfx not in arrays:
        raise UserError(f"{entry.latents_npz}: has no latents{sfx}; delete the file to re-cache it.")
    flipped, mask = (arrays.get(k + sfx) for k in ("latents_flipped", "alpha_mask"))
    return (
        torch.from_numpy(arrays["latents" + sfx]),
        torch.from_numpy(flipped) if flipped is not None else None,
        torch.from_numpy(mask) if mask is not None else None,
    )


class LatentCacher:
    """Encodes every entry's image once (see the module docstring)."""

    def __init__(
        self,
        encoder,
        ae_fingerprint: str,
        to_disk: bool,
        batch_size: int = 1,
        skip_cache_check: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        num_workers: int | None = None,
    ):
        self.encoder = encoder
        self.ae_fingerprint = ae_fingerprint
        self.to_disk = to_disk
        self.batch_size = max(1, batch_size)
        self.skip_cache_check = skip_cache_check
        self.process_index = process_index
        self.num_processes = num_processes
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)

    def _record(self, e: ImageEntry, identity: dict) -> dict:
        s = e.subset
        return {
            "version": RECORD_VERSION,
            "image": identity,
            "ae": self.ae_fingerprint,
            "interpolation": _resampling(e),
            "resized": list(e.resized),
            "bucket": list(e.bucket),
            "flip_aug": s.flip_aug,
            "alpha_mask": s.alpha_mask,
        }

    def is_valid(self, e: ImageEntry) -> bool:
        """Whether e's disk cache can be used as it is."""
        path, sfx = e.latents_npz, reso_suffix(e.bucket)
        if not os.path.exists(path):
            return False
        keys = npz_keys(path)
        needed = (
            {"latents" + sfx}
            | ({"latents_flipped" + sfx} if e.subset.flip_aug else set())
            | ({"alpha_mask" + sfx} if e.subset.alpha_mask else set())
        )
        if not needed <= keys:
            return False
        if self.skip_cache_check:
            return True
        if "cache_record" + sfx not in keys:  # sd-scripts' checks only: its files have no record
            # but sd-scripts encodes the stored pixels: its latents of an image EXIF turns (upside down, mirrored,
            # or square) have the right size and the wrong picture
            return not is_turned_by_exif(e.path)
        try:
            with np.load(path) as npz:
                rec = read_record(npz, "cache_record" + sfx)
        except UNREADABLE_NPZ:
            return False
        if rec is None:
            return False
        want = self._record(e, {})
        # flip/alpha arrays were checked above; extra ones from an earlier setting do no harm
        unchecked = ("image", "flip_aug", "alpha_mask") + (() if _resampling(e) else ("interpolation",))
        if any(rec.get(k) != want[k] for k in want if k not in unchecked):
            return False
        image = rec.get("image", {})
        if not same_image(e.path, image):
            return False
        mtime = os.stat(e.path).st_mtime_ns
        if mtime != image.get("mtime_ns"):  # copied or touched, same content: remember the new time
            rec["image"] = dict(image, mtime_ns=mtime)
            rewrite_record(path, "cache_record" + sfx, rec)
        return True

    def cache(self, groups: Iterable) -> CacheStats:
        """Fills entries' `latents*` (RAM) or `latents_npz` (disk). Call on every process."""
        entries = _all_entries(groups)
        stats = CacheStats()
        if self.to_disk:
            for e in entries:
                e.latents_npz = latent_npz_path(canonical_path(e.path), e.size)
            _refuse_shared_slots(entries)
            _clean_up_after_killed_runs(e.latents_npz for e in entries)
            mine = owned_paths((canonical_path(e.path) for e in entries), self.process_index, self.num_processes)
            todo = []
            for e in tqdm(entries, desc="checking latent caches", unit="img", disable=len(entries) < 200):
                if canonical_path(e.path) not in mine:
                    stats.other_processes += 1
                elif self.is_valid(e):
                    stats.reused += 1
                else:
                    todo.append(e)
        else:
            todo = list(entries)
        # one encode per distinct (image, bucket, settings): the same image can sit in several subsets
        same: dict[tuple, list[ImageEntry]] = {}
        for e in todo:
            same.setdefault(self._identity(e), []).append(e)
        todo = [group[0] for group in same.values()]
        # sorted so that a batch holds one bucket and one set of flags, as sd-scripts batches
        todo.sort(key=lambda e: (e.bucket[0] * e.bucket[1], e.bucket, e.subset.flip_aug, e.subset.alpha_mask, e.path))
        batches, batch = [], []
        for e in todo:
            if batch and self._condition(batch[0]) != self._condition(e) or len(batch) >= self.batch_size:
                batches.append(batch)
                batch = []
            batch.append(e)
        if batch:
            batches.append(batch)
        with (
            tqdm(total=len(todo), desc="caching latents", unit="img", disable=not todo) as bar,
            ThreadPoolExecutor(self.num_workers) as pool,
        ):
            # the next batch's images are read, resized and hashed while this one is encoded
            upcoming = self._load(batches[0], pool) if batches else []
            for i, b in enumerate(batches):
                loaded, upcoming = upcoming, self._load(batches[i + 1], pool) if i + 1 < len(batches) else []
                self._encode_batch(b, [f.result() for f in loaded])
                for e in b:
                    for twin in same[self._identity(e)][1:]:
                        twin.latents, twin.latents_flipped, twin.alpha_mask = e.latents, e.latents_flipped, e.alpha_mask
                stats.encoded += len(b)
                bar.update(len(b))
        logger.info(
            "latents: %d encoded, %d reused from disk, %d cached by other processes",
            stats.encoded,
            stats.reused,
            stats.other_processes,
        )
        return stats

    @staticmethod
    def _identity(e: ImageEntry) -> tuple:
        s = e.subset
        return canonical_path(e.path), e.bucket, e.resized, _resampling(e), s.flip_aug, s.alpha_mask

    @staticmethod
    def _condition(e: ImageEntry):
        return e.bucket, e.subset.flip_aug, e.subset.alpha_mask

    def _load(self, batch: list[ImageEntry], pool: ThreadPoolExecutor) -> list[Future]:
        """Futures of each entry's (prepared image, identity of its file or None)."""
        def load(e: ImageEntry):
            image = prepare_image(e.path, e.bucket, e.resized, e.subset.interpolation, None, e.subset.alpha_mask)
            return image, image_identity(e.path) if self.to_disk else None

        return [pool.submit(load, e) for e in batch]

    def _encode_batch(self, batch: list[ImageEntry], images_and_identities: list[tuple]) -> None:
        loaded, identities = zip(*images_and_identities, strict=True)
        x = torch.stack([torch.from_numpy(rgb).permute(2, 0, 1) for rgb, *_ in loaded]).float() / 127.5 - 1.0
        device, dtype = _device_dtype(self.encoder)
        x = x.to(device=device, dtype=dtype)
        with torch.no_grad():
            lat = self.encoder.encode(x).float().cpu()
            flipped = self.encoder.encode(torch.flip(x, dims=[3])).float().cpu() if batch[0].subset.flip_aug else None
        for i, e in enumerate(batch):
            for latents in (lat[i], flipped[i] if flipped is not None else lat[i]):
                if not torch.isfinite(latents).all():  # an fp16 AE overflows to inf as well
                    raise UserError(f"{non_finite(latents)} in the latents of {e.path}; check the AE weights and "
                                    "--mixed_precision (or --no_half_vae).")  # fmt: skip
            mask = loaded[i][1]
            if not self.to_disk:
                e.latents = lat[i].clone()
                e.latents_flipped = flipped[i].clone() if flipped is not None else None
                e.alpha_mask = torch.from_numpy(mask) if mask is not None else None
                continue
            self._write(e, lat[i], flipped[i] if flipped is not None else None, mask, loaded[i][2], identities[i])

    def _write(self, e, lat, flipped, mask, original, identity) -> None:
        sfx = reso_suffix(e.bucket)
        record = self._record(e, identity)
        arrays = {}
        if os.path.exists(e.latents_npz):
            try:
                with np.load(e.latents_npz) as old:
                    arrays = {k: old[k] for k in old.files}
            except UNREADABLE_NPZ:
                logger.warning("%s: unreadable, replacing it", e.latents_npz)
            # the flipped latents and mask of another dataset's entry for this very image and resize
            # stay; those of another image or setting are stale
            if not _same_source(read_record(arrays, "cache_record" + sfx), record):
                for k in ("latents_flipped", "alpha_mask"):
                    arrays.pop(k + sfx, None)
        arrays["latents" + sfx] = lat.numpy()
        arrays["original_size" + sfx] = np.array(original)
        arrays["crop_ltrb" + sfx] = np.array(crop_ltrb(e.bucket, original))
        if flipped is not None:
            arrays["latents_flipped" + sfx] = flipped.numpy()
        if mask is not None:
            arrays["alpha_mask" + sfx] = mask.astype(np.float32)
        record["flip_aug"], record["alpha_mask"] = "latents_flipped" + sfx in arrays, "alpha_mask" + sfx in arrays
        arrays["cache_record" + sfx] = np.array(json.dumps(record, sort_keys=True))
        write_npz_atomic(e.latents_npz, arrays)


# --- text-encoder outputs -----------------------------------------------------------------------
def load_te_outputs(path: str) -> dict[str, np.ndarray]:
    arrays = _read_cache_arrays(path, list(TE_KEYS))
    if len(arrays) != len(TE_KEYS):
        missing = ", ".join(k for k in TE_KEYS if k not in arrays)
        raise UserError(f"{path}: has no {missing}; delete the file to re-cache it.")
    return arrays


def _te_arrays(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {}
    for k in TE_KEYS:
        if k not in out:
            raise ValueError(f"encode_captions returned no {k!r}")
        a = np.asarray(out[k])
        if k == "t5_attn_mask":
            a = a.astype(np.int64)
        elif a.dtype != np.float16:
            a = a.astype(np.float32)  # bf16 arrives as float32 already; anything else becomes float32
        arrays[k] = a
    return arrays


class TextEncoderCacher:
    """Encodes every entry's (deterministically processed) caption once."""

    def __init__(
        self,
        encode_captions: Callable[[list[str]], list[dict]],
        fingerprint: dict,
        apply_t5_attn_mask: bool,
        to_disk: bool,
        batch_size: int | None = None,
        skip_cache_check: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.encode_captions = encode_captions
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.apply_t5_attn_mask = bool(apply_t5_attn_mask)
        self.to_disk = to_disk
        self.batch_size = batch_size
        self.skip_cache_check = skip_cache_check
        self.process_index = process_index
        self.num_processes = num_processes

    def _record(self, caption: str) -> dict:
        return {"version": RECORD_VERSION, "caption": caption, "fingerprint": self.fingerprint}

    def check(self, path: str, caption: str) -> str:
        """'valid', 'missing', 'stale' or 'legacy' (an sd-scripts file without a record)."""
        if not os.path.exists(path):
            return "missing"
        keys = npz_keys(path)
        if not set(TE_KEYS) | {"apply_t5_attn_mask"} <= keys:
            return "stale"
        if self.skip_cache_check:
            return "valid"
        try:
            with np.load(path) as npz:
                if bool(npz["apply_t5_attn_mask"]) != self.apply_t5_attn_mask:
                    return "stale"
                rec = read_record(npz, "cache_record")
        except UNREADABLE_NPZ:
            return "stale"
        if rec is None:
            return "legacy"
        return "valid" if rec == self._record(caption) else "stale"

    def cache(self, groups: Iterable) -> CacheStats:
        """Fills entries' `te_outputs` (RAM) or `te_npz` (disk). Call on every process."""
        groups = list(groups)
        entries = _all_entries(groups)
        stats = CacheStats()
        texts: dict[str, str] = {}  # unit of work (npz path, or caption in RAM) -> caption
        users: dict[str, list[ImageEntry]] = {}
        images: dict[str, str] = {}  # npz path -> the first image using it
        for e in entries:
            cap = caption_for_cache(e.caption, e.subset.caption, canonical_path(e.path))
            unit = te_npz_path(canonical_path(e.path)) if self.to_disk else cap
            if self.to_disk:
                e.te_npz = unit
                other = images.setdefault(unit, e.path)
                if unit in texts and texts[unit] != cap and canonical_path(other) != canonical_path(e.path):
                    raise UserError(
                        f"{other} and {e.path} would share the text-encoder cache {os.path.basename(unit)} with "
                        f"two captions ({texts[unit]!r} and {cap!r}; caches are named by the image's name without "
                        "its extension, as sd-scripts names them); rename one of them, or cache in RAM only (drop "
                        "--cache_text_encoder_outputs_to_disk)."
                    )
                if unit in texts and texts[unit] != cap:
                    raise UserError(
                        f"{e.path} is used with two different captions ({texts[unit]!r} and {cap!r}, e.g. from two "
                        f"subsets or datasets with different caption settings); {TE_SUFFIX} holds one per image. Use "
                        "the same caption settings, or cache in RAM only (drop --cache_text_encoder_outputs_to_disk)."
                    )
            texts[unit] = cap
            users.setdefault(unit, []).append(e)
        todo = list(texts)
        if self.to_disk:
            _clean_up_after_killed_runs(todo)
            mine = owned_paths(todo, self.process_index, self.num_processes)
            stats.other_processes = len(todo) - len(mine)
            todo = []
            for unit in tqdm(sorted(mine), desc="checking text-encoder caches", unit="file", disable=len(mine) < 200):
                state = self.check(unit, texts[unit])
                if state == "valid":
                    stats.reused += 1
                else:
                    stats.legacy_reencoded += state == "legacy"
                    todo.append(unit)
            if stats.legacy_reencoded:
                logger.info(
                    "%d text-encoder cache files have no validity record (written by sd-scripts or an older "
                    "version); re-encoding them once",
                    stats.legacy_reencoded,
                )
        bs = self.batch_size or max(
            (g_ds.batch_size for g in groups if g is not None for g_ds in getattr(g, "datasets", [])), default=1
        )
        with tqdm(total=len(todo), desc="caching text encoder outputs", unit="caption", disable=not todo) as bar:
            for i in range(0, len(todo), bs):
                chunk = todo[i : i + bs]
                outs = self.encode_captions([texts[u] for u in chunk])
                if len(outs) != len(chunk):
                    raise ValueError(f"encode_captions returned {len(outs)} results for {len(chunk)} captions")
                for unit, out in zip(chunk, outs, strict=True):
                    arrays = _te_arrays(out)
                    for key in ("l_pooled", "t5_out"):
                        if not np.isfinite(arrays[key]).all():  # T5 overflows in fp16; a cache must not keep that
                            raise UserError(
                                f"{non_finite(arrays[key])} in the text-encoder output {key} of the caption "
                                f"{texts[unit]!r} ({users[unit][0].path}); check the text encoder weights and "
                                "--mixed_precision (T5 overflows in fp16: use bf16)."
                            )
                    if self.to_disk:
                        arrays["apply_t5_attn_mask"] = np.array(self.apply_t5_attn_mask)
                        arrays["cache_record"] = np.array(json.dumps(self._record(texts[unit]), sort_keys=True))
                        write_npz_atomic(unit, arrays)
                    else:
                        for e in users[unit]:
                            e.te_outputs = arrays
                stats.encoded += len(chunk)
                bar.update(len(chunk))
        logger.info(
            "text encoder outputs: %d encoded, %d reused from disk, %d cached by other processes",
            stats.encoded,
            stats.reused,
            stats.other_processes,
        )
        return stats


def check_disk_caches_complete(groups: Iterable, latents: bool = True, te: bool = False) -> None:
    """After every process has cached its share (and a barrier): stops naming the first missing file."""
    for e in _all_entries(groups):
        if latents and e.latents_npz is not None:
            sfx = reso_suffix(e.bucket)
            if "latents" + sfx not in npz_keys(e.latents_npz):
                raise UserError(
                    f"{e.latents_npz}: latents{sfx} missing after caching; did a process fail? Run again to re-cache."
                )
        if te and e.te_npz is not None and not set(TE_KEYS) <= npz_keys(e.te_npz):
            raise UserError(f"{e.te_npz}: text-encoder outputs missing after caching; run again to re-cache.")
