"""The checks made before the models load (library/preflight.py): they refuse what cannot work and
nothing that can."""

from __future__ import annotations

import logging
from argparse import Namespace

import pytest

import flux_train_network
from library.errors import UserError
from library.preflight import check_counts, check_learning_rates, rehearse_optimizer_and_schedule


def parse(*argv: str):
    return flux_train_network.setup_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ["--optimizer_type", "Muon"],  # matrices only, as every LoRA weight is
    ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
     "warmup_init=False", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2"],
    ["--optimizer_type", "Adafactor"],  # relative_step: the adafactor schedule
    ["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine"],
    ["--optimizer_type", "Prodigy", "--learning_rate", "1.0"],
    ["--optimizer_type", "PagedAdamW8bit"],
    ["--optimizer_type", "torch.optim.RAdam"],
    # per-group arguments: the real optimizer has a group each for the DiT and the text encoder
    ["--lr_scheduler_type", "OneCycleLR", "--lr_scheduler_args", "max_lr=[1e-3,1e-3]", "total_steps=10"],
    ["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1", "--lr_warmup_steps", "0.1"],
], ids=["muon", "adafactor recipe", "adafactor relative", "schedule-free", "prodigy", "paged 8-bit", "class path",
        "per-group scheduler args", "min lr"])  # fmt: skip
def test_the_rehearsal_passes_what_trains(argv):
    args = parse(*argv)
    before = vars(args).copy()
    assert rehearse_optimizer_and_schedule(args, 10).count(".") >= 1
    assert vars(args) == before  # Adafactor's rewrites of the learning rate and schedule stay in the rehearsal


@pytest.mark.parametrize("argv, message", [
    (["--optimizer_type", "Lion8bitt"], "--optimizer_type 'Lion8bitt' is not a known optimizer"),
    (["--lr_scheduler_type", "NoSuchLR"], "--lr_scheduler_type NoSuchLR: no class 'NoSuchLR'"),
    (["--optimizer_args", "betas=(0.9,)"], "do not fit AdamW"),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "11"], "--lr_warmup_steps 11 is longer than the whole"),
])
def test_the_rehearsal_stops_what_cannot(argv, message):
    with pytest.raises(UserError, match=message):
        rehearse_optimizer_and_schedule(parse(*argv), 10)


@pytest.mark.parametrize("argv", [
    ["--network_dim", "0", "--network_args", "img_attn_dim=4"],  # 0 is a rank: only the layers given one train
    ["--max_train_epochs", "2", "--max_train_steps", "0"],  # the epochs set the length
    ["--max_grad_norm", "0"],  # no clipping
    ["--max_data_loader_n_workers", "0"],
    ["--save_every_n_steps", "0", "--save_every_n_epochs", "0", "--save_n_epoch_ratio", "0"],  # off, as left out
    ["--save_last_n_steps", "0", "--save_last_n_epochs", "0", "--save_last_n_steps_state", "0",
     "--save_last_n_epochs_state", "0"],  # keep every save
])
def test_counts_at_their_bound_pass(argv):
    check_counts(parse(*argv))


@pytest.mark.parametrize("flag", ["save_every_n_steps", "save_every_n_epochs", "save_n_epoch_ratio",
                                  "save_last_n_steps", "save_last_n_steps_state", "save_last_n_epochs",
                                  "save_last_n_epochs_state"])
def test_negative_save_counts_are_refused(flag):
    # --save_last_n_steps -1 deleted each step save right after writing it; --save_every_n_steps -2 saved every 2
    with pytest.raises(UserError, match=rf"^--{flag} -1: give 0 or more \("):
        check_counts(parse(f"--{flag}", "-1"))


def test_zero_epochs_are_refused():
    with pytest.raises(UserError) as ei:
        check_counts(parse("--max_train_epochs", "0"))
    assert str(ei.value) == "--max_train_epochs 0: give 1 or more (epochs)"

@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "0", "--network_train_unet_only"], "every parameter group has learning rate 0"),
    (["--learning_rate", "0", "--unet_lr", "0", "--text_encoder_lr", "0", "0"], "learning rate 0"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
])
def test_runs_with_nothing_to_train_stop(argv, message):
    with pytest.raises(UserError, match=message):
        check_learning_rates(parse(*argv))


