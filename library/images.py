"""Image files: discovery, reading (any mode to RGB plus alpha), resize, crop and colour augmentation.

Everything here works on Pillow images and numpy arrays (H, W, C) uint8; tensors are made by the
dataset. Resizing uses Pillow, which antialiases when downscaling; `area` is Pillow's box filter.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from library.errors import UserError

# sd-scripts globs exactly these (lower and upper case); matching them keeps the file list, and
# with it the validation-split membership, identical to sd-scripts'.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_GLOB_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS))
# sd-scripts globs each of those; on Windows glob ignores case, so ".Png" is an image there too
_GLOB_IGNORES_CASE = sys.platform == "win32"

# Names accepted for `interpolation_type` (the guide) and `resize_interpolation` (sd-scripts).
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}
CANONICAL_INTERPOLATION = {"linear": "bilinear", "cubic": "bicubic", "box": "area"}
DEFAULT_INTERPOLATION = "bicubic"  # the guide's default (sd-scripts: area down, lanczos up)


def canonical_interpolation(name: str) -> str:
    """`linear` -> `bilinear`, `cubic` -> `bicubic`, `box` -> `area`; others unchanged."""
    return CANONICAL_INTERPOLATION.get(name, name)


def canonical_path(path: str) -> str:
    """``path`` with its folder resolved (``img``, ``./img``, ``/data/img`` or a linked folder name one
    place): two spellings of one image must share its cache checks and its writer. The file name itself
    is kept, so a dataset of linked images still gets its caches beside the links, as sd-scripts writes them;
    on Windows, whose file names ignore case, in lower case (``A.png`` and ``a.jpg`` share one cache file there)."""
    folder, name = os.path.split(path)
    return os.path.normcase(os.path.join(_real_folder(folder or "."), name))


@functools.lru_cache(maxsize=1024)  # a dataset has a few folders and many images in each
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def list_images(directory: str) -> tuple[list[str], list[str]]:
    """(image paths sorted as sd-scripts sorts them, files skipped for a mixed-case extension)."""
    images, skipped = [], []
    for name in os.listdir(directory):
        if name.startswith("."):  # hidden, as sd-scripts' glob skips them: macOS's "._x.png" are no images
            continue
        path = os.path.join(directory, name)
        ext = os.path.splitext(name)[1]
        if ext in _GLOB_EXTENSIONS or (_GLOB_IGNORES_CASE and ext.lower() in IMAGE_EXTENSIONS):
            if os.path.isfile(path):
                images.append(path)
            elif os.path.islink(path):  # sd-scripts' glob lists it, and its loader fails on it later
                raise UserError(
                    f"{path}: a link to {os.readlink(path)}, which does not exist; mount or restore its target, "
                    "or remove the link."
                )
        elif ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
            skipped.append(path)
    images.sort()
    return images, sorted(skipped)


def _size_and_orientation(path: str) -> tuple[int, int, int]:
    """(W, H, EXIF orientation) as stored, from the header only. Stops with the path if unreadable."""
    try:
        with Image.open(path) as img:
            return *img.size, img.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read this image ({e}); fix or remove the file.") from None


def is_turned_by_exif(path: str) -> bool:
    """Whether the image's EXIF orientation turns or mirrors its pixels (values 2-8), from the header only."""
    return _size_and_orientation(path)[2] not in (1, None)


def read_image_size(path: str) -> tuple[int, int]:
    """(W, H) after EXIF orientation, from the header only. Stops with the path if unreadable."""
    w, h, orientation = _size_and_orientation(path)
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        w, h = h, w
    if w <= 0 or h <= 0:
        raise UserError(f"{path}: image has size {w}x{h}; fix or remove the file.")
    return w, h


