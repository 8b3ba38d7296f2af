"""The ss_* metadata of a trained LoRA as sd-scripts writes it (spec §h.4): dataset keys with and
without a dataset TOML, tag frequencies, base-model hashes, values taken from the command line,
and what --no_metadata keeps."""

import datetime
import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
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
        "(64, 64)", "True", "False", "False")  # fmt: skip  (sd-scripts' parsed (W, H))
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



# spec §h.4: every ss_* key of a run (generic, FLUX additions, model file, --vae, per save), plus this project's
# documented ss_batch_size_per_device / ss_total_batch_size (written with a TOML too) and ss_num_processes
SPEC_KEYS = """
ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2
ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
ss_validate_every_n_steps ss_resize_interpolation
ss_model_type ss_apply_t5_attn_mask ss_weighting_scheme ss_logit_mean ss_logit_std ss_mode_scale ss_guidance_scale
ss_timestep_sampling ss_sigmoid_scale ss_model_prediction_type ss_discrete_flow_shift
ss_network_args ss_sd_model_name ss_sd_model_hash ss_new_sd_model_hash ss_vae_name
ss_training_finished_at ss_steps ss_epoch
ss_batch_size_per_device ss_total_batch_size ss_num_processes
""".split()


def test_a_save_writes_exactly_the_specified_keys():
    """A missing or misspelt key is invisible to GUIs and civitai, which read these names."""
    args = SimpleNamespace(output_name="x", vae="/models/ae.safetensors")
    run = dict(RUN, network_args={"dropout": None}, model_file="/m/flux1-dev.safetensors", sd_model_hash="12345678",
               new_sd_model_hash="ab" * 32, batch_size_per_device=2, total_batch_size=2)  # fmt: skip
    saved = per_save_metadata(build_training_metadata(args, run), steps=5, epoch=1)
    assert sorted(k for k in saved if k.startswith("ss_")) == sorted(SPEC_KEYS)


def test_debiased_estimation_and_max_grad_norm_are_recorded_from_their_flags():
    """FLUX ignores both, but sd-scripts records them under these names (spec §a, §h.4)."""
    args = SimpleNamespace(output_name="x", debiased_estimation_loss=True, max_grad_norm=0.5)
    md = build_training_metadata(args, RUN)
    assert (md["ss_debiased_estimation"], md["ss_max_grad_norm"]) == ("True", "0.5")


def test_the_commit_recorded_is_this_checkouts(monkeypatch):
    import subprocess

    from library import model_hashes

    def recorded() -> str:
        model_hashes.git_commit.cache_clear()
        return build_training_metadata(SimpleNamespace(output_name="x"), RUN)["ss_sd_scripts_commit_hash"]

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root)
    assert recorded() == (head.stdout.strip() if head.returncode == 0 else "(unknown)")
    # outside a git checkout (an unpacked release): sd-scripts' "(unknown)"
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: SimpleNamespace(returncode=128, stdout=""))
    assert recorded() == "(unknown)"
    monkeypatch.undo()
    model_hashes.git_commit.cache_clear()


def test_a_save_records_the_step_and_the_epoch_it_is_given():
    """The caller passes the 1-based epoch number, as sd-scripts' save_model(..., epoch + 1)."""
    saved = per_save_metadata(build_training_metadata(SimpleNamespace(output_name="x"), RUN), steps=40, epoch=2)
    assert (saved["ss_steps"], saved["ss_epoch"]) == ("40", "2")


def test_the_largest_module_rank_is_recorded_when_a_type_dim_exceeds_network_dim():
    """This project records the rank actually trained (docs §17.4), i.e. the largest module rank."""
    from library.tiny_models import random_model, tiny_flux_params
    from library.train_metadata import network_rank_and_alpha
    from networks.lora_flux import create_network

    model = random_model(tiny_flux_params(depth=1, depth_single=1))
    network = create_network(1.0, 4, 2, None, [None, None], model, single_dim="8")
    assert {m.lora_dim for m in network.all_loras()} == {4, 8}
    args = SimpleNamespace(network_dim=4, network_alpha=2)
    assert network_rank_and_alpha(network, args) == {"network_dim": 8, "network_alpha": 2.0}


