"""Generic command-line arguments of the LoRA trainer, with sd-scripts' dests, types and defaults.

Spec §b.2 and the generic part of §b.1, grouped by purpose. The dataset options (the "Dataset
CLI fallbacks" and latent-cache flags) live in ``library.dataset_args``; the FLUX group in
``library.flux_train_utils.add_flux_train_arguments``. Import-light on purpose (no torch):
GUIs import the parsers to read each action's dest, option strings, type, default and help.

Every adder skips an option string the parser already has, so modules that share a flag
(``--alpha_mask``, ``--validation_split``, ``--dataset_config``, the text-encoder cache flags)
compose in any order as long as the other module does the same or is called first.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from library.errors import UserError

LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "inverse_sqrt",
    "piecewise_constant", "adafactor",
)  # fmt: skip
DEFAULT_MAX_TRAIN_STEPS = 1600

# sd-scripts' list (its "tensort" typo kept), with "tensorrt", torch's name, and "no", which GUIs write
DYNAMO_BACKENDS = (
    "no", "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
    "onnxrt", "tensort", "tensorrt", "ipex", "tvm",
)  # fmt: skip
SAMPLE_SAMPLERS = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)  # fmt: skip


def int_or_float(value: str) -> int | float:
    """argparse type of ``--lr_warmup_steps`` / ``--lr_decay_steps``: ``100`` → 100 steps,
    ``0.1`` → ratio 0.1 of the run, ``10%`` → ratio 0.1."""
    text = value.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a ratio below 1 or a percentage") from None
    if number < 1:
        return number
    if not math.isfinite(number) or number != int(number):
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number of steps, a ratio below 1 or a percentage")
    return int(number)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once: appended only when the help text does not already say it
    and the default means something (not None, "", False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default in (None, "", False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {default})"


def argument_adder(parser: argparse.ArgumentParser, title: str):
    """An ``add(*flags, **kw)`` that puts arguments in a titled group, skipping flags already defined."""
    group = parser.add_argument_group(title) if isinstance(parser, argparse.ArgumentParser) else parser
    existing = parser._option_string_actions  # shared by a parser and its groups

    def add(*flags: str, **kwargs: Any) -> None:
        if not any(f in existing for f in flags):
            group.add_argument(*flags, **kwargs)

    return add


def _flag(add, name: str, help: str) -> None:
    add(name, action="store_true", help=help)


# region groups


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Base model and tokenizers."""
    add = argument_adder(parser, "model")
    add("--pretrained_model_name_or_path", type=str, default=None,
        help="(required) DiT checkpoint to train: FLUX.1 dev/schnell or Chroma .safetensors, or a Diffusers "
        "FLUX/Chroma directory")
    add("--tokenizer_cache_dir", type=str, default=None,
        help="directory with local tokenizer copies (for offline training); default: none")  # fmt: skip


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Steps, batches, precision, memory and distribution."""
    add = argument_adder(parser, "training")
    add("--train_batch_size", type=int, default=1, help="batch size when no --dataset_config sets one (default 1)")
    add("--max_train_steps", type=int, default=DEFAULT_MAX_TRAIN_STEPS, help="training steps (default 1600)")
    add("--max_train_epochs", type=int, default=None, help="training epochs; overrides --max_train_steps")
    add("--max_data_loader_n_workers", type=int, default=8, help="max DataLoader worker processes (default 8)")
    _flag(add, "--persistent_data_loader_workers", "keep DataLoader workers alive between epochs")
    add("--seed", type=int, default=None, help="random seed (default: a random one)")
    _flag(add, "--gradient_checkpointing", "recompute activations in backward to save memory")
    add("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step (default 1)")
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
        help="compute dtype: no (fp32, default), fp16 or bf16")  # fmt: skip
    _flag(add, "--full_fp16", "keep the trained network in fp16 (needs --mixed_precision fp16)")
    _flag(add, "--full_bf16", "keep the trained network in bf16 (needs --mixed_precision bf16)")
    _flag(add, "--fp8_base", "store the base DiT (and text encoders) in fp8_e4m3fn")
    _flag(add, "--fp8_base_unet", "store only the DiT in fp8; text encoders stay in the mixed-precision dtype")
    _flag(add, "--fp8_scaled",
          "with --fp8_base / --fp8_base_unet: store the DiT's fp8 weights with a power-of-two scale per output row "
          "(less quantisation error than plain fp8, same memory)")  # fmt: skip
    _flag(add, "--cpu_offload_checkpointing",
          "keep gradient-checkpoint activations on the CPU (needs --gradient_checkpointing)")  # fmt: skip
    _flag(add, "--gradient_checkpointing_keep_attention",
          "with --gradient_checkpointing and --torch_compile: also keep each block's attention output, so that "
          "the recompute skips attention (about 1.6 GB more at 1024x1024 on FLUX.1; without --torch_compile it "
          "is slower on a GPU)")  # fmt: skip
    _flag(add, "--no_half_vae", "run the AE in fp32 even with mixed precision")
    _flag(add, "--lowram", "accepted for compatibility; no effect (models are loaded tensor by tensor anyway)")
    _flag(add, "--highvram", "accepted for compatibility; no effect (caching never frees memory between batches)")
    _flag(add, "--torch_compile", "compile the DiT's blocks with torch.compile (their checkpointing included; "
          "with --blocks_to_swap, --gradient_checkpointing is required)")  # fmt: skip
    _flag(add, "--cudnn_attention",
          "let attention use cuDNN's fused kernel first where the GPU has it (faster on an H100; off by default: "
          "with torch 2.11 its backward crashed the process on some tensor layouts)")  # fmt: skip
    add("--dynamo_backend", type=str, default="inductor", choices=list(DYNAMO_BACKENDS),
        help="torch.compile backend for --torch_compile (default inductor; \"no\", which GUIs write, is accepted "
        "and refused with --torch_compile)")  # fmt: skip
    add("--ddp_timeout", type=int, default=None, help="DDP timeout in minutes (default: accelerate's)")
    _flag(add, "--ddp_gradient_as_bucket_view", "accepted for compatibility; no effect (no DDP wrapper is used)")
    _flag(add, "--ddp_static_graph", "accepted for compatibility; no effect (no DDP wrapper is used)")
    _flag(add, "--skip_until_initial_step", "skip batches until --initial_step / --initial_epoch is reached")
    add("--initial_epoch", type=int, default=None,
        help="epoch number to start counting from, 1-based, also over a --resume state's step (the lr schedule "
        "still starts at 0 unless --resume)")
    add("--initial_step", type=int, default=None,
        help="step number to start counting from, over all epochs; overrides --initial_epoch and a --resume "
        "state's step")  # fmt: skip


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and gradient clipping (names as in ``library.optimizers``)."""
    add = argument_adder(parser, "optimizer")
    add("--optimizer_type", type=str, default="",
        help="optimizer, case-insensitive (default AdamW): AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, "
        "PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdam, "
        "DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, Adafactor, AdamWScheduleFree, "
        "RAdamScheduleFree, SGDScheduleFree, any torch.optim class or a class path like "
        "bitsandbytes.optim.AdEMAMix8bit")  # fmt: skip
    _flag(add, "--use_8bit_adam", "legacy: same as --optimizer_type AdamW8bit")
    _flag(add, "--use_lion_optimizer", "legacy: same as --optimizer_type Lion")
    add("--learning_rate", type=float, default=2.0e-6, help="learning rate (default 2e-6; the FLUX guide uses 1e-4)")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 to disable (default 1.0)")
    add("--optimizer_args", type=str, default=None, nargs="*",
        help='optimizer keyword arguments as Python literals, e.g. "weight_decay=0.01" "betas=0.9,0.999"')
    _flag(add, "--fused_backward_pass", "accepted for compatibility; no effect on LoRA training")


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """Learning-rate schedule (``library.lr_schedulers``)."""
    add = argument_adder(parser, "learning-rate schedule")
    add("--lr_scheduler", type=str, default="constant",
        help=f"lr schedule (default constant): {', '.join(LR_SCHEDULERS)}")
    add("--lr_scheduler_type", type=str, default="",
        help="custom scheduler class: a torch.optim.lr_scheduler name or a class path; overrides --lr_scheduler")
    add("--lr_scheduler_args", type=str, default=None, nargs="*",
        help='scheduler keyword arguments as Python literals, e.g. "T_max=100"')
    add("--lr_warmup_steps", type=int_or_float, default=0,
        help="warmup: steps (int), a ratio of the run (float < 1) or a percentage (10%%); default 0")
    add("--lr_decay_steps", type=int_or_float, default=0,
        help="decay length for warmup_stable_decay: steps, ratio or percentage; default 0")
    add("--lr_scheduler_num_cycles", type=int, default=1, help="cycles for cosine_with_restarts (default 1)")
    add("--lr_scheduler_power", type=float, default=1, help="power for polynomial (default 1)")
    add("--lr_scheduler_timescale", type=int, default=None,
        help="timescale for inverse_sqrt (default: the warmup steps)")
    add("--lr_scheduler_min_lr_ratio", type=float, default=None,
        help="final lr / initial lr for cosine_with_min_lr, cosine_warmup_with_min_lr and "
             "warmup_stable_decay")  # fmt: skip


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The trained network (LoRA) and its learning rates."""
    add = argument_adder(parser, "network")
    add("--network_module", type=str, default=None, help="network module to train, e.g. networks.lora_flux")
    add("--network_dim", type=int, default=None, help="LoRA rank (default: the module's, 4 for lora_flux)")
    add("--network_alpha", type=float, default=1,
        help="LoRA alpha; scale is alpha/rank (default 1; 0 means alpha = rank)")
    add("--network_dropout", type=float, default=None, help="dropout on the LoRA down output (default none)")
    add("--network_args", type=str, default=None, nargs="*", help="network options as key=value")
    add("--network_weights", type=str, default=None, help="LoRA weights to start from")
    _flag(add, "--dim_from_weights", "take ranks and alphas from --network_weights")
    _flag(add, "--network_train_unet_only", "train only the DiT LoRA (no text-encoder LoRA)")
    _flag(add, "--network_train_text_encoder_only", "train only the text-encoder LoRA")
    add("--unet_lr", type=float, default=None, help="lr of the DiT LoRA (default --learning_rate)")
    add("--text_encoder_lr", type=float, default=None, nargs="*",
        help="lr of the text-encoder LoRA: one value for both, or CLIP-L then T5 (default --learning_rate)")
    add("--scale_weight_norms", type=float, default=None,
        help="max norm of each module's weight delta (1 is a good start; default off)")
    add("--base_weights", type=str, default=None, nargs="*", help="LoRA files merged into the model before training")
    add("--base_weights_multiplier", type=float, default=None, nargs="*",
        help="multiplier per --base_weights file (default 1.0)")  # fmt: skip


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Noise perturbation, loss function and loss masks (``library.flow_matching``)."""
    add = argument_adder(parser, "noise and loss")
    add("--ip_noise_gamma", type=float, default=None,
        help="input-perturbation noise strength, about 0.1 when used (default off)")
    _flag(add, "--ip_noise_gamma_random_strength", "draw the IP noise strength uniformly in [0, --ip_noise_gamma]")
    add("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
        help="loss function (default l2)")
    add("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
        help="Huber c schedule for huber/smooth_l1 (default snr, which FLUX cannot use: pick constant or exponential)")
    add("--huber_c", type=float, default=0.1, help="Huber c (default 0.1)")
    add("--huber_scale", type=float, default=1.0, help="Huber c multiplier (default 1.0)")
    _flag(add, "--masked_loss", "weight the loss by masks: here the images' alpha channel, with --alpha_mask (or "
          "alpha_mask = true in the dataset config); alone it changes nothing")
    add("--conditioning_data_dir", type=str, default=None,
        help="mask images for --masked_loss (not supported: refused; use --alpha_mask)")
    _flag(add, "--alpha_mask", "weight the loss by each image's alpha channel")