@pytest.mark.parametrize("argv", [
    ["--learning_rate", "0", "--unet_lr", "1e-4"],
    ["--learning_rate", "0", "--text_encoder_lr", "1e-5"],  # the text encoder trains
    ["--unet_lr", "0", "--network_train_text_encoder_only"],  # the DiT does not train anyway
])
def test_runs_with_something_to_train_pass(argv):
    check_learning_rates(parse(*argv))


def trained_text_encoders(*argv: str) -> list[int] | None:
    return flux_train_network.FluxNetworkTrainer().text_encoders_with_lora(parse(*argv))


@pytest.mark.parametrize("argv, expected", [
    ([], [0]),  # FLUX.1: CLIP-L; T5 only when asked
    (["--network_args", "train_t5xxl=True"], [0, 1]),
    (["--model_type", "chroma"], []),  # no CLIP-L
    (["--model_type", "chroma", "--network_args", "train_t5xxl=True"], [1]),
    (["--network_module", "lycoris.kohya"], None),  # a third-party module decides for itself
    (["--dim_from_weights", "--network_weights", "x.safetensors"], None),  # so does the file's set of modules
])
def test_the_flux_trainer_knows_which_text_encoders_get_lora(argv, expected):
    assert trained_text_encoders(*argv) == expected


@pytest.mark.parametrize("argv, message", [
    # the rates of text encoders without LoRA modules do not count: these runs would train nothing
    (["--model_type", "chroma", "--unet_lr", "0"], "every parameter group has learning rate 0"),
    (["--unet_lr", "0", "--text_encoder_lr", "0", "1e-4"], "every parameter group has learning rate 0"),
    (["--model_type", "chroma", "--network_train_text_encoder_only"], "train_t5xxl=True"),
])
def test_flux_runs_with_nothing_to_train_stop_before_loading(argv, message):
    args = parse(*argv)
    with pytest.raises(UserError, match=message):
        check_learning_rates(args, trained_text_encoders(*argv))


@pytest.mark.parametrize("argv", [
    ["--unet_lr", "0", "--text_encoder_lr", "1e-4", "0"],  # CLIP-L trains
    ["--unet_lr", "0", "--text_encoder_lr", "0", "1e-4", "--network_args", "train_t5xxl=True"],  # T5 trains
    ["--model_type", "chroma", "--unet_lr", "0", "--text_encoder_lr", "1e-4", "--network_args", "train_t5xxl=True"],
    ["--network_module", "lycoris.kohya", "--unet_lr", "0", "--text_encoder_lr", "0", "1e-4"],  # may train T5
])
def test_flux_runs_with_a_trained_text_encoder_pass(argv):
    check_learning_rates(parse(*argv), trained_text_encoders(*argv))


@pytest.mark.parametrize("kind, refused", [("DEEPSPEED", True), ("FSDP", True), ("MULTI_GPU", False), ("NO", False)])
def test_deepspeed_or_fsdp_in_accelerate_config_is_refused(kind, refused):
    from accelerate.utils import DistributedType

    from library.preflight import refuse_unsupported_distribution

    if refused:
        with pytest.raises(UserError, match=f"accelerate is configured for {kind}, which this trainer does not"):
            refuse_unsupported_distribution(DistributedType[kind])
    else:
        refuse_unsupported_distribution(DistributedType[kind])


@pytest.mark.parametrize("environ, refused", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED"), ({"ACCELERATE_USE_FSDP": "1"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_USE_FSDP": "0"}, None), ({}, None),
])
def test_deepspeed_or_fsdp_set_by_accelerate_launch_is_refused_before_the_accelerator(environ, refused):
    # accelerate launch passes the config's choice in these variables; the Accelerator would first demand that
    # DeepSpeed be installed
    from library.preflight import refuse_unsupported_distribution

    if refused:
        with pytest.raises(UserError, match=f"accelerate is configured for {refused}"):
            refuse_unsupported_distribution(environ=environ)
    else:
        refuse_unsupported_distribution(environ=environ)


@pytest.mark.parametrize("checkpoint, schnell, length", [("flux_schnell", True, 256), ("flux_dev", False, 512)])
def test_schnell_is_known_from_the_header_and_sets_the_t5_length(tiny_model_files, tmp_path, checkpoint, schnell,
                                                                 length):
    from types import SimpleNamespace

    m = tiny_model_files
    args = parse("--pretrained_model_name_or_path", getattr(m, checkpoint), "--clip_l", m.clip_l, "--t5xxl", m.t5xxl,
                 "--ae", m.ae, "--tokenizer_cache_dir", m.tokenizer_cache_dir, "--output_dir", str(tmp_path))
    trainer = flux_train_network.FluxNetworkTrainer()
    trainer.check_args(args)  # reads headers only
    assert trainer.is_schnell is schnell
    trainer.prepare_before_loading(args, SimpleNamespace(datasets=[]), None)
    assert trainer.t5_max_length == length


