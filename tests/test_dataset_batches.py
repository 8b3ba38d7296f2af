"""What a batch carries, and per-sample randomness that depends only on (seed, epoch, index)."""

from __future__ import annotations

import glob
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from library.caches import LatentCacher, TextEncoderCacher
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups, collate_first, sample_rng
from tests.dataset_helpers import FakeTextEncoder, StandInEncoder, make_args, make_folder, make_image, write_toml


def _build(tmp_path, subsets: str, dataset: str = "", seed: int = 0, *argv, resolution: int = 32):
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = {resolution}
        batch_size = 4
        {dataset}
        {subsets}
        """)
    return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg, *argv)), seed=seed)


def test_batch_contents(tmp_path):
    make_folder(tmp_path / "a", {"a.png": (32, 32)}, {"a.png": "a cat"}, ext=".caption")
    make_folder(tmp_path / "r", {"r.png": (64, 64)})
    train, _ = _build(tmp_path, f"""
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'a'}"
          caption_prefix = "photo of"
          custom_attributes = {{ diff_output_preservation = true }}
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'r'}"
          is_reg = true
          class_tokens = "cat"
        """, "network_multiplier = 0.75", 0, "--prior_loss_weight", "0.5")
    train.set_current_epoch(1)
    (b,) = [train[i] for i in range(len(train))]
    order = [os.path.basename(p) for p in b["image_keys"]]
    assert sorted(order) == ["a.png", "r.png"]
    by = {n: i for i, n in enumerate(order)}
    assert b["captions"][by["a.png"]] == "photo of a cat" and b["captions"][by["r.png"]] == "cat"
    assert b["loss_weights"][by["a.png"]] == 1.0 and b["loss_weights"][by["r.png"]] == 0.5
    assert b["is_reg"][by["r.png"]] and not b["is_reg"][by["a.png"]]
    assert b["custom_attributes"][by["a.png"]] == {"diff_output_preservation": True}
    assert b["custom_attributes"][by["r.png"]] == {}
    assert b["network_multipliers"].tolist() == [0.75, 0.75]
    assert b["images"].shape == (2, 3, 32, 32) and b["images"].dtype == torch.float32
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    assert b["latents"] is None and b["alpha_masks"] is None and b["text_encoder_outputs"] is None
    assert b["original_sizes_hw"][by["r.png"]].tolist() == [64, 64]
    assert b["target_sizes_hw"].tolist() == [[32, 32], [32, 32]] and b["bucket_reso"] == (32, 32)


def test_images_match_the_file_after_resize(tmp_path):
    path = make_image(tmp_path / "a" / "a.png", (64, 64), seed=3)
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\ninterpolation_type = "area"')
    img = train[0]["images"][0]
    ref = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BOX), np.float32) / 127.5 - 1
    assert torch.allclose(img.permute(1, 2, 0), torch.from_numpy(ref), atol=1e-6)


def test_alpha_masks_are_carried_and_ones_without_alpha(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:, 3] = 255
    os.makedirs(tmp_path / "a")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "t.png")
    make_image(tmp_path / "a" / "o.png", (32, 32))
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\nalpha_mask = true')
    b = train[0]
    masks = dict(zip((os.path.basename(k) for k in b["image_keys"]), b["alpha_masks"], strict=True))
    assert masks["o.png"].min() == 1.0
    assert masks["t.png"][:, :16].max() == 0.0 and masks["t.png"][:, 16:].min() == 1.0


def test_flip_is_per_sample_and_flips_image_and_mask_together(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16, :3] = 255
    rgba[:, :16, 3] = 255
    os.makedirs(tmp_path / "a")
    for i in range(8):
        Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / f"{i}.png")
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\nalpha_mask = true\n'
                                "flip_aug = true\nnum_repeats = 2", seed=1)
    train.set_current_epoch(1)
    flips = []
    for i in range(len(train)):
        b = train[i]
        for img, mask, flipped in zip(b["images"], b["alpha_masks"], b["flippeds"], strict=True):
            left_white = img[:, :, :16].mean() > 0.9
            assert left_white != flipped and (mask[:, :16].mean() == 1.0) != flipped
            flips.append(flipped)
    assert 2 < sum(flips) < 14


def test_sample_randomness_depends_only_on_seed_epoch_and_index(tmp_path):
    make_folder(tmp_path / "a", {f"{i}.png": (40, 32) for i in range(8)},
                {f"{i}.png": "a, b, c, d, e, f" for i in range(8)})
    sub = f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\ncaption_extension = ".txt"\nflip_aug = true\n' \
          "shuffle_caption = true\nrandom_crop = true"
    g1, _ = _build(tmp_path, sub, seed=7)
    g2, _ = _build(tmp_path, sub, seed=7)
    for g in (g1, g2):
        g.set_current_epoch(2)
    # different access orders (as different workers would do) give the same batches
    a = [g1[i] for i in range(len(g1))]
    b = [g2[i] for i in reversed(range(len(g2)))][::-1]
    for x, y in zip(a, b, strict=True):
        assert x["captions"] == y["captions"] and x["flippeds"] == y["flippeds"]
        assert torch.equal(x["images"], y["images"])
    g1.set_current_epoch(3)
    assert [g1[i]["captions"] for i in range(len(g1))] != [x["captions"] for x in a]
    assert sample_rng(1, 2, 3, 4).random() == sample_rng(1, 2, 3, 4).random() != sample_rng(1, 2, 3, 5).random()


def test_dataloader_with_workers_gives_the_same_batches(tmp_path):
    make_folder(tmp_path / "a", {f"{i}.png": (32, 32) for i in range(6)})
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\nflip_aug = true', seed=3)
    train.set_current_epoch(1)
    direct = [train[i]["flippeds"] for i in range(len(train))]
    loader = torch.utils.data.DataLoader(train, batch_size=1, shuffle=False, collate_fn=collate_first, num_workers=2)
    assert [b["flippeds"] for b in loader] == direct


def test_dataloader_workers_reading_disk_caches_give_the_main_process_batches_and_flips(tmp_path):
    """Workers load the latent and text-encoder files themselves: same latents, flips and T5 outputs as the
    main process, each the file's flipped or unflipped array as the flip says."""
    names = {f"{i}.png": (32, 32) if i % 2 else (64, 16) for i in range(12)}
    make_folder(tmp_path / "a", names, {n: f"cap {n}" for n in names})
    buckets = "enable_bucket = true\nbucket_reso_steps = 16\nmin_bucket_reso = 16\nmax_bucket_reso = 64"
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\ncaption_extension = ".txt"\n'
                                "flip_aug = true", buckets, 3)  # fmt: skip
    LatentCacher(StandInEncoder(), "ae", True).cache([train])
    TextEncoderCacher(FakeTextEncoder(), {"x": 1}, False, True).cache([train])
    assert all(e.latents is None and e.te_outputs is None for e in train.entries())  # read from disk per batch
    train.set_current_epoch(2)
    direct = [train[i] for i in range(len(train))]
    loader = torch.utils.data.DataLoader(train, batch_size=1, shuffle=False, collate_fn=collate_first, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(direct) == 4  # buckets 32x32 and 64x16, 6 images each, batches of 4
    flips = []
    for a, b in zip(direct, batches, strict=True):
        assert a["image_keys"] == b["image_keys"] and a["flippeds"] == b["flippeds"]
        assert torch.equal(a["latents"], b["latents"])
        assert torch.equal(a["text_encoder_outputs"]["t5_out"], b["text_encoder_outputs"]["t5_out"])
        for key, lat, t5, flipped in zip(b["image_keys"], b["latents"], b["text_encoder_outputs"]["t5_out"],
                                         b["flippeds"], strict=True):  # fmt: skip
            stem = os.path.splitext(key)[0]
            (lat_file,) = glob.glob(stem + "_*x*_flux.npz")
            with np.load(lat_file) as z:
                name = next(k for k in z.files if k.startswith("latents_flipped_" if flipped else "latents_"))
                assert torch.equal(lat, torch.from_numpy(z[name]))
            with np.load(stem + "_flux_te.npz") as z:
                assert torch.equal(t5, torch.from_numpy(z["t5_out"]))
            flips.append(flipped)
    assert len(flips) == 12 and 0 < sum(flips) < 12


def test_shared_counters_drive_epoch_and_step(tmp_path):
    import multiprocessing as mp

    make_folder(tmp_path / "a", {"0.png": (32, 32)}, {"0.png": "k, a, b, c, d"})
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\ncaption_extension = ".txt"\n'
                                "keep_tokens = 1\ntoken_warmup_step = 4")
    epoch, step = mp.Value("i", 1), mp.Value("i", 0)
    train.use_shared_counters(epoch, step)
    assert train[0]["captions"] == ["k, a"]
    step.value = 4
    assert train[0]["captions"] == ["k, a, b, c, d"]


