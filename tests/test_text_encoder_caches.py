"""Text-encoder output caches: the npz keys and dtypes sd-scripts reads, re-encoding exactly what a caption or
setting change touches, sd-scripts' files without a record, sharding, and the caption a cached entry trains on."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from library.caches import TextEncoderCacher, check_disk_caches_complete
from library.captions import caption_for_cache
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from library.images import canonical_path
from tests.dataset_helpers import FakeTextEncoder, make_args, make_folder, write_toml
from tests.test_dataset_caches import FP, _group, _te


def test_te_disk_cache_keys_and_dtypes(tmp_path):
    te = FakeTextEncoder()
    _te(tmp_path, te, 'caption_prefix = "photo of"')
    assert sorted(te.seen) == ["photo of caption a", "photo of caption b", "photo of caption c"]
    with np.load(tmp_path / "img" / "a_flux_te.npz") as npz:
        assert sorted(npz.files) == ["apply_t5_attn_mask", "cache_record", "l_pooled", "t5_attn_mask", "t5_out",
                                     "txt_ids"]
        assert npz["l_pooled"].dtype == np.float32 and npz["t5_out"].dtype == np.float32
        assert npz["txt_ids"].dtype == np.float32 and npz["t5_attn_mask"].dtype == np.int64
        assert npz["apply_t5_attn_mask"].dtype == np.bool_ and npz["apply_t5_attn_mask"].shape == ()
        assert npz["t5_out"].shape == (8, 16)
        ref = FakeTextEncoder()(["photo of caption a"])[0]
        assert np.array_equal(npz["t5_out"], ref["t5_out"])


def test_te_fp16_outputs_stay_fp16(tmp_path):
    _te(tmp_path, FakeTextEncoder(dtype=np.float16))
    with np.load(tmp_path / "img" / "b_flux_te.npz") as npz:
        assert npz["t5_out"].dtype == np.float16 and npz["t5_attn_mask"].dtype == np.int64


def test_te_cache_round_trip_into_batches(tmp_path):
    for to_disk in (False, True):
        g, _ = _te(tmp_path, FakeTextEncoder(), to_disk=to_disk)
        b = g[0]
        te = b["text_encoder_outputs"]
        assert te["t5_out"].shape == (2, 8, 16) and te["t5_attn_mask"].dtype == torch.int64
        refs = FakeTextEncoder()(b["captions"])
        for k in ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask"):
            assert np.array_equal(te[k].numpy(), np.stack([r[k] for r in refs]))


def test_te_edited_caption_reencodes_exactly_that_entry(tmp_path):
    _te(tmp_path, FakeTextEncoder())
    (tmp_path / "img" / "c.txt").write_text("a new caption", encoding="utf-8")
    te = FakeTextEncoder()
    _, stats = _te(tmp_path, te)
    assert te.seen == ["a new caption"] and (stats.encoded, stats.reused) == (1, 2)


@pytest.mark.parametrize("change", ["t5_length", "mask", "encoder"])
def test_te_settings_change_reencodes_everything(tmp_path, change):
    _te(tmp_path, FakeTextEncoder())
    fp, mask = dict(FP), False
    if change == "t5_length":
        fp["t5xxl_max_token_length"] = 512
    elif change == "mask":
        fp["apply_t5_attn_mask"], mask = True, True
    else:
        fp["encoders"] = "clip:2|t5:1"
    te = FakeTextEncoder()
    _, stats = _te(tmp_path, te, fp=fp, mask=mask)
    assert stats.encoded == 3 and len(te.seen) == 3


def test_te_file_without_record_is_reencoded_once_with_an_info_line(tmp_path, caplog):
    g = _group(tmp_path)
    for e in g.entries():  # sd-scripts' file: five keys, no record
        np.savez(os.path.splitext(e.path)[0] + "_flux_te.npz", l_pooled=np.zeros(16, np.float32),
                 t5_out=np.zeros((8, 16), np.float32), txt_ids=np.zeros((8, 3), np.float32),
                 t5_attn_mask=np.ones(8, np.int64), apply_t5_attn_mask=False)
    te = FakeTextEncoder()
    with caplog.at_level(logging.INFO):
        _, stats = _te(tmp_path, te)
    assert stats.legacy_reencoded == 3 and len(te.seen) == 3
    assert "3 text-encoder cache files have no validity record" in caplog.text
    te2 = FakeTextEncoder()
    _, stats = _te(tmp_path, te2)
    assert te2.seen == [] and stats.reused == 3


def test_te_skip_cache_check_trusts_files_without_record(tmp_path):
    g = _group(tmp_path)
    for e in g.entries():
        np.savez(os.path.splitext(e.path)[0] + "_flux_te.npz", l_pooled=np.zeros(16, np.float32),
                 t5_out=np.zeros((8, 16), np.float32), txt_ids=np.zeros((8, 3), np.float32),
                 t5_attn_mask=np.ones(8, np.int64), apply_t5_attn_mask=False)
    te = FakeTextEncoder()
    _, stats = _te(tmp_path, te, skip_cache_check=True)
    assert te.seen == [] and stats.reused == 3


def test_te_batches_use_text_encoder_batch_size_and_dedupe_in_ram(tmp_path):
    calls = []

    def encode(captions):
        calls.append(len(captions))
        return FakeTextEncoder()(captions)

    make_folder(tmp_path / "img", {n: (32, 32) for n in ("a.png", "b.png", "c.png")},
                {"a.png": "same", "b.png": "same", "c.png": "other"})
    _te(tmp_path, encode, to_disk=False, batch_size=1)
    assert calls == [1, 1]  # two distinct captions
    calls.clear()
    _te(tmp_path, encode, to_disk=True, batch_size=2)
    assert calls == [2, 1]


def test_te_same_image_with_two_captions_on_disk_is_refused(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32)}, {"a.png": "cap"})
    cfg = write_toml(tmp_path / "c.toml", f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          caption_extension = ".txt"
        [[datasets]]
        resolution = 16
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          caption_extension = ".txt"
          caption_prefix = "x"
        """)
    g, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    with pytest.raises(UserError, match=r"a\.png is used with two different captions \('cap' and 'x cap'"):
        TextEncoderCacher(FakeTextEncoder(), FP, False, True).cache([g])


