"""The ``ss_*`` training metadata stored in a saved LoRA (spec §h.4). Every value is a string:
None becomes "None" and booleans "True"/"False", as sd-scripts writes them, because tools that
read these files (GUIs, civitai, ComfyUI managers) parse exactly that."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

# args attribute -> metadata key, copied verbatim
_FROM_ARGS = {
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "gradient_checkpointing": "ss_gradient_checkpointing",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "lr_warmup_steps": "ss_lr_warmup_steps",
    "lr_scheduler": "ss_lr_scheduler",
    "network_module": "ss_network_module",
    "network_dropout": "ss_network_dropout",
    "mixed_precision": "ss_mixed_precision",
    "full_fp16": "ss_full_fp16",
    "v2": "ss_v2",
    "clip_skip": "ss_clip_skip",
    "max_token_length": "ss_max_token_length",
    "cache_latents": "ss_cache_latents",
    "seed": "ss_seed",
    "lowram": "ss_lowram",
    "noise_offset": "ss_noise_offset",
    "multires_noise_iterations": "ss_multires_noise_iterations",
    "multires_noise_discount": "ss_multires_noise_discount",
    "adaptive_noise_scale": "ss_adaptive_noise_scale",
    "zero_terminal_snr": "ss_zero_terminal_snr",
    "training_comment": "ss_training_comment",
    "max_grad_norm": "ss_max_grad_norm",
    "min_snr_gamma": "ss_min_snr_gamma",
    "scale_weight_norms": "ss_scale_weight_norms",
    "ip_noise_gamma": "ss_ip_noise_gamma",
    "debiased_estimation_loss": "ss_debiased_estimation",
    "noise_offset_random_strength": "ss_noise_offset_random_strength",
    "ip_noise_gamma_random_strength": "ss_ip_noise_gamma_random_strength",
    "loss_type": "ss_loss_type",
    "huber_schedule": "ss_huber_schedule",
    "huber_scale": "ss_huber_scale",
    "huber_c": "ss_huber_c",
    "fp8_base": "ss_fp8_base",
    "fp8_base_unet": "ss_fp8_base_unet",
    "validation_seed": "ss_validation_seed",
    "validation_split": "ss_validation_split",
    "max_validation_steps": "ss_max_validation_steps",
    "validate_every_n_epochs": "ss_validate_every_n_epochs",
    "validate_every_n_steps": "ss_validate_every_n_steps",
    "resize_interpolation": "ss_resize_interpolation",
    # FLUX additions
    "model_type": "ss_model_type",
    "apply_t5_attn_mask": "ss_apply_t5_attn_mask",
    "weighting_scheme": "ss_weighting_scheme",
    "logit_mean": "ss_logit_mean",
    "logit_std": "ss_logit_std",
    "mode_scale": "ss_mode_scale",
    "guidance_scale": "ss_guidance_scale",
    "timestep_sampling": "ss_timestep_sampling",
    "sigmoid_scale": "ss_sigmoid_scale",
    "model_prediction_type": "ss_model_prediction_type",
    "discrete_flow_shift": "ss_discrete_flow_shift",
}
# what --no_metadata keeps
MINIMAL_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


def as_metadata_value(value: Any) -> str:
    return str(value)


def build_training_metadata(args, run: dict[str, Any]) -> dict[str, str]:
    """All ``ss_*`` keys known at the start of training.

    ``run`` carries what is computed rather than given: num_train_images, num_validation_images,
    num_reg_images, num_batches_per_epoch, num_epochs, max_train_steps, optimizer, base_model_version,
    network_dim, network_alpha, network_args, text_encoder_lr, dataset info, model file name/hash,
    batch sizes and process count.
    """
    md: dict[str, Any] = {
        "ss_session_id": uuid.uuid4().int % (2**31),
        "ss_training_started_at": time.time(),
        "ss_output_name": args.output_name,
        "ss_sd_scripts_commit_hash": run.get("commit", "flux-lora-trainer"),
    }
    for attr, key in _FROM_ARGS.items():
        md[key] = getattr(args, attr, None)
    md.update(
        ss_text_encoder_lr=run.get("text_encoder_lr"),
        ss_num_train_images=run["num_train_images"],
        ss_num_validation_images=run.get("num_validation_images", 0),
        ss_num_reg_images=run.get("num_reg_images", 0),
        ss_num_batches_per_epoch=run["num_batches_per_epoch"],
        ss_num_epochs=run["num_epochs"],
        ss_max_train_steps=run["max_train_steps"],
        ss_optimizer=run["optimizer"],
        ss_base_model_version=run["base_model_version"],
        ss_network_dim=run["network_dim"],
        ss_network_alpha=run["network_alpha"],
        ss_network_args=json.dumps(run.get("network_args") or {}),
        ss_caption_dropout_rate=run.get("caption_dropout_rate"),
        ss_caption_dropout_every_n_epochs=run.get("caption_dropout_every_n_epochs"),
        ss_caption_tag_dropout_rate=run.get("caption_tag_dropout_rate"),
        ss_face_crop_aug_range=run.get("face_crop_aug_range"),
        ss_prior_loss_weight=run.get("prior_loss_weight", 1.0),
        ss_batch_size_per_device=run.get("batch_size_per_device"),
        ss_total_batch_size=run.get("total_batch_size"),
        ss_num_processes=run.get("num_processes", 1),
    )
    if run.get("datasets") is not None:
        md["ss_datasets"] = json.dumps(run["datasets"])
    if run.get("tag_frequency") is not None:
        md["ss_tag_frequency"] = json.dumps(run["tag_frequency"])
    if run.get("dataset_dirs") is not None:
        md["ss_dataset_dirs"] = json.dumps(run["dataset_dirs"])
    if run.get("model_file"):
        md["ss_sd_model_name"] = os.path.basename(run["model_file"])
    for key in ("sd_model_hash", "new_sd_model_hash"):
        if run.get(key):
            md[f"ss_{key}"] = run[key]
    if getattr(args, "vae", None):
        md["ss_vae_name"] = os.path.basename(args.vae)
    return {k: as_metadata_value(v) for k, v in md.items()}


def minimal_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """What ``--no_metadata`` keeps."""
    return {k: metadata[k] for k in MINIMAL_KEYS if k in metadata}


def per_save_metadata(metadata: dict[str, str], steps: int, epoch: int) -> dict[str, str]:
    return dict(metadata, ss_training_finished_at=str(time.time()), ss_steps=str(steps), ss_epoch=str(epoch))