@pytest.mark.parametrize("steps,bucket", [(16, (48, 32)), (32, (32, 32))])
def test_no_upscale_buckets_follow_the_steps(tmp_path, steps, bucket):
    make_folder(tmp_path / "a", {"a.png": (50, 40)})
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"',
                      f"enable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = {steps}", resolution=64)
    assert next(train.entries()).bucket == bucket and train[0]["images"].shape[2:] == (bucket[1], bucket[0])


def test_set_current_step_reaches_persistent_workers_through_shared_counters(tmp_path):
    import multiprocessing as mp

    make_folder(tmp_path / "a", {"0.png": (32, 32)}, {"0.png": "k, a, b, c, d"})
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\ncaption_extension = ".txt"\n'
                                "keep_tokens = 1\ntoken_warmup_step = 4")
    epoch, step = mp.Value("i", 1), mp.Value("i", 0)
    train.use_shared_counters(epoch, step)
    train.set_current_step(4)
    train.set_current_epoch(3)
    assert (step.value, epoch.value) == (4, 3)
    assert train[0]["captions"] == ["k, a, b, c, d"]


@pytest.mark.parametrize("warmup", ["10", "0.5"])
def test_validation_captions_are_whole_under_token_warm_up(tmp_path, warmup):
    """Token warm-up grows training captions; validation, which the loop never steps, sees whole captions
    (with an integer warm-up it saw token_warmup_min tags for the whole run)."""
    names = [f"i{k}.png" for k in range(4)]
    make_folder(tmp_path / "img", {n: (32, 32) for n in names}, {n: "t1, t2, t3, t4, t5, t6" for n in names},
                ext=".caption")  # fmt: skip
    train, val = _build(tmp_path, f"""
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          token_warmup_step = {warmup}
        """, "validation_split = 0.5", 1)
    train.set_max_train_steps(20)
    train.set_current_epoch(1)
    train.set_current_step(0)
    assert all(c == "t1" for c in train[0]["captions"])  # training starts warm-up at token_warmup_min (1) tag
    assert all(c.count(",") == 5 for i in range(len(val)) for c in val[i]["captions"])


