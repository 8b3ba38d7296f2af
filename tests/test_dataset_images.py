"""Image reading (modes, EXIF, unreadable files), resize filters and colour augmentation."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from PIL import Image

from library.errors import UserError
from library.images import color_aug, list_images, load_image, prepare_image, read_image_size, resize


def _save(path, img, **kw):
    img.save(str(path), **kw)
    return str(path)


def test_grayscale_palette_cmyk_become_rgb(tmp_path):
    base = np.zeros((4, 6, 3), np.uint8)
    base[:, :3] = (200, 30, 60)
    rgb = Image.fromarray(base, "RGB")
    for mode in ("L", "P", "CMYK"):
        path = _save(tmp_path / f"x_{mode}.png" if mode != "CMYK" else tmp_path / "x.jpg", rgb.convert(mode))
        arr, alpha = load_image(path)
        assert arr.shape == (4, 6, 3) and arr.dtype == np.uint8 and alpha is None
        assert arr.flags.writeable
    gray, _ = load_image(str(tmp_path / "x_L.png"))
    assert (gray[..., 0] == gray[..., 1]).all()  # grey replicated into three channels


def test_rgba_la_and_palette_transparency_keep_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    rgba[0, 0, 3] = 0
    arr, alpha = load_image(_save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")))
    assert arr.shape == (4, 4, 3) and alpha[0, 0] == 0 and alpha[1, 1] == 128
    _, alpha = load_image(_save(tmp_path / "la.png", Image.fromarray(rgba, "RGBA").convert("LA")))
    assert alpha[0, 0] == 0 and alpha[3, 3] == 128
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    arr, alpha = load_image(_save(tmp_path / "p.png", pal, transparency=0))
    assert alpha is not None and alpha[0, 0] == 0 and alpha[1, 1] == 255 and tuple(arr[1, 1]) == (255, 0, 0)
    # a colour key (PNG tRNS) on RGB and grayscale images marks its colour transparent, as convert("RGBA") reads it
    for mode, key, other in (("RGB", (10, 20, 30), (200, 0, 0)), ("L", 7, 90)):
        keyed = Image.new(mode, (4, 4), other)
        keyed.putpixel((0, 0), key)
        _, alpha = load_image(_save(tmp_path / f"key_{mode}.png", keyed, transparency=key))
        assert alpha is not None and alpha[0, 0] == 0 and alpha[1, 1] == 255, mode


def test_16_bit_grayscale_is_scaled_to_8_bit(tmp_path):
    arr16 = np.full((3, 3), 65535, np.uint16)
    arr16[0, 0] = 0
    path = _save(tmp_path / "g16.png", Image.fromarray(arr16))
    arr, _ = load_image(path)
    assert arr[0, 0, 0] == 0 and arr[1, 1, 0] == 255


def test_16_bit_and_float_images_are_scaled_to_8_bit_by_their_range(tmp_path):
    arr16 = np.array([[0, 32768, 65535]], np.uint16)  # mid-grey stays mid-grey: 32768 / 65535 · 255 = 127.5 -> 128
    assert load_image(_save(tmp_path / "g16.png", Image.fromarray(arr16)))[0][0, :, 0].tolist() == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")  # a [0, 1] image, its maximum exactly 1
    assert load_image(_save(tmp_path / "unit.tiff", unit))[0][0, :, 0].tolist() == [0, 128, 255]
    counts = Image.fromarray(np.array([[0.0, 100.0, 200.0]], np.float32), "F")  # values on the 0-255 scale
    assert load_image(_save(tmp_path / "counts.tiff", counts))[0][0, :, 0].tolist() == [0, 100, 200]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path / "r.jpg", img, exif=exif.tobytes(), quality=100)
    assert read_image_size(path) == (4, 6)
    arr, _ = load_image(path)
    assert arr.shape == (6, 4, 3)
    assert arr[0, 3].mean() > 200  # top-left pixel moved to the top-right corner


@pytest.mark.parametrize("orientation, size", [(1, (6, 4)), (2, (6, 4)), (3, (6, 4)), (4, (6, 4)), (5, (4, 6)),
                                               (6, (4, 6)), (7, (4, 6)), (8, (4, 6))])  # fmt: skip
def test_every_exif_orientation_that_turns_the_image_swaps_its_sides(tmp_path, orientation, size):
    # 5 and 7 mirror and turn by 90 degrees (transpose, transverse): turned, as 6 and 8 are
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "o.jpg", Image.new("RGB", (6, 4)), exif=exif.tobytes())
    assert read_image_size(path) == size
    assert load_image(path)[0].shape[:2] == size[::-1]


def test_bad_images_are_listed_twenty_at_most():
    from library.images import stop_for_bad_images

    problems = [f"{i}.png: broken" for i in range(21)]
    with pytest.raises(UserError) as stopped:
        stop_for_bad_images(problems[:20])
    assert str(stopped.value).splitlines() == ["20 images cannot be used:", *(f"  {p}" for p in problems[:20])]
    with pytest.raises(UserError) as stopped:
        stop_for_bad_images(problems)
    assert str(stopped.value).splitlines()[1:] == [*(f"  {p}" for p in problems[:20]), "  ... and 1 more"]


def test_unreadable_image_stops_with_its_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"bad\.png: cannot read this image"):
        read_image_size(str(bad))
    with pytest.raises(UserError, match=r"bad\.png: cannot read this image"):
        load_image(str(bad))


def test_an_image_over_pillows_pixel_limit_is_named(tmp_path, monkeypatch):
    path = _save(tmp_path / "huge.png", Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then past twice the limit, as a 180 MP scan
    for read in (read_image_size, load_image):
        with pytest.raises(UserError, match=r"huge\.png: cannot read this image \(Image size .* exceeds limit"):
            read(path)


def test_image_listing_matches_sd_scripts_extensions(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp", "d.bmp", "e.jpeg", "f.Png", "g.gif", "h.txt", "._b.png", ".x.png"):
        (tmp_path / name).write_bytes(b"x")
    images, skipped = list_images(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in images] == ["a.JPG", "b.png", "c.webp", "d.bmp", "e.jpeg"]
    assert [p.rsplit("/", 1)[1] for p in skipped] == ["f.Png"]


def test_on_windows_a_mixed_case_extension_is_an_image_as_sd_scripts_globs_it(tmp_path, monkeypatch):
    from library import images as images_module

    monkeypatch.setattr(images_module, "_GLOB_IGNORES_CASE", True)
    for name in ("b.png", "f.Png", "g.gif"):
        (tmp_path / name).write_bytes(b"x")
    images, skipped = list_images(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in images] == ["b.png", "f.Png"] and skipped == []


def test_a_link_to_a_missing_image_stops_with_its_path(tmp_path):
    # an image on a drive that is not mounted: sd-scripts' loader fails on it later; skipping it would train without it
    (tmp_path / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "gone" / "b.png", tmp_path / "b.png")
    with pytest.raises(UserError, match=r"b\.png: a link to .*gone/b\.png, which does not exist; mount or restore"):
        list_images(str(tmp_path))


def test_each_interpolation_name_is_its_pillow_filter():
    arr = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for name, pillow in (("lanczos", Image.Resampling.LANCZOS), ("nearest", Image.Resampling.NEAREST),
                         ("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC),
                         ("area", Image.Resampling.BOX)):  # fmt: skip
        for size in ((20, 14), (80, 60)):  # down and up
            assert np.array_equal(resize(arr, size, name), np.array(Image.fromarray(arr).resize(size, pillow))), name


def test_crops_reach_every_offset_and_centre_odd_excesses():
    from library.images import choose_crop

    windows = {(c.left, c.top) for c in (choose_crop((69, 67), (64, 64), random.Random(s)) for s in range(300))}
    assert {left for left, _ in windows} == set(range(6)) and {top for _, top in windows} == set(range(4))
    centre = choose_crop((69, 67), (64, 64), None)
    assert (centre.left, centre.top) == (2, 1)  # excess 5 and 3, floored halves as sd-scripts


def test_the_alpha_mask_is_resized_and_cropped_with_the_image(tmp_path):
    # alpha equal to the red channel: wherever the crop window lands, the mask is the red channel / 255
    red = np.random.default_rng(3).integers(0, 256, (40, 90), dtype=np.uint8)
    rgba = np.stack([red, np.zeros_like(red), np.zeros_like(red), red], axis=-1)
    path = _save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))
    for seed in range(5):
        rgb, mask, _, _ = prepare_image(path, (64, 32), (80, 36), "lanczos", random.Random(seed), True)
        assert mask.shape == (32, 64) and np.array_equal(mask, rgb[:, :, 0].astype(np.float32) / 255.0)
    _, ones, _, _ = prepare_image(_save(tmp_path / "o.png", Image.new("RGB", (90, 40))), (64, 32), (80, 36),
                                  "bicubic", None, True)  # fmt: skip
    assert ones.shape == (32, 64) and ones.min() == 1.0  # (a non-square bucket: height by width)


def test_interpolation_aliases_resize_identically():
    arr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for a, b in (("bilinear", "linear"), ("bicubic", "cubic"), ("area", "box")):
        assert np.array_equal(resize(arr, (20, 14), a), resize(arr, (20, 14), b))
    assert not np.array_equal(resize(arr, (20, 14), "lanczos"), resize(arr, (20, 14), "nearest"))


def test_area_is_a_box_average_when_downscaling_by_an_integer_factor():
    arr = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = resize(arr, (4, 4), "area").astype(np.float64)
    ref = arr.reshape(4, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out - ref).max() <= 1.0


def test_downscaling_is_antialiased():
    # alternating one-pixel stripes average to grey, which a point sampler would miss
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, ::2] = 255
    out = resize(arr, (4, 4), "bicubic")
    assert 100 < out.mean() < 155 and out.std() < 20


def test_prepare_image_resizes_crops_and_masks(tmp_path):
    rgba = np.zeros((50, 100, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :50, 3] = 0  # left half transparent
    path = _save(tmp_path / "m.png", Image.fromarray(rgba, "RGBA"))
    rgb, mask, original, box = prepare_image(path, (80, 48), (96, 48), "bicubic", None, True)
    assert rgb.shape == (48, 80, 3) and mask.shape == (48, 80) and original == (100, 50)
    assert (box.left, box.top) == (8, 0)
    assert mask[:, :10].max() == 0.0 and mask[:, -10:].min() == 1.0
    _, mask, _, _ = prepare_image(
        _save(tmp_path / "o.png", Image.new("RGB", (64, 64))), (64, 64), (64, 64), "bicubic", None, True
    )
    assert mask.min() == 1.0  # no alpha channel: all ones
    boxes = {prepare_image(path, (80, 48), (96, 48), "bicubic", random.Random(s))[3].left for s in range(30)}
    assert boxes <= set(range(17)) and len(boxes) > 3  # random_crop: uniform window


def test_color_aug_shifts_hue_up_to_16_degrees_or_applies_a_gamma_near_1():
    """sd-scripts' amounts: a hue shift of up to 8 on OpenCV's 0-180 scale (16 degrees), or a gamma in
    [0.95, 1.05] on values in [0, 1] (so black and white stay, unlike sd-scripts' power of 0-255 values)."""
    hues = np.arange(0, 256, 4, dtype=np.uint8)
    hsv = np.stack([np.tile(hues, (4, 1)), np.full((4, 64), 255, np.uint8), np.full((4, 64), 255, np.uint8)], -1)
    colours = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    grey = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    shifts, gammas = [], []
    for seed in range(300):
        coloured, greyed = color_aug(colours, random.Random(seed)), color_aug(grey, random.Random(seed))
        if not np.array_equal(greyed, grey):  # the gamma branch (a hue shift leaves grey as it is)
            assert greyed[0, 0, 0] == 0 and greyed[0, 255, 0] == 255
            gammas.append(np.log(greyed[0, 128, 0] / 255) / np.log(128 / 255))
        elif not np.array_equal(coloured, colours):
            moved = np.asarray(Image.fromarray(coloured).convert("HSV"))[..., 0].astype(int) - hsv[..., 0]
            moved = (moved + 128) % 256 - 128  # around the hue circle
            assert moved.max() - moved.min() <= 3, "one shift for every pixel"
            shifts.append(np.median(moved) * 360 / 256)  # degrees
    assert 60 < len(shifts) + len(gammas) < 140  # applied with probability 0.33
    assert len(shifts) > 25 and len(gammas) > 25  # each half of those
    assert max(abs(s) for s in shifts) <= 16 + 1.5 and max(abs(s) for s in shifts) > 12
    assert min(shifts) < 0 < max(shifts)
    assert 0.95 - 0.01 <= min(gammas) and max(gammas) <= 1.05 + 0.01 and max(gammas) - min(gammas) > 0.05


def test_color_aug_is_seeded_and_bounded():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outs = [color_aug(rgb, random.Random(s)) for s in range(60)]
    unchanged = sum(np.array_equal(o, rgb) for o in outs)
    assert 25 < unchanged < 55  # applied with probability 0.33
    assert np.array_equal(color_aug(rgb, random.Random(4)), color_aug(rgb, random.Random(4)))
    assert all(np.abs(o.astype(int) - rgb.astype(int)).mean() < 40 for o in outs)
