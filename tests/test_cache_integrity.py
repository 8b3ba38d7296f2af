"""Cache files that must not be trusted as they are: arrays another setting left in a latent file, one
image spelled two ways, two images that name one cache file, damaged arrays, touched images, the
dtype the trainer hands the text-encoder cache; and what the flipped latents and the latent keys hold."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from library import cache_files, caches
from library.caches import LatentCacher, TextEncoderCacher
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from library.images import prepare_image
from tests.dataset_helpers import FakeTextEncoder, StandInEncoder, make_args, make_folder, make_image, write_toml
from tests.test_dataset_caches import FP, _group
from tests.training_helpers import base_argv, dataset


def test_a_mask_left_in_the_file_is_not_the_loss_mask_of_a_subset_without_alpha_mask(tmp_path):
    # run 1 caches b's alpha as its mask; run 2 turns alpha_mask off for b's subset, while a's (same batch)
    # keeps it: b must train unmasked (all ones), as it would uncached, not with its old mask from the file
    for name, seed in (("A", 1), ("B", 2)):
        make_image(tmp_path / name / f"{name.lower()}.png", (32, 32), seed=seed, mode="RGBA")

    def group(b_alpha: bool):
        cfg = write_toml(tmp_path / "c.toml", f"""
            [[datasets]]
            resolution = 32
            batch_size = 2
              [[datasets.subsets]]
              image_dir = "{tmp_path / 'A'}"
              alpha_mask = true
              [[datasets.subsets]]
              image_dir = "{tmp_path / 'B'}"
              alpha_mask = {str(b_alpha).lower()}
            """)
        return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]

    LatentCacher(StandInEncoder(), "ae", True).cache([group(True)])
    g = group(False)
    assert LatentCacher(StandInEncoder(), "ae", True).cache([g]).reused == 2
    g.set_current_epoch(1)
    batch = g[0]
    masks = dict(zip(batch["image_paths"], batch["alpha_masks"], strict=True))
    b_mask, a_mask = masks[str(tmp_path / "B" / "b.png")], masks[str(tmp_path / "A" / "a.png")]
    assert torch.equal(b_mask, torch.ones(32, 32))
    alpha = np.asarray(Image.open(tmp_path / "A" / "a.png"))[..., 3] / 255.0
    assert a_mask.min() < 1 and np.allclose(torch.flip(a_mask, [1]).numpy() if batch["flippeds"][0] else a_mask.numpy(),
                                            alpha, atol=1e-6)  # fmt: skip


def _spelled_twice(tmp_path, second_subset: str):
    """The folder ``img`` as ``.../img`` and as ``..././img`` in two datasets."""
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          caption_extension = ".txt"
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path}/./img"
          caption_extension = ".txt"
          {second_subset}
        """)
    return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]


def test_one_image_spelled_two_ways_is_refused_two_captions_in_one_file(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32)}, {"a.png": "cap"})
    g = _spelled_twice(tmp_path, 'caption_prefix = "x"')
    with pytest.raises(UserError, match=r"a\.png is used with two different captions \('cap' and 'x cap'"):
        TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])


def test_one_image_spelled_two_ways_is_refused_two_resizes_in_one_latent(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (96, 64)})  # resized to 48x32
    g = _spelled_twice(tmp_path, 'interpolation_type = "nearest"')
    with pytest.raises(UserError, match=r"a\.png is resized two ways for one 32x32 bucket"):
        LatentCacher(StandInEncoder(), "ae", True).cache([g])


def test_one_image_spelled_two_ways_with_one_setting_is_encoded_once_by_one_process(tmp_path):
    make_folder(tmp_path / "img", {n: (32, 32) for n in ("a.png", "b.png", "c.png")})
    g = _spelled_twice(tmp_path, "")
    encoders = [StandInEncoder(), StandInEncoder()]
    stats = [LatentCacher(encoders[p], "ae", True, process_index=p, num_processes=2).cache([g]) for p in range(2)]
    assert sum(s.encoded for s in stats) == 3  # each image once, though each is listed twice
    assert sorted(s.encoded for s in stats) == [1, 2]


