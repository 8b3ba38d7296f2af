"""Edges found by a mutation round over train_metadata.py, run_saves.py and train_state.py: each ss_* key from its
own option or run value, modelspec keys, dataset keys, and RunSaves' saves and pruning driven directly with a
stand-in network (no training run); names, pruning arithmetic and state checks of train_state."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from library.run_saves import RunSaves
from library.train_metadata import build_training_metadata, modelspec_from_args, per_save_metadata
from library.train_state import read_progress

RUN = dict(num_train_images=1, num_batches_per_epoch=1, num_epochs=1, max_train_steps=1, optimizer="AdamW()",
           base_model_version="flux1", network_dim=4, network_alpha=4.0)  # fmt: skip


# the options sd-scripts' train_network.py and flux_train_network.py's update_metadata record, each as "ss_" + its name
# (--debiased_estimation_loss as ss_debiased_estimation)
OPTIONS = """
learning_rate unet_lr gradient_checkpointing gradient_accumulation_steps lr_warmup_steps lr_scheduler network_module
network_dropout mixed_precision full_fp16 v2 clip_skip max_token_length cache_latents seed lowram noise_offset
multires_noise_iterations multires_noise_discount adaptive_noise_scale zero_terminal_snr training_comment max_grad_norm
min_snr_gamma scale_weight_norms ip_noise_gamma debiased_estimation_loss noise_offset_random_strength
ip_noise_gamma_random_strength loss_type huber_schedule huber_scale huber_c fp8_base_unet validation_seed
validation_split max_validation_steps validate_every_n_epochs validate_every_n_steps resize_interpolation
caption_dropout_rate caption_dropout_every_n_epochs caption_tag_dropout_rate face_crop_aug_range prior_loss_weight
model_type apply_t5_attn_mask weighting_scheme logit_mean logit_std mode_scale guidance_scale timestep_sampling
sigmoid_scale model_prediction_type discrete_flow_shift
""".split()
OPTION_KEYS = {o: "ss_" + o.removesuffix("_loss") for o in OPTIONS}


def test_each_option_key_records_its_own_option():
    """Every option gets a value of its own: a key read from a neighbouring option shows up."""
    values = {option: f"value of {option}" for option in OPTION_KEYS}
    md = build_training_metadata(SimpleNamespace(output_name="x", **values), RUN)
    assert {key: md[key] for key in OPTION_KEYS.values()} == {key: values[o] for o, key in OPTION_KEYS.items()}


def test_each_run_value_is_recorded_under_its_own_key():
    run = dict(num_train_images=11, num_validation_images=12, num_reg_images=13, num_batches_per_epoch=14,
               num_epochs=15, max_train_steps=16, optimizer="o.Opt(a=1)", base_model_version="chroma",
               network_dim=17, network_alpha=18.5, text_encoder_lr=[1e-5], batch_size_per_device=19,
               total_batch_size=20, num_processes=21,
               network_args={"dropout": None, "train_blocks": "single"})  # fmt: skip
    md = build_training_metadata(SimpleNamespace(output_name="x", learning_rate=3e-4, unet_lr=2e-4), run)
    assert {k: md[k] for k in ("ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images",
                               "ss_num_batches_per_epoch", "ss_num_epochs", "ss_max_train_steps", "ss_optimizer",
                               "ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_text_encoder_lr",
                               "ss_batch_size_per_device", "ss_total_batch_size", "ss_num_processes")} == {
        "ss_num_train_images": "11", "ss_num_validation_images": "12", "ss_num_reg_images": "13",
        "ss_num_batches_per_epoch": "14", "ss_num_epochs": "15", "ss_max_train_steps": "16",
        "ss_optimizer": "o.Opt(a=1)", "ss_base_model_version": "chroma", "ss_network_dim": "17",
        "ss_network_alpha": "18.5", "ss_text_encoder_lr": "[1e-05]", "ss_batch_size_per_device": "19",
        "ss_total_batch_size": "20", "ss_num_processes": "21"}  # fmt: skip
    # JSON, as sd-scripts' json.dumps(net_kwargs): readers parse it (None is null, not Python's None)
    assert md["ss_network_args"] == '{"dropout": null, "train_blocks": "single"}'


def test_defaults_of_a_run_without_the_optional_values():
    """A single process, no validation or regularisation images, no --output_name: as sd-scripts writes them."""
    md = build_training_metadata(SimpleNamespace(output_name=None), RUN)
    assert (md["ss_num_validation_images"], md["ss_num_reg_images"], md["ss_num_processes"]) == ("0", "0", "1")
    assert (md["ss_output_name"], md["ss_text_encoder_lr"], md["ss_batch_size_per_device"]) == ("None",) * 3
    assert "ss_network_args" not in md and "ss_vae_name" not in md and "ss_sd_model_name" not in md
    assert 0 <= int(md["ss_session_id"]) < 2**31  # a 31-bit number, readable as an int32 too


def test_fp8_base_alone_records_fp8_base():
    md = build_training_metadata(SimpleNamespace(output_name="x", fp8_base=True, fp8_base_unet=False), RUN)
    assert (md["ss_fp8_base"], md["ss_fp8_base_unet"]) == ("True", "False")


def test_file_names_not_paths_are_recorded_for_the_model_and_the_vae():
    args = SimpleNamespace(output_name="x", vae=os.path.join("models", "sub", "ae.safetensors"))
    md = build_training_metadata(args, dict(RUN, model_file=os.path.join("models", "flux1-dev.safetensors")))
    assert (md["ss_sd_model_name"], md["ss_vae_name"]) == ("flux1-dev.safetensors", "ae.safetensors")


def spec_args(**given):
    names = ("title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint", "thumbnail",
             "merged_from", "preprocessor", "is_negative_embedding")  # fmt: skip
    args = dict({f"metadata_{n}": None for n in names}, output_name="my_lora", resolution="512", min_timestep=None,
                max_timestep=None, clip_skip=None)  # fmt: skip
    return SimpleNamespace(**(args | given))


@pytest.mark.parametrize("low, high, expected", [(None, None, None), (100, None, "100,1000"), (None, 900, "0,900"),
                                                 (0, 500, "0,500")])  # fmt: skip
def test_the_timestep_range_fills_the_bound_not_given_as_sd_scripts(low, high, expected):
    spec = modelspec_from_args(spec_args(min_timestep=low, max_timestep=high), "dev")
    assert spec.get("modelspec.timestep_range") == expected


def test_modelspec_title_clip_skip_and_the_keys_given_as_false():
    spec = modelspec_from_args(spec_args(clip_skip=2, metadata_preprocessor="canny",
                                         metadata_is_negative_embedding=False), "dev")  # fmt: skip
    assert spec["modelspec.title"] == "my_lora"  # the output name when no --metadata_title
    assert spec["modelspec.encoder_layer"] == "2"
    assert (spec["modelspec.preprocessor"], spec["modelspec.is_negative_embedding"]) == ("canny", "False")
    spec = modelspec_from_args(spec_args(metadata_title="Mine"), "chroma")
    assert spec["modelspec.title"] == "Mine" and "modelspec.encoder_layer" not in spec
    assert "modelspec.preprocessor" not in spec and "modelspec.is_negative_embedding" not in spec


def test_each_save_is_dated_then_not_at_the_start():
    md = build_training_metadata(SimpleNamespace(output_name="x"), RUN) | {"modelspec.date": "2000-01-01T00:00:00"}
    saved = per_save_metadata(md, steps=3, epoch=0)
    assert saved["modelspec.date"] != "2000-01-01T00:00:00" and saved["ss_epoch"] == "0"
    finished = float(saved["ss_training_finished_at"])
    assert finished != int(finished) or saved["ss_training_finished_at"].endswith(".0")  # time.time(), unrounded


class StandInNetwork:
    """Writes the metadata a save would store, as JSON, under the LoRA's name."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.ones(2))

    def save_weights(self, path, dtype, metadata):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(metadata, f)

    def state_dict(self):
        return {"w": self.weight.detach().clone()}


