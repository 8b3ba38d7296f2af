"""Edges of the latent and text-encoder caches that a mutation round over library/cache_files.py and
library/caches.py found unpinned: when an image counts as the one a cache was made from, damaged files and
members, records that do not parse, temporaries of killed writes, read-only folders, the checks after the
barrier, flipped latents of another setting, the arrays a text-encoder file must hold and their dtypes, and
what one encode and one VAE batch serve."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from library import cache_files
from library.cache_files import image_identity, same_image
from library.caches import (
    LatentCacher,
    TextEncoderCacher,
    check_disk_caches_complete,
    load_latents,
    load_te_outputs,
)
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import FakeTextEncoder, StandInEncoder, make_args, make_folder, make_image, write_toml


def _group(tmp_path, extra_subset="", names=("a.png", "b.png"), size=(32, 32), resolution=32, dataset=""):
    folder = tmp_path / "img"
    if not folder.exists():
        make_folder(folder, {n: size for n in names}, {n: f"caption {n[0]}" for n in names})
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = {resolution}
        batch_size = 1
        {dataset}
          [[datasets.subsets]]
          image_dir = "{folder}"
          caption_extension = ".txt"
          {extra_subset}
        """,
    )
    train, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    return train


# the text-encoder settings a cache records, as the trainer passes them
FP = {"t5xxl_max_token_length": 8, "apply_t5_attn_mask": False, "encoders": "clip:1|t5:1"}


def _set_mtime(path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


# --- which image a cache was made from --------------------------------------------------------------
def test_an_image_of_another_size_is_another_image_even_at_the_recorded_time(tmp_path):
    """A replaced image whose time was kept (rsync -t, cp -p, a restore from a backup) is not the recorded one
    when its byte count differs; the size is checked before the time is trusted."""
    path = tmp_path / "a.png"
    make_image(path, (32, 32), seed=0)
    recorded = image_identity(str(path))
    make_image(path, (48, 32), seed=1)
    _set_mtime(path, recorded["mtime_ns"])
    assert not same_image(str(path), recorded)


# --- damaged files ------------------------------------------------------------------------------------
def _cached_then_replaced(tmp_path, content: bytes | None):
    """Two images cached to disk, then b's latent file replaced by ``content`` (None: by a folder)."""
    train = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True).cache([train])
    e = next(e for e in train.entries() if e.path.endswith("b.png"))
    os.remove(e.latents_npz)
    if content is None:
        os.mkdir(e.latents_npz)
    else:
        with open(e.latents_npz, "wb") as f:
            f.write(content)
    return train, e


@pytest.mark.parametrize("content", [b"garbage", b"\x93NUMPY\x01"], ids=["not_zip", "npy_header"])
def test_a_latent_file_np_load_calls_pickled_or_bad_is_replaced_and_named_when_read(tmp_path, content, caplog):
    """np.load raises ValueError (not BadZipFile) for a file that does not start as a zip does: it is one more
    damaged file, replaced when caching and named when training reads it."""
    train, e = _cached_then_replaced(tmp_path, content)
    with pytest.raises(UserError, match="b_0032x0032_flux.npz: this cache file is damaged"):
        load_latents(e)
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused) == (1, 1)
    assert "b_0032x0032_flux.npz: unreadable, replacing it" in caplog.text
    assert load_latents(e)[0].shape == (16, 4, 4)


def test_a_latent_file_that_cannot_be_opened_is_named_when_read(tmp_path):
    """An OSError from np.load (here a folder in the file's place; on a failing disk or share, an I/O error)
    stops with the file named, as for a damaged one."""
    _, e = _cached_then_replaced(tmp_path, None)
    with pytest.raises(UserError, match="b_0032x0032_flux.npz: this cache file is damaged"):
        load_latents(e)


def test_a_latent_file_whose_record_is_not_json_is_encoded_again(tmp_path):
    """A record that does not parse (another tool's key of that name, a hand edit) is no record of this image:
    the latents are encoded again rather than trusted or crashing the check."""
    train = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True).cache([train])
    e = next(e for e in train.entries() if e.path.endswith("b.png"))
    with np.load(e.latents_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["cache_record_4x4"] = np.array("{not json")
    np.savez(e.latents_npz, **arrays)
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused) == (1, 1)


