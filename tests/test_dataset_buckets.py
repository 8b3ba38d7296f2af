"""Buckets: the bucket list, per-image selection, resize-to-cover, no-upscale mode, batching per epoch.

Every expected list is worked out by hand in the comments from spec §c.5's rules.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter

import pytest

from library.buckets import (
    BucketSelector,
    adjust_min_max_reso,
    check_reso_steps,
    crop_ltrb,
    make_bucket_resolutions,
)
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import bucketed_group, make_args, make_folder, write_toml


def test_bucket_list_256_area_steps_64():
    # max_area = 65536; square side floor(256/64)*64 = 256.
    # width 128: 65536//128 = 512 -> 512 (cap 512)  -> (128,512),(512,128)
    # width 192: 341 -> 320                          -> (192,320),(320,192)
    # width 256: 256                                 -> (256,256)
    # width 320: 204 -> 192                          -> (320,192),(192,320)
    # width 384: 170 -> 128; 448: 146 -> 128; 512: 128 -> (384,128),(448,128),(512,128) and transposes
    expected = [
        (128, 384),
        (128, 448),
        (128, 512),
        (192, 320),
        (256, 256),
        (320, 192),
        (384, 128),
        (448, 128),
        (512, 128),
    ]
    assert make_bucket_resolutions((256, 256), 128, 512, 64) == expected


def test_bucket_list_64_area_steps_16():
    # max_area = 4096; square 64. width 32: 128 -> (32,128); 48: 85 -> 80 -> (48,80); 64: 64;
    # 80: 51 -> 48; 96: 42 -> 32; 112: 36 -> 32; 128: 32.
    expected = [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    assert make_bucket_resolutions((64, 64), 32, 128, 16) == expected


def test_bucket_list_non_square_resolution():
    # (96, 64): max_area 6144; square floor(78.38/32)*32 = 64.
    # width 32: 192 -> cap 128 -> (32,128),(128,32); 64: 96 -> (64,96),(96,64); 96: 64 -> (96,64),(64,96);
    # 128: 48 -> 32 -> (128,32),(32,128)
    assert make_bucket_resolutions((96, 64), 32, 128, 32) == [(32, 128), (64, 64), (64, 96), (96, 64), (128, 32)]


def test_bucket_list_includes_the_width_max_bucket_reso():
    # sd-scripts loops while width <= max_size. max_area 4096, square side 64; width 16: min(32, 256) = 32 ->
    # (16,32),(32,16); width 32 (= max_size): min(32, 128) = 32 -> (32,32), which no other width yields
    assert make_bucket_resolutions((64, 64), 16, 32, 16) == [(16, 32), (32, 16), (32, 32), (64, 64)]
    # with min and max not multiples of the step, width 120 (= max) alone yields (120,80): 10000 // 120 = 83 -> 80
    assert {(120, 80), (80, 120)} <= set(make_bucket_resolutions((100, 100), 40, 120, 16))


@pytest.fixture
def selector64():
    return BucketSelector((64, 64), 16, make_bucket_resolutions((64, 64), 32, 128, 16))


def test_select_nearest_aspect_and_resize_to_cover(selector64):
    # 100x50, aspect 2.0: nearest bucket aspect is 80/48 = 1.667 (|error| 0.333 vs 1.0 for 96x32).
    # Image wider than the bucket -> scale = 48/50 = 0.96 -> (int(96.5), int(48.5)) = (96, 48).
    c = selector64.select(100, 50)
    assert (c.bucket, c.resized) == ((80, 48), (96, 48))
    # 30x100, aspect 0.3: 32/112 = 0.286 (|error| 0.014) beats 32/96 = 0.333 (0.033). The image is
    # wider than that bucket -> scale = 112/100 -> (int(33.6 + 0.5), int(112.5)) = (34, 112).
    c = selector64.select(30, 100)
    assert (c.bucket, c.resized) == ((32, 112), (34, 112))


def test_select_exact_bucket_keeps_size(selector64):
    c = selector64.select(48, 80)
    assert (c.bucket, c.resized, c.ar_error) == ((48, 80), (48, 80), 0.0)


def test_select_upscales_small_images(selector64):
    # 20x20 -> square bucket 64, scale 3.2
    assert selector64.select(20, 20).resized == (64, 64)


def test_no_upscale_large_image_is_downscaled_to_the_area_then_floored():
    s = BucketSelector((64, 64), 16, None, no_upscale=True)
    # 200x100 (area 20000 > 4096): width sqrt(8192) = 90.5 -> 80, height from it 40 -> 32 (aspect 2.5);
    # height 45.25 -> 32, width from it 64 (aspect 2.0 exact) -> resized (64, 32), bucket (64, 32)
    c = s.select(200, 100)
    assert (c.bucket, c.resized) == ((64, 32), (64, 32))
    # 40x30 fits: no resize, bucket floored to (32, 16)
    c = s.select(40, 30)
    assert (c.bucket, c.resized) == ((32, 16), (40, 30))


def test_select_takes_the_first_of_two_equally_near_buckets(selector64):
    # aspect 3.25 (104x32) lies 0.25 from 96/32 = 3 and from 112/32 = 3.5; numpy's argmin in sd-scripts takes
    # the first in the sorted list. 3.25 > 3 -> scale 32/32 -> (104, 32). Likewise 3.75 between 3.5 and 4.
    c = selector64.select(104, 32)
    assert (c.bucket, c.resized) == ((96, 32), (104, 32))
    assert selector64.select(120, 32).bucket == (112, 32)


def test_no_upscale_rounds_half_up_to_the_step():
    # 79x80 (aspect 0.9875, area 6320 > 4096): width sqrt(4096 * 0.9875) = 63.6 -> int(64.1) = 64, height from it
    # 64.8 -> 65 -> 64: aspect 1.0 (error 0.0125); height 64.4 -> 64, width from it 63.2 -> 63 -> 48: aspect 0.75.
    # Width first: resized (64, int(64.81 + 0.5)) = (64, 65), bucket (64, 64). Truncating would give 48x48.
    s = BucketSelector((64, 64), 16, None, no_upscale=True)
    c = s.select(79, 80)
    assert (c.bucket, c.resized) == ((64, 64), (64, 65))


def spec_selection(width: int, height: int, area: int, steps: int, buckets: list, no_upscale: bool):
    """Spec §c.5's selection, written out step by step: (bucket, resized, aspect error)."""
    aspect = width / height
    if not no_upscale:
        if (width, height) in buckets:
            bucket = (width, height)
        else:  # the first of the nearest aspects in the sorted list (numpy's argmin)
            errors = [abs(w / h - aspect) for w, h in buckets]
            bucket = buckets[errors.index(min(errors))]
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        def to_steps(x):  # int(x + 0.5), floored to a multiple of the step
            return int(x + 0.5) // steps * steps

        resized = (width, height)
        if width * height > area:
            area_width = math.sqrt(area * aspect)
            by_width = to_steps(area_width)
            by_height = to_steps(area / area_width)
            width_first_error = abs(by_width / to_steps(by_width / aspect) - aspect)
            height_first_error = abs(to_steps(by_height * aspect) / by_height - aspect)
            if width_first_error < height_first_error:
                resized = (by_width, int(by_width / aspect + 0.5))
            else:
                resized = (int(by_height * aspect + 0.5), by_height)
        bucket = (resized[0] // steps * steps, resized[1] // steps * steps)
    return bucket, resized, bucket[0] / bucket[1] - aspect


@pytest.mark.parametrize("no_upscale", [False, True])
def test_every_image_size_gets_the_buckets_of_the_spec(no_upscale):
    # a grid of sizes around the buckets' edges: ties of aspect, exact buckets, rounding at .5, tiny and huge images
    buckets = make_bucket_resolutions((96, 64), 32, 160, 16)
    selector = BucketSelector((96, 64), 16, None if no_upscale else buckets, no_upscale=no_upscale)
    # (24x256 has exactly the area: not resized, where resizing it to the area would change its bucket)
    sizes = [(w, h) for w in range(20, 400, 7) for h in range(20, 400, 11)] + buckets + [(79, 80), (104, 32), (24, 256)]
    for w, h in sizes:
        choice = selector.select(w, h)
        bucket, resized, error = spec_selection(w, h, 96 * 64, 16, buckets, no_upscale)
        assert (choice.bucket, choice.resized) == (bucket, resized), (w, h)
        assert choice.ar_error == pytest.approx(error, abs=1e-12), (w, h)


def test_crop_ltrb_floors_both_offsets_as_sd_scripts():
    # get_crop_ltrb: a 32x40 image in a 32x32 bucket is 25.6 wide there; left = (32 - 25.6) // 2 = 3.0, not 3.2
    assert crop_ltrb((32, 32), (32, 40)) == (3.0, 0, 28.6, 32)
    assert crop_ltrb((32, 32), (40, 32)) == (0, 3.0, 32, 28.6)


def test_without_buckets_images_cover_the_single_resolution():
    s = BucketSelector((64, 64), None, [(64, 64)])
    c = s.select(100, 50)  # aspect 2 > 1 -> scale 64/50 -> (128, 64)
    assert (c.bucket, c.resized) == ((64, 64), (128, 64))


def test_reso_steps_must_be_a_multiple_of_16():
    for ok in (16, 32, 48, 64):
        check_reso_steps(ok, "x")
    for bad in (8, 24, 0, 100):
        with pytest.raises(UserError, match=rf"x: bucket_reso_steps = {bad} is not a positive multiple of 16"):
            check_reso_steps(bad, "x")


def test_min_max_are_rounded_to_steps_with_a_warning_and_checked(caplog):
    with caplog.at_level(logging.WARNING):
        assert adjust_min_max_reso((1024, 1024), 250, 1000, 64, "d") == (192, 1024)
    assert [r.getMessage() for r in caplog.records] == [
        "d: min_bucket_reso = 250 is not a multiple of bucket_reso_steps 64; using 192",
        "d: max_bucket_reso = 1000 is not a multiple of bucket_reso_steps 64; using 1024",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert adjust_min_max_reso((512, 512), 256, 1024, 64, "d") == (256, 1024)
    assert not caplog.records
    assert adjust_min_max_reso((512, 1024), 512, 1024, 64, "d") == (512, 1024)  # the bounds may equal the sides
    # below one step: one step, not 0 (whose bucket list divided by zero)
    assert adjust_min_max_reso((512, 512), 32, 1024, 64, "d") == (64, 1024)
    assert (64, 1024) in make_bucket_resolutions((512, 512), 64, 1024, 64)
    with pytest.raises(UserError, match="min_bucket_reso .512. is larger than the smaller side"):
        adjust_min_max_reso((256, 1024), 512, 1024, 64, "d")
    with pytest.raises(UserError, match="max_bucket_reso .512. is smaller than the larger side"):
        adjust_min_max_reso((1024, 1024), 256, 512, 64, "d")


def test_dataset_assigns_each_image_its_bucket(tmp_path):
    train = bucketed_group(tmp_path, {"wide.png": (100, 50), "tall.png": (30, 100), "sq.png": (20, 20)})
    got = {os.path.basename(e.path): (e.bucket, e.resized) for e in train.entries()}
    assert got == {"wide.png": ((80, 48), (96, 48)), "tall.png": ((32, 112), (34, 112)), "sq.png": ((64, 64), (64, 64))}


def test_bucket_reso_steps_24_is_refused_at_build(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (64, 64)})
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 64
        enable_bucket = true
        bucket_reso_steps = 24
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img"}"
        """,
    )
    with pytest.raises(UserError, match=r"c\.toml: datasets\[0\]: bucket_reso_steps = 24 is not a positive multiple"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


def test_resolution_not_multiple_of_16_without_buckets_is_refused(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (64, 64)})
    cfg = write_toml(
        tmp_path / "c.toml", f'[[datasets]]\nresolution = 60\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n'
    )
    with pytest.raises(UserError, match=r"c\.toml: datasets\[0\]: resolution \(60, 60\) is not a multiple of 16"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


SIZES = {
    "w1.png": (100, 50),
    "w2.png": (120, 60),
    "w3.png": (90, 45),
    "s1.png": (64, 64),
    "s2.png": (70, 70),
    "t1.png": (30, 100),
}


def test_batches_never_mix_buckets_and_each_sample_appears_num_repeats_times(tmp_path):
    train = bucketed_group(tmp_path, SIZES, repeats=3, batch=2)
    ds = train.datasets[0]
    # buckets: 3 wide (80x48) x3 repeats = 9 -> 5 batches; 2 square x3 = 6 -> 3; 1 tall (32x112) x3 = 3 -> 2
    assert len(train) == 10
    for epoch in (1, 2):
        batches = ds.epoch_batches(epoch)
        assert all(len({e.bucket for e in b}) == 1 for b in batches)
        assert Counter(os.path.basename(e.path) for b in batches for e in b) == {n: 3 for n in SIZES}


def test_epoch_order_is_a_function_of_seed_and_epoch(tmp_path):
    def order(seed, epoch, sub):
        train = bucketed_group(tmp_path / sub, SIZES, repeats=2, batch=1, seed=seed)
        train.set_current_epoch(epoch)
        return [train[i]["image_keys"][0].rsplit("/", 1)[1] for i in range(len(train))]

    assert order(5, 1, "a") == order(5, 1, "b")
    assert order(5, 1, "a") != order(5, 2, "a")
    assert order(5, 1, "a") != order(6, 1, "a")
    assert sorted(order(5, 1, "a")) == sorted(order(5, 2, "a"))


def test_multiple_datasets_interleave_and_keep_their_batch_sizes(tmp_path):
    make_folder(tmp_path / "img", {f"{i}.png": (64, 64) for i in range(6)})
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 64
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img"}"
        [[datasets]]
        resolution = 32
        batch_size = 3
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img"}"
        """,
    )
    train, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=1)
    train.set_current_epoch(1)
    shapes = [tuple(train[i]["images"].shape) for i in range(len(train))]
    assert sorted(shapes) == sorted([(2, 3, 64, 64)] * 3 + [(3, 3, 32, 32)] * 2)
    assert shapes != sorted(shapes) and shapes != sorted(shapes, reverse=True)  # interleaved by the seed


def test_images_that_fit_no_bucket_without_upscaling_are_listed_together(tmp_path):
    # kept at their area, 8x200 and 4x300 would be under one 16-pixel step wide
    with pytest.raises(UserError, match=r"datasets\[0\]: 2 image\(s\) fit no bucket with bucket_no_upscale: .*"
                                        r"a\.png \(8x200\), .*b\.png \(4x300\)\. Remove or upscale"):
        bucketed_group(tmp_path, {"a.png": (8, 200), "b.png": (4, 300), "c.png": (64, 64)}, "bucket_no_upscale = true")


def test_a_dataset_of_regularisation_images_only_says_so(tmp_path):
    with pytest.raises(UserError, match=r"datasets\[0\]: only regularisation images \(is_reg = true\)"):
        bucketed_group(tmp_path, {"a.png": (64, 64)}, subset_extra="is_reg = true")
