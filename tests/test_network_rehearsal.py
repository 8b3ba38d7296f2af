"""The network built once on the meta device before the models load: what only the network shows stops the run
before loading and caching (minutes with the real files), and what building it logs is said once."""

import logging

import pytest
import torch

import flux_train_network
from library.safetensors_io import load_safetensors, save_safetensors
from tests.training_helpers import base_argv, dataset


@pytest.fixture
def never_loaded(monkeypatch):
    """Fails a run that gets as far as loading the models."""

    def load_target_model(self, *args, **kwargs):
        raise AssertionError("the models were loaded before the error was found")

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model", load_target_model)


@pytest.fixture(scope="module")
def rank_4_lora(tiny_model_files, tmp_path_factory):
    """A rank-4 LoRA on the tiny dev DiT, its CLIP-L and its T5."""
    from library.flux_utils import load_flow_model
    from library.text_encoders import load_clip_l, load_t5xxl
    from networks.lora_flux import create_network

    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    encoders = [load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu"),
                load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")]  # fmt: skip
    path = str(tmp_path_factory.mktemp("rehearsal") / "rank4.safetensors")
    create_network(1.0, 4, 4.0, None, encoders, dit).save_weights(path, None, {})
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    return err[-1]


def test_network_weights_of_another_rank_stop_before_the_models_load(tiny_model_files, tmp_path, rank_4_lora,
                                                                      never_loaded, capsys):  # fmt: skip
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1,
                     network_weights=rank_4_lora, cache_latents_to_disk=True)  # fmt: skip
    argv[argv.index("--network_dim") + 1] = "8"
    assert flux_train_network.main(argv) == 1
    error = _error(capsys)
    assert error.startswith(f"error: {rank_4_lora} does not fit this network: lora_te1_")
    assert "(4, 128) (network (8, 128)) and 73 more" in error
    assert error.endswith("Give the file's rank as --network_dim / network_args, or add --dim_from_weights")
    assert not list((tmp_path / "data").rglob("*_flux.npz")), "nothing was cached"


def test_a_lora_for_another_model_width_stops_before_the_models_load(tiny_model_files, tmp_path, rank_4_lora,
                                                                    never_loaded, capsys):  # fmt: skip
    wide = str(tmp_path / "wide.safetensors")
    weights = load_safetensors(rank_4_lora)
    weights["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.zeros(4, 96)
    save_safetensors(weights, wide)
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1, network_weights=wide,
                     dim_from_weights=True)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert _error(capsys) == (
        f"error: {wide} does not fit this network: lora_unet_double_blocks_0_img_attn_proj.lora_down.weight (4, 96) "
        "(network (4, 64)). The LoRA was made for a model of other widths"
    )


@pytest.mark.parametrize("network_args, message", [
    (["train_double_block_indices=none", "train_single_block_indices=none"],
     "error: nothing to train: the network has no LoRA module (--network_dim 4, and no network_args give a layer "
     "a rank)"),
    (["network_reg_lrs=.*=0"], "error: nothing to train: every parameter group has learning rate 0 (check "
                               "--learning_rate, --unet_lr, --text_encoder_lr and network_args network_reg_lrs)"),
])  # fmt: skip
def test_network_args_that_leave_nothing_to_train_stop_before_the_models_load(tiny_model_files, tmp_path,
                                                                              never_loaded, capsys, network_args,
                                                                              message):  # fmt: skip
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1,
                     network_train_unet_only=True, network_args=network_args)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert _error(capsys).startswith(message)


def test_a_lora_that_fits_trains_on_and_its_build_warnings_are_said_once(tiny_model_files, tmp_path, rank_4_lora,
                                                                         caplog):  # fmt: skip
    """The meta build reads the file and warns nothing itself: the real build, after loading, says it all once."""
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1, network_weights=rank_4_lora,
                     network_args=["conv_dim=4"])  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert flux_train_network.main(argv) == 0
    assert caplog.messages.count("network args conv_dim / conv_alpha have no effect: FLUX and Chroma have no "
                                 "convolutions") == 1  # fmt: skip
    assert caplog.messages.count(f"loaded --network_weights {rank_4_lora}") == 1
    assert (tmp_path / "out" / "lora.safetensors").is_file()


@pytest.mark.parametrize("metadata", [{}, {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 4}'}])
def test_another_tools_lora_shapes_the_network_with_dim_from_weights(tiny_model_files, tmp_path, rank_4_lora,
                                                                     metadata):  # fmt: skip
    """Converting another tool's file (diffusers names; alphas from the rank, or from peft's metadata) makes its
    alphas anew: on the CPU, where the meta build can read them."""
    from library.lora_formats import to_ai_toolkit

    converted = to_ai_toolkit(load_safetensors(rank_4_lora)).state_dict
    other = str(tmp_path / "diffusers_lora.safetensors")
    save_safetensors({k: v.contiguous() for k, v in converted.items()}, other, metadata)
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1, network_weights=other,
                     dim_from_weights=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    trained = load_safetensors(str(tmp_path / "out" / "lora.safetensors"))
    assert trained["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"].shape == (4, 64)
    assert trained["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 64)  # q, k, v fused
