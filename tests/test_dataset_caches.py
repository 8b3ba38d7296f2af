"""Latent and text-encoder caches: round trips, sd-scripts' files, invalidation, sharding, atomic writes.

The AE is a deterministic stand-in (tests/dataset_helpers.StandInEncoder) except in the last test,
which uses the project's real AutoEncoder at a tiny width.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from library import cache_files, caches
from library.caches import (
    LatentCacher,
    TextEncoderCacher,
    check_disk_caches_complete,
    latent_npz_path,
    owned_paths,
    write_npz_atomic,
)
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from library.images import prepare_image
from tests.dataset_helpers import FakeTextEncoder, StandInEncoder, make_args, make_folder, make_image, write_toml


def _group(tmp_path, extra_subset="", datasets=((32, 2),), names=("a.png", "b.png", "c.png"), seed=0, size=(32, 32)):
    folder = tmp_path / "img"
    if not folder.exists():
        make_folder(folder, {n: size for n in names}, {n: f"caption {n[0]}" for n in names})
    text = ""
    for res, bs in datasets:
        text += f"""
        [[datasets]]
        resolution = {res}
        batch_size = {bs}
          [[datasets.subsets]]
          image_dir = "{folder}"
          caption_extension = ".txt"
          {extra_subset}
        """
    cfg = write_toml(tmp_path / "c.toml", text)
    train, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=seed)
    return train


# the text-encoder settings a cache records, as the trainer passes them
FP = {"t5xxl_max_token_length": 8, "apply_t5_attn_mask": False, "encoders": "clip:1|t5:1"}


def _te(tmp_path, te, extra="", fp=FP, mask=False, **kw):
    g = _group(tmp_path, extra)
    stats = TextEncoderCacher(te, fp, mask, to_disk=kw.pop("to_disk", True), **kw).cache([g])
    return g, stats


def _expected_latents(enc, e):
    rgb, *_ = prepare_image(e.path, e.bucket, e.resized, e.subset.interpolation)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    saved = list(enc.calls)
    out = enc.encode(x)[0]
    enc.calls[:] = saved
    return out


def test_ram_cache_round_trip(tmp_path):
    train = _group(tmp_path, "flip_aug = true")
    enc = StandInEncoder()
    stats = LatentCacher(enc, "ae", to_disk=False, batch_size=2).cache([train])
    assert stats.encoded == 3 and enc.calls == [2, 2, 1, 1]  # two batches, each also encoded flipped
    assert not [f for f in os.listdir(tmp_path / "img") if f.endswith(".npz")]
    for e in train.entries():
        assert torch.allclose(e.latents, _expected_latents(enc, e), atol=1e-6)
        assert e.latents_flipped.shape == (16, 4, 4)
    b = train[0]
    assert b["images"] is None and b["latents"].shape == (2, 16, 4, 4)


def test_disk_cache_file_names_keys_and_dtypes(tmp_path):
    train = _group(tmp_path, "flip_aug = true\nalpha_mask = true", size=(40, 32))
    enc = StandInEncoder()
    LatentCacher(enc, "ae", to_disk=True).cache([train])
    # bucket 32x32 -> latent 4x4; file named with the original 40x32 size
    path = tmp_path / "img" / "a_0040x0032_flux.npz"
    with np.load(path) as npz:
        assert sorted(npz.files) == ["alpha_mask_4x4", "cache_record_4x4", "crop_ltrb_4x4", "latents_4x4",
                                     "latents_flipped_4x4", "original_size_4x4"]
        assert npz["latents_4x4"].dtype == np.float32 and npz["latents_4x4"].shape == (16, 4, 4)
        assert npz["latents_flipped_4x4"].dtype == np.float32
        assert npz["alpha_mask_4x4"].dtype == np.float32 and npz["alpha_mask_4x4"].shape == (32, 32)
        assert npz["original_size_4x4"].tolist() == [40, 32]
        assert npz["crop_ltrb_4x4"].tolist() == [0, 3, 32, 28.6]  # sd-scripts' formula: 32/1.25 = 25.6 high
        record = json.loads(str(npz["cache_record_4x4"]))
    assert record["ae"] == "ae" and record["image"]["size"] == os.path.getsize(tmp_path / "img" / "a.png")
    e = next(iter(train.entries()))
    with np.load(e.latents_npz) as npz:
        assert torch.allclose(torch.from_numpy(npz["latents_4x4"]), _expected_latents(enc, e), atol=1e-6)
    assert not [f for f in os.listdir(tmp_path / "img") if f.endswith(".tmp")]


def test_disk_cache_is_reused_and_loaded_into_batches(tmp_path):
    train = _group(tmp_path)
    enc = StandInEncoder()
    LatentCacher(enc, "ae", True).cache([train])
    enc2 = StandInEncoder()
    stats = LatentCacher(enc2, "ae", True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused, enc2.calls) == (0, 3, [])
    b = train[0]
    assert b["latents"].shape == (2, 16, 4, 4)
    for key, lat in zip(b["image_keys"], b["latents"], strict=True):
        e = next(x for x in train.entries() if x.path == key)
        assert torch.allclose(lat, _expected_latents(enc, e), atol=1e-6)


def test_several_resolutions_share_one_file(tmp_path):
    train = _group(tmp_path, datasets=((32, 1), (16, 1)))
    LatentCacher(StandInEncoder(), "ae", True, batch_size=4).cache([train])
    with np.load(tmp_path / "img" / "a_0032x0032_flux.npz") as npz:
        assert {"latents_4x4", "latents_2x2", "cache_record_4x4", "cache_record_2x2"} <= set(npz.files)
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, datasets=((32, 1), (16, 1)))])
    assert (stats.encoded, stats.reused) == (0, 6)


def test_sd_scripts_latent_file_without_record_is_reused(tmp_path):
    train = _group(tmp_path, "flip_aug = true")
    stored = {}
    for e in train.entries():  # what sd-scripts writes: np.savez, no record
        lat = np.full((16, 4, 4), 0.5, np.float32) + len(stored)
        stored[e.path] = lat
        np.savez(latent_npz_path(e.path, e.size), latents_4x4=lat, latents_flipped_4x4=-lat,
                 original_size_4x4=np.array([32, 32]), crop_ltrb_4x4=np.array([0, 0, 32, 32]))
    enc = StandInEncoder()
    stats = LatentCacher(enc, "ae", True).cache([train])
    assert (stats.encoded, stats.reused, enc.calls) == (0, 3, [])
    train.set_current_epoch(1)
    for i in range(len(train)):
        b = train[i]
        for key, lat, flipped in zip(b["image_keys"], b["latents"], b["flippeds"], strict=True):
            assert np.array_equal(lat.numpy(), -stored[key] if flipped else stored[key])


def test_sd_scripts_latent_file_missing_flipped_latents_is_recached(tmp_path):
    train = _group(tmp_path, "flip_aug = true")
    for e in train.entries():
        np.savez(latent_npz_path(e.path, e.size), latents_4x4=np.zeros((16, 4, 4), np.float32),
                 original_size_4x4=np.array([32, 32]), crop_ltrb_4x4=np.array([0, 0, 32, 32]))
    assert LatentCacher(StandInEncoder(), "ae", True).cache([train]).encoded == 3


def _cache_then(tmp_path, change, fingerprint="ae", extra=""):
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, extra)])
    change()
    enc = StandInEncoder()
    train = _group(tmp_path, extra)
    stats = LatentCacher(enc, fingerprint, True).cache([train])
    return stats, enc, train


def test_edited_image_recaches_exactly_that_entry(tmp_path):
    def edit():
        make_image(tmp_path / "img" / "b.png", (32, 32), seed=99)
    stats, enc, train = _cache_then(tmp_path, edit)
    assert (stats.encoded, stats.reused, enc.calls) == (1, 2, [1])
    e = next(e for e in train.entries() if e.path.endswith("b.png"))
    with np.load(e.latents_npz) as npz:
        assert torch.allclose(torch.from_numpy(npz["latents_4x4"]), _expected_latents(enc, e), atol=1e-6)


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 garbage", None])
def test_a_damaged_latent_file_is_replaced(tmp_path, damage, caplog):
    def break_b():
        path = tmp_path / "img" / "b_0032x0032_flux.npz"
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2] if damage is None else damage)  # empty, garbage, truncated

    with caplog.at_level(logging.WARNING):
        stats, enc, train = _cache_then(tmp_path, break_b)
    assert (stats.encoded, stats.reused) == (1, 2)
    assert "b_0032x0032_flux.npz: unreadable, replacing it" in caplog.text
    e = next(e for e in train.entries() if e.path.endswith("b.png"))
    with np.load(e.latents_npz) as npz:
        assert torch.allclose(torch.from_numpy(npz["latents_4x4"]), _expected_latents(enc, e), atol=1e-6)


@pytest.mark.parametrize("damage", [b"", b"garbage"])
def test_a_damaged_text_encoder_file_is_encoded_again(tmp_path, damage):
    _te(tmp_path, FakeTextEncoder())
    (tmp_path / "img" / "a_flux_te.npz").write_bytes(damage)
    te = FakeTextEncoder()
    _, stats = _te(tmp_path, te)
    assert (stats.encoded, stats.reused, te.seen) == (1, 2, ["caption a"])


def test_touched_but_unchanged_image_is_reused(tmp_path):
    def touch():
        t = time.time() + 100
        os.utime(tmp_path / "img" / "a.png", (t, t))
    stats, _, _ = _cache_then(tmp_path, touch)
    assert (stats.encoded, stats.reused) == (0, 3)


def test_different_ae_recaches_everything(tmp_path):
    stats, _, _ = _cache_then(tmp_path, lambda: None, fingerprint="other-ae")
    assert (stats.encoded, stats.reused) == (3, 0)


def test_changed_interpolation_recaches(tmp_path):
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, size=(48, 48))])
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, 'interpolation_type = "nearest"')])
    assert stats.encoded == 3


def test_the_interpolation_of_an_image_that_is_not_resized_does_not_matter(tmp_path):
    """It was compared all the same: a new interpolation_type re-encoded images it never touched, and two
    datasets with two interpolations were refused as resizing one 32x32 image two ways."""
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])  # 32x32 images at resolution 32
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, 'interpolation_type = "nearest"')])
    assert (stats.encoded, stats.reused) == (0, 3)
    two_interpolations = _one_folder_twice(tmp_path, 'interpolation_type = "lanczos"')
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([two_interpolations])
    assert (stats.encoded, stats.reused) == (0, 6)


def test_skip_cache_check_trusts_existing_files(tmp_path):
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    make_image(tmp_path / "img" / "b.png", (32, 32), seed=99)
    stats = LatentCacher(StandInEncoder(), "other", True, skip_cache_check=True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused) == (0, 3)


def test_vae_batch_size_batches_within_a_bucket(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (32, 32), "c.png": (32, 32), "w.png": (96, 32)})
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
        enable_bucket = true
        min_bucket_reso = 16
        max_bucket_reso = 64
        bucket_reso_steps = 16
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
        """)
    train, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    assert {e.bucket for e in train.entries()} == {(32, 32), (48, 16)}
    enc = StandInEncoder()
    LatentCacher(enc, "ae", False, batch_size=2).cache([train])
    # sorted by bucket area: (48, 16) alone, then the three squares as 2 + 1; never mixed
    assert enc.calls == [1, 2, 1]