def test_a_write_killed_before_its_rename_leaves_a_temporary_the_next_run_removes(tmp_path, monkeypatch):
    """The temporary of write_npz_atomic is named after its process, so that the clean-up of a later run can tell
    a killed writer's from a live one's; a temporary named otherwise would stay beside the images for good. A
    temporary of a gone process is removed once it is an hour old, not while it is a minute old."""
    final = str(tmp_path / "a_0032x0032_flux.npz")
    monkeypatch.setattr(cache_files.os, "replace", lambda src, dst: None)  # killed between writing and renaming
    cache_files.write_npz_atomic(final, {"x": np.zeros(1)})
    monkeypatch.undo()
    (left,) = os.listdir(tmp_path)
    assert left == f"a_0032x0032_flux.npz.{os.getpid()}.tmp"
    written = os.stat(tmp_path / left).st_mtime_ns
    _set_mtime(tmp_path / left, written - 60 * 10**9)  # a minute ago: maybe another machine's, writing now
    assert cache_files.remove_half_written_caches([final]) == []
    _set_mtime(tmp_path / left, written - 3600 * 10**9)  # an hour ago: a killed run's, whoever wrote it
    assert cache_files.remove_half_written_caches([final]) == [str(tmp_path / left)]
    assert os.listdir(tmp_path) == []


# --- touched images, read-only folders -----------------------------------------------------------------
def test_a_touched_image_beside_a_cache_that_cannot_be_rewritten_is_still_reused(tmp_path, monkeypatch):
    """A copied or touched image keeps its latents; remembering its new time is a rewrite of the record that may
    fail (a read-only share, a full disk). That failure costs a re-hash next run, not the run."""
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    later = os.stat(tmp_path / "img" / "a.png").st_mtime_ns + 100 * 10**9
    _set_mtime(tmp_path / "img" / "a.png", later)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_files.np, "savez", no_space)
    enc = StandInEncoder()
    stats = LatentCacher(enc, "ae", True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused, enc.calls) == (0, 2, [])
    assert [n for n in os.listdir(tmp_path / "img") if n.endswith(".tmp")] == []


def test_a_latent_file_written_in_the_same_clock_tick_as_its_image_counts_as_up_to_date(tmp_path, monkeypatch):
    """On file systems with coarse times (FAT's 2 s, some shares' 1 s) a latent file made right after its image
    has the image's very time: it is not older, so the image is not decoded before the models load and its folder
    need not be writable."""
    from library.cache_files import check_cache_folders_writable, images_to_decode

    g = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True).cache([g])
    entries = list(g.entries())
    for e in entries:
        _set_mtime(e.latents_npz, os.stat(e.path).st_mtime_ns)
    assert images_to_decode(entries, latents_on_disk=True) == []
    monkeypatch.setattr("library.safetensors_io.output_folder_problem", lambda folder: f"{folder} is read-only")
    check_cache_folders_writable(entries, latents_on_disk=True, te_on_disk=False)
    _set_mtime(entries[0].latents_npz, os.stat(entries[0].path).st_mtime_ns - 1)  # older: it would be re-made
    with pytest.raises(UserError, match="--cache_latents_to_disk writes cache files beside the images"):
        check_cache_folders_writable(entries, latents_on_disk=True, te_on_disk=False)


def test_a_read_only_folder_is_refused_only_for_the_cache_that_would_be_written(tmp_path, monkeypatch):
    """With every latent file there and no text-encoder files, a read-only folder is refused for
    --cache_text_encoder_outputs_to_disk only, and not at all when text-encoder outputs stay in RAM."""
    from library.cache_files import check_cache_folders_writable

    g = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True).cache([g])
    entries = list(g.entries())
    monkeypatch.setattr("library.safetensors_io.output_folder_problem", lambda folder: f"{folder} is read-only")
    check_cache_folders_writable(entries, latents_on_disk=True, te_on_disk=False)
    check_cache_folders_writable(entries, latents_on_disk=False, te_on_disk=False)
    with pytest.raises(UserError, match="^--cache_text_encoder_outputs_to_disk writes"):
        check_cache_folders_writable(entries, latents_on_disk=True, te_on_disk=True)


