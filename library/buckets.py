"""Aspect-ratio buckets: the bucket list, per-image bucket selection and the crop box.

The arithmetic follows sd-scripts (`model_util.make_bucket_resolutions` and
`BucketManager.select_bucket`) exactly, so an image lands in the same bucket, with the same
resized size, as it does there; only the step check differs: FLUX needs multiples of 16
(8x VAE downsampling times 2x2 latent patches), where sd-scripts asks for 32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from library.errors import UserError

logger = logging.getLogger(__name__)
FLUX_STEP = 16  # pixels: 8 (AE) x 2 (patchify)


def check_reso_steps(steps: int, where: str) -> None:
    """Refuses a bucket_reso_steps that would give latents FLUX cannot patchify."""
    if steps <= 0 or steps % FLUX_STEP:
        raise UserError(
            f"{where}: bucket_reso_steps = {steps} is not a positive multiple of {FLUX_STEP}; FLUX latents are "
            f"patchified 2x2 after 8x downsampling, so every bucket side must be a multiple of {FLUX_STEP}. "
            "Use 16, 32 or 64 (the default)."
        )


def adjust_min_max_reso(
    resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int, where: str
) -> tuple[int, int]:
    """Rounds min down and max up to multiples of `steps` (saying so, as sd-scripts does) and checks
    they bracket `resolution`. A min below one step becomes one step, the smallest bucket side."""
    rounded_min = max(min_reso - min_reso % steps, steps)
    rounded_max = max_reso + (-max_reso) % steps
    for key, given, rounded in (("min_bucket_reso", min_reso, rounded_min), ("max_bucket_reso", max_reso, rounded_max)):
        if rounded != given:
            logger.warning(f"{where}: {key} = {given} is not a multiple of bucket_reso_steps {steps}; using {rounded}")
    min_reso, max_reso = rounded_min, rounded_max
    if min(resolution) < min_reso:
        raise UserError(
            f"{where}: min_bucket_reso ({min_reso}) is larger than the smaller side of resolution {resolution}; "
            "lower min_bucket_reso or raise resolution."
        )
    if max(resolution) > max_reso:
        raise UserError(
            f"{where}: max_bucket_reso ({max_reso}) is smaller than the larger side of resolution {resolution}; "
            "raise max_bucket_reso or lower resolution."
        )
    return min_reso, max_reso


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """All (width, height) buckets of area <= W*H with sides in [min_size, max_size], sorted."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]  # (W, H) of the training image, multiples of the step
    resized: tuple[int, int]  # (W, H) the image is resized to before cropping to `bucket`
    ar_error: float


class BucketSelector:
    """Assigns images to buckets the way sd-scripts' BucketManager does.

    `predefined` is the list of make_bucket_resolutions (upscaling mode) or a single
    (W, H) without bucketing; with `no_upscale` buckets are derived from each image.
    """

    def __init__(
        self,
        resolution: tuple[int, int],
        steps: int | None,
        predefined: list[tuple[int, int]] | None,
        no_upscale: bool = False,
    ):
        self.max_area = resolution[0] * resolution[1]
        self.steps = steps
        self.no_upscale = no_upscale
        self.predefined = list(predefined or [])
        self._predefined_set = set(self.predefined)
        self._ars = [w / h for w, h in self.predefined]

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                # first minimum in the sorted list, as numpy's argmin picks it in sd-scripts
                errors = [abs(a - aspect) for a in self._ars]
                reso = self.predefined[errors.index(min(errors))]
            if aspect > reso[0] / reso[1]:
                scale = reso[1] / height
            else:
                scale = reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                bw = self._round_to_steps(rw)
                bh_in_wr = self._round_to_steps(bw / aspect)
                ar_w = bw / bh_in_wr if bh_in_wr else math.inf
                bh = self._round_to_steps(rh)
                bw_in_hr = self._round_to_steps(bh * aspect)
                ar_h = bw_in_hr / bh if bh else math.inf
                if abs(ar_w - aspect) < abs(ar_h - aspect):
                    resized = (bw, int(bw / aspect + 0.5))
                else:
                    resized = (int(bh * aspect + 0.5), bh)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return BucketChoice(reso, resized, reso[0] / reso[1] - aspect if reso[1] else math.inf)


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' `get_crop_ltrb` (SDXL-style conditioning; FLUX stores it only for file compatibility)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2
    top = (bucket[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h
