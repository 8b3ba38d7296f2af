"""The ss_* metadata of a trained LoRA as sd-scripts writes it (spec §h.4): dataset keys with and
without a dataset TOML, tag frequencies, base-model hashes, values taken from the command line,
and what --no_metadata keeps."""

import glob
import hashlib
import json
import os
import shutil
from concurrent.futures import Future
from types import SimpleNamespace

import flux_train_network
from library.safetensors_io import read_metadata
from library.train_metadata import build_training_metadata, minimal_metadata, per_save_metadata
from tests.training_helpers import base_argv, dataset

RUN = dict(num_train_images=1, num_batches_per_epoch=1, num_epochs=1, max_train_steps=1, optimizer="AdamW()",
           base_model_version="flux1", network_dim=4, network_alpha=4.0)  # fmt: skip


def captions(folder: str) -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.txt"))):
        with open(path, encoding="utf-8") as f:
            out.append(f.read().strip())
    return out


def test_dataset_toml_run_records_tags_folders_subsets_hashes_and_options(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=1, prior_loss_weight=0.5, caption_dropout_rate=0.1)
    assert flux_train_network.main(argv) == 0
    md = read_metadata(os.path.join(out, "lora.safetensors"))

    image_dir = os.path.join(os.path.dirname(data.dataset_toml), "images")
    expected_tags = {}
    for caption in captions(image_dir):  # each demo caption is one tag (no commas)
        expected_tags[caption.lower()] = expected_tags.get(caption.lower(), 0) + 1
    assert json.loads(md["ss_tag_frequency"]) == {"images": expected_tags}
    assert json.loads(md["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 6}}
    (ds,) = json.loads(md["ss_datasets"])
    assert (ds["is_dreambooth"], ds["batch_size_per_device"], ds["num_train_images"], ds["resolution"]) == (
        True, 2, 6, [64, 64])  # fmt: skip
    assert (ds["min_bucket_reso"], ds["max_bucket_reso"], ds["tag_frequency"]) == (32, 128, {"images": expected_tags})
    (subset,) = ds["subsets"]
    assert subset["img_count"] == 6 and subset["image_dir"] == "images" and subset["is_reg"] is False
    assert {"color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
            "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
            "resize_interpolation", "class_tokens"} <= subset.keys()  # fmt: skip

    with open(tiny_model_files.flux_dev, "rb") as f:
        content = f.read()
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(content).hexdigest()
    assert md["ss_sd_model_hash"] == hashlib.sha256(content[0x100000:0x110000]).hexdigest()[:8]
    assert md["ss_sd_model_name"] == os.path.basename(tiny_model_files.flux_dev)
    assert md["ss_prior_loss_weight"] == "0.5" and md["ss_caption_dropout_rate"] == "0.1"
    assert "ss_resolution" not in md and "ss_reg_dataset_dirs" not in md


def test_folder_run_without_a_toml_records_the_flat_keys(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    image_dir = os.path.join(os.path.dirname(data.dataset_toml), "images")
    train, reg = tmp_path / "train" / "3_sks shape", tmp_path / "reg" / "1_shape"
    shutil.copytree(image_dir, train, ignore=shutil.ignore_patterns("*.npz"))
    reg.mkdir(parents=True)
    for name in ("00_red_circle.png", "01_green_square.png"):
        if os.path.exists(os.path.join(image_dir, name)):
            shutil.copy(os.path.join(image_dir, name), reg / name)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, prior_loss_weight=0.25)
    at = argv.index("--dataset_config")
    del argv[at : at + 2]
    argv += ["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
             "--resolution", "64", "--caption_extension", ".txt", "--flip_aug"]  # fmt: skip
    assert flux_train_network.main(argv) == 0
    md = read_metadata(str(tmp_path / "out" / "lora.safetensors"))

    reg_count = len(os.listdir(reg))
    assert reg_count >= 1
    tags = {}
    for caption in captions(str(train)):
        tags[caption.lower()] = tags.get(caption.lower(), 0) + 1
    assert json.loads(md["ss_tag_frequency"]) == {"3_sks shape": tags, "1_shape": {"shape": reg_count}}
    assert json.loads(md["ss_dataset_dirs"]) == {"3_sks shape": {"n_repeats": 3, "img_count": 6}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": reg_count}}
    assert (md["ss_resolution"], md["ss_flip_aug"], md["ss_color_aug"], md["ss_enable_bucket"]) == (
        "64", "True", "False", "False")  # fmt: skip
    assert "buckets" in json.loads(md["ss_bucket_info"])
    # the reg images as configured (each once), not as repeated to match the 18 training samples
    assert md["ss_prior_loss_weight"] == "0.25" and md["ss_num_reg_images"] == str(reg_count) != "18"
    assert "ss_datasets" not in md


def test_fp8_base_unet_records_fp8_base_as_it_implies_it():
    args = SimpleNamespace(output_name="x", fp8_base=False, fp8_base_unet=True)
    md = build_training_metadata(args, RUN)
    assert (md["ss_fp8_base"], md["ss_fp8_base_unet"]) == ("True", "True")
    md = build_training_metadata(SimpleNamespace(output_name="x", fp8_base=False, fp8_base_unet=False), RUN)
    assert (md["ss_fp8_base"], md["ss_fp8_base_unet"]) == ("False", "False")


def test_background_hashes_are_waited_for_at_a_save_and_a_failed_one_left_out():
    done, failed = Future(), Future()
    done.set_result("ab" * 32)
    failed.set_exception(FileNotFoundError("gone"))
    md = build_training_metadata(SimpleNamespace(output_name="x"),
                                 dict(RUN, new_sd_model_hash=done, sd_model_hash="12345678"))  # fmt: skip
    saved = per_save_metadata(dict(md, other_hash=failed), steps=3, epoch=1)
    assert saved["ss_new_sd_model_hash"] == "ab" * 32 and saved["ss_sd_model_hash"] == "12345678"
    assert "other_hash" not in saved and saved["ss_steps"] == "3"
    assert all(isinstance(v, str) for v in saved.values())


def test_no_metadata_keeps_modelspec_with_the_given_title():
    md = {"ss_network_dim": "4", "ss_seed": "1", "modelspec.title": "MyTitle", "modelspec.sai_model_spec": "1.0.1"}
    assert minimal_metadata(md) == {"ss_network_dim": "4", "modelspec.title": "MyTitle",
                                    "modelspec.sai_model_spec": "1.0.1"}  # fmt: skip


def test_alphas_are_recorded_as_given_whatever_the_buffer_precision():
    import torch

    from library.train_metadata import shortest_decimal

    given = [0.1, 16.0, 1e-3, 0.3]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert [shortest_decimal(torch.tensor(a, dtype=dtype)) for a in given] == given
    assert shortest_decimal(torch.tensor(1 / 3, dtype=torch.float32)) == 0.33333334  # fp32's own, to its precision