# --- after the barrier of a multi-process run ---------------------------------------------------------
def test_a_latent_file_of_another_resolution_is_no_latent_of_this_one_after_the_barrier(tmp_path):
    """A file left by an earlier run at another resolution exists, but the latents this run needs are not in it:
    a process that failed its share is found by the array, not by the file."""
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (32, 32)})
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, resolution=16)])  # *_flux.npz with 2x2
    g = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True, process_index=0, num_processes=2).cache([g])  # process 1 failed
    with pytest.raises(UserError, match=r"b_0032x0032_flux\.npz: latents_4x4 missing after caching"):
        check_disk_caches_complete([g])


def test_missing_or_empty_text_encoder_files_are_reported_after_the_barrier(tmp_path):
    g = _group(tmp_path)
    TextEncoderCacher(FakeTextEncoder(), FP, False, True, process_index=0, num_processes=2).cache([g])
    check_disk_caches_complete([g], latents=False, te=False)
    with pytest.raises(UserError, match=r"b_flux_te\.npz: text-encoder outputs missing after caching"):
        check_disk_caches_complete([g], latents=False, te=True)
    (tmp_path / "img" / "b_flux_te.npz").write_bytes(b"")  # there, but holds nothing
    with pytest.raises(UserError, match=r"b_flux_te\.npz: text-encoder outputs missing after caching"):
        check_disk_caches_complete([g], latents=False, te=True)


def _damage_member(path, member: bytes, into: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(member) + len(member) + into  # inside that member's stored bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_file_whose_directory_is_intact_but_whose_checked_member_is_damaged_is_made_again(tmp_path):
    """The checks read the zip directory first (all arrays named), then the flag and the record: a damaged member
    there is a stale file, made again, not a crash before training."""
    g = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True).cache([g])
    TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    _damage_member(tmp_path / "img" / "b_flux_te.npz", b"apply_t5_attn_mask.npy", 100)
    _damage_member(tmp_path / "img" / "b_0032x0032_flux.npz", b"cache_record_4x4.npy", 150)
    te = FakeTextEncoder()
    stats = TextEncoderCacher(te, FP, False, True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused, te.seen) == (1, 1, ["caption b"])
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused) == (1, 1)


BICUBIC, LANCZOS = 'interpolation_type = "bicubic"', 'interpolation_type = "lanczos"'
NO_UPSCALE = "enable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = 16"


@pytest.mark.parametrize(
    "size, first, second",
    [
        ((48, 48), dict(extra=LANCZOS), dict(extra=BICUBIC)),  # another interpolation
        ((32, 32), dict(ae="ae"), dict(ae="other-ae")),  # another AE
        ((40, 36), dict(), dict(resolution=64, dataset=NO_UPSCALE)),  # another resize (36x32, 40x36) for one bucket
    ],
    ids=["interpolation", "ae", "resize"],
)
def test_flipped_latents_of_another_setting_are_dropped_when_the_latents_are_made_again(tmp_path, size, first, second):
    """Run 1 caches an image's latents and flipped latents; run 2, with another setting and without flip_aug,
    encodes it again: the old flipped latents must go with the old latents, or run 3 (that setting, flip_aug on)
    would find every array and a matching record, and train on another encoding's mirror image."""
    make_folder(tmp_path / "img", {"a.png": size})

    def run(extra="", ae="ae", **kw):
        group = _group(tmp_path, extra, names=("a.png",), **kw)
        assert LatentCacher(StandInEncoder(), ae, True).cache([group]).encoded == 1
        return group

    run(**{**first, "extra": first.get("extra", "") + "\nflip_aug = true"})
    (e,) = run(**second).entries()
    assert e.bucket == (32, 32)
    with np.load(e.latents_npz) as npz:
        assert sorted(npz.files) == ["cache_record_4x4", "crop_ltrb_4x4", "latents_4x4", "original_size_4x4"]