def test_two_images_named_alike_are_refused_one_text_encoder_file_for_two_captions(tmp_path):
    # caption files would be one (a.txt): a metadata file gives the two images their own captions
    make_folder(tmp_path / "img", {"a.png": (32, 32), "a.jpg": (32, 32)})
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a.png": {"caption": "red car"}, "a.jpg": {"caption": "blue boat"}}))
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          metadata_file = "{meta}"
        """)
    g = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]
    with pytest.raises(UserError, match=r"a\.(png|jpg) and .*a\.(png|jpg) would share the text-encoder cache "
                                        r"a_flux_te\.npz with two captions"):  # fmt: skip
        TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])


def test_a_cache_file_damaged_inside_names_itself_when_read(tmp_path):
    # the checks before training read a file's directory only: a damaged array is found when a batch reads it
    g = _group(tmp_path)
    LatentCacher(StandInEncoder(), "ae", True).cache([g])
    TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    for name, member in (("a_0032x0032_flux.npz", b"latents_4x4.npy"), ("a_flux_te.npz", b"t5_out.npy")):
        path = tmp_path / "img" / name
        data = bytearray(path.read_bytes())
        at = data.index(member) + len(member) + 200  # inside that member's stored bytes
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    e = next(e for e in g.entries() if e.path.endswith("a.png"))
    with pytest.raises(UserError, match=r"a_0032x0032_flux\.npz: this cache file is damaged .*delete it"):
        caches.load_latents(e)
    with pytest.raises(UserError, match=r"a_flux_te\.npz: this cache file is damaged .*delete it"):
        caches.load_te_outputs(e.te_npz)


def test_a_touched_image_is_read_in_full_once_then_known_by_its_new_time(tmp_path, monkeypatch):
    LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)])
    t = time.time() + 100
    for name in ("a.png", "b.png"):
        os.utime(tmp_path / "img" / name, (t, t))
    hashed = []
    real_sha = cache_files._sha256
    monkeypatch.setattr(cache_files, "_sha256", lambda path: hashed.append(os.path.basename(path)) or real_sha(path))
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)]).reused == 3
    assert sorted(hashed) == ["a.png", "b.png"]
    hashed.clear()
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path)]).reused == 3
    assert hashed == []


@pytest.mark.parametrize("dtype,stored", [(torch.float16, np.float16), (torch.bfloat16, np.float32),
                                          (torch.float32, np.float32)])  # fmt: skip
def test_trainer_hands_the_cache_fp16_outputs_as_fp16_and_bf16_ones_as_fp32(tmp_path, dtype, stored):
    """Spec §f.4: fp16 text-encoder outputs stay fp16 in the file; numpy has no bf16, so those become fp32."""
    from types import SimpleNamespace

    from flux_train_network import FluxNetworkTrainer

    def encode_captions(ctx, captions):
        n = len(captions)
        return (torch.full((n, 4), 0.1, dtype=dtype), torch.full((n, 3, 8), 0.2, dtype=dtype),
                torch.zeros(n, 3, 3, dtype=dtype), torch.ones(n, 3, dtype=torch.int64))  # fmt: skip

    trainer = SimpleNamespace(encode_captions=encode_captions)
    outs = FluxNetworkTrainer.encode_captions_to_numpy(trainer, None, ["a", "b"])
    assert [o["t5_out"].dtype for o in outs] == [stored, stored] and outs[1]["l_pooled"].dtype == stored
    assert outs[0]["t5_attn_mask"].dtype == np.int64
    np.testing.assert_allclose(outs[0]["t5_out"], torch.full((3, 8), 0.2, dtype=dtype).float().numpy())
    g = _group(tmp_path)
    encode = lambda caps: FluxNetworkTrainer.encode_captions_to_numpy(trainer, None, caps)  # noqa: E731
    TextEncoderCacher(encode, FP, False, True).cache([g])
    with np.load(tmp_path / "img" / "a_flux_te.npz") as npz:
        assert npz["t5_out"].dtype == stored and npz["t5_attn_mask"].dtype == np.int64


# --- what the arrays and keys hold ----------------------------------------------------------------------------
def _latents_of(enc, e, flip: bool = False) -> torch.Tensor:
    """The stand-in's latents of e's prepared image, mirrored left-right first when ``flip``."""
    rgb, *_ = prepare_image(e.path, e.bucket, e.resized, e.subset.interpolation)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    return enc.encode(torch.flip(x, dims=[3]) if flip else x)[0]


@pytest.mark.parametrize("to_disk", [False, True])
def test_flipped_latents_are_those_of_the_left_right_mirrored_image(tmp_path, to_disk):
    # flip_aug flips horizontally (spec §c.6); the pooling stand-in commutes with that flip, so the flipped
    # latents are also the latents mirrored along their width, and not along their height
    g = _group(tmp_path, "flip_aug = true")
    enc = StandInEncoder()
    LatentCacher(enc, "ae", to_disk).cache([g])
    for e in g.entries():
        lat, flipped = (caches.load_latents(e)[:2] if to_disk else (e.latents, e.latents_flipped))
        assert torch.allclose(flipped, _latents_of(enc, e, flip=True), atol=1e-6)
        assert torch.allclose(flipped, torch.flip(lat, dims=[2]), atol=1e-6)
        assert not torch.allclose(flipped, torch.flip(lat, dims=[1]), atol=1e-3)


def test_a_non_square_bucket_keys_its_latents_by_latent_height_then_width(tmp_path):
    """Spec §f.4: keys end in _<h>x<w> of the latent, e.g. latents_96x64 for a 512 wide, 768 high bucket."""
    assert cache_files.reso_suffix((512, 768)) == "_96x64"
    g = _group(tmp_path, datasets=(("[32, 48]", 1),), size=(40, 60))  # resolution (W, H) = (32, 48)
    e = next(e for e in g.entries() if e.path.endswith("a.png"))
    assert e.bucket == (32, 48)
    enc = StandInEncoder()
    LatentCacher(enc, "ae", True).cache([g])
    with np.load(tmp_path / "img" / "a_0040x0060_flux.npz") as npz:
        assert {"latents_6x4", "original_size_6x4", "crop_ltrb_6x4", "cache_record_6x4"} <= set(npz.files)
        assert not any(k.endswith("_4x6") for k in npz.files)
        assert npz["latents_6x4"].shape == (16, 6, 4) and npz["original_size_6x4"].tolist() == [40, 60]
    assert torch.allclose(caches.load_latents(e)[0], _latents_of(enc, e), atol=1e-6)


def test_flipped_latents_and_mask_of_an_older_version_of_the_image_are_dropped(tmp_path):
    # run 1 caches flip and mask of a.png; a.png is replaced and run 2 (no flip, no mask) re-encodes it: the old
    # image's flipped latents and mask must go, or run 3 (flip and mask again) would find every key and reuse them
    image = tmp_path / "img" / "a.png"
    make_image(image, (32, 32), seed=1, mode="RGBA")
    flags = "flip_aug = true\nalpha_mask = true"
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, flags, names=("a.png",))]).encoded == 1
    make_image(image, (32, 32), seed=2, mode="RGBA")
    assert LatentCacher(StandInEncoder(), "ae", True).cache([_group(tmp_path, names=("a.png",))]).encoded == 1
    with np.load(tmp_path / "img" / "a_0032x0032_flux.npz") as npz:
        assert sorted(npz.files) == ["cache_record_4x4", "crop_ltrb_4x4", "latents_4x4", "original_size_4x4"]
    enc = StandInEncoder()
    g = _group(tmp_path, flags, names=("a.png",))
    assert LatentCacher(enc, "ae", True).cache([g]).encoded == 1
    (e,) = g.entries()
    _, flipped, mask = caches.load_latents(e)
    assert torch.allclose(flipped, _latents_of(enc, e, flip=True), atol=1e-6)
    assert np.allclose(mask.numpy(), np.asarray(Image.open(image))[..., 3] / 255.0, atol=1e-6)


def test_a_latent_of_the_same_bucket_but_another_resize_is_encoded_again(tmp_path):
    # a 40x36 image lands in a 32x32 bucket both ways: covering it without buckets (resized to 36x32), and
    # kept at its size with bucket_no_upscale (40x36, floored): one key, two crops, so the record must tell
    make_folder(tmp_path / "img", {"a.png": (40, 36)})

    def group(dataset: str):
        cfg = write_toml(tmp_path / "c.toml", f"""
            [[datasets]]
            {dataset}
              [[datasets.subsets]]
              image_dir = "{tmp_path / 'img'}"
            """)
        return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]

    first = group("resolution = 32")
    assert [(e.bucket, e.resized) for e in first.entries()] == [((32, 32), (36, 32))]
    LatentCacher(StandInEncoder(), "ae", True).cache([first])
    second = group("resolution = 64\nenable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = 16")
    (e,) = second.entries()
    assert (e.bucket, e.resized) == ((32, 32), (40, 36))
    enc = StandInEncoder()
    assert LatentCacher(enc, "ae", True).cache([second]).encoded == 1
    assert torch.allclose(caches.load_latents(e)[0], _latents_of(enc, e), atol=1e-6)


def test_te_outputs_cached_without_the_t5_mask_are_encoded_again_with_it(tmp_path):
    # the trainer's fingerprint leaves the mask flag out (it is the file's apply_t5_attn_mask array, as in
    # sd-scripts' check, spec §f.4): the array alone must send the file back to the encoder
    fp = {"t5xxl": "t5.safetensors:1:1", "t5xxl_max_token_length": 8}
    g = _group(tmp_path)
    TextEncoderCacher(FakeTextEncoder(), fp, False, True).cache([g])
    te = FakeTextEncoder()
    stats = TextEncoderCacher(te, fp, True, True).cache([_group(tmp_path)])
    assert (stats.encoded, stats.reused, sorted(te.seen)) == (3, 0, ["caption a", "caption b", "caption c"])
    with np.load(tmp_path / "img" / "a_flux_te.npz") as npz:
        assert bool(npz["apply_t5_attn_mask"]) is True
    again = TextEncoderCacher(FakeTextEncoder(), fp, True, True).cache([_group(tmp_path)])
    assert (again.encoded, again.reused) == (0, 3)


def test_on_windows_names_that_differ_in_case_alone_are_refused_one_cache_file(tmp_path, monkeypatch):
    """NTFS ignores case: A.png and a.jpg write one a_flux_te.npz there, and one image trained on the other's
    caption; the check compared the names as written."""
    monkeypatch.setattr(os.path, "normcase", str.lower)  # what ntpath.normcase does, case-wise
    g = _group(tmp_path, names=("A.png", "a.jpg"))  # captions "caption A" and "caption a"
    with pytest.raises(UserError, match=r"would share the text-encoder cache a_flux_te\.npz with two captions"):
        TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    with pytest.raises(UserError, match=r"would share the latent cache a_0032x0032_flux\.npz"):
        LatentCacher(StandInEncoder(), "ae", True).cache([g])


def test_images_with_a_newer_latent_file_are_not_decoded_before_the_models_load(tmp_path):
    """verify_images decoded every image on every run, cached or not: minutes for 20,000 photos."""
    from library.cache_files import images_to_decode

    g = _group(tmp_path)  # a.png, b.png, c.png
    entries = list(g.entries())
    paths = sorted(e.path for e in entries)
    assert images_to_decode(entries, latents_on_disk=True) == paths  # nothing cached yet
    LatentCacher(StandInEncoder(), "ae", True).cache([g])
    assert images_to_decode(entries, latents_on_disk=True) == []
    assert images_to_decode(entries, latents_on_disk=False) == paths  # in RAM, caching decodes them after loading
    later = time.time() + 100
    os.utime(tmp_path / "img" / "b.png", (later, later))  # edited since its latents were made
    assert images_to_decode(entries, latents_on_disk=True) == [str(tmp_path / "img" / "b.png")]


def test_half_written_cache_files_of_a_killed_run_are_removed(tmp_path, monkeypatch):
    """A caching run killed mid-write left <cache file>.<pid>.tmp beside the images for good. Those of a live
    process (another GPU's, writing now), fresh ones (another machine's, on a shared disk: its process numbers
    mean nothing here) and files that only look alike are left alone."""
    import subprocess
    import sys

    g = _group(tmp_path)
    folder = tmp_path / "img"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getppid()
    left = {
        f"a_0032x0032_flux.npz.{dead}.tmp": False,  # a killed run's: removed
        f"b_flux_te.npz.{dead}.tmp": False,
        f"b_0032x0032_flux.npz.{alive}.tmp": True,  # a live process's: kept
        f"other_flux.npz.{dead}.tmp": True,  # no image of this run is named so: not this run's to judge
        "a.png.tmp": True,
        f"c_flux_te.npz.{dead}.tmp": True,  # written a minute ago
    }
    old = time.time() - cache_files.HALF_WRITTEN_AFTER_S - 60
    for name in left:
        (folder / name).write_bytes(b"partial")
        if not name.startswith("c_"):
            os.utime(folder / name, (old, old))
    LatentCacher(StandInEncoder(), "ae", True).cache([g])
    TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    assert {name: (folder / name).exists() for name in left} == left
    os.utime(folder / f"c_flux_te.npz.{dead}.tmp", (old, old))  # later, when it has grown old
    TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])
    assert not (folder / f"c_flux_te.npz.{dead}.tmp").exists()


@pytest.mark.parametrize("orientation, reused", [(1, True), (3, False), (2, False), (6, False)])
def test_an_sd_scripts_latent_file_of_an_image_exif_turns_is_encoded_again(tmp_path, orientation, reused):
    """sd-scripts encodes the stored pixels; here the EXIF orientation is applied. Turned by 180 degrees or
    mirrored (or square, as here, at any turn) the image keeps its size, so sd-scripts' file has the right name
    and keys and the wrong picture: it is encoded again, once. An image that is not turned keeps the file."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    folder = tmp_path / "img"
    make_image(folder / "a.jpg", (32, 32), exif=exif.tobytes())
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{folder}"
        """)
    train = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]
    (e,) = train.entries()
    np.savez(cache_files.latent_npz_path(e.path, e.size), latents_4x4=np.zeros((16, 4, 4), np.float32),
             original_size_4x4=np.array([32, 32]), crop_ltrb_4x4=np.array([0, 0, 32, 32]))  # sd-scripts', no record
    assert LatentCacher(StandInEncoder(), "ae", True).cache([train]).reused == int(reused)
    with np.load(e.latents_npz) as npz:
        assert ("cache_record_4x4" in npz.files) is not reused  # re-encoded files carry a record: once only
    assert LatentCacher(StandInEncoder(), "ae", True, skip_cache_check=True).cache([train]).reused == 1


@pytest.mark.parametrize("value, flipped_only", [(float("inf"), False), (float("-inf"), True), (float("nan"), True)])
def test_latents_that_are_not_finite_are_refused_naming_the_image(tmp_path, value, flipped_only):
    """An fp16 AE overflows to inf as well as NaN, in the flipped pass as well: no such cache is written."""
    class Overflowing(StandInEncoder):
        def encode(self, x):
            out = super().encode(x)
            if not flipped_only or len(self.calls) % 2 == 0:  # the second call of a batch is the flipped one
                out[-1, 0, 0, 0] = value
            return out

    word = "NaN" if value != value else "inf"
    with pytest.raises(UserError, match=rf"^{word} in the latents of .*c\.png; check the AE weights"):
        LatentCacher(Overflowing(), "ae", True, batch_size=3).cache([_group(tmp_path, "flip_aug = true")])
    assert not (tmp_path / "img" / "c_0032x0032_flux.npz").exists()


@pytest.mark.parametrize("key, value", [("t5_out", float("inf")), ("l_pooled", float("nan"))])
def test_text_encoder_outputs_that_are_not_finite_are_refused_naming_the_caption(tmp_path, key, value):
    """T5 in fp16 overflows to inf: a cache of that would be reused after the precision is fixed, and the run
    would stop at a NaN loss naming nothing. It stops at caching instead, naming the caption and its image."""
    fake = FakeTextEncoder()

    def overflowing(captions):
        outs = fake(captions)
        outs[-1][key] = outs[-1][key].copy()
        outs[-1][key].flat[0] = value
        return outs

    word = "NaN" if value != value else "inf"
    with pytest.raises(UserError, match=rf"^{word} in the text-encoder output {key} of the caption 'caption c' "
                                        r"\(.*c\.png\); check the text encoder weights"):  # fmt: skip
        TextEncoderCacher(overflowing, FP, False, to_disk=True, batch_size=3).cache([_group(tmp_path)])
    assert not (tmp_path / "img" / "c_flux_te.npz").exists()


def test_a_read_only_image_folder_stops_disk_caching_before_the_models_load(tiny_model_files, tmp_path, monkeypatch,
                                                                            capsys):  # fmt: skip
    """A read-only dataset (a share, another user's folder) failed at the first cache write, after every model had
    loaded. It stops first, naming the folder and the flag; once its caches exist, it trains from them."""
    import flux_train_network

    data = dataset(tmp_path, batch_size=1)
    folder = os.path.realpath(data.image_dir)
    read_only = lambda path, mode: os.path.realpath(path) != folder  # noqa: E731
    flags = dict(network_train_unet_only=True, cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True)
    for flag in ("cache_latents_to_disk", "cache_text_encoder_outputs_to_disk"):
        with monkeypatch.context() as m:
            m.setattr(os, "access", read_only)
            m.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model", lambda *a: pytest.fail("loaded"))
            argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, **{**flags, flag: False})
            assert flux_train_network.main(argv) == 1
        other = "--cache_text_encoder_outputs_to_disk" if flag == "cache_latents_to_disk" else "--cache_latents_to_disk"
        assert (f"{other} writes cache files beside the images, but cannot write in {folder} (no permission, or a "
                f"read-only disk). Make the folder writable, or cache in RAM only (drop {other})."
                ) in capsys.readouterr().err  # fmt: skip
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(tmp_path / "cached"), steps=1, **flags)) == 0
    with monkeypatch.context() as m:  # every cache there: the folder is only read
        m.setattr(os, "access", read_only)
        assert flux_train_network.main(base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, **flags)) == 0
