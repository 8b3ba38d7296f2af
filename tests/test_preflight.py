"""The checks made before the models load (library/preflight.py): they refuse what cannot work and
nothing that can."""

from __future__ import annotations

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
])
def test_counts_at_their_bound_pass(argv):
    check_counts(parse(*argv))


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