# --- text-encoder files that lack an array ----------------------------------------------------------------
@pytest.mark.parametrize("drop", ["apply_t5_attn_mask", "t5_attn_mask", "t5_out"])
def test_a_text_encoder_file_without_one_of_its_arrays_is_encoded_again(tmp_path, drop):
    """sd-scripts' check wants the four outputs and the apply_t5_attn_mask flag: a file without one of them (an
    older tool's, a hand edit) is encoded again even though its record matches, also with --skip_cache_check."""
    g = _group(tmp_path)
    TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    path = tmp_path / "img" / "b_flux_te.npz"
    for skip in (True, False):
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files if k != drop}
        np.savez(path, **arrays)
        te = FakeTextEncoder()
        stats = TextEncoderCacher(te, FP, False, True, skip_cache_check=skip).cache([_group(tmp_path)])
        assert (stats.encoded, stats.reused, te.seen) == (1, 1, ["caption b"])


def test_text_encoder_outputs_in_float64_are_stored_as_float32_and_the_mask_as_int64(tmp_path):
    """np.zeros makes float64: outputs other than fp16 are stored as float32, as sd-scripts stores bf16 ones."""

    def encode(captions):
        outs = FakeTextEncoder()(captions)
        for out in outs:
            out.update(
                txt_ids=np.zeros((8, 3)),
                l_pooled=out["l_pooled"].astype(np.float64),
                t5_attn_mask=out["t5_attn_mask"].astype(np.int32),
            )
        return outs

    TextEncoderCacher(encode, FP, False, True).cache([_group(tmp_path)])
    with np.load(tmp_path / "img" / "a_flux_te.npz") as npz:
        dtypes = {k: npz[k].dtype for k in ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask")}
    assert dtypes == {
        "l_pooled": np.float32,
        "t5_out": np.float32,
        "txt_ids": np.float32,
        "t5_attn_mask": np.int64,
        "apply_t5_attn_mask": np.bool_,
    }


def test_flipped_latents_of_an_sd_scripts_file_go_when_this_project_encodes_the_image_again(tmp_path):
    """An sd-scripts file (no record) has latents and flipped latents but no mask; a run with alpha_mask encodes
    the image again. sd-scripts' flipped latents are of an unknown resize (its default filter is not this
    project's): they go, or a later flip_aug run would find them under this project's record and reuse them."""
    g = _group(tmp_path, names=("a.png",))
    (e,) = g.entries()
    lat = np.ones((16, 4, 4), np.float32)
    np.savez(cache_files.latent_npz_path(e.path, e.size), latents_4x4=lat, latents_flipped_4x4=-lat,
             original_size_4x4=np.array([32, 32]), crop_ltrb_4x4=np.array([0, 0, 32, 32]))  # fmt: skip
    (e,) = _group(tmp_path, "alpha_mask = true", names=("a.png",)).entries()
    assert LatentCacher(StandInEncoder(), "ae", True).cache([[e]]).encoded == 1
    with np.load(e.latents_npz) as npz:
        assert "latents_flipped_4x4" not in npz.files and "alpha_mask_4x4" in npz.files


def test_reading_a_text_encoder_file_without_an_output_names_the_file_and_the_output(tmp_path):
    g = _group(tmp_path)
    TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    path = tmp_path / "img" / "a_flux_te.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "t5_out"}
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=r"a_flux_te\.npz: has no t5_out; delete the file"):
        load_te_outputs(str(path))


def test_reading_latents_takes_only_what_the_subset_asks_for_and_names_a_missing_latent(tmp_path):
    """The file holds flipped latents for a flip_aug dataset; a dataset without flip_aug reads the latents only.
    A file without this bucket's latents names the file and the key rather than a bare KeyError."""
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, "flip_aug = true", names=("a.png",))])
    (e,) = _group(tmp_path, names=("a.png",)).entries()
    e.latents_npz = cache_files.latent_npz_path(e.path, e.size)
    latents, flipped, mask = load_latents(e)
    assert latents.shape == (16, 4, 4) and flipped is None and mask is None
    with np.load(e.latents_npz) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "latents_4x4"}
    np.savez(e.latents_npz, **arrays)
    with pytest.raises(UserError, match=r"a_0032x0032_flux\.npz: has no latents_4x4; delete the file"):
        load_latents(e)


