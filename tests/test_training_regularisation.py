"""Regularisation of the LoRA during training, run on the tiny models: --scale_weight_norms caps what is saved
and logs its max_norm/* values; GGPO logs its norm/* values."""

import math
import os

import pytest
import torch

import flux_train_network
from library.safetensors_io import load_safetensors
from tests.training_helpers import base_argv, dataset, logged_scalars


def update_norms(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each module's ‖scale · up @ down‖ from a saved sd-scripts LoRA file (scale = alpha / rank)."""
    norms = {}
    for key in weights:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = weights[key].float(), weights[f"{name}.lora_up.weight"].float()
            scale = weights[f"{name}.alpha"].item() / down.shape[0]
            norms[name] = (scale * up @ down.flatten(1)).norm().item()
    return norms


@pytest.mark.parametrize("ggpo", [False, True])
def test_scale_weight_norms_caps_every_saved_update_and_logs_it(tiny_model_files, tmp_path, ggpo):
    """With GGPO on too, norm/avg_key_norm stays the capped updates' mean, as in sd-scripts (where the cap
    takes the tag); GGPO's other norms are logged beside it."""
    data = dataset(tmp_path)
    out, logs = str(tmp_path / "out"), tmp_path / "logs"
    cap = 1e-4  # far below what a step at lr 1e-2 gives every module
    argv = base_argv(tiny_model_files, data, out, steps=2, learning_rate=1e-2, network_train_unet_only=True,
                     scale_weight_norms=cap, logging_dir=str(logs),
                     network_args=["ggpo_sigma=0.03", "ggpo_beta=0.01"] if ggpo else None)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    norms = update_norms(load_safetensors(os.path.join(out, "lora.safetensors")))
    assert len(norms) > 10
    assert all(norm == pytest.approx(cap, rel=1e-3) for norm in norms.values()), norms
    scalars = logged_scalars(logs)
    for step in (1, 2):
        assert scalars["max_norm/keys_scaled"][step] == len(norms)
        assert scalars["max_norm/max_key_norm"][step] == pytest.approx(cap, rel=1e-3)
        assert scalars["norm/avg_key_norm"][step] == pytest.approx(cap, rel=1e-3)  # sd-scripts' tag
    assert "max_norm/average_key_norm" not in scalars
    assert ("norm/avg_grad_norm" in scalars) == ggpo


def test_ggpo_logs_the_mean_norms_of_the_updates(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    out, logs = str(tmp_path / "out"), tmp_path / "logs"
    argv = base_argv(tiny_model_files, data, out, steps=2, network_train_unet_only=True, logging_dir=str(logs),
                     save_every_n_steps=1, network_args=["ggpo_sigma=0.03", "ggpo_beta=0.01"])  # fmt: skip
    assert flux_train_network.main(argv) == 0
    scalars = logged_scalars(logs)
    # step 2 logs the norms it perturbed with, measured before its update: those of the LoRA saved after step 1
    # (row norms, averaged per module, then over the modules)
    weights = load_safetensors(os.path.join(out, "lora-step00000001.safetensors"))
    row_norms = []
    for key in weights:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = weights[key].float(), weights[f"{name}.lora_up.weight"].float()
            row_norms.append((weights[f"{name}.alpha"].item() / down.shape[0] * up @ down).norm(dim=1).mean().item())
    assert scalars["norm/avg_key_norm"][2] == pytest.approx(sum(row_norms) / len(row_norms), rel=1e-4)
    for tag in ("norm/avg_grad_norm", "norm/avg_combined_norm"):
        assert all(math.isfinite(v) and v > 0 for v in scalars[tag].values()), tag
    assert scalars["norm/avg_combined_norm"][2] > scalars["norm/avg_key_norm"][2]  # base rows + update


def test_ggpo_measures_scaled_fp8_base_weights_as_the_weights_they_store(tiny_model_files, tmp_path):
    """--fp8_scaled stores each row divided by its scale; GGPO's base norms are those of the weights, within
    fp8 rounding of a run that keeps them wide (norm/avg_combined_norm is base rows + update, the base dominating)."""
    data = dataset(tmp_path)
    combined = []
    for name, fp8 in (("wide", {}), ("scaled", {"fp8_base": True, "fp8_scaled": True})):
        logs = tmp_path / f"logs_{name}"
        argv = base_argv(tiny_model_files, data, str(tmp_path / name), steps=2, network_train_unet_only=True,
                         mixed_precision="bf16", logging_dir=str(logs),
                         network_args=["ggpo_sigma=0.03", "ggpo_beta=0.01"], **fp8)  # fmt: skip
        assert flux_train_network.main(argv) == 0
        combined.append(logged_scalars(logs)["norm/avg_combined_norm"][2])
    assert combined[1] == pytest.approx(combined[0], rel=0.05)