def _toml_group(tmp_path, subsets: str):
    from library.dataset_config import load_dataset_configs
    from library.datasets import build_dataset_groups
    from tests.dataset_helpers import make_args, write_toml

    text = f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        [[datasets]]
        {subsets}
    """
    cfg = write_toml(tmp_path / "d.toml", text)
    args = make_args("--dataset_config", cfg)
    return build_dataset_groups(load_dataset_configs(args), seed=0)[0], args


def test_toml_dataset_records_images_with_repeats_lower_cased_tags_and_subset_settings(tmp_path):
    """sd-scripts' ss_datasets: num_train_images counts repeats, tags are lower-cased, subsets keep their settings."""
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_folder

    make_folder(tmp_path / "train", {"a.png": (64, 64), "b.png": (64, 64)}, {"a.png": "Red, red", "b.png": "RED, Blue"})
    make_folder(tmp_path / "reg", {"c.png": (64, 64)}, {"c.png": "shape"})
    subsets = f"""
        [[datasets.subsets]]
        image_dir = '{tmp_path / "train"}'
        num_repeats = 3
        keep_tokens_separator = "|||"
        secondary_separator = ";;;"
        [[datasets.subsets]]
        image_dir = '{tmp_path / "reg"}'
        is_reg = true
    """
    group, args = _toml_group(tmp_path, subsets)
    md = dataset_metadata(group.datasets, True, args)
    (ds,) = json.loads(md["ss_datasets"])
    assert ds["num_train_images"] == 2 * 3
    assert ds["tag_frequency"]["train"] == {"red": 3, "blue": 1}
    assert json.loads(md["ss_tag_frequency"])["train"] == {"red": 3, "blue": 1}
    train, reg = ds["subsets"]
    assert (train["keep_tokens_separator"], train["secondary_separator"]) == ("|||", ";;;")
    assert (train["is_reg"], reg["is_reg"]) == (False, True)
    assert (train["num_repeats"], train["img_count"], reg["img_count"]) == (3, 2, 1)


def test_folder_dataset_records_keep_tokens(tmp_path):
    """Without a TOML, ss_keep_tokens is --keep_tokens, as sd-scripts' flat keys."""
    from library.dataset_config import load_dataset_configs
    from library.datasets import build_dataset_groups
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_args, make_folder

    make_folder(tmp_path / "data" / "2_sks", {"a.png": (64, 64)}, {"a.png": "Sks, Dog"})
    args = make_args("--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--caption_extension", ".txt",
                     "--keep_tokens", "2")  # fmt: skip
    group = build_dataset_groups(load_dataset_configs(args), seed=0)[0]
    md = dataset_metadata(group.datasets, False, args)
    assert md["ss_keep_tokens"] == 2
    assert json.loads(md["ss_tag_frequency"]) == {"2_sks": {"sks": 1, "dog": 1}}


def test_a_failed_git_command_gives_no_commit_whatever_it_printed(monkeypatch):
    """`git rev-parse HEAD` in a repository without commits prints HEAD and fails: no commit, not 'HEAD'."""
    from library import model_hashes

    def no_commits(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, stdout="HEAD\n", stderr="fatal: ambiguous argument 'HEAD'")

    monkeypatch.setattr(model_hashes.subprocess, "run", no_commits)
    model_hashes.git_commit.cache_clear()
    try:
        assert model_hashes.git_commit() is None
        assert model_hashes.implementation_version() == "flux-lora-trainer/unknown"
    finally:
        model_hashes.git_commit.cache_clear()


