"""Which images a subset holds, their raw captions and sizes, and the validation split.

Public API:
    scan_subset(sub: SubsetConfig) -> list[ImageRecord]
    split_train_val(items, validation_split, seed) -> (train_items, val_items)
    split_subset(records, sub, seed) -> (train_records, val_records)

The split reproduces sd-scripts' procedure (`train_util.split_train_val`): the subset's image
list, in sd-scripts' order (sorted paths), is shuffled by `random.Random(seed)`; the validation
side is the last round(n * split) items. sd-scripts builds its training side separately as the
first ceil(n * (1 - split)) items, which overlaps the validation side by one image whenever the
rounding (or float error, e.g. 10 * 0.7 = 7.000000000000001) goes up; here the training side is
everything else, so the sets never share an image. Fine-tuning subsets are split the same way
(in metadata-file order); sd-scripts ignores the split there and validates on the whole set.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import TypeVar

from tqdm import tqdm

from library.captions import read_caption_file, read_utf8
from library.dataset_config import SubsetConfig
from library.errors import UserError
from library.images import IMAGE_EXTENSIONS, list_images, read_image_size, stop_for_bad_images

logger = logging.getLogger(__name__)
T = TypeVar("T")
INFO_CACHE_FILE = "metadata_cache.json"


@dataclass
class ImageRecord:
    path: str  # absolute image path
    caption: str  # raw caption (several lines when enable_wildcard)
    size: tuple[int, int] | None = None  # (W, H) after EXIF orientation
    tags: str | None = None  # a metadata file's "tags" (what ss_tag_frequency counts there); None in folders


def split_train_val(items: list[T], validation_split: float, seed: int) -> tuple[list[T], list[T]]:
    """(training items, validation items), disjoint; see the module docstring."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(shuffled) * validation_split)
    cut = len(shuffled) - n_val
    return shuffled[:cut], shuffled[cut:]


def _split_keeping_one(n: int) -> str:
    """The shortest written validation_split that holds out all but one of ``n`` images."""
    for digits in range(2, 12):
        text = f"{(n - 1) / n:.{digits}g}"
        if round(n * float(text)) == n - 1:
            return text
    return repr((n - 1) / n)


def split_subset(records: list[ImageRecord], sub: SubsetConfig, seed: int) -> tuple[list, list]:
    """Regularisation subsets are never split: all of them train, none validate."""
    if sub.is_reg or sub.validation_split <= 0:
        return list(records), []
    train, val = split_train_val(records, sub.validation_split, seed)
    if not val:
        logger.warning("%s: validation_split = %s of its %d images rounds to none, so none is held out for "
                       "validation; %.2g holds out one", sub.describe(), sub.validation_split, len(records),
                       1 / max(len(records), 1))  # fmt: skip
    elif not train and sub.validation_split < 1:
        n = len(records)
        fix = f"{_split_keeping_one(n)} keeps one for training" if n > 1 else "leave it out to train on the image"
        logger.warning("%s: validation_split = %s of its %d images rounds to all of them, so none of them trains; "
                       "%s", sub.describe(), sub.validation_split, n, fix)  # fmt: skip
    return train, val


def _fill_sizes(records: list[ImageRecord], desc: str) -> None:
    todo = [r for r in records if r.size is None]
    problems = []
    for r in tqdm(todo, desc=desc, unit="img", disable=len(todo) < 200):
        try:
            r.size = read_image_size(r.path)
        except UserError as e:
            problems.append(str(e))
    stop_for_bad_images(problems)


def _scan_dreambooth(sub: SubsetConfig) -> list[ImageRecord]:
    where = sub.key_path("image_dir")
    if not sub.image_dir or not os.path.isdir(sub.image_dir):
        raise UserError(f"{where}: directory {sub.image_dir!r} not found; fix the path or remove the subset.")
    paths, skipped = list_images(sub.image_dir)
    for p in skipped:
        logger.warning("%s: skipped %s: rename its extension to lower or upper case (sd-scripts ignores it too, "
                       "except on Windows)", sub.label, p)  # fmt: skip
    if not paths:
        raise UserError(
            f"{where}: directory {sub.image_dir!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the subset."
        )
    records, missing = [], []
    for p in paths:
        cap = read_caption_file(p, sub.caption_extension, sub.caption.enable_wildcard)
        if cap is None:
            missing.append(p)
            cap = sub.class_tokens or ""
        records.append(ImageRecord(p, cap))
    if missing:
        fallback = f"class_tokens {sub.class_tokens!r}" if sub.class_tokens else "an empty caption"
        logger.warning(
            "%s: %d images have no %s caption file; using %s (first: %s)",
            sub.describe(),
            len(missing),
            sub.caption_extension,
            fallback,
            missing[0],
        )
    if sub.cache_info:
        _sizes_from_info_cache(records, os.path.join(sub.image_dir, INFO_CACHE_FILE))
    return records