def test_progress_bar_shows_counts(tmp_path, capsys):
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    err = capsys.readouterr().err
    assert "caching latents" in err and "3/3" in err


def test_sharded_caching_each_process_does_its_share_then_all_see_everything(tmp_path):
    names = tuple(f"{i}.png" for i in range(5))
    groups = [_group(tmp_path, names=names, datasets=((32, 1), (16, 1))) for _ in range(2)]
    encs = [StandInEncoder(), StandInEncoder()]
    stats = [LatentCacher(encs[p], "ae", True, process_index=p, num_processes=2).cache([groups[p]])
             for p in range(2)]
    # 5 images x 2 resolutions; images dealt round-robin in sorted order: 3 to process 0, 2 to process 1
    assert [s.encoded for s in stats] == [6, 4] and [s.other_processes for s in stats] == [4, 6]
    assert owned_paths(["b", "a", "c", "a"], 0, 2) == {"a", "c"} and owned_paths(["b", "a", "c"], 1, 2) == {"b"}
    for g in groups:  # after the barrier every process finds every entry
        check_disk_caches_complete([g])
        assert all(g[i]["latents"] is not None for i in range(len(g)))
    again = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, names=names,
                                                                     datasets=((32, 1), (16, 1)))])
    assert (again.encoded, again.reused) == (0, 10)


