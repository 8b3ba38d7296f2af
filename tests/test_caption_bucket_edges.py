"""Edges of caption processing and bucketing that a mutation round over library/captions.py and
library/buckets.py found unpinned. Expected values come from spec §c.5/§c.6 and sd-scripts'
`process_caption` / `BucketManager`, worked out in the comments or by small references written here.
"""

from __future__ import annotations

import math
import os
import random

import pytest

from library.buckets import BucketSelector, adjust_min_max_reso, crop_ltrb, make_bucket_resolutions
from library.captions import CaptionOptions, caption_for_cache, process_caption, read_caption_file
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import bucketed_group, make_args, make_folder, write_toml


def run(caption, seed=0, epoch=1, step=0, max_steps=0, **opts):
    return process_caption(caption, CaptionOptions(**opts), random.Random(seed), epoch, step, max_steps)


# --- caption files ---------------------------------------------------------------------------------


def test_caption_file_with_old_mac_line_ends_keeps_only_its_first_line(tmp_path):
    # sd-scripts reads captions in text mode, where a lone "\r" ends a line as "\n" and "\r\n" do
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_bytes(b"first line\rsecond line\r")
    assert read_caption_file(str(tmp_path / "a.png"), ".txt", False) == "first line"
    assert read_caption_file(str(tmp_path / "a.png"), ".txt", True) == "first line\nsecond line"


# --- prefix and suffix -----------------------------------------------------------------------------


def test_a_suffix_alone_is_added():
    assert run("a cat", caption_suffix="4k") == "a cat 4k"


def test_the_cached_caption_gets_a_suffix_alone_too():
    assert caption_for_cache("a cat", CaptionOptions(caption_suffix="4k"), "a.png") == "a cat 4k"


def test_the_cached_caption_splits_at_the_subsets_separator():
    opts = CaptionOptions(caption_separator=";", keep_tokens_separator="|||")
    assert caption_for_cache("sks ||| a; b", opts, "a.png") == "sks, a, b"


def test_the_cached_caption_is_never_shuffled_nor_thinned():
    # it is encoded once: only the deterministic transforms apply, whatever random options the subset holds
    wild = CaptionOptions(
        keep_tokens_separator="|||",
        shuffle_caption=True,
        caption_tag_dropout_rate=1.0,
        caption_dropout_rate=1.0,
        caption_dropout_every_n_epochs=1,
        token_warmup_step=5,
    )
    for key in ("a.png", "b.png", "c.png", "d.png"):
        assert caption_for_cache("sks ||| a, b, c, d, e, f", wild, key) == "sks, a, b, c, d, e, f"


def test_the_cached_wildcard_choice_is_seeded_by_the_file_names_bytes():
    # one draw from random.Random("wildcard:" + name), the name as its bytes on disk: a Latin-1 name that is not
    # UTF-8 (Python keeps its byte as a surrogate) seeds with that byte, so two such names differ
    wild = CaptionOptions(enable_wildcard=True)
    for name, raw in (("img3.png", b"img3.png"), ("caf\udce9.png", b"caf\xe9.png"), ("caf\udce8.png", b"caf\xe8.png")):
        want = random.Random(b"wildcard:" + raw).choice("abcdefghijklmnop")
        assert caption_for_cache("{" + "|".join("abcdefghijklmnop") + "}", wild, name) == want
    assert random.Random(b"wildcard:caf\xe9.png").random() != random.Random(b"wildcard:caf\xe8.png").random()


def test_an_empty_prefix_adds_no_space():
    # sd-scripts adds `prefix + " "` only when the prefix is truthy; an empty string is not
    assert run("a cat", caption_prefix="", caption_suffix="4k") == "a cat 4k"
    assert run("a cat", caption_prefix="sks", caption_suffix="") == "sks a cat"


# --- wildcards -------------------------------------------------------------------------------------


def test_empty_braces_are_no_wildcard():
    # sd-scripts' pattern is r"\{([^}]+)\}": "{}" has no alternative and stays as it is
    assert {run("a {} b {x|x}", seed=s, enable_wildcard=True) for s in range(5)} == {"a {} b x"}