def test_original_sizes_are_height_then_width(tmp_path):
    # a 64 wide, 48 high image: (H, W) = (48, 64), as its name says and sd-scripts' original_size is read
    make_image(tmp_path / "a" / "w.png", (64, 48))
    train, _ = _build(tmp_path, f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"')
    b = train[0]
    assert b["original_sizes_hw"].tolist() == [[48, 64]] and b["target_sizes_hw"].tolist() == [[32, 32]]


def test_regularisation_repeats_start_from_their_own_and_grow_round_robin(tmp_path):
    """Spec §c.3: reg subsets keep their num_repeats, then gain one per image in turn until reg samples >=
    training samples; num_train_images counts repeats, num_reg_images the reg repeats before that growth."""
    make_folder(tmp_path / "t", {"t1.png": (32, 32), "t2.png": (32, 32)})
    make_folder(tmp_path / "r", {"r1.png": (32, 32)})
    make_folder(tmp_path / "q", {"q1.png": (32, 32)})
    train, _ = _build(tmp_path, f"""
          [[datasets.subsets]]
          image_dir = "{tmp_path / 't'}"
          num_repeats = 5
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'r'}"
          is_reg = true
          num_repeats = 3
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'q'}"
          is_reg = true
        """)
    # 10 training samples; reg starts at r1 3 + q1 1 = 4, then r1, q1, r1, q1, r1, q1 gain one each -> 6 + 4
    repeats = {os.path.basename(e.path): e.num_repeats for e in train.entries()}
    assert repeats == {"t1.png": 5, "t2.png": 5, "r1.png": 6, "q1.png": 4}
    assert (train.num_train_images, train.num_reg_images) == (10, 4)
    counts = Counter(os.path.basename(e.path) for b in train.datasets[0].epoch_batches(1) for e in b)
    assert counts == repeats