def make_saves(tmp_path, steps_per_epoch=4, **flags):
    options = dict(output_dir=str(tmp_path), output_name="lora", save_model_as=None, save_every_n_steps=None,
                   save_every_n_epochs=None, save_last_n_steps=None, save_last_n_steps_state=None,
                   save_last_n_epochs=None, save_last_n_epochs_state=None, save_state=False,
                   save_state_on_train_end=False, no_metadata=False, seed=5)  # fmt: skip
    network = StandInNetwork()
    optimizer = torch.optim.SGD([network.weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)
    metadata = build_training_metadata(SimpleNamespace(output_name="lora"), RUN)
    metadata["modelspec.title"] = "lora"
    modes = []
    saves = RunSaves(SimpleNamespace(**(options | flags)), accelerator, network, SimpleNamespace(optimizer=optimizer),
                     scheduler, metadata, torch.float32, steps_per_epoch, lambda: modes.append("eval"),
                     lambda: modes.append("train"))  # fmt: skip
    return saves, modes


def saved(tmp_path, suffix):
    return sorted(name for name in os.listdir(tmp_path) if name.endswith(suffix))


def recorded(tmp_path, name):
    with open(tmp_path / name, encoding="utf-8") as f:
        return json.load(f)


def test_step_saves_keep_the_last_n_steps_and_states_their_own_count(tmp_path):
    """--save_last_n_steps 3 every 2 steps keeps the saves of the last 3 steps (sd-scripts: step - n - 1, floored to
    a save); --save_last_n_steps_state 5 keeps the states of the last 5."""
    saves, _ = make_saves(tmp_path, save_every_n_steps=2, save_last_n_steps=3, save_last_n_steps_state=5,
                          save_state=True)  # fmt: skip
    for step in range(1, 11):
        saves.at_step(step, (step - 1) // 4)
    assert saved(tmp_path, ".safetensors") == ["lora-step00000008.safetensors", "lora-step00000010.safetensors"]
    assert saved(tmp_path, "-state") == ["lora-step00000006-state", "lora-step00000008-state",
                                         "lora-step00000010-state"]  # fmt: skip
    md = recorded(tmp_path, "lora-step00000010.safetensors")
    assert (md["ss_steps"], md["ss_epoch"]) == ("10", "2")  # the whole epochs before step 10's (0-based) epoch
    assert read_progress(str(tmp_path / "lora-step00000010-state")).current_epoch == 3  # 1-based, as --resume counts


def test_epoch_saves_keep_the_last_n_saves_and_states_their_own_count(tmp_path):
    saves, _ = make_saves(tmp_path, save_every_n_epochs=2, save_last_n_epochs=2, save_last_n_epochs_state=3,
                          save_state=True)  # fmt: skip
    for epoch in range(1, 10):
        saves.at_epoch_end(epoch, 4 * epoch)
    assert saved(tmp_path, ".safetensors") == ["lora-000006.safetensors", "lora-000008.safetensors"]
    assert saved(tmp_path, "-state") == ["lora-000004-state", "lora-000006-state", "lora-000008-state"]
    md = recorded(tmp_path, "lora-000008.safetensors")
    assert (md["ss_steps"], md["ss_epoch"]) == ("32", "8")
    progress = read_progress(str(tmp_path / "lora-000008-state"))
    assert (progress.current_epoch, progress.current_step, progress.seed) == (8, 32, 5)


def test_epoch_states_are_pruned_by_save_last_n_epochs_without_the_state_count(tmp_path):
    saves, _ = make_saves(tmp_path, save_every_n_epochs=1, save_last_n_epochs=2, save_state=True)
    for epoch in range(1, 5):
        saves.at_epoch_end(epoch, 4 * epoch)
    assert saved(tmp_path, "-state") == ["lora-000003-state", "lora-000004-state"]


def test_a_stop_saves_the_last_finished_step_once(tmp_path):
    saves, modes = make_saves(tmp_path, save_every_n_steps=4, save_state=True)
    saves.at_step(4, 0)
    message = saves.for_stop(4, 0)  # the step save has just run: nothing is written again
    state = os.path.join(str(tmp_path), "lora-step00000004-state")
    assert message == (f"saved the LoRA to {os.path.join(str(tmp_path), 'lora-step00000004.safetensors')} and the "
                       f"training state to {state} (continue with --resume {state})")  # fmt: skip
    assert len(saves.files) == len(saves.states) == 1 and modes == ["eval", "train"]
    saves.for_stop(6, 1)
    assert saved(tmp_path, ".safetensors") == ["lora-step00000004.safetensors", "lora-step00000006.safetensors"]
    assert saved(tmp_path, "-state") == ["lora-step00000004-state", "lora-step00000006-state"]
    assert recorded(tmp_path, "lora-step00000006.safetensors")["ss_epoch"] == "1"


def test_a_stop_without_save_state_says_how_to_be_able_to_resume(tmp_path):
    saves, _ = make_saves(tmp_path)
    message = saves.for_stop(3, 0)
    assert message.endswith("lora-step00000003.safetensors (add --save_state to be able to resume)")
    assert saved(tmp_path, "-state") == []


@pytest.mark.parametrize("flag", ["save_state", "save_state_on_train_end"])
def test_the_final_save_records_the_epochs_run_and_saves_the_state_with_either_flag(tmp_path, flag):
    saves, _ = make_saves(tmp_path, steps_per_epoch=4, **{flag: True})
    assert saves.final(9) == os.path.join(str(tmp_path), "lora.safetensors")
    md = recorded(tmp_path, "lora.safetensors")
    assert (md["ss_steps"], md["ss_epoch"]) == ("9", "3")
    assert read_progress(str(tmp_path / "lora-state")).current_epoch == 3


def test_without_save_state_no_state_is_saved_or_pruned_at_the_step_and_epoch_saves(tmp_path):
    """--save_state_on_train_end saves the last state alone; the states an earlier run left stay (it may resume)."""
    for name in ("lora-000001-state", "lora-step00000002-state"):
        (tmp_path / name).mkdir()
    saves, _ = make_saves(tmp_path, save_every_n_steps=2, save_last_n_steps=1, save_every_n_epochs=1,
                          save_last_n_epochs=1, save_state_on_train_end=True)  # fmt: skip
    for step in (2, 4, 6):
        saves.at_step(step, 0)
    for epoch in (1, 2, 3):
        saves.at_epoch_end(epoch, 4 * epoch)
    assert saved(tmp_path, "-state") == ["lora-000001-state", "lora-step00000002-state"]


def test_the_epoch_of_a_state_counts_a_started_epoch_and_at_least_one(tmp_path):
    saves, _ = make_saves(tmp_path, steps_per_epoch=4)
    assert [saves._epoch_of(steps) for steps in (0, 1, 4, 5, 8)] == [1, 1, 1, 2, 2]
    saves, _ = make_saves(tmp_path, steps_per_epoch=1)  # one batch an epoch: each step is an epoch
    assert [saves._epoch_of(steps) for steps in (1, 3)] == [1, 3]


def test_the_file_before_a_non_finite_loss_is_named_only_if_it_is_still_there(tmp_path):
    saves, _ = make_saves(tmp_path, save_every_n_steps=2, save_last_n_steps=2)
    assert saves.before_failure(1) == "nothing has been saved yet"
    saves.at_step(2, 0)
    first = os.path.join(str(tmp_path), "lora-step00000002.safetensors")
    assert saves.before_failure(2) == (f"the last file saved, {first}, holds the weights that gave this loss and "
                                       "may be bad too; the one before it is: none")  # fmt: skip
    assert saves.before_failure(3) == f"the last good file is: {first}"
    saves.at_step(4, 0)
    saves.at_step(6, 1)  # prunes step 2 (6 - 2 - 1 = 3, floored to 2)
    last = os.path.join(str(tmp_path), "lora-step00000006.safetensors")
    assert saves.before_failure(6).endswith(
        "the one before it is: " + os.path.join(str(tmp_path), "lora-step00000004.safetensors")
    )
    os.remove(last)
    assert saves.before_failure(6) == "the last good file is: " + os.path.join(
        str(tmp_path), "lora-step00000004.safetensors"
    )


def test_files_of_other_formats_get_no_metadata_and_no_metadata_keeps_the_minimal_keys(tmp_path):
    saves, _ = make_saves(tmp_path, save_model_as="ckpt")
    assert saves.final(1).endswith("lora.ckpt") and recorded(tmp_path, "lora.ckpt") is None
    saves, _ = make_saves(tmp_path, no_metadata=True)
    saves.final(1)
    assert sorted(recorded(tmp_path, "lora.safetensors")) == ["modelspec.title", "ss_base_model_version",
                                                              "ss_network_alpha", "ss_network_dim",
                                                              "ss_network_module", "ss_v2"]  # fmt: skip


def folder_metadata(tmp_path, *flags):
    from library.dataset_config import load_dataset_configs
    from library.datasets import build_dataset_groups
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_args, make_folder

    make_folder(tmp_path / "data" / "2_sks", {"a.png": (64, 64)}, {"a.png": "Sks, , Dog"})
    args = make_args("--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--caption_extension", ".txt",
                     *flags)  # fmt: skip
    group = build_dataset_groups(load_dataset_configs(args), seed=0)[0]
    return dataset_metadata(group.datasets, False, args)


def test_each_flat_dataset_key_records_its_own_option(tmp_path):
    """Without a dataset TOML, every augmentation and bucket option under its own key (one set at a time)."""
    md = folder_metadata(tmp_path, "--color_aug", "--random_crop", "--enable_bucket", "--min_bucket_reso", "32",
                         "--max_bucket_reso", "128")  # fmt: skip
    assert {k: md[k] for k in ("ss_color_aug", "ss_flip_aug", "ss_random_crop", "ss_shuffle_caption",
                               "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
                               "ss_max_bucket_reso")} == {
        "ss_color_aug": True, "ss_flip_aug": False, "ss_random_crop": True, "ss_shuffle_caption": False,
        "ss_enable_bucket": True, "ss_bucket_no_upscale": False, "ss_min_bucket_reso": 32,
        "ss_max_bucket_reso": 128}  # fmt: skip
    md = folder_metadata(tmp_path, "--shuffle_caption", "--enable_bucket", "--bucket_no_upscale")
    assert (md["ss_color_aug"], md["ss_random_crop"], md["ss_shuffle_caption"], md["ss_bucket_no_upscale"]) == (
        False, False, True, True)  # fmt: skip


def test_empty_tags_are_not_counted(tmp_path):
    md = folder_metadata(tmp_path)
    assert json.loads(md["ss_tag_frequency"]) == {"2_sks": {"sks": 1, "dog": 1}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {}


def toml_metadata(tmp_path, text):
    from library.dataset_config import load_dataset_configs
    from library.datasets import build_dataset_groups
    from library.train_metadata import dataset_metadata
    from tests.dataset_helpers import make_args, write_toml

    args = make_args("--dataset_config", write_toml(tmp_path / "d.toml", text))
    return dataset_metadata(build_dataset_groups(load_dataset_configs(args), seed=0)[0].datasets, True, args)


def test_each_toml_dataset_and_subset_records_its_own_settings(tmp_path):
    """Datasets with other settings each, the same folder name in all three (one key each, "name (n)"), the
    tags of the first dataset that has the folder (as sd-scripts counts a folder once)."""
    from tests.dataset_helpers import make_folder

    for n, (parent, caption) in enumerate([("a", "red"), ("b", "blue"), ("c", "green")]):
        make_folder(tmp_path / parent / "img", {f"{i}.png": (64, 64) for i in range(n + 1)},
                    {f"{i}.png": caption for i in range(n + 1)})  # fmt: skip
    make_folder(tmp_path / "reg", {"r.png": (64, 64)}, {"r.png": "shape"})
    md = toml_metadata(
        tmp_path,
        f"""
        [general]
        caption_extension = ".txt"
        [[datasets]]
        resolution = 64
        batch_size = 3
        enable_bucket = true
        min_bucket_reso = 32
        max_bucket_reso = 96
        [[datasets.subsets]]
        image_dir = '{tmp_path / "a" / "img"}'
        color_aug = true
        caption_prefix = "pre, "
        keep_tokens = 1
        enable_wildcard = true
        class_tokens = "sks"
        resize_interpolation = "lanczos"
        [[datasets.subsets]]
        image_dir = '{tmp_path / "reg"}'
        is_reg = true
        resize_interpolation = "lanczos"
        [[datasets]]
        resolution = 64
        batch_size = 1
        [[datasets.subsets]]
        image_dir = '{tmp_path / "b" / "img"}'
        resize_interpolation = "area"
        [[datasets]]
        resolution = 64
        [[datasets.subsets]]
        image_dir = '{tmp_path / "c" / "img"}'
    """,
    )
    first, second, _ = json.loads(md["ss_datasets"])
    assert {k: first[k] for k in ("is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images",
                                  "enable_bucket", "min_bucket_reso", "max_bucket_reso", "resize_interpolation")} == {
        "is_dreambooth": True, "batch_size_per_device": 3, "num_train_images": 1, "num_reg_images": 1,
        "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 96,
        "resize_interpolation": "lanczos"}  # fmt: skip
    assert (second["batch_size_per_device"], second["enable_bucket"]) == (1, False)
    assert second["resize_interpolation"] == "area"
    assert second["bucket_info"]["buckets"] == {"0": {"resolution": [64, 64], "count": 2}}
    subset = first["subsets"][0]
    assert {k: subset[k] for k in ("color_aug", "flip_aug", "caption_prefix", "caption_suffix", "keep_tokens",
                                   "enable_wildcard", "class_tokens", "resize_interpolation")} == {
        "color_aug": True, "flip_aug": False, "caption_prefix": "pre, ", "caption_suffix": None, "keep_tokens": 1,
        "enable_wildcard": True, "class_tokens": "sks", "resize_interpolation": "lanczos"}  # fmt: skip
    assert json.loads(md["ss_dataset_dirs"]) == {"img": {"n_repeats": 1, "img_count": 1},
                                                 "img (2)": {"n_repeats": 1, "img_count": 2},
                                                 "img (3)": {"n_repeats": 1, "img_count": 3}}  # fmt: skip
    assert json.loads(md["ss_tag_frequency"]) == {"img": {"red": 1}, "reg": {"shape": 1}}


def test_several_datasets_without_a_toml_are_recorded_as_with_one(tmp_path):
    """--train_data_dir with a second dataset (a --validation... split aside) has no flat keys: only one dataset
    has them in sd-scripts; several are listed in ss_datasets."""
    from library.train_metadata import dataset_metadata

    one = SimpleNamespace(config=SimpleNamespace(kind="dreambooth", batch_size=1, resolution=(64, 64),
                                                  enable_bucket=False, min_bucket_reso=32, max_bucket_reso=128,
                                                  subsets=[]),
                          entries=[], num_reg_images=0, bucket_info=lambda: {"buckets": {}})  # fmt: skip
    md = dataset_metadata([one, one], False, SimpleNamespace())
    assert sorted(md) == ["ss_dataset_dirs", "ss_datasets", "ss_tag_frequency"]


def test_saves_without_an_output_name_take_sd_scripts_default_names():
    from library.train_state import model_file_name, state_dir_name

    assert [model_file_name(None, "epoch", 3), model_file_name(None, "step", 12), model_file_name(None, "last")] == [
        "epoch-000003.safetensors", "at-step00000012.safetensors", "last.safetensors"]  # fmt: skip
    assert [state_dir_name(None, "epoch", 3), state_dir_name("x", "step", 12), state_dir_name(None, "last")] == [
        "epoch-000003-state", "x-step00000012-state", "last-state"]  # fmt: skip


def test_the_save_that_falls_out_as_sd_scripts_counts_it():
    from library.train_state import epoch_to_remove, step_to_remove

    # every 3 epochs, keep 2: epoch 9 drops 3; nothing before epoch 7; no count or no epoch saves: nothing
    assert [epoch_to_remove(e, 3, 2) for e in (3, 6, 9, 12)] == [None, None, 3, 6]
    assert epoch_to_remove(9, None, 2) is None and epoch_to_remove(9, 3, None) is None
    # every 5 steps, keep the last 12 steps: step 25 drops (25 - 12 - 1 = 12, floored) 10
    assert [step_to_remove(s, 5, 12) for s in (10, 15, 20, 25, 30)] == [None, None, 5, 10, 15]
    assert step_to_remove(20, 5, 19) is None and step_to_remove(20, None, 12) is None


def test_a_state_written_by_sd_scripts_restores_accelerates_random_states(tmp_path):
    """accelerate's random_states_0.pkl is a torch.save of its own keys, without CUDA on a CPU machine."""
    import random

    import numpy as np

    from library.train_state import read_rng_states, restore_rng_states

    saved = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}
    torch.save(saved | {"torch_manual_seed": torch.get_rng_state()}, tmp_path / "r.pkl")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    states = read_rng_states(str(tmp_path / "r.pkl"))
    assert sorted(states) == ["numpy", "python", "torch"]
    restore_rng_states(states)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def sgd_state(tmp_path, **kwargs):
    from library.train_state import TrainProgress, save_training_state

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = str(tmp_path / "lora-state")
    save_training_state(state, {"w": torch.ones(2)}, optimizer, scheduler, TrainProgress(1, 3, 7), **kwargs)
    return state


def test_a_state_saved_again_leaves_no_trace_of_the_one_it_replaced(tmp_path):
    sgd_state(tmp_path)
    sgd_state(tmp_path)
    assert os.listdir(tmp_path) == ["lora-state"]


def test_a_state_without_its_optimizer_or_with_a_damaged_loss_scale_is_refused(tmp_path):
    from library.errors import UserError
    from library.train_state import check_state_dir

    scaler = SimpleNamespace(state_dict=lambda: {"scale": torch.tensor(1024.0), "growth_tracker": 0})
    state = sgd_state(tmp_path, scaler=scaler)
    with open(os.path.join(state, "scaler.pt"), "r+b") as f:  # cut short, as by a full disk
        f.truncate(os.path.getsize(f.name) // 2)
    with pytest.raises(UserError, match="scaler.pt is damaged"):
        check_state_dir(state)
    os.remove(os.path.join(state, "scaler.pt"))
    os.remove(os.path.join(state, "optimizer.bin"))
    with pytest.raises(UserError, match=r"not a training state \(missing optimizer.bin\)"):
        check_state_dir(state)


def test_a_replaced_state_whose_replacement_arrived_is_not_put_back(tmp_path):
    """Killed after the rename of the new state but before the old one was removed: the new one stays."""
    from library.train_state import remove_abandoned_temporaries

    state = sgd_state(tmp_path)
    old = tmp_path / ".lora-state.tmp-999999999.old"  # a process number no system hands out
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the state it replaced")
    assert remove_abandoned_temporaries(str(tmp_path), "lora") == [old.name]
    assert sorted(os.listdir(tmp_path)) == ["lora-state"] and read_progress(state).current_step == 3


def test_a_temporary_of_another_users_process_is_left_alone(tmp_path, monkeypatch):
    from library import train_state

    def not_allowed(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(train_state.os, "kill", not_allowed)
    monkeypatch.setattr(train_state.sys, "platform", "linux")
    assert train_state.writer_is_gone(os.getpid() + 1) is False


def test_an_alpha_kept_in_a_buffer_is_recorded_as_given_and_a_network_without_modules_names_its_own():
    from library.tiny_models import random_model, tiny_flux_params
    from library.train_metadata import network_rank_and_alpha
    from networks.lora_flux import create_network

    network = create_network(1.0, 4, 0.1, None, [None, None], random_model(tiny_flux_params(depth=1, depth_single=1)))
    args = SimpleNamespace(network_dim=4, network_alpha=0.1)
    assert network_rank_and_alpha(network, args) == {"network_dim": 4, "network_alpha": 0.1}
    # a third-party network without LoRA modules to read: its own rank and alpha, not the flags'
    assert network_rank_and_alpha(SimpleNamespace(lora_dim=8, alpha=2.0), args) == {"network_dim": 8,
                                                                                   "network_alpha": 2.0}  # fmt: skip


def test_a_metadata_file_subset_is_recorded_as_a_fine_tuning_dataset(tmp_path):
    from tests.dataset_helpers import make_folder

    make_folder(tmp_path / "img", {"a.png": (64, 64)})
    (tmp_path / "meta.json").write_text(json.dumps({str(tmp_path / "img" / "a.png"): {"caption": "a cat"}}))
    subset = f"image_dir = '{tmp_path / 'img'}'\nmetadata_file = '{tmp_path / 'meta.json'}'"
    md = toml_metadata(tmp_path, f"[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\n{subset}\n")
    (dataset,) = json.loads(md["ss_datasets"])
    assert dataset["is_dreambooth"] is False
    assert (dataset["subsets"][0]["metadata_file"], dataset["subsets"][0]["image_dir"]) == ("meta.json", "img")


def test_no_metadata_keeps_the_network_args_and_v2_of_a_run_given_them():
    from library.train_metadata import minimal_metadata

    md = {"ss_network_args": '{"dropout": null}', "ss_v2": "False", "ss_seed": "1", "modelspec.title": "t"}
    assert minimal_metadata(md) == {"ss_network_args": '{"dropout": null}', "ss_v2": "False", "modelspec.title": "t"}


def test_other_processes_record_the_saves_without_writing_or_removing(tmp_path):
    saves, modes = make_saves(tmp_path, save_every_n_steps=1, save_last_n_steps=1)
    saves.accelerator.is_main_process = False
    (tmp_path / "lora-step00000001.safetensors").write_text("the main process's")
    for step in (1, 2, 3):
        saves.at_step(step, 0)
    assert [step for step, _ in saves.files] == [1, 2, 3] and modes == []
    assert os.listdir(tmp_path) == ["lora-step00000001.safetensors"]


def test_a_state_gathers_every_process_random_state_and_a_stop_keeps_the_one_it_is_given(tmp_path, monkeypatch):
    import library.run_saves
    from library.train_state import capture_rng_states, read_rng_states

    torch.manual_seed(1)
    at_step_end = capture_rng_states()
    torch.manual_seed(2)
    saves, _ = make_saves(tmp_path, save_state=True)
    saves.for_stop(3, 0, at_step_end)
    states = read_rng_states(str(tmp_path / "lora-step00000003-state" / "random_states_0.pkl"))
    assert torch.equal(states["torch"], at_step_end["torch"])
    saves.accelerator.num_processes = 2
    monkeypatch.setattr(library.run_saves, "gather_object", lambda states: states + states)
    saves.state("step", 5, 5)
    assert sorted(n for n in os.listdir(tmp_path / "lora-step00000005-state") if n.startswith("random")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # fmt: skip


def test_a_full_quota_is_said_as_a_full_disk_naming_the_last_good_file(tmp_path):
    import errno

    from library.errors import UserError

    saves, _ = make_saves(tmp_path, save_every_n_steps=1)
    saves.at_step(1, 0)

    def over_quota(path, dtype, metadata):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    saves.network.save_weights = over_quota
    with pytest.raises(UserError) as raised:
        saves.at_step(2, 0)
    good = os.path.join(str(tmp_path), "lora-step00000001.safetensors")
    assert "Disk quota exceeded. Free space on that disk or choose another --output_dir" in str(raised.value)
    assert f"the last good file is {good}" in str(raised.value)


def test_the_same_optimizer_class_from_another_module_resumes(tmp_path):
    from library.errors import UserError
    from library.train_state import check_state_optimizer

    state = sgd_state(tmp_path)  # saved as torch.optim.sgd.SGD
    check_state_optimizer(state, "some.other.module.SGD")
    with pytest.raises(UserError, match="saved with the optimizer torch.optim.sgd.SGD"):
        check_state_optimizer(state, "torch.optim.adamw.AdamW")


def test_a_lora_that_does_not_fit_names_three_problems_and_counts_the_rest(tmp_path):
    from library.errors import UserError
    from library.train_state import check_state_fits

    state = sgd_state(tmp_path)  # its LoRA: w of shape (2,)
    network = {"w": torch.ones(3), "a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}
    with pytest.raises(UserError) as raised:
        check_state_fits(state, network)
    assert "(w (2,) (network (3,)); a missing; b missing and 1 more)" in str(raised.value)


def test_a_state_without_scheduler_bin_is_refused_for_a_run_with_a_schedule(tmp_path):
    from library.errors import UserError
    from library.train_state import load_training_state

    state = sgd_state(tmp_path)
    os.remove(os.path.join(state, "scheduler.bin"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(UserError, match="the state has no scheduler.bin"):
        load_training_state(state, optimizer, scheduler)