def verify_images(paths: list[str], workers: int = 4) -> None:
    """Decodes every image once, so a truncated or corrupt file stops the run with its path before
    any model is loaded (the size check reads headers only). Threads: Pillow decodes without the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def decode(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return f"{path}: cannot decode this image ({e}); fix or remove the file."
        return None

    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = tqdm(pool.map(decode, unique), total=len(unique), desc="checking images", unit="img",
                       disable=len(unique) < 100)  # fmt: skip
        stop_for_bad_images([problem for problem in results if problem])


def stop_for_bad_images(problems: list[str], shown: int = 20) -> None:
    """One error for every unusable image at once, so that one run finds them all."""
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise UserError(f"{len(problems)} images cannot be used:\n  " + "\n  ".join(problems[:shown]) + more)


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def load_image(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 array (H, W, 3), alpha uint8 array (H, W) or None).

    EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and float images become RGB;
    an alpha channel (RGBA, LA, palette transparency) is returned separately.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img = _to_8bit(img)
            if "transparency" in img.info:  # a palette's, or an L / RGB colour key (PNG tRNS)
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                rgba = np.asarray(img.convert("RGBA"))
                return np.array(rgba[:, :, :3]), np.array(rgba[:, :, 3])
            return np.array(img.convert("RGB")), None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read this image ({e}); fix or remove the file.") from None


def resize(arr: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resizes an (H, W[, C]) uint8 array to (W, H) = `size` with Pillow."""
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr
    img = Image.fromarray(arr)
    return np.array(img.resize(tuple(size), INTERPOLATIONS[interpolation]))


@dataclass(frozen=True)
class Crop:
    left: int
    top: int


def choose_crop(resized: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None) -> Crop:
    """Centre crop, or a uniform random window when `rng` is given (random_crop)."""
    dw, dh = resized[0] - bucket[0], resized[1] - bucket[1]
    if dw < 0 or dh < 0:
        raise ValueError(f"resized size {resized} is smaller than bucket {bucket}")
    left = rng.randint(0, dw) if rng is not None and dw else dw // 2
    top = rng.randint(0, dh) if rng is not None and dh else dh // 2
    return Crop(left, top)


def crop(arr: np.ndarray, box: Crop, bucket: tuple[int, int]) -> np.ndarray:
    return arr[box.top : box.top + bucket[1], box.left : box.left + bucket[0]]


def color_aug(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' colour augmentation: with p = 0.33, a hue shift of up to +-8 (OpenCV's 0-180
    hue scale, i.e. +-16 degrees) or a gamma in [0.95, 1.05].

    Gamma is applied to values normalised to [0, 1]; sd-scripts raises raw 0-255 values to the
    power, which brightens or darkens far more than a gamma of 1.05 should.
    """
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        shift = rng.uniform(-8.0, 8.0) / 180.0 * 256.0  # to Pillow's 0-255 hue scale
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float32) + shift) % 256.0).astype(np.uint8)
        return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    out = 255.0 * (rgb.astype(np.float32) / 255.0) ** gamma
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def prepare_image(
    path: str,
    bucket: tuple[int, int],
    resized: tuple[int, int],
    interpolation: str,
    crop_rng: random.Random | None = None,
    want_alpha: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], Crop]:
    """Loads, resizes to `resized` and crops to `bucket`.

    Returns (rgb (H, W, 3) uint8, alpha mask (H, W) float32 in [0, 1] or None, original (W, H), crop).
    The mask is all ones when `want_alpha` and the image has no alpha channel.
    """
    rgb, alpha = load_image(path)
    original = (rgb.shape[1], rgb.shape[0])
    rgb = resize(rgb, resized, interpolation)
    box = choose_crop((rgb.shape[1], rgb.shape[0]), bucket, crop_rng)
    rgb = np.ascontiguousarray(crop(rgb, box, bucket))
    mask = None
    if want_alpha:
        if alpha is None:
            mask = np.ones((bucket[1], bucket[0]), np.float32)
        else:
            mask = crop(resize(alpha, resized, interpolation), box, bucket).astype(np.float32) / 255.0
    return rgb, mask, original, box