def test_te_sharding(tmp_path):
    groups = [_group(tmp_path, names=tuple(f"{i}.png" for i in range(5))) for _ in range(2)]
    tes = [FakeTextEncoder(), FakeTextEncoder()]
    for p in range(2):
        TextEncoderCacher(tes[p], FP, False, True, process_index=p, num_processes=2).cache([groups[p]])
    assert (len(tes[0].seen), len(tes[1].seen)) == (3, 2) and not set(tes[0].seen) & set(tes[1].seen)
    for g in groups:
        check_disk_caches_complete([g], latents=False, te=True)
        assert all(g[i]["text_encoder_outputs"] is not None for i in range(len(g)))


def test_a_wildcard_choice_does_not_depend_on_how_the_folder_is_spelled(tmp_path):
    """The choice was seeded by the path as written: one folder spelled two ways was refused as one image with
    two captions, and spelled another way in a later run it was encoded again with another choice."""
    names = [f"i{k}.png" for k in range(12)]  # all alike by chance: 5 ** -11
    make_folder(tmp_path / "img", {n: (32, 32) for n in names}, {n: "a {red|green|blue|pink|black} car" for n in names})

    def group(*spellings):
        text = "".join(f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{folder}"\n'
                       f'caption_extension = ".txt"\nenable_wildcard = true\n' for folder in spellings)  # fmt: skip
        config = write_toml(tmp_path / "c.toml", text)
        return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", config)), seed=0)[0]

    first = FakeTextEncoder()
    two_spellings = group(tmp_path / "img", f"{tmp_path}/img/../img")
    assert TextEncoderCacher(first, FP, False, True).cache([two_spellings]).encoded == 12
    assert len(set(first.seen)) > 1  # the wildcards resolved per image
    again = FakeTextEncoder()
    assert TextEncoderCacher(again, FP, False, True).cache([group(f"{tmp_path}/./img")]).reused == 12


def test_batch_captions_are_the_cached_captions_for_a_clip_l_trained_beside_cached_t5(tmp_path):
    """CLIP-L trained live encodes batch["captions"] while T5's outputs come from the cache: both must see the
    same text, so the batch carries the cached caption (its wildcard choice, no epoch-based dropout)."""
    folder = tmp_path / "img"
    names = [f"i{k}.png" for k in range(12)]  # all alike by chance: 5 ** -11
    make_folder(folder, {n: (32, 32) for n in names}, {n: "a {red|green|blue|pink|black} car" for n in names})
    te = FakeTextEncoder()
    g, _ = _te(tmp_path, te, "enable_wildcard = true\n          caption_dropout_every_n_epochs = 2", to_disk=False)
    assert len(set(te.seen)) > 1  # the wildcards resolved per image
    for epoch in (1, 2):
        g.set_current_epoch(epoch)
        for index in range(len(g)):
            batch = g[index]
            for path, caption in zip(batch["image_paths"], batch["captions"], strict=True):
                entry = next(e for e in g.entries() if e.path == path)
                assert caption == caption_for_cache(entry.caption, entry.subset.caption, canonical_path(path)) != ""


@pytest.mark.parametrize("model_type, precision, added", [
    ("flux", "bf16", {"clip_l_text": "ftfy"}),
    ("flux", "no", {"clip_l_text": "ftfy"}),
    ("flux", "fp16", {"clip_l_text": "ftfy", "encoded_in_fp16": True}),
    ("chroma", "bf16", {}),  # no CLIP-L: nothing about its text
])  # fmt: skip
def test_the_cache_record_names_what_made_the_outputs_differ(tiny_model_files, model_type, precision, added):
    """fp16 outputs (T5 overflows, clamped to finite values) are not reused by a bf16 run, and FLUX caches made
    before captions were cleaned for CLIP-L are encoded again; other runs' caches keep their records."""
    from types import SimpleNamespace

    import flux_train_network

    trainer = flux_train_network.FluxNetworkTrainer()
    trainer.t5_max_length = 512
    args = SimpleNamespace(t5xxl=tiny_model_files.t5xxl, clip_l=None, model_type=model_type, fp8_base=False,
                           fp8_base_unet=False, mixed_precision=precision)  # fmt: skip
    fingerprint = trainer.text_cache_fingerprint(SimpleNamespace(args=args, text_encoder_base_weights=None))
    base = {"t5xxl", "clip_l", "t5xxl_max_token_length", "model_type"}
    assert set(fingerprint) - base == set(added) and {k: fingerprint[k] for k in added} == added