def _sizes_from_info_cache(records: list[ImageRecord], info_file: str) -> None:
    """``cache_info``: image sizes from the folder's ``metadata_cache.json``, the part of a scan
    that opens every image. The image list and the captions are read each run (cheap), so new
    images and edited captions are never missed. An entry counts only when the image file still
    has the byte count and mtime written with it (files written by sd-scripts carry neither, and
    their sizes ignore EXIF orientation, so their images are measured once more). Entries are
    matched by file name, so the folder may move or be given by another path. The file keeps
    sd-scripts' layout (path -> caption, resolution), which sd-scripts reads."""
    try:
        with open(info_file, encoding="utf-8") as f:
            cached = {os.path.basename(path): entry for path, entry in json.load(f).items()}
    except FileNotFoundError:
        cached = {}
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("%s: unreadable (%s); the images are measured again and the file rewritten", info_file, e)
        cached = {}
    stats = {r.path: os.stat(r.path) for r in records}
    changed = len(cached) != len(records)
    for r in records:
        entry = cached.get(os.path.basename(r.path))
        entry = entry if isinstance(entry, dict) else {}
        stat = stats[r.path]
        size = entry.get("resolution")
        valid = isinstance(size, list) and len(size) == 2 and all(type(n) is int and n > 0 for n in size)
        if valid and entry.get("bytes") == stat.st_size and entry.get("mtime") == stat.st_mtime_ns:
            r.size = tuple(entry["resolution"])
            changed = changed or entry.get("caption") != r.caption
        else:
            changed = True
    _fill_sizes(records, "image sizes")
    if not changed:
        return
    data = {
        r.path: {"caption": r.caption, "resolution": list(r.size), "bytes": stats[r.path].st_size,
                 "mtime": stats[r.path].st_mtime_ns}
        for r in records
    }  # fmt: skip
    tmp = f"{info_file}.{os.getpid()}.tmp"  # several processes may write it at once: the last rename wins
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
        os.replace(tmp, info_file)
    except OSError as e:  # the sizes were read anyway: only the next run's head start is lost
        logger.warning("--cache_info: cannot write %s (%s); image sizes are read again next run", info_file, e)
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_metadata(path: str, where: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{where}: {path!r} not found; fix the path.")
    text = read_utf8(path, "metadata file")
    try:
        if path.lower().endswith(".jsonl"):
            metadata = {}
            for n, line in enumerate(io.StringIO(text, newline=None), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:  # its position counts within the line
                    raise UserError(f"{path}: line {n} is not valid JSON ({e}); fix the file.") from None
                if not isinstance(item, dict) or "image_path" not in item:
                    raise UserError(f'{path}: line {n} has no "image_path"; every line needs one.')
                if item["image_path"] in metadata:
                    logger.warning("%s: line %d names %r again; the later line is used", path, n,
                                   item["image_path"])  # fmt: skip
                metadata[item["image_path"]] = item
            return metadata
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix the file.") from None
    if not isinstance(metadata, dict):
        raise UserError(f'{path}: expected an object {{"image key": {{"caption": ...}}}} at the top level.')
    return metadata


def _existing_image(base: str) -> str | None:
    if os.path.isfile(base):
        return base
    for ext in IMAGE_EXTENSIONS:  # sd-scripts' older metadata files name images without extension
        for cand in (base + ext, base + ext.upper()):
            if os.path.isfile(cand):
                return cand
    return None


def _resolve_image_path(key: str, sub: SubsetConfig) -> str:
    """The image a metadata key names: an absolute path as it is; a relative one inside image_dir, or
    else as written, relative to the working folder (sd-scripts' ``merge_captions_to_metadata.py
    --full_path`` writes such keys). sd-scripts tries the key as written first; here the folder the
    config names wins over a file of the same name in the working folder."""
    if os.path.isabs(key):
        bases = [key]
    else:
        bases = ([os.path.join(sub.image_dir, key)] if sub.image_dir else []) + [key]
    for base in bases:
        found = _existing_image(base)
        if found:
            return found
    if not os.path.isabs(key) and not sub.image_dir:
        raise UserError(
            f"{sub.metadata_file}: image key {key!r} is a relative path and not found from the working folder "
            f"{os.getcwd()}; set image_dir in {sub.label} to the folder it is relative to."
        )
    looked = " or ".join(bases)
    raise UserError(f"{sub.metadata_file}: image {key!r} not found (looked for {looked}); fix the entry or image_dir.")


def _scan_finetune(sub: SubsetConfig) -> list[ImageRecord]:
    metadata = _read_metadata(sub.metadata_file, sub.key_path("metadata_file"))
    if not metadata:
        raise UserError(f"{sub.metadata_file}: holds no images; add entries or remove {sub.label}.")
    sep = sub.caption.caption_separator
    records = []
    for key, md in metadata.items():
        if not isinstance(md, dict):
            raise UserError(f'{sub.metadata_file}: entry {key!r} is {type(md).__name__}, not an object like '
                            '{"caption": "...", "tags": "..."}')  # fmt: skip
        caption = md.get("caption") or ""
        tags = md.get("tags") or ""
        for name, value in (("caption", caption), ("tags", tags)):
            if not isinstance(value, str):
                raise UserError(f"{sub.metadata_file}: entry {key!r}: {name} is {type(value).__name__}, not text")
        # what ss_tag_frequency counts: the tags, on one line where wildcard captions put them on each line
        raw_tags = tags.replace("\n", sep) if sub.caption.enable_wildcard else tags
        if not caption.strip():  # a tagger's entry without a caption: its tags are the caption
            caption, tags = tags, ""
        if sub.caption.enable_wildcard and tags:
            tags = tags.replace("\n", sep)
            caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = (caption + sep if caption else "") + tags
        # ``image_size`` is not read: sd-scripts' tools write the size before EXIF orientation, which
        # the images are loaded with, so a rotated photo would be bucketed for the other shape
        records.append(ImageRecord(_resolve_image_path(key, sub), caption, None, raw_tags))
    return records


def scan_subset(sub: SubsetConfig) -> list[ImageRecord]:
    """The subset's images with raw captions and sizes, in sd-scripts' order. Raises UserError."""
    records = _scan_dreambooth(sub) if sub.kind == "dreambooth" else _scan_finetune(sub)
    _fill_sizes(records, f"image sizes {sub.label}")
    return records