def test_missing_share_is_reported_after_the_barrier(tmp_path):
    g = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True, process_index=0, num_processes=2).cache([g])
    with pytest.raises(UserError, match=r"_flux\.npz: latents_4x4 missing after caching"):
        check_disk_caches_complete([g])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "x_flux.npz")
    write_npz_atomic(path, {"a": np.ones(3)})

    def broken(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(caches.np, "savez", broken)
    with pytest.raises(UserError, match=r"x_flux\.npz: cannot write this cache file \(disk full\)"):
        write_npz_atomic(path, {"a": np.zeros(3)})
    monkeypatch.undo()
    with np.load(path) as npz:
        assert npz["a"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == ["x_flux.npz"]


def test_nan_latents_name_the_image(tmp_path):
    class NaNEncoder(StandInEncoder):
        def encode(self, x):
            return super().encode(x) * float("nan")

    with pytest.raises(UserError, match=r"NaN in the latents of .*a\.png"):  # one message, no traceback
        LatentCacher(NaNEncoder(), "ae", False).cache([_group(tmp_path)])




def _one_folder_twice(tmp_path, second_subset: str = ""):
    """Two 32-pixel datasets over the same folder, the second's subset with ``second_subset`` added."""
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          {second_subset}
        """)
    return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]


def test_latents_of_one_image_resized_two_ways_for_one_bucket_are_refused_on_disk(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (96, 64)})  # resized to 48x32; one only cropped would not matter
    g = _one_folder_twice(tmp_path, 'interpolation_type = "nearest"')
    message = (r"a\.png is resized two ways for one 32x32 bucket \(datasets\[0\]\.subsets\[0\]: to 48x32 with bicubic; "
               r"datasets\[1\]\.subsets\[0\]: to 48x32 with nearest\)")  # fmt: skip
    with pytest.raises(UserError, match=message):
        LatentCacher(StandInEncoder(), "ae", True).cache([g])
    stats = LatentCacher(StandInEncoder(), "ae", False).cache([g])  # in RAM each gets its own latents
    assert stats.encoded == 2


def test_two_images_named_alike_are_refused_a_shared_latent_file(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32), "a.jpg": (32, 32)})
    g = _group(tmp_path, names=("a.png", "a.jpg"))
    with pytest.raises(UserError, match=r"a\.jpg and .*a\.png would share the latent cache a_0032x0032_flux\.npz"):
        LatentCacher(StandInEncoder(), "ae", True).cache([g])
    assert LatentCacher(StandInEncoder(), "ae", False).cache([g]).encoded == 2  # in RAM each has its own


# --- the real AE ---------------------------------------------------------------------------------
def test_real_autoencoder_caches_and_reloads(tmp_path):
    flux_ae = pytest.importorskip("library.flux_ae")
    tiny = pytest.importorskip("library.tiny_models")
    torch.manual_seed(0)
    ae = tiny.random_model(tiny.tiny_ae_params(), seed=0).eval()
    ae.reg.sample = False  # the posterior mean, so the comparison below is exact
    assert isinstance(ae, flux_ae.AutoEncoder)
    fingerprint = cache_files.file_fingerprint(tiny.write_model(ae, str(tmp_path / "ae.safetensors")))
    g = _group(tmp_path, datasets=((32, 2),))
    LatentCacher(ae, fingerprint, True, batch_size=2).cache([g])
    e = next(iter(g.entries()))
    rgb, *_ = prepare_image(e.path, e.bucket, e.resized, e.subset.interpolation)
    with torch.no_grad():
        ref = ae.encode(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    with np.load(e.latents_npz) as npz:
        lat = torch.from_numpy(npz["latents_4x4"])
    assert lat.shape == (16, 4, 4) and torch.allclose(lat, ref, atol=1e-5)


def test_same_image_in_two_subsets_is_encoded_once(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (32, 32)})
    for to_disk in (False, True):
        g = _one_folder_twice(tmp_path, "num_repeats = 2")
        enc = StandInEncoder()
        LatentCacher(enc, "ae", to_disk, batch_size=4).cache([g])
        assert enc.calls == [2]
        assert all(g[i]["latents"] is not None for i in range(len(g)))


def test_turning_flip_aug_on_recaches_but_off_reuses(tmp_path):
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, "flip_aug = true")]).encoded == 3
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)]).reused == 3


def test_two_datasets_sharing_a_latent_file_keep_each_others_mask_and_flipped_latents(tmp_path):
    # one image in two datasets: one trains with its alpha as the loss mask, the other with flip_aug
    make_image(tmp_path / "img" / "m.png", (32, 32), mode="RGBA")
    text = "".join(
        f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n{flag} = true\n'
        for flag in ("alpha_mask", "flip_aug")
    )
    config = write_toml(tmp_path / "c.toml", text)

    def group():
        return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", config)), seed=0)[0]

    first = group()
    assert LatentCacher(StandInEncoder(), "ae", True).cache([first]).encoded == 2
    (npz,) = [f for f in os.listdir(tmp_path / "img") if f.endswith(".npz")]
    with np.load(tmp_path / "img" / npz) as cached:
        assert {"latents_4x4", "latents_flipped_4x4", "alpha_mask_4x4"} <= set(cached.files)
    first.set_current_epoch(1)
    masks = [first[i]["alpha_masks"] for i in range(len(first))]  # one batch of each dataset
    alpha = np.asarray(Image.open(tmp_path / "img" / "m.png"))[..., 3] / 255.0
    assert any(m is not None and np.allclose(m[0].numpy(), alpha, atol=1e-6) for m in masks)
    assert LatentCacher(StandInEncoder(), "ae", True).cache([group()]).reused == 2  # the next run encodes nothing


def test_two_datasets_with_two_interpolations_of_an_image_that_keeps_its_size_keep_each_others_arrays(tmp_path):
    """Accepted as one latent, the image was still encoded once per interpolation, and each write took the other
    dataset's mask or flipped latents for stale: one dataset trained without its mask, alternating each run."""
    make_image(tmp_path / "img" / "m.png", (32, 32), mode="RGBA")
    text = "".join(
        f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n{extra}\n'
        for extra in ("alpha_mask = true", 'flip_aug = true\ninterpolation_type = "lanczos"')
    )
    config = write_toml(tmp_path / "c.toml", text)

    def group():
        return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", config)), seed=0)[0]

    for run in range(2):
        stats = LatentCacher(StandInEncoder(), "ae", True).cache([group()])
        assert (stats.encoded, stats.reused) == ((2, 0) if run == 0 else (0, 2))
        (npz,) = [f for f in os.listdir(tmp_path / "img") if f.endswith(".npz")]
        with np.load(tmp_path / "img" / npz) as cached:
            assert {"latents_4x4", "latents_flipped_4x4", "alpha_mask_4x4"} <= set(cached.files)


def test_the_next_batchs_images_are_read_while_a_batch_is_encoded(tmp_path, monkeypatch):
    """Images were read, resized and hashed one batch at a time while the encoder waited (with vae_batch_size 1,
    one image at a time)."""
    import threading

    g = _group(tmp_path)  # a.png, b.png, c.png in one bucket
    prepare_image, read, second_read = caches.prepare_image, [], threading.Event()

    def prepare(path, *args, **kwargs):
        read.append(os.path.basename(path))
        if len(read) == 2:
            second_read.set()
        return prepare_image(path, *args, **kwargs)

    class Waiting(StandInEncoder):
        def encode(self, x):
            if not self.calls:  # the first image's encode: the second image is read meanwhile
                assert second_read.wait(10), "the next batch was not read while this one was encoded"
            return super().encode(x)

    monkeypatch.setattr(caches, "prepare_image", prepare)
    encoder = Waiting()
    for to_disk in (True, False):
        read.clear()
        second_read.clear()
        encoder.calls.clear()
        stats = LatentCacher(encoder, "ae", to_disk, batch_size=1).cache([g] if to_disk else [_group(tmp_path)])
        assert stats.encoded == 3 and encoder.calls == [1, 1, 1] and sorted(read) == ["a.png", "b.png", "c.png"]
