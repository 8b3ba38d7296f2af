"""The ``ss_*`` training metadata stored in a saved LoRA (spec §h.4). Every value is a string:
None becomes "None" and booleans "True"/"False", as sd-scripts writes them, because tools that
read these files (GUIs, civitai, ComfyUI managers) parse exactly that.

The one slow value, the base model's full sha256 (``ss_new_sd_model_hash``: a minute for a 24 GB
checkpoint on a fast disk), is computed while training runs and waited for at the first save."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from typing import Any

import torch

from library.model_hashes import git_commit

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
    "fp8_base_unet": "ss_fp8_base_unet",
    "validation_seed": "ss_validation_seed",
    "validation_split": "ss_validation_split",
    "max_validation_steps": "ss_max_validation_steps",
    "validate_every_n_epochs": "ss_validate_every_n_epochs",
    "validate_every_n_steps": "ss_validate_every_n_steps",
    "resize_interpolation": "ss_resize_interpolation",
    "caption_dropout_rate": "ss_caption_dropout_rate",
    "caption_dropout_every_n_epochs": "ss_caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "ss_caption_tag_dropout_rate",
    "face_crop_aug_range": "ss_face_crop_aug_range",
    "prior_loss_weight": "ss_prior_loss_weight",
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


def build_training_metadata(args, run: dict[str, Any]) -> dict[str, str | Future]:
    """All ``ss_*`` keys known at the start of training.

    ``run`` carries what is computed rather than given: training_started_at (when ``train`` began, as
    sd-scripts takes it; now if left out), num_train_images, num_validation_images,
    num_reg_images, num_batches_per_epoch, num_epochs, max_train_steps, optimizer, base_model_version,
    network_dim, network_alpha, network_args, text_encoder_lr, dataset keys (``dataset_metadata``),
    model file name and hashes (a hash may be a Future, kept as one until ``per_save_metadata``),
    batch sizes and process count.
    """
    md: dict[str, Any] = {
        "ss_session_id": uuid.uuid4().int % (2**31),
        "ss_training_started_at": run.get("training_started_at", time.time()),
        "ss_output_name": args.output_name,
        # the commit of the code that trained (this project's; sd-scripts writes its own), as sd-scripts words it
        "ss_sd_scripts_commit_hash": git_commit() or "(unknown)",
    }
    for attr, key in _FROM_ARGS.items():
        md[key] = getattr(args, attr, None)
    # --fp8_base_unet implies --fp8_base (spec §a.3), as sd-scripts records it
    md["ss_fp8_base"] = bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))
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
        ss_batch_size_per_device=run.get("batch_size_per_device"),
        ss_total_batch_size=run.get("total_batch_size"),
        ss_num_processes=run.get("num_processes", 1),
    )
    if run.get("network_args") is not None:  # sd-scripts writes it only for a run given --network_args
        md["ss_network_args"] = json.dumps(run["network_args"])
    md.update(run.get("dataset_keys") or {})
    if run.get("model_file"):
        md["ss_sd_model_name"] = os.path.basename(run["model_file"])
    for key in ("sd_model_hash", "new_sd_model_hash"):
        if run.get(key):
            md[f"ss_{key}"] = run[key]
    if getattr(args, "vae", None):
        md["ss_vae_name"] = os.path.basename(args.vae)
    return {k: v if isinstance(v, Future) else as_metadata_value(v) for k, v in md.items()}


def modelspec_from_args(args, architecture: str) -> dict[str, str]:
    """``modelspec.*`` keys from --metadata_* and the run's settings; ``architecture`` is the model kind
    (``dev``, ``schnell``, ``chroma``). The network module fills what is left out."""
    from library.model_hashes import build_modelspec

    timesteps = None
    if args.min_timestep is not None or args.max_timestep is not None:
        timesteps = (args.min_timestep or 0, args.max_timestep or 1000)
    spec = build_modelspec(
        architecture, title=args.metadata_title or args.output_name, resolution=args.resolution,
        author=args.metadata_author, description=args.metadata_description, license=args.metadata_license,
        tags=args.metadata_tags, trigger_phrase=args.metadata_trigger_phrase, usage_hint=args.metadata_usage_hint,
        thumbnail=args.metadata_thumbnail, merged_from=args.metadata_merged_from, timesteps=timesteps,
        clip_skip=args.clip_skip,
    )
    for key in ("preprocessor", "is_negative_embedding"):
        if getattr(args, f"metadata_{key}", None) is not None:
            spec[f"modelspec.{key}"] = str(getattr(args, f"metadata_{key}"))
    return spec


def network_rank_and_alpha(network, args) -> dict[str, Any]:
    """The rank and alpha to record: read from the modules (the largest rank), so --dim_from_weights
    records the file's, not the command line's."""
    modules = list(network.all_loras()) if hasattr(network, "all_loras") else []
    if not modules:
        return {"network_dim": getattr(network, "lora_dim", args.network_dim),
                "network_alpha": getattr(network, "alpha", args.network_alpha)}  # fmt: skip
    top = max(modules, key=lambda m: m.lora_dim)
    alpha = shortest_decimal(top.alpha) if isinstance(top.alpha, torch.Tensor) else top.alpha
    return {"network_dim": top.lora_dim, "network_alpha": alpha}


def shortest_decimal(t: torch.Tensor) -> float:
    """The shortest decimal that ``t``'s dtype stores as ``t``: an alpha of 0.1 kept in fp32 (or bf16)
    is recorded as 0.1, as it was given, not as 0.10000000149011612."""
    value = t.item()
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        if torch.tensor(candidate, dtype=t.dtype) == t:
            return candidate
    return value


def dataset_metadata(datasets, from_toml: bool, args) -> dict[str, Any]:
    """The dataset keys of sd-scripts: with a dataset TOML ``ss_datasets`` (every dataset and subset
    setting), ``ss_tag_frequency`` and ``ss_dataset_dirs``; without one, the flat keys of the
    command-line options. Tag counts are per image, of the comma-separated, lower-cased tags of
    its caption (of its "tags" in a metadata file, as sd-scripts counts them), per folder (GUIs and
    civitai show them as the LoRA's tags)."""
    if not from_toml and len(datasets) == 1:
        (dataset,) = datasets
        cfg, subsets = dataset.config, _subset_entries(dataset)
        return {
            "ss_resolution": str(tuple(cfg.resolution)) if cfg.resolution else args.resolution,  # sd-scripts' (W, H)
            "ss_color_aug": bool(args.color_aug),
            "ss_flip_aug": bool(args.flip_aug),
            "ss_random_crop": bool(args.random_crop),
            "ss_shuffle_caption": bool(args.shuffle_caption),
            "ss_enable_bucket": bool(cfg.enable_bucket),
            "ss_bucket_no_upscale": bool(cfg.bucket_no_upscale),
            "ss_min_bucket_reso": cfg.min_bucket_reso,
            "ss_max_bucket_reso": cfg.max_bucket_reso,
            "ss_keep_tokens": args.keep_tokens,
            "ss_dataset_dirs": json.dumps(_dirs([(s, e) for s, e in subsets if not s.is_reg])),
            "ss_reg_dataset_dirs": json.dumps(_dirs([(s, e) for s, e in subsets if s.is_reg])),
            "ss_tag_frequency": json.dumps(_tag_frequency(subsets)),
            "ss_bucket_info": json.dumps(dataset.bucket_info()),
        }
    datasets_info, tag_frequency, dataset_dirs = [], {}, {}
    for dataset in datasets:
        cfg, subsets = dataset.config, _subset_entries(dataset)
        frequency = _tag_frequency(subsets)
        counts = {id(s): len(e) for s, e in subsets}  # a subset that went to validation whole has none here
        interpolations = {s.interpolation for s in cfg.subsets}
        datasets_info.append({
            "is_dreambooth": cfg.kind == "dreambooth",
            "batch_size_per_device": cfg.batch_size,
            "num_train_images": sum(e.num_repeats for e in dataset.entries if not e.is_reg),
            "num_reg_images": dataset.num_reg_images,
            "resolution": list(cfg.resolution) if cfg.resolution else None,
            "enable_bucket": cfg.enable_bucket,
            "min_bucket_reso": cfg.min_bucket_reso,
            "max_bucket_reso": cfg.max_bucket_reso,
            "tag_frequency": frequency,
            "bucket_info": dataset.bucket_info(),
            "resize_interpolation": interpolations.pop() if len(interpolations) == 1 else None,
            "subsets": [_subset_info(s, counts.get(id(s), 0)) for s in cfg.subsets],
        })
        for folder, tags in frequency.items():  # a folder in several datasets counts once
            tag_frequency.setdefault(folder, tags)
        for subset, entries in subsets:
            if subset.is_reg:
                continue
            name = _folder(subset)
            unique, n = name, 2  # folders of one name, in one dataset or several: "name (2)", ...
            while unique in dataset_dirs:
                unique, n = f"{name} ({n})", n + 1
            dataset_dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": len(entries)}
    return {
        "ss_datasets": json.dumps(datasets_info),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
    }


def _subset_entries(dataset) -> list[tuple[Any, list]]:
    """(subset, its images in this dataset) for each subset that has images."""
    by_subset: dict[int, tuple[Any, list]] = {}  # by identity: subset configs are not hashable
    for entry in dataset.entries:
        by_subset.setdefault(id(entry.subset), (entry.subset, []))[1].append(entry)
    return list(by_subset.values())


def _folder(subset) -> str:
    return os.path.basename(subset.image_dir if subset.kind == "dreambooth" else subset.metadata_file)


def _dirs(subsets: list[tuple[Any, list]]) -> dict[str, dict[str, int]]:
    return {_folder(s): {"n_repeats": s.num_repeats, "img_count": len(entries)} for s, entries in subsets}


def _tag_frequency(subsets: list[tuple[Any, list]]) -> dict[str, dict[str, int]]:
    frequency: dict[str, Counter] = {}
    for subset, entries in subsets:
        counts = frequency.setdefault(_folder(subset), Counter())
        for entry in entries:  # a metadata file's tags, as sd-scripts counts them there; else the caption's parts
            text = entry.tags if entry.tags is not None else entry.caption
            counts.update(tag.strip().lower() for tag in (text or "").split(",") if tag.strip())
    return {folder: dict(counts) for folder, counts in frequency.items()}


def _subset_info(subset, img_count: int) -> dict[str, Any]:
    caption = subset.caption
    info = {
        "img_count": img_count,
        "num_repeats": subset.num_repeats,
        "color_aug": subset.color_aug,
        "flip_aug": subset.flip_aug,
        "random_crop": subset.random_crop,
        "shuffle_caption": caption.shuffle_caption,
        "keep_tokens": caption.keep_tokens,
        "keep_tokens_separator": caption.keep_tokens_separator,
        "secondary_separator": caption.secondary_separator,
        "enable_wildcard": caption.enable_wildcard,
        "caption_prefix": caption.caption_prefix,
        "caption_suffix": caption.caption_suffix,
        "resize_interpolation": subset.interpolation,
    }
    if subset.image_dir:
        info["image_dir"] = os.path.basename(subset.image_dir)
    if subset.kind == "dreambooth":
        info |= {"class_tokens": subset.class_tokens, "is_reg": subset.is_reg}
    else:
        info["metadata_file"] = os.path.basename(subset.metadata_file)
    return info


def minimal_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """What ``--no_metadata`` keeps: the minimal ``ss_*`` keys, and ModelSpec (always written, as sd-scripts does)."""
    return {k: v for k, v in metadata.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}


def per_save_metadata(metadata: dict[str, str | Future], steps: int, epoch: int) -> dict[str, str]:
    """The metadata of one save: its step, epoch, time (``modelspec.date`` too, as sd-scripts dates each file),
    and background hashes waited for (a hash that failed, e.g. an unreadable file, is left out)."""
    from library.model_hashes import modelspec_date

    now = time.time()
    resolved = {}
    for key, value in metadata.items():
        if isinstance(value, Future):
            if value.exception() is not None:
                continue
            value = value.result()
        resolved[key] = value
    if "modelspec.date" in resolved:
        resolved["modelspec.date"] = modelspec_date(now)
    return dict(resolved, ss_training_finished_at=str(now), ss_steps=str(steps), ss_epoch=str(epoch))
