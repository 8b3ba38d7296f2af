"""The argument parsers (library.train_args, library.flux_train_utils) against spec §b."""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from library import flux_train_utils, train_args
from library.errors import UserError
from library.train_args import int_or_float

F = "flag"  # store_true, default False
N = object()  # no choices / nargs check

# flag: (type, default[, choices or N[, nargs]]) -- spec §b.1, §b.2, §b.3 and sd-scripts' parsers
EXPECTED: dict[str, tuple] = {
    # §b.1 add_flux_train_arguments
    "clip_l": (str, None), "t5xxl": (str, None), "ae": (str, None), "controlnet_model_name_or_path": (str, None),
    "t5xxl_max_token_length": (int, None), "apply_t5_attn_mask": (F, False), "guidance_scale": (float, 3.5),
    "timestep_sampling": (None, "sigma", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"]),
    "sigmoid_scale": (float, 1.0), "model_prediction_type": (None, "sigma_scaled", ["raw", "additive", "sigma_scaled"]),
    "discrete_flow_shift": (float, 3.0), "model_type": (str, "flux", ["flux", "chroma"]),
    # §b.1 add_dit_training_arguments, --split_mode
    "cache_text_encoder_outputs": (F, False), "cache_text_encoder_outputs_to_disk": (F, False),
    "text_encoder_batch_size": (int, None), "disable_mmap_load_safetensors": (F, False),
    "weighting_scheme": (str, "uniform", ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"]),
    "logit_mean": (float, 0.0), "logit_std": (float, 1.0), "mode_scale": (float, 1.29), "blocks_to_swap": (int, None),
    "split_mode": (F, False),
    # §b.1 train_network.py
    "cpu_offload_checkpointing": (F, False), "fp8_base_unet": (F, False), "no_metadata": (F, False),
    "save_model_as": (str, "safetensors", [None, "ckpt", "pt", "safetensors"]), "unet_lr": (float, None),
    "text_encoder_lr": (float, None, N, "*"), "network_weights": (str, None), "network_module": (str, None),
    "network_dim": (int, None), "network_alpha": (float, 1), "network_dropout": (float, None),
    "network_args": (str, None, N, "*"), "network_train_unet_only": (F, False),
    "network_train_text_encoder_only": (F, False), "training_comment": (str, None), "dim_from_weights": (F, False),
    "scale_weight_norms": (float, None), "base_weights": (str, None, N, "*"),
    "base_weights_multiplier": (float, None, N, "*"), "no_half_vae": (F, False), "skip_until_initial_step": (F, False),
    "initial_epoch": (int, None), "initial_step": (int, None), "validation_seed": (int, None),
    "validation_split": (float, 0.0), "validate_every_n_steps": (int, None), "validate_every_n_epochs": (int, None),
    "max_validation_steps": (int, None),
    # §b.2 model and tokenizer
    "pretrained_model_name_or_path": (str, None), "tokenizer_cache_dir": (str, None), "v2": (F, False),
    "v_parameterization": (F, False), "vae": (str, None),
    # §b.2 output and saving
    "output_dir": (str, None), "output_name": (str, None),
    "save_precision": (str, None, [None, "float", "fp16", "bf16"]), "save_every_n_epochs": (int, None),
    "save_every_n_steps": (int, None), "save_n_epoch_ratio": (int, None), "save_last_n_epochs": (int, None),
    "save_last_n_epochs_state": (int, None), "save_last_n_steps": (int, None), "save_last_n_steps_state": (int, None),
    "save_state": (F, False), "save_state_on_train_end": (F, False), "resume": (str, None),
    "huggingface_repo_id": (str, None), "huggingface_repo_type": (str, None), "huggingface_path_in_repo": (str, None),
    "huggingface_token": (str, None), "huggingface_repo_visibility": (str, None),
    "save_state_to_huggingface": (F, False), "resume_from_huggingface": (F, False), "async_upload": (F, False),
    # §b.2 training
    "train_batch_size": (int, 1), "max_train_steps": (int, 1600), "max_train_epochs": (int, None),
    "max_data_loader_n_workers": (int, 8), "persistent_data_loader_workers": (F, False), "seed": (int, None),
    "gradient_checkpointing": (F, False), "gradient_accumulation_steps": (int, 1),
    "mixed_precision": (str, "no", ["no", "fp16", "bf16"]), "full_fp16": (F, False), "full_bf16": (F, False),
    "fp8_base": (F, False), "fp8_scaled": (F, False), "gradient_checkpointing_keep_attention": (F, False),
    "ddp_timeout": (int, None),
    "ddp_gradient_as_bucket_view": (F, False),
    "ddp_static_graph": (F, False), "lowram": (F, False), "highvram": (F, False), "torch_compile": (F, False),
    "cudnn_attention": (F, False),
    "dynamo_backend": (str, "inductor"), "xformers": (F, False), "sdpa": (F, False), "mem_eff_attn": (F, False),
    # §b.2 logging
    "logging_dir": (str, None), "log_with": (str, None, ["tensorboard", "wandb", "all"]), "log_prefix": (str, None),
    "log_tracker_name": (str, None), "wandb_run_name": (str, None), "log_tracker_config": (str, None),
    "wandb_api_key": (str, None), "log_config": (F, False),
    "console_log_level": (str, None, ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    "console_log_file": (str, None), "console_log_simple": (F, False),
    # §b.2 noise, timesteps, loss
    "noise_offset": (float, None), "noise_offset_random_strength": (F, False),
    "multires_noise_iterations": (int, None), "multires_noise_discount": (float, 0.3),
    "adaptive_noise_scale": (float, None), "zero_terminal_snr": (F, False), "min_snr_gamma": (float, None),
    "scale_v_pred_loss_like_noise_pred": (F, False), "v_pred_like_loss": (float, None),
    "debiased_estimation_loss": (F, False), "ip_noise_gamma": (float, None),
    "ip_noise_gamma_random_strength": (F, False), "min_timestep": (int, None), "max_timestep": (int, None),
    "loss_type": (str, "l2", ["l1", "l2", "huber", "smooth_l1"]),
    "huber_schedule": (str, "snr", ["constant", "exponential", "snr"]), "huber_c": (float, 0.1),
    "huber_scale": (float, 1.0), "masked_loss": (F, False), "conditioning_data_dir": (str, None),
    "alpha_mask": (F, False), "weighted_captions": (F, False),
    # §b.2 sampling
    "sample_every_n_steps": (int, None), "sample_every_n_epochs": (int, None), "sample_at_first": (F, False),
    "sample_prompts": (str, None), "sample_sampler": (str, "ddim"),
    # §b.2 config files
    "config_file": (str, None), "output_config": (F, False), "dataset_config": (Path, None),
    # §b.2 optimizer
    "optimizer_type": (str, ""), "use_8bit_adam": (F, False), "use_lion_optimizer": (F, False),
    "optimizer_args": (str, None, N, "*"), "learning_rate": (float, 2e-6), "max_grad_norm": (float, 1.0),
    "fused_backward_pass": (F, False),
    # §b.2 scheduler
    "lr_scheduler": (str, "constant"), "lr_warmup_steps": (int_or_float, 0), "lr_decay_steps": (int_or_float, 0),
    "lr_scheduler_num_cycles": (int, 1), "lr_scheduler_power": (float, 1), "lr_scheduler_timescale": (int, None),
    "lr_scheduler_min_lr_ratio": (float, None), "lr_scheduler_type": (str, ""),
    "lr_scheduler_args": (str, None, N, "*"),
    # §b.3 and the other SD-only options
    "clip_skip": (int, None), "max_token_length": (int, None, [None, 150, 225]),
    # ModelSpec metadata (spec §h.4)
    **{f"metadata_{k}": (str, None) for k in ("title", "author", "description", "license", "tags", "usage_hint",
                                              "thumbnail", "merged_from", "trigger_phrase", "preprocessor",
                                              "is_negative_embedding")},
    # DeepSpeed (accepted, refused when enabled)
    "deepspeed": (F, False), "zero_stage": (int, 2, [0, 1, 2, 3]), "offload_optimizer_device": (str, None),
    "offload_optimizer_nvme_path": (str, None), "offload_param_device": (str, None),
    "offload_param_nvme_path": (str, None), "zero3_init_flag": (F, False), "zero3_save_16bit_model": (F, False),
    "fp16_master_weights_and_gradients": (F, False),
}  # fmt: skip

# §b.2 "Dataset CLI fallbacks" and latent-cache flags: library.dataset_args defines them, not these modules
DATASET_FLAGS = [
    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "caption_extension", "caption_separator", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
    "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "color_aug", "flip_aug",
    "face_crop_aug_range", "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "resize_interpolation", "cache_latents",
    "cache_latents_to_disk", "vae_batch_size", "skip_cache_check", "cache_info", "train_data_dir", "reg_data_dir",
    "in_json", "dataset_repeats", "prior_loss_weight", "dataset_class", "debug_dataset",
]  # fmt: skip

FLUX_GROUP = [
    "--clip_l", "--t5xxl", "--ae", "--controlnet_model_name_or_path", "--t5xxl_max_token_length",
    "--apply_t5_attn_mask", "--guidance_scale", "--timestep_sampling", "--sigmoid_scale", "--model_prediction_type",
    "--discrete_flow_shift", "--model_type",
]  # fmt: skip


def flux_parser() -> argparse.ArgumentParser:
    """What flux_train_network.setup_parser() builds, less the dataset options."""
    parser = argparse.ArgumentParser()
    train_args.add_train_network_arguments(parser)
    train_args.add_flux_script_arguments(parser)
    flux_train_utils.add_flux_train_arguments(parser)
    return parser


def actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def assert_matches_spec(action: argparse.Action | None, dest: str) -> None:
    assert action is not None, f"--{dest} missing"
    assert action.option_strings == [f"--{dest}"]
    expected_type, default, *rest = EXPECTED[dest]
    if expected_type is F:
        assert isinstance(action, argparse._StoreTrueAction) and action.default is False
    else:
        assert action.type is expected_type
        assert action.default == default and type(action.default) is type(default)
    if rest and rest[0] is not N:
        assert list(action.choices) == rest[0]
    assert action.nargs == (rest[1] if len(rest) > 1 else (0 if expected_type is F else None))


@pytest.mark.parametrize("dest", list(EXPECTED))
def test_parser_has_each_spec_flag_with_sd_scripts_dest_type_and_default(dest):
    assert_matches_spec(actions_by_dest(flux_parser()).get(dest), dest)


def test_parser_defines_no_dataset_options_and_nothing_unexpected():
    dests = set(actions_by_dest(flux_parser()))
    assert not dests & set(DATASET_FLAGS)
    assert dests == set(EXPECTED)


def test_add_flux_train_arguments_adds_exactly_sd_scripts_flux_group_in_order():
    parser = argparse.ArgumentParser()
    flux_train_utils.add_flux_train_arguments(parser)
    assert [a.option_strings[0] for a in parser._actions if a.dest != "help"] == FLUX_GROUP


def test_every_option_has_a_one_line_help_and_help_renders():
    parser = flux_parser()
    for action in parser._actions:
        assert action.help and "\n" not in action.help, action.dest
    text = parser.format_help()
    assert "--timestep_sampling" in text and "10%" in text


def test_parser_modules_do_not_import_torch():
    code = (
        "import sys, argparse; import library.train_args as t, library.flux_train_utils as f; "
        "p = argparse.ArgumentParser(); t.add_train_network_arguments(p); t.add_flux_script_arguments(p); "
        "f.add_flux_train_arguments(p); p.parse_args([]); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_adders_skip_flags_already_defined_elsewhere():
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha_mask", action="store_true", help="defined by the dataset options")
    parser.add_argument("--validation_split", type=float, default=0.5, help="defined by the dataset options")
    train_args.add_train_network_arguments(parser)
    train_args.add_train_network_arguments(parser)  # twice: still no conflict
    flux_train_utils.add_flux_train_arguments(parser)
    flux_train_utils.add_flux_train_arguments(parser)
    assert parser.parse_args([]).validation_split == 0.5
    assert [a.dest for a in parser._actions].count("alpha_mask") == 1


def test_parser_composes_with_the_dataset_options():
    dataset_args = pytest.importorskip("library.dataset_args")
    parser = argparse.ArgumentParser()
    dataset_args.add_dataset_arguments(parser)
    train_args.add_train_network_arguments(parser)
    train_args.add_flux_script_arguments(parser)
    flux_train_utils.add_flux_train_arguments(parser)
    actions = actions_by_dest(parser)
    assert set(DATASET_FLAGS) <= set(actions)
    for dest in EXPECTED:  # shared flags keep the spec's type and default whichever module defines them
        assert_matches_spec(actions.get(dest), dest)


GUIDE_COMMAND = """
  --pretrained_model_name_or_path=flux1-dev.safetensors --clip_l=clip_l.safetensors --t5xxl=t5xxl.safetensors
  --ae=ae.safetensors --dataset_config=my_flux_dataset_config.toml --output_dir=out --output_name=my_flux_lora
  --save_model_as=safetensors --network_module=networks.lora_flux --network_dim=16 --network_alpha=1
  --learning_rate=1e-4 --optimizer_type=AdamW8bit --lr_scheduler=constant --sdpa --max_train_epochs=10
  --save_every_n_epochs=1 --mixed_precision=fp16 --gradient_checkpointing --guidance_scale=1.0
  --timestep_sampling=flux_shift --model_prediction_type=raw --blocks_to_swap=18 --cache_text_encoder_outputs
  --cache_latents --optimizer_type adafactor --optimizer_args relative_step=False scale_parameter=False
  warmup_init=False --lr_scheduler constant_with_warmup --max_grad_norm 0.0 --text_encoder_lr 1e-4 1e-5
  --network_args img_attn_dim=4 "in_dims=[4,2,2,2,4]" --lr_warmup_steps 10%
"""


def test_the_guides_command_lines_parse():
    args, unknown = flux_parser().parse_known_args(shlex.split(GUIDE_COMMAND))
    assert set(unknown) <= {"--cache_latents"}  # a dataset option, from library.dataset_args
    assert args.optimizer_args == ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    assert args.text_encoder_lr == [1e-4, 1e-5] and args.network_args == ["img_attn_dim=4", "in_dims=[4,2,2,2,4]"]
    assert (args.timestep_sampling, args.model_prediction_type, args.guidance_scale) == ("flux_shift", "raw", 1.0)
    assert args.blocks_to_swap == 18 and args.max_grad_norm == 0.0 and args.lr_warmup_steps == pytest.approx(0.1)
    assert args.dataset_config == Path("my_flux_dataset_config.toml")


def test_review_compat_flags_warns_once_per_ignored_flag_and_not_for_sdpa():
    parser = flux_parser()
    args = parser.parse_args(["--v2", "--noise_offset", "0.1", "--sdpa", "--max_token_length", "225", "--split_mode"])
    warnings = train_args.review_compat_flags(args, parser)
    assert len(warnings) == 3  # --split_mode has an effect (--blocks_to_swap 18): the trainer warns about it itself
    assert any(w.startswith("--v2 ") for w in warnings) and any("--noise_offset " in w for w in warnings)
    assert any("--t5xxl_max_token_length" in w for w in warnings) and not any("--split_mode" in w for w in warnings)
    assert not any("sdpa" in w for w in warnings)
    assert train_args.review_compat_flags(parser.parse_args([]), parser) == []


def test_compat_flags_written_as_off_are_not_warned_about():
    # GUIs write every option they show: noise_offset = 0, min_snr_gamma = 0, v2 = false mean off, as in sd-scripts
    parser = flux_parser()
    args = parser.parse_args(["--noise_offset", "0", "--min_snr_gamma", "0", "--multires_noise_iterations", "0",
                              "--max_timestep", "0"])  # fmt: skip
    assert train_args.review_compat_flags(args, parser) == []
    # and the values that mean "as if not set": CLIP's last layer, the full timestep range
    args = parser.parse_args(["--clip_skip", "1", "--max_timestep", "1000", "--dynamo_backend", "no"])
    assert train_args.review_compat_flags(args, parser) == []
    (warning,) = train_args.review_compat_flags(parser.parse_args(["--clip_skip", "2"]), parser)
    assert warning.startswith("--clip_skip has no effect")


@pytest.mark.parametrize("flag", ["--lowram", "--highvram", "--ddp_static_graph", "--ddp_gradient_as_bucket_view",
                                  "--disable_mmap_load_safetensors"])  # fmt: skip
def test_generic_flags_without_effect_say_so_in_help_and_when_set(flag):
    parser = flux_parser()
    assert actions_by_dest(parser)[flag[2:]].help.startswith("accepted for compatibility; no effect")
    (warning,) = train_args.review_compat_flags(parser.parse_args([flag]), parser)
    assert warning.startswith(f"{flag} has no effect for FLUX/Chroma: ")


@pytest.mark.parametrize(
    "argv, flag", [(["--weighted_captions"], "--weighted_captions"), (["--deepspeed"], "--deepspeed")]
)
def test_review_compat_flags_refuses_flags_that_cannot_work(argv, flag):
    parser = flux_parser()
    with pytest.raises(UserError, match=flag):
        train_args.review_compat_flags(parser.parse_args(argv), parser)


def test_compat_tables_name_real_dests():
    dests = set(actions_by_dest(flux_parser()))
    assert set(train_args.IGNORED_FOR_FLUX) <= dests and set(train_args.REFUSED_FOR_FLUX) <= dests


def test_console_log_file_in_a_folder_not_there_yet_is_made_and_an_unwritable_one_is_a_message(tmp_path):
    import logging
    from argparse import Namespace

    from library.errors import UserError
    from library.run_logging import setup_logging

    path = tmp_path / "logs" / "today" / "train.log"
    try:
        setup_logging(Namespace(console_log_file=str(path), console_log_level="INFO"))
        logging.getLogger("library.test").info("hello from the test")
        assert "hello from the test" in path.read_text()
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        with pytest.raises(UserError, match=r"--console_log_file .*a_file/train\.log: cannot write it"):
            setup_logging(Namespace(console_log_file=str(blocker / "train.log"), console_log_level="INFO"))
    finally:
        setup_logging(Namespace())  # the console handler alone again


def test_the_console_log_file_is_written_by_the_first_process_and_ends_with_the_outcome(tmp_path, monkeypatch,
                                                                                          capsys):  # fmt: skip
    """Every process of a multi-GPU run wrote each line into it; the run's error, printed to the console, was
    missing from it."""
    import logging
    from argparse import Namespace

    import train_network
    from library.run_logging import setup_logging

    path = tmp_path / "train.log"
    try:
        monkeypatch.setenv("RANK", "1")
        setup_logging(Namespace(console_log_file=str(path), console_log_level="INFO"))
        logging.getLogger("library.test").info("from the second process")
        assert not path.exists()
        monkeypatch.delenv("RANK")
        assert train_network.main(["--console_log_file", str(path), "--network_module", "no.such.module"],
                                  trainer=train_network.NetworkTrainer()) == 1  # fmt: skip
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ")
        assert path.read_text().strip().splitlines()[-1] == f"ERROR train_network: {error}"

        class Trained:
            def train(self, args):
                return "out/lora.safetensors"

        assert train_network.main(["--console_log_file", str(path)], trainer=Trained()) == 0
        assert path.read_text().strip().splitlines()[-1] == "INFO train_network: saved the LoRA to out/lora.safetensors"
    finally:
        setup_logging(Namespace())  # the console handler alone again


@pytest.mark.parametrize("argv, warning", [
    (["--network_train_unet_only", "--text_encoder_lr", "1e-5"],
     "--text_encoder_lr is not used: --network_train_unet_only trains no text-encoder LoRA"),
    (["--network_train_text_encoder_only", "--unet_lr", "1e-4"],
     "--unet_lr is not used: --network_train_text_encoder_only trains no DiT LoRA"),
    (["--masked_loss"], "--masked_loss: masks come from each image's alpha channel"),
    # the examples set max_train_epochs: a --max_train_steps 2 given to try one out would pass unnoticed
    (["--max_train_epochs", "10", "--max_train_steps", "2"],
     "--max_train_epochs 10 sets the run's length: --max_train_steps 2 is not used"),
    (["--max_train_epochs", "10"], None),
    (["--text_encoder_lr", "1e-5", "--unet_lr", "1e-4"], None),
])
def test_settings_narrower_than_their_name_say_so(argv, warning, caplog):
    from train_network import NetworkTrainer

    with caplog.at_level("WARNING"):
        NetworkTrainer().warn_about_flags_without_effect(flux_parser().parse_args(argv))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == (warning is not None) and all(m.startswith(warning) for m in messages)


def test_a_path_the_console_cannot_encode_still_prints(monkeypatch):
    """On Windows a redirected stdout encodes with the code page, strictly: printing where a LoRA was saved
    raised UnicodeEncodeError after the training had finished."""
    import io
    import sys

    import train_network

    class Trained:
        def train(self, args):
            return "output/学習/lora.safetensors"

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert train_network.main([], trainer=Trained()) == 0
    stdout.flush()
    assert stdout.buffer.getvalue() == b"saved the LoRA to output/\\u5b66\\u7fd2/lora.safetensors\n"