def add_saving_arguments(parser: argparse.ArgumentParser) -> None:
    """Output files, checkpoints, state and resume."""
    add = argument_adder(parser, "saving")
    add("--output_dir", type=str, default=None, help="(required) directory for the trained LoRA")
    add("--output_name", type=str, default=None, help="file name without extension (default: last.safetensors, "
        "epoch-000001.safetensors, at-step00000100.safetensors)")
    add("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
        help="file format (default safetensors; ckpt/pt carry no metadata)")
    add("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
        help="dtype of the saved weights (default: as trained)")
    add("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    add("--save_every_n_steps", type=int, default=None, help="save every N steps")
    add("--save_n_epoch_ratio", type=int, default=None, help="save about N times over the run")
    add("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    add("--save_last_n_epochs_state", type=int, default=None,
        help="keep only the last N epoch states (overrides --save_last_n_epochs for states)")
    add("--save_last_n_steps", type=int, default=None, help="keep step saves of the last N steps only")
    add("--save_last_n_steps_state", type=int, default=None,
        help="keep step states of the last N steps only (overrides --save_last_n_steps for states)")
    _flag(add, "--save_state", "also save the training state (optimizer etc.) with each save")
    _flag(add, "--save_state_on_train_end", "save the training state at the end")
    add("--resume", type=str, default=None, help="state directory to resume from")
    add("--huggingface_repo_id", type=str, default=None, help="Hugging Face repo to upload to (not supported)")
    add("--huggingface_repo_type", type=str, default=None, help="Hugging Face repo type (not supported)")
    add("--huggingface_path_in_repo", type=str, default=None, help="path in the Hugging Face repo (not supported)")
    add("--huggingface_token", type=str, default=None, help="Hugging Face token (not supported)")
    add("--huggingface_repo_visibility", type=str, default=None,
        help="Hugging Face repo visibility (not supported)")
    _flag(add, "--save_state_to_huggingface", "upload states to Hugging Face (not supported)")
    _flag(add, "--resume_from_huggingface", "resume from a Hugging Face state (not supported)")
    _flag(add, "--async_upload", "upload asynchronously (not supported)")  # fmt: skip


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """``ss_*`` and ``modelspec.*`` metadata of the saved file."""
    add = argument_adder(parser, "metadata")
    _flag(add, "--no_metadata", "save only the minimal ss_* metadata (the modelspec.* keys are kept)")
    add("--training_comment", type=str, default=None, help="comment stored as ss_training_comment")
    for name, what in (
        ("title", "model title (default: output_name)"),
        ("author", "author"),
        ("description", "description"),
        ("license", "license"),
        ("tags", "tags, comma separated"),
        ("usage_hint", "usage hint"),
        ("thumbnail", "thumbnail: a data: URL or an image file (converted)"),
        ("merged_from", "source models of a merge"),
        ("trigger_phrase", "trigger phrase"),
        ("preprocessor", "preprocessor"),
        ("is_negative_embedding", "whether this is a negative embedding"),
    ):
        add(f"--metadata_{name}", type=str, default=None, help=f"modelspec {what}")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Console logging and experiment trackers."""
    add = argument_adder(parser, "logging")
    add("--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="console log level (default INFO)")
    add("--console_log_file", type=str, default=None,
        help="write the console log to this file (the first process of several writes it)")
    _flag(add, "--console_log_simple", "plain console log lines")
    add("--logging_dir", type=str, default=None,
        help="TensorBoard directory; runs go to <dir>/<log_prefix><YYYYmmddHHMMSS>")
    add("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
        help="trackers (default: tensorboard if --logging_dir is set)")
    add("--log_prefix", type=str, default=None, help="prefix of the run directory name")
    add("--log_tracker_name", type=str, default=None, help="tracker project name (default network_train)")
    add("--wandb_run_name", type=str, default=None, help="wandb run name")
    add("--log_tracker_config", type=str, default=None, help="TOML file of tracker init arguments")
    add("--wandb_api_key", type=str, default=None, help="wandb API key to log in with")
    _flag(add, "--log_config", "log the training arguments to the trackers (secrets and paths removed)")  # fmt: skip


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Sample images during training."""
    add = argument_adder(parser, "sample images")
    add("--sample_every_n_steps", type=int, default=None, help="sample every N steps (0 or less: off)")
    add("--sample_every_n_epochs", type=int, default=None,
        help="sample every N epochs (overrides n_steps; 0 or less: off)")
    _flag(add, "--sample_at_first", "sample before training starts")
    add("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """Validation loss at fixed noise levels."""
    add = argument_adder(parser, "validation")
    add("--validation_seed", type=int, default=None, help="seed of the validation split and noise (default --seed)")
    add("--validation_split", type=float, default=0.0,
        help="fraction of each dataset held out for validation when its config sets none (default 0.0)")
    add("--validate_every_n_steps", type=int, default=None, help="also validate every N steps")
    add("--validate_every_n_epochs", type=int, default=None, help="validate every N epochs (default: every epoch)")
    add("--max_validation_steps", type=int, default=None, help="validation batches per run (default: all)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Argument and dataset config files."""
    add = argument_adder(parser, "config files")
    add("--config_file", type=str, default=None,
        help="TOML of arguments (sections flattened); the command line overrides it")
    _flag(add, "--output_config",
          "write the arguments that differ from the defaults to a new --config_file (no API keys) and exit")
    add("--dataset_config", type=Path, default=None, help="dataset config (.toml or .json)")


def add_dit_training_arguments(parser: argparse.ArgumentParser) -> None:
    """DiT-trainer options (sd-scripts' ``add_dit_training_arguments``): text-encoder caching,
    the timestep density / loss weighting scheme, and block swapping."""
    add = argument_adder(parser, "DiT training")
    _flag(add, "--cache_text_encoder_outputs", "cache CLIP-L/T5 outputs in memory")
    _flag(add, "--cache_text_encoder_outputs_to_disk", "cache CLIP-L/T5 outputs to *_flux_te.npz (implies the above)")
    add("--text_encoder_batch_size", type=int, default=None,
        help="batch size for text-encoder caching (default: the dataset batch size)")
    _flag(add, "--disable_mmap_load_safetensors", "accepted for compatibility; no effect (files are always read "
          "tensor by tensor without a memory map)")
    add("--weighting_scheme", type=str, default="uniform",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"],
        help="timestep density for --timestep_sampling sigma and loss weight for sigma_scaled (default uniform)")
    add("--logit_mean", type=float, default=0.0, help="mean for logit_normal (default 0.0)")
    add("--logit_std", type=float, default=1.0, help="std for logit_normal (default 1.0)")
    add("--mode_scale", type=float, default=1.29, help="scale for the mode scheme (default 1.29)")
    add("--blocks_to_swap", type=int, default=None, help="DiT blocks to swap between CPU and GPU (default none)")


def add_compat_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts options that do not apply to FLUX: accepted so command lines keep working;
    :func:`review_compat_flags` warns about (or refuses) those that are set."""
    add = argument_adder(parser, "accepted for sd-scripts compatibility (no effect on FLUX)")
    _flag(add, "--v2", "Stable Diffusion 2 model (ignored)")
    _flag(add, "--v_parameterization", "v-prediction (ignored)")
    add("--vae", type=str, default=None, help="SD VAE (ignored: FLUX uses --ae; recorded in metadata)")
    add("--clip_skip", type=int, default=None, help="CLIP skip (ignored)")
    add("--max_token_length", type=int, default=None, choices=[None, 150, 225],
        help="SD token length (ignored: use --t5xxl_max_token_length)")
    _flag(add, "--xformers", "xformers attention (ignored: FLUX uses PyTorch SDPA)")
    _flag(add, "--sdpa", "SDPA attention (always used)")
    _flag(add, "--mem_eff_attn", "memory-efficient attention (ignored: FLUX uses PyTorch SDPA)")
    add("--noise_offset", type=float, default=None, help="noise offset (ignored)")
    _flag(add, "--noise_offset_random_strength", "random noise offset strength (ignored)")
    add("--multires_noise_iterations", type=int, default=None, help="multires noise (ignored)")
    add("--multires_noise_discount", type=float, default=0.3, help="multires noise discount (ignored; default 0.3)")
    add("--adaptive_noise_scale", type=float, default=None, help="adaptive noise scale (ignored)")
    _flag(add, "--zero_terminal_snr", "zero terminal SNR (ignored)")
    add("--min_snr_gamma", type=float, default=None, help="min-SNR weighting (ignored)")
    _flag(add, "--scale_v_pred_loss_like_noise_pred", "v-pred loss scaling (ignored)")
    add("--v_pred_like_loss", type=float, default=None, help="v-pred-like loss (ignored)")
    _flag(add, "--debiased_estimation_loss", "debiased estimation (ignored)")
    _flag(add, "--weighted_captions", "(token:1.2) caption weights (not supported for FLUX)")
    add("--min_timestep", type=int, default=None, help="min timestep (ignored by FLUX sampling; metadata only)")
    add("--max_timestep", type=int, default=None, help="max timestep (ignored by FLUX sampling; metadata only)")
    add("--sample_sampler", type=str, default="ddim", choices=list(SAMPLE_SAMPLERS),
        help="sampler for samples (ignored: FLUX samples with Euler flow)")
    _flag(add, "--deepspeed", "DeepSpeed training (not supported)")
    add("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (not supported)")
    add("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
        help="DeepSpeed optimizer offload (not supported)")
    add("--offload_optimizer_nvme_path", type=str, default=None, help="DeepSpeed NVMe path (not supported)")
    add("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"],
        help="DeepSpeed parameter offload (not supported)")
    add("--offload_param_nvme_path", type=str, default=None, help="DeepSpeed NVMe path (not supported)")
    _flag(add, "--zero3_init_flag", "DeepSpeed zero.Init (not supported)")
    _flag(add, "--zero3_save_16bit_model", "DeepSpeed 16-bit save (not supported)")
    _flag(add, "--fp16_master_weights_and_gradients", "DeepSpeed fp16 master weights (not supported)")


def add_flux_script_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``flux_train_network.py`` adds beyond the generic trainer besides the FLUX group:
    the DiT options and the deprecated ``--split_mode``."""
    add_dit_training_arguments(parser)
    add = argument_adder(parser, "deprecated")
    _flag(add, "--split_mode", "deprecated: use --blocks_to_swap (18 is used when it is unset)")


def add_train_network_arguments(parser: argparse.ArgumentParser) -> None:
    """All generic groups of ``train_network.setup_parser()`` except the dataset options.

    Call ``library.dataset_args.add_dataset_arguments(parser)`` first (or after, if it too
    skips flags already defined).
    """
    for add_group in (
        add_model_arguments,
        add_training_arguments,
        add_optimizer_arguments,
        add_scheduler_arguments,
        add_network_arguments,
        add_loss_arguments,
        add_saving_arguments,
        add_metadata_arguments,
        add_logging_arguments,
        add_sampling_arguments,
        add_validation_arguments,
        add_config_arguments,
        add_compat_arguments,
    ):
        add_group(parser)


# endregion

# region flags that do nothing for FLUX

# dest -> why it has no effect; each prints one warning when set to a non-default value.
IGNORED_FOR_FLUX: dict[str, str] = {
    "v2": "Stable Diffusion 2 only",
    "v_parameterization": "FLUX is a flow model; there is no v-prediction",
    "vae": "FLUX uses --ae; --vae is only recorded in the metadata",
    "clip_skip": "FLUX uses the final CLIP-L pooled output",
    "max_token_length": "not used in FLUX training; use --t5xxl_max_token_length",
    "xformers": "FLUX always uses PyTorch scaled-dot-product attention",
    "mem_eff_attn": "FLUX always uses PyTorch scaled-dot-product attention",
    "noise_offset": "noise offset does not apply to flow matching",
    "noise_offset_random_strength": "noise offset does not apply to flow matching",
    "multires_noise_iterations": "multires noise does not apply to flow matching",
    "multires_noise_discount": "multires noise does not apply to flow matching",
    "adaptive_noise_scale": "noise offset does not apply to flow matching",
    "zero_terminal_snr": "FLUX has no DDPM beta schedule",
    "min_snr_gamma": "FLUX has no SNR schedule; see --weighting_scheme",
    "scale_v_pred_loss_like_noise_pred": "FLUX has no v-prediction",
    "v_pred_like_loss": "FLUX has no v-prediction",
    "debiased_estimation_loss": "FLUX has no SNR schedule",
    "min_timestep": "FLUX timestep sampling ignores it; it is only recorded in the metadata",
    "max_timestep": "FLUX timestep sampling ignores it; it is only recorded in the metadata",
    "sample_sampler": "FLUX samples with the Euler flow sampler",
    "controlnet_model_name_or_path": "used only by ControlNet training, not by LoRA training",
    "fused_backward_pass": "it has no effect on LoRA training (as in sd-scripts, which still stops a run that sets "
    "it without Adafactor or with gradient accumulation; a flag without effect does not stop this trainer)",
    "huggingface_repo_id": "uploading to Hugging Face is not supported; nothing is uploaded",
    "save_state_to_huggingface": "uploading to Hugging Face is not supported; nothing is uploaded",
    "async_upload": "uploading to Hugging Face is not supported; nothing is uploaded",
    "zero_stage": "DeepSpeed is not supported",
    "offload_optimizer_device": "DeepSpeed is not supported",
    "offload_optimizer_nvme_path": "DeepSpeed is not supported",
    "offload_param_device": "DeepSpeed is not supported",
    "offload_param_nvme_path": "DeepSpeed is not supported",
    "zero3_init_flag": "DeepSpeed is not supported",
    "zero3_save_16bit_model": "DeepSpeed is not supported",
    "fp16_master_weights_and_gradients": "DeepSpeed is not supported",
    "huggingface_repo_type": "uploading to Hugging Face is not supported; nothing is uploaded",
    "huggingface_path_in_repo": "uploading to Hugging Face is not supported; nothing is uploaded",
    "huggingface_token": "uploading to Hugging Face is not supported; nothing is uploaded",
    "huggingface_repo_visibility": "uploading to Hugging Face is not supported; nothing is uploaded",
    "lowram": "models are loaded tensor by tensor without a memory map, which is what it is for",
    "disable_mmap_load_safetensors": "models are loaded tensor by tensor without a memory map already",
    "highvram": "memory is never freed between caching batches anyway",
    "ddp_gradient_as_bucket_view": "gradients are averaged by explicit all-reduces, not by a DDP wrapper",
    "ddp_static_graph": "gradients are averaged by explicit all-reduces, not by a DDP wrapper",
}

# Values of no-effect flags that mean "as if not set" (kohya_ss writes them on every run): CLIP's last layer
# and the full timestep range.
NEUTRAL_VALUES: dict[str, tuple] = {
    "clip_skip": (1,),
    "max_timestep": (1000,),
}

# dest -> what to do instead; setting one stops the run before any work.
REFUSED_FOR_FLUX: dict[str, str] = {
    "weighted_captions": "FLUX has no weighted-caption tokenizer; remove --weighted_captions",
    "deepspeed": "DeepSpeed is not supported; remove --deepspeed (use --blocks_to_swap or --fp8_base to save memory)",
    "resume_from_huggingface": "resuming from Hugging Face is not supported; download the state and pass its path",
    "conditioning_data_dir": "conditioning-image masks are not supported; use the images' alpha channel with "
    "--alpha_mask (or alpha_mask = true in the dataset config)",
}


def review_compat_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Warnings for the no-effect flags set to a non-default value (one line each, naming the
    flag); raises :class:`UserError` listing any refused flag that is set."""
    def is_set(dest: str) -> bool:  # 0, false or "" mean off, as GUIs write them for every option they show
        value = getattr(args, dest, None)
        neutral = NEUTRAL_VALUES.get(dest, ())
        return value != parser.get_default(dest) and value not in (None, False, 0, "", *neutral)

    refused = [f"--{dest} cannot be used for FLUX/Chroma training: {why}" for dest, why in REFUSED_FOR_FLUX.items()
               if is_set(dest)]
    if refused:
        raise UserError("; ".join(refused))
    return [f"--{dest} has no effect for FLUX/Chroma: {why}" for dest, why in IGNORED_FOR_FLUX.items() if is_set(dest)]


# endregion