def test_literal_braces_survive_a_caption_holding_the_placeholder_characters():
    # `{{`/`}}` are parked on U+2985/U+2986 while alternatives are drawn; a caption that already holds one of
    # them must keep it, and still get its literal braces back
    for odd in ("\u2985", "\u2986", "\u2985\u2986"):
        assert run(f"{odd} {{{{x}}}} {{a|a}}", enable_wildcard=True) == f"{odd} {{x}} a"


# --- keep_tokens / keep_tokens_separator -----------------------------------------------------------


def test_keep_tokens_separator_absent_from_the_caption_falls_back_to_keep_tokens():
    cap = "sks, a, b, c, d"
    outs = {run(cap, seed=s, shuffle_caption=True, keep_tokens=1, keep_tokens_separator="|||") for s in range(20)}
    assert all(o.startswith("sks, ") and sorted(o.split(", ")[1:]) == list("abcd") for o in outs)
    assert len(outs) > 1


def test_keep_tokens_separator_drops_empty_tags_of_the_fixed_end_part():
    assert run("a ||| b ||| , e, ", keep_tokens_separator="|||") == "a, b, e"
    assert run("a ||| b ||| , e, ", keep_tokens_separator="|||", shuffle_caption=True, seed=4) == "a, b, e"


def test_a_third_keep_tokens_separator_stays_in_the_fixed_end_part():
    # sd-scripts splits at the first occurrence, then the flexible part at its first: the end part is
    # everything after the second separator, a third one included
    assert run("a ||| b ||| c ||| d", keep_tokens_separator="|||") == "a, b, c ||| d"


def test_keep_tokens_counts_empty_tags_as_sd_scripts_does():
    # without keep_tokens_separator, sd-scripts strips the tags but drops no empty one: "x, , y" is three tags
    assert run("x, , y", shuffle_caption=True, keep_tokens=3, seed=1) == "x, , y"
    assert run("x, , y, z", keep_tokens=2, caption_tag_dropout_rate=1.0) == "x, "


def test_a_space_separator_ignores_the_captions_outer_spaces():
    # sd-scripts splits caption.strip(): no empty tag from a leading or trailing space
    assert run(" a b c ", caption_separator=" ", keep_tokens=3, shuffle_caption=True) == "a, b, c"


# --- token warm-up ---------------------------------------------------------------------------------


def test_warm_up_caption_is_whole_at_its_last_step_despite_rounding():
    # n = floor(step * (L - min) / warmup) + min; at step == warmup the loop no longer cuts (step < warmup),
    # where the formula would give floor(49 * (1 / 49)) = floor(0.9999999999999999) = 0 -> 1 tag of 2
    assert math.floor(49 * (1 / 49)) == 0
    assert run("a, b", step=49, token_warmup_step=49) == "a, b"
    assert run("a, b", step=48, token_warmup_step=49) == "a"


def test_a_fractional_warm_up_above_one_step_is_not_truncated():
    # sd-scripts converts token_warmup_step only when it is below 1; 2.5 stays 2.5 steps:
    # step 2 < 2.5 -> floor(2 * (5 - 1) / 2.5) + 1 = floor(3.2) + 1 = 4 of the 5 tags
    cap = "a, b, c, d, e"
    assert run(cap, step=2, max_steps=100, token_warmup_step=2.5) == "a, b, c, d"
    assert run(cap, step=1, max_steps=100, token_warmup_step=2.5) == "a, b"  # floor(1.6) + 1
    assert run(cap, step=3, max_steps=100, token_warmup_step=2.5) == cap


# --- the order of random draws ---------------------------------------------------------------------