# --- what one encode serves, and what one batch holds -------------------------------------------------------
def test_one_image_kept_at_its_size_in_two_buckets_is_encoded_for_each_bucket(tmp_path):
    """bucket_no_upscale keeps a 56x56 image at its size; steps of 16 and 32 crop it to 48x48 and 32x32. Same
    image, same resize, two buckets: two encodes, each entry with the latents of its own crop."""
    make_folder(tmp_path / "img", {"a.png": (56, 56)})
    text = ""
    for steps in (16, 32):
        text += f"""
            [[datasets]]
            resolution = 64
            enable_bucket = true
            bucket_no_upscale = true
            bucket_reso_steps = {steps}
              [[datasets.subsets]]
              image_dir = "{tmp_path / "img"}"
            """
    cfg = write_toml(tmp_path / "c.toml", text)
    g = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]
    assert sorted((e.bucket, e.resized) for e in g.entries()) == [((32, 32), (56, 56)), ((48, 48), (56, 56))]
    assert LatentCacher(StandInEncoder(), "ae", False).cache([g]).encoded == 2
    assert sorted(e.latents.shape for e in g.entries()) == [(16, 4, 4), (16, 6, 6)]


def test_a_batch_of_the_vae_holds_one_set_of_flags(tmp_path):
    """Entries of one bucket with and without flip_aug are encoded in separate batches (as sd-scripts batches by
    bucket, flip_aug and alpha_mask): a mixed batch would encode flipped latents for all or none of them."""
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (32, 32)})
    make_folder(tmp_path / "img2", {"c.png": (32, 32), "d.png": (32, 32)})
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img"}"
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img2"}"
          flip_aug = true
        """,
    )
    g = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]
    enc = StandInEncoder()
    LatentCacher(enc, "ae", False, batch_size=4).cache([g])
    assert enc.calls == [2, 2, 2]  # a and b; c and d, then their mirror images
    assert {os.path.basename(e.path): e.latents_flipped is not None for e in g.entries()} == {
        "a.png": False,
        "b.png": False,
        "c.png": True,
        "d.png": True,
    }


def test_turning_alpha_mask_on_encodes_again_and_off_reuses(tmp_path):
    """The record leaves the flags out (a file may hold another dataset's arrays): a mask is asked of the file by
    its array, so a run that turns alpha_mask on caches the masks, and one that turns it off reuses the file."""
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, "alpha_mask = true")])
    assert (stats.encoded, stats.reused) == (2, 0)
    with np.load(tmp_path / "img" / "a_0032x0032_flux.npz") as npz:
        assert npz["alpha_mask_4x4"].shape == (32, 32)
    stats = LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused) == (0, 2)


# --- what a run reports and leaves alone --------------------------------------------------------------------
def test_a_cache_reused_as_it_is_is_not_rewritten(tmp_path):
    """Only a touched image's record is rewritten (with its new time): an unchanged file is read, not written, so
    a run over 20,000 cached images writes nothing."""
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    path = tmp_path / "img" / "a_0032x0032_flux.npz"
    _set_mtime(path, os.stat(path).st_mtime_ns - 10**9)
    before = os.stat(path).st_mtime_ns
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)]).reused == 2
    assert os.stat(path).st_mtime_ns == before


def test_text_encoder_files_of_other_processes_are_counted_and_half_written_ones_reported(tmp_path, caplog):
    g = _group(tmp_path)
    stale = tmp_path / "img" / f"a_flux_te.npz.{os.getpid()}.tmp"
    stale.write_bytes(b"partial")
    _set_mtime(stale, os.stat(stale).st_mtime_ns - 3600 * 10**9)
    with caplog.at_level(logging.INFO):
        stats = TextEncoderCacher(FakeTextEncoder(), FP, False, True, process_index=1, num_processes=2).cache([g])
    assert (stats.encoded, stats.other_processes) == (1, 1)
    assert "removed 1 half-written cache file(s) of a killed run" in caplog.text