def test_metadata_file_subsets_count_their_tags_not_the_captions_words(tmp_path):
    """sd-scripts counts a metadata file's "tags" (GUIs show them as the LoRA's tags), not the pieces of a
    prose caption split at its commas."""
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_folder

    make_folder(tmp_path / "img", {"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 64)})
    entries = {"a.png": {"caption": "a photo of a cat, sitting in the sun", "tags": "Cat, sun"},
               "b.png": {"tags": "dog, grass"}, "c.png": {"caption": "plain words, no tags"}}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps({str(tmp_path / "img" / k): v for k, v in entries.items()}))
    group, args = _toml_group(tmp_path, f"""
        [[datasets.subsets]]
        image_dir = '{tmp_path / "img"}'
        metadata_file = '{tmp_path / "meta.json"}'
    """)
    md = dataset_metadata(group.datasets, True, args)
    assert json.loads(md["ss_tag_frequency"]) == {"meta.json": {"cat": 1, "sun": 1, "dog": 1, "grass": 1}}


def test_wildcard_metadata_tags_on_several_lines_count_as_separate_tags(tmp_path):
    """With enable_wildcard the tags go on one line after each caption line, their line breaks turned into the
    caption separator; sd-scripts counts them after that turn, so "red\nround" is two tags."""
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_folder

    make_folder(tmp_path / "img", {"a.png": (64, 64)})
    entry = {"caption": "a ball\na toy", "tags": "Red\nround"}
    (tmp_path / "meta.json").write_text(json.dumps({str(tmp_path / "img" / "a.png"): entry}))
    group, args = _toml_group(tmp_path, f"""
        [[datasets.subsets]]
        image_dir = '{tmp_path / "img"}'
        metadata_file = '{tmp_path / "meta.json"}'
        enable_wildcard = true
    """)
    md = dataset_metadata(group.datasets, True, args)
    assert json.loads(md["ss_tag_frequency"]) == {"meta.json": {"red": 1, "round": 1}}


def test_a_runs_files_record_sd_scripts_epochs_dates_and_start(tiny_model_files, tmp_path, monkeypatch):
    """Step saves record the whole epochs before the step's epoch (sd-scripts passes its 0-based loop epoch), the
    final file the epochs run; each file is dated when saved; the start is taken before the models load; and
    TensorBoard gets no empty hparams record without --log_config."""
    loaded_at = []
    load = flux_train_network.FluxNetworkTrainer.load_target_model
    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model",
                        lambda self, *a: loaded_at.append(time.time()) or load(self, *a))  # fmt: skip
    data = dataset(tmp_path, batch_size=1, num_images=3)  # 3 steps an epoch
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(tiny_model_files, data, str(out), steps=4, save_every_n_steps=2, network_train_unet_only=True,
                     log_with="tensorboard", logging_dir=str(logs))  # fmt: skip
    assert flux_train_network.main(argv) == 0
    saved = {name: read_metadata(str(out / name)) for name in sorted(os.listdir(out))}
    assert {md["ss_num_batches_per_epoch"] for md in saved.values()} == {"3"}
    epochs = {name: (md["ss_steps"], md["ss_epoch"]) for name, md in saved.items()}
    assert epochs == {"lora-step00000002.safetensors": ("2", "0"), "lora-step00000004.safetensors": ("4", "1"),
                      "lora.safetensors": ("4", "2")}  # fmt: skip
    for md in saved.values():
        finished = float(md["ss_training_finished_at"])
        assert md["modelspec.date"] == datetime.datetime.fromtimestamp(int(finished)).isoformat()
        assert float(md["ss_training_started_at"]) < loaded_at[0]
    assert glob.glob(str(logs / "**" / "events.out.tfevents.*"), recursive=True)
    assert not glob.glob(str(logs / "**" / "hparams.yml"), recursive=True)


def test_same_named_folders_in_one_dataset_are_listed_apart(tmp_path):
    """sd-scripts names each subset's folder in ss_dataset_dirs, "img (2)" for the second of one name, in one
    dataset as across datasets; their tag counts add up under the one name, as sd-scripts counts them."""
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_folder

    for side, n in (("a", 1), ("b", 2)):
        make_folder(tmp_path / side / "img", {f"{i}.png": (64, 64) for i in range(n)})
        for i in range(n):
            (tmp_path / side / "img" / f"{i}.txt").write_text("red")
    group, args = _toml_group(tmp_path, f"""
        [[datasets.subsets]]
        image_dir = '{tmp_path / "a" / "img"}'
        num_repeats = 3
        [[datasets.subsets]]
        image_dir = '{tmp_path / "b" / "img"}'
    """)
    md = dataset_metadata(group.datasets, True, args)
    assert json.loads(md["ss_dataset_dirs"]) == {"img": {"n_repeats": 3, "img_count": 1},
                                                 "img (2)": {"n_repeats": 1, "img_count": 2}}  # fmt: skip
    assert json.loads(md["ss_tag_frequency"]) == {"img": {"red": 3}}