def reference_caption(caption, rng, dropout=0.0, wildcard=False, shuffle=False, tag_dropout=0.0, keep=0):
    """sd-scripts' process_caption order of draws: the dropout draw only with a rate, then the wildcard line and
    alternatives, then the shuffle, then one draw per flexible tag."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if wildcard:
        lines = caption.split("\n")
        caption = rng.choice(lines) if len(lines) > 1 else caption
        out = ""
        while "{" in caption:
            head, rest = caption.split("{", 1)
            inner, caption = rest.split("}", 1)
            out += head + rng.choice(inner.split("|"))
        caption = out + caption
    tags = [t.strip() for t in caption.split(",")]
    fixed, flex = tags[:keep], tags[keep:]
    if shuffle:
        rng.shuffle(flex)
    if tag_dropout > 0:
        flex = [t for t in flex if rng.random() >= tag_dropout]
    return ", ".join(fixed + flex)


def test_random_draws_come_in_sd_scripts_order():
    cap = "k, a, b, c, d, e, f"
    wild = "k, {a|b|c}, {d|e}, f, g, h\nk, x, {y|z}, w, v"
    cases = [
        (cap, dict(shuffle=True, keep=1), dict(shuffle_caption=True, keep_tokens=1)),
        # a rate of 0 draws nothing: the shuffle gets the generator's first numbers
        (
            cap,
            dict(shuffle=True, tag_dropout=0.3),
            dict(shuffle_caption=True, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.3),
        ),
        (cap, dict(dropout=0.3, shuffle=True), dict(shuffle_caption=True, caption_dropout_rate=0.3)),
        (cap, dict(shuffle=True), dict(shuffle_caption=True, caption_tag_dropout_rate=0.0)),
        (
            wild,
            dict(dropout=0.3, wildcard=True, shuffle=True, tag_dropout=0.4, keep=1),
            dict(
                caption_dropout_rate=0.3,
                enable_wildcard=True,
                shuffle_caption=True,
                caption_tag_dropout_rate=0.4,
                keep_tokens=1,
            ),
        ),
    ]
    for text, ref_opts, opts in cases:
        for seed in range(25):
            ref_rng, rng = random.Random(seed), random.Random(seed)
            expected = reference_caption(text, ref_rng, **ref_opts)
            assert process_caption(text, CaptionOptions(**opts), rng, 1) == expected, (text, opts, seed)
            # and no more draws than that: the sample's generator goes on to random crops and colour changes
            assert rng.random() == ref_rng.random(), (text, opts, seed)


# --- buckets ---------------------------------------------------------------------------------------


def test_max_bucket_reso_is_checked_against_the_longer_side_of_a_non_square_resolution():
    # 1024 > 768 although the shorter side 512 fits
    with pytest.raises(UserError, match=r"max_bucket_reso \(768\) is smaller than the larger side"):
        adjust_min_max_reso((512, 1024), 256, 768, 64, "d")
    with pytest.raises(UserError, match=r"max_bucket_reso \(768\) is smaller than the larger side"):
        adjust_min_max_reso((1024, 512), 256, 768, 64, "d")
    assert adjust_min_max_reso((512, 1024), 256, 1024, 64, "d") == (256, 1024)


def test_an_image_of_exactly_a_bucket_size_takes_that_bucket_over_an_earlier_one_of_its_aspect():
    # the list (16,32), (32,16), (32,32), (64,64) holds two squares; sd-scripts looks the size up first, and only
    # else takes the first nearest aspect (numpy's argmin): 64x64 -> (64,64), 96x96 -> (32,32), scaled to cover
    buckets = make_bucket_resolutions((64, 64), 16, 32, 16)
    assert buckets == [(16, 32), (32, 16), (32, 32), (64, 64)]
    selector = BucketSelector((64, 64), 16, buckets)
    assert (selector.select(64, 64).bucket, selector.select(64, 64).resized) == ((64, 64), (64, 64))
    assert (selector.select(96, 96).bucket, selector.select(96, 96).resized) == ((32, 32), (32, 32))


def test_crop_box_of_an_image_with_the_buckets_own_aspect_takes_sd_scripts_width_branch():
    # get_crop_ltrb scales to the bucket height only when the bucket is strictly wider than the image; at equal
    # aspects it scales to the width, and the height 176 / (176 / 240) comes out 240.00000000000003, whose
    # floored offset is -1.0. A latent cache records this box as sd-scripts does (FLUX itself ignores it)
    height = 176 / (176 / 240)
    assert height > 240
    for image in ((176, 240), (88, 120), (528, 720)):
        assert crop_ltrb((176, 240), image) == (0, (240 - height) // 2, 176, (240 - height) // 2 + height)
    assert crop_ltrb((176, 240), (176, 240))[1] == -1.0


# --- buckets in a dataset --------------------------------------------------------------------------


def _dataset(tmp_path, sizes, extra="", repeats=1, batch=1, seed=5):
    return bucketed_group(tmp_path, sizes, extra, repeats, batch, seed).datasets[0]


def test_bucket_info_lists_buckets_sorted_with_repeats_counted_and_the_mean_absolute_aspect_error(tmp_path):
    # buckets of (64,64) in 32..128 by 16: a.png 100x50 (aspect 2) -> (80,48), error 5/3 - 2 = -1/3;
    # b.png 50x100 (aspect 0.5) -> (48,80), error 0.6 - 0.5 = +0.1. sd-scripts sorts the buckets, counts each
    # image num_repeats times, and averages the absolute errors (not the signed ones, nor their maximum)
    ds = _dataset(tmp_path, {"a.png": (100, 50), "b.png": (50, 100)}, repeats=3)
    info = ds.bucket_info()
    assert info["buckets"] == {0: {"resolution": (48, 80), "count": 3}, 1: {"resolution": (80, 48), "count": 3}}
    assert info["mean_img_ar_error"] == pytest.approx((1 / 3 + 0.1) / 2)


def test_images_in_a_bucket_are_reshuffled_every_epoch(tmp_path):
    # one bucket, one batch of 6: only the shuffle inside the bucket can change the order from epoch to epoch
    ds = _dataset(tmp_path / "a", {f"{i}.png": (64, 64) for i in range(6)}, batch=6)
    orders = [tuple(e.path for e in ds.epoch_batches(epoch)[0]) for epoch in range(1, 7)]
    assert len(set(orders)) > 1
    # the order of an epoch is a function of (seed, epoch), whichever epoch the dataset was asked for before
    fresh = _dataset(tmp_path / "b", {f"{i}.png": (64, 64) for i in range(6)}, batch=6)
    for epoch in (3, 1, 2):
        assert [os.path.basename(e.path) for e in fresh.epoch_batches(epoch)[0]] == [
            os.path.basename(p) for p in orders[epoch - 1]
        ]


def test_five_images_that_fit_no_bucket_are_all_named_without_a_count_of_more(tmp_path):
    sizes = {f"{i}.png": (300, 4) for i in range(5)}
    with pytest.raises(UserError, match=r"5 image\(s\) fit no bucket") as err:
        _dataset(tmp_path / "a", sizes | {"ok.png": (64, 64)}, "bucket_no_upscale = true")
    assert "more" not in str(err.value) and str(err.value).count("(300x4)") == 5
    with pytest.raises(UserError, match=r"6 image\(s\) fit no bucket.* and 1 more\. Remove"):
        _dataset(tmp_path / "b", {f"{i}.png": (300, 4) for i in range(6)}, "bucket_no_upscale = true")


def test_a_resolution_whose_height_alone_is_no_multiple_of_16_is_refused_without_buckets(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (64, 40)})
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nresolution = [64, 40]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n',
    )
    with pytest.raises(UserError, match=r"resolution \(64, 40\) is not a multiple of 16"):
        build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)


def test_without_buckets_every_image_covers_the_single_resolution_in_a_dataset(tmp_path):
    # one bucket, the resolution; each image scaled to cover it: 100x50 by 64/50 -> (128, 64),
    # 30x100 by 64/30 -> (64, int(213.33 + 0.5)) = (64, 213); no aspect bucket of a bucket list is used
    make_folder(tmp_path / "img", {"a.png": (100, 50), "b.png": (30, 100), "c.png": (64, 64)})
    cfg = write_toml(
        tmp_path / "c.toml",
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n',
    )
    train, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    got = {os.path.basename(e.path): (e.bucket, e.resized) for e in train.datasets[0].entries}
    assert got == {"a.png": ((64, 64), (128, 64)), "b.png": ((64, 64), (64, 213)), "c.png": ((64, 64), (64, 64))}
