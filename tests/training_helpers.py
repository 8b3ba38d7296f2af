"""Command lines for training runs on the tiny models."""

from __future__ import annotations

import glob
import os

from library.demo_data import write_demo_dataset


def base_argv(models, data, output_dir: str, model_type: str = "flux", steps: int = 4, **flags) -> list[str]:
    """A complete flux_train_network.py command line; ``flags`` add ``--key value`` (True: bare flag)."""
    ckpt = {"flux": models.flux_dev, "schnell": models.flux_schnell, "chroma": models.chroma}[model_type]
    argv = [
        "--pretrained_model_name_or_path", ckpt, "--t5xxl", models.t5xxl, "--ae", models.ae,
        "--tokenizer_cache_dir", models.tokenizer_cache_dir, "--dataset_config", data.dataset_toml,
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_alpha", "4",
        "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--seed", "7",
        "--max_data_loader_n_workers", "0", "--output_dir", output_dir, "--output_name", "lora",
        "--t5xxl_max_token_length", "16",
    ]  # fmt: skip
    if model_type == "chroma":
        argv += ["--model_type", "chroma", "--apply_t5_attn_mask", "--guidance_scale", "0.0"]
    else:
        argv += ["--clip_l", models.clip_l]
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", *([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])]
    return argv


def dataset(tmp_path, **kwargs):
    return write_demo_dataset(os.path.join(str(tmp_path), "data"), **kwargs)


def logged_scalars(logging_dir) -> dict[str, dict[int, float]]:
    """Every scalar a run logged to TensorBoard under ``logging_dir``: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in glob.glob(os.path.join(str(logging_dir), "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(events)
        accumulator.Reload()
        scalars |= {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}
    return scalars