def test_a_validation_flag_alone_without_held_out_images_is_one_flag_that_has_no_effect(caplog):
    from library.preflight import warn_about_validation_without_images

    with caplog.at_level(logging.WARNING):
        warn_about_validation_without_images(Namespace(validation_seed=3))
    assert "--validation_seed: no image is held out for validation" in caplog.text
    assert caplog.text.rstrip().endswith("so there is no validation and it has no effect")


def test_an_output_name_folder_that_is_a_file_stops_the_run(tmp_path):
    from library.preflight import check_output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("x")  # --output_name a/lora needs out/a to be a folder
    expected = rf"^--output_dir {out} with --output_name a/lora: {out / 'a'} is a file, not a folder; choose another"
    with pytest.raises(UserError, match=expected):
        check_output_folder(Namespace(output_dir=str(out), output_name="a/lora"))


T5_ONLY = "T5 gets LoRA modules only with --network_args train_t5xxl=True"


@pytest.mark.parametrize("argv, warnings", [
    # Chroma has no CLIP-L: without train_t5xxl no text encoder trains, whatever the rates say
    (["--model_type", "chroma", "--text_encoder_lr", "1e-4", "5e-5"],
     [f"--text_encoder_lr 0.0001 5e-05 is not used: no text encoder gets LoRA modules in this run (Chroma has no "
      f"CLIP-L and {T5_ONLY})"]),
    (["--model_type", "chroma", "--network_args", "loraplus_text_encoder_lr_ratio=4"],
     ["--network_args loraplus_text_encoder_lr_ratio=4 is not used: no text encoder gets LoRA modules"]),
    (["--model_type", "chroma", "--network_args", "train_t5xxl=True", "--text_encoder_lr", "1e-4", "5e-5"],
     ["--text_encoder_lr 0.0001 5e-05: the first rate (CLIP-L) is not used: Chroma has no CLIP-L"]),
    (["--text_encoder_lr", "1e-4", "5e-5"], [f"--text_encoder_lr 0.0001 5e-05: the second rate (T5) is not used: "
                                             f"{T5_ONLY}"]),
    (["--text_encoder_lr", "1e-4"], []),  # one rate for every text encoder that trains
    (["--text_encoder_lr", "1e-4", "5e-5", "--network_args", "train_t5xxl=True"], []),
    (["--model_type", "chroma", "--network_args", "train_t5xxl=True", "--text_encoder_lr", "1e-4"], []),
    (["--model_type", "chroma", "--network_args", "train_t5xxl=True", "loraplus_text_encoder_lr_ratio=4"], []),
    # the unet-only warning says it already
    (["--model_type", "chroma", "--network_train_unet_only", "--text_encoder_lr", "1e-4"], []),
])  # fmt: skip
def test_text_encoder_rates_no_module_takes_are_named(argv, warnings, caplog):
    """They were recorded in the metadata (ss_text_encoder_lr) and trained nothing, without a word."""
    from library.preflight import warn_about_unused_text_encoder_rates
    from train_network import parse_network_args

    args = parse(*argv)
    with caplog.at_level(logging.WARNING):
        warn_about_unused_text_encoder_rates(
            args, flux_train_network.FluxNetworkTrainer().text_encoders_with_lora(args),
            parse_network_args(args.network_args),
        )  # fmt: skip
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(warnings) and all(m.startswith(w) for m, w in zip(messages, warnings, strict=True))


def test_the_trainer_names_unused_text_encoder_rates_before_loading(tiny_model_files, tmp_path, caplog):
    """The check above, as the trainer runs it: Chroma with --text_encoder_lr trains no text encoder."""
    from tests.training_helpers import base_argv, dataset

    args = parse(*base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), model_type="chroma",
                            text_encoder_lr="1e-4"))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        flux_train_network.FluxNetworkTrainer().check_inputs_before_loading(args)
    assert any(m.startswith("--text_encoder_lr 0.0001 is not used: no text encoder gets LoRA modules")
               for m in caplog.messages), caplog.messages  # fmt: skip
