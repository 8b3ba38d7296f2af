"""The memory options through the real trainer, in-process on the tiny models: --fp8_base with
--mixed_precision bf16, --blocks_to_swap (its LoRA equals the unswapped run's), and
--gradient_checkpointing with --cpu_offload_checkpointing or --gradient_checkpointing_keep_attention
(their LoRAs equal plain checkpointing's), and --cudnn_attention."""

import dataclasses
import logging
import os
import re

import pytest
import torch

import flux_train_network
from library.fp8 import T5_LINEAR_WEIGHTS
from library.safetensors_io import load_safetensors, save_safetensors
from library.tiny_models import random_model, tiny_flux_params, write_model
from tests.training_helpers import base_argv, dataset


@pytest.fixture(scope="module")
def deeper_models(tiny_model_files, tmp_path_factory):
    """The tiny files with a dev DiT of 4 single blocks: deep enough to swap one unit (two single blocks)."""
    folder = tmp_path_factory.mktemp("deeper")
    dit = write_model(random_model(tiny_flux_params(True, depth=2, depth_single=4), 0), str(folder / "dev.safetensors"))
    return dataclasses.replace(tiny_model_files, flux_dev=dit)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset(tmp_path_factory.mktemp("memory_data"))


def train(models, data, out, **flags) -> dict:
    argv = base_argv(models, data, str(out), steps=2, network_train_unet_only=True, **flags)
    assert flux_train_network.main(argv) == 0
    path = os.path.join(str(out), "lora.safetensors")
    assert os.path.isfile(path)
    return load_safetensors(path)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fp8_base_with_bf16_trains_and_writes_the_lora(deeper_models, data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        weights = train(deeper_models, data, tmp_path / "fp8", fp8_base=True, mixed_precision="bf16")
    assert "block Linear weights stored as float8_e4m3fn, the rest in torch.bfloat16" in caplog.text
    ups = [k for k in weights if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(weights[k]).all() for k in weights)
    assert any(weights[k].abs().sum() > 0 for k in ups)  # lora_up starts at zero: it was trained


def test_an_fp8_t5_file_stays_fp8_without_fp8_base_and_trains_as_widened(tiny_model_files, data, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """t5xxl_fp8_e4m3fn without --fp8_base: kept fp8 (half of T5's memory while captions are encoded), with the
    same outputs as its weights widened to bf16 on load, so the same LoRA."""
    t5 = load_safetensors(tiny_model_files.t5xxl)
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.endswith(T5_LINEAR_WEIGHTS) else v for k, v in t5.items()}
    save_safetensors(fp8, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    save_safetensors({k: v.to(torch.bfloat16) for k, v in fp8.items()}, tmp_path / "t5xxl_widened.safetensors")
    seen = []
    original = flux_train_network.FluxNetworkTrainer.load_target_model

    def load_and_look(self, *args, **kwargs):
        models = original(self, *args, **kwargs)
        seen.append(models.text_encoders[1].encoder.block[0].layer[0].SelfAttention.q.weight.dtype)
        return models

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model", load_and_look)
    loras = []
    for name in ("t5xxl_fp8_e4m3fn", "t5xxl_widened"):
        models = dataclasses.replace(tiny_model_files, t5xxl=str(tmp_path / f"{name}.safetensors"))
        loras.append(train(models, data, tmp_path / name, mixed_precision="bf16", cache_text_encoder_outputs=True))
    assert seen == [torch.float8_e4m3fn, torch.bfloat16]
    assert_same(*loras)

    # widened where fp8 weights would not be computed in a wider dtype (no mixed precision: no autocast), and
    # where T5 modules of --base_weights merge into them (Q(W + dW), not Q(Q(W) + dW))
    from library.flux_utils import load_flow_model
    from library.text_encoders import load_clip_l, load_t5xxl
    from networks.lora_flux import create_network

    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    encoders = [load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu"),
                load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")]  # fmt: skip
    base = str(tmp_path / "with_t5.safetensors")
    create_network(1.0, 4, 4.0, None, encoders, dit, train_t5xxl="True").save_weights(base, None, {})
    models = dataclasses.replace(tiny_model_files, t5xxl=str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    seen.clear()
    train(models, data, tmp_path / "fp32", mixed_precision="no", cache_text_encoder_outputs=True)
    train(models, data, tmp_path / "merged", mixed_precision="bf16", cache_text_encoder_outputs=True, base_weights=base)
    assert seen == [torch.float32, torch.bfloat16]


def test_fp8_scaled_trains_with_per_row_scaled_weights(deeper_models, data, tmp_path, caplog, monkeypatch):
    seen = {}
    original = flux_train_network.FluxNetworkTrainer.load_target_model

    def load_and_look(self, *args, **kwargs):
        models = original(self, *args, **kwargs)
        qkv = models.dit.double_blocks[0].img_attn.qkv
        seen.update(dtype=qkv.weight.dtype, scale=getattr(qkv, "weight_scale", None))
        return models

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model", load_and_look)
    with caplog.at_level(logging.INFO):
        weights = train(deeper_models, data, tmp_path / "scaled", fp8_base=True, fp8_scaled=True,
                        mixed_precision="bf16")  # fmt: skip
    assert "fp8 (per-row scaled): " in caplog.text
    assert seen["dtype"] == torch.float8_e4m3fn and seen["scale"] is not None
    assert torch.all(torch.log2(seen["scale"]) == torch.round(torch.log2(seen["scale"])))  # powers of two
    ups = [k for k in weights if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(weights[k]).all() for k in weights) and any(weights[k].abs().sum() > 0 for k in ups)


def test_block_swap_lora_and_validation_equal_the_unswapped_run(deeper_models, tmp_path, caplog):
    """Validation (forwards without backward) and sampling run between the steps: the layout is
    restored before each forward, and the losses and the LoRA equal the run without swapping."""
    data = dataset(tmp_path, validation_split=0.5, num_images=4)
    flags = dict(validate_every_n_steps=1, sample_every_n_steps=2, sample_prompts=data.sample_prompts)

    def run(name, **more):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            weights = train(deeper_models, data, tmp_path / name, **flags, **more)
        losses = [line for line in caplog.text.splitlines() if "validation loss" in line]
        return weights, losses, caplog.text

    plain, plain_losses, _ = run("n0")
    swapped, swapped_losses, log = run("n1", blocks_to_swap=1)
    assert "block swap: 0 double and 2 single blocks" in log
    assert plain_losses and swapped_losses == plain_losses
    assert os.listdir(tmp_path / "n1" / "sample")
    assert_same(plain, swapped)


def validation_losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"validation loss \([^)]*\): ([0-9.]+)", log)]


def test_compiled_blocks_with_swapping_train_the_lora_of_the_plain_run(deeper_models, tmp_path, caplog):
    """--torch_compile with --blocks_to_swap (checkpointing recomputes outside the compiled graphs,
    which run the blocks' forwards), validation and sampling in between: the losses and the LoRA
    of the uncompiled, unswapped run, to the 1 ulp that compiled blocks' rotation differs by."""
    data = dataset(tmp_path, validation_split=0.5, num_images=4)
    flags = dict(validate_every_n_steps=1, sample_every_n_steps=2, sample_prompts=data.sample_prompts,
                 gradient_checkpointing=True)  # fmt: skip
    with caplog.at_level(logging.INFO):
        plain = train(deeper_models, data, tmp_path / "plain", **flags)
        plain_losses = validation_losses(caplog.text)
        caplog.clear()
        compiled = train(deeper_models, data, tmp_path / "compiled", blocks_to_swap=1, torch_compile=True,
                         dynamo_backend="eager", **flags)  # fmt: skip
        losses = validation_losses(caplog.text)
    assert "block swap: 0 double and 2 single blocks" in caplog.text
    assert plain_losses and losses == pytest.approx(plain_losses, abs=2e-5)  # logged to 5 decimals
    assert os.listdir(tmp_path / "compiled" / "sample")
    assert compiled.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=1e-5, atol=1e-6)


def test_cpu_offloaded_checkpointing_lora_equals_plain_checkpointing(deeper_models, data, tmp_path):
    plain = train(deeper_models, data, tmp_path / "ckpt", gradient_checkpointing=True)
    offloaded = train(deeper_models, data, tmp_path / "offload", gradient_checkpointing=True,
                      cpu_offload_checkpointing=True)  # fmt: skip
    assert_same(plain, offloaded)


def test_checkpointing_that_keeps_attention_trains_the_same_lora(deeper_models, data, tmp_path, caplog):
    plain = train(deeper_models, data, tmp_path / "ckpt", gradient_checkpointing=True)
    with caplog.at_level(logging.INFO):
        kept = train(deeper_models, data, tmp_path / "keep", gradient_checkpointing=True,
                     gradient_checkpointing_keep_attention=True)  # fmt: skip
    assert "gradient checkpointing keeps each block's attention output" in caplog.text
    assert "without --torch_compile is slower on a GPU" in caplog.text
    assert_same(plain, kept)
    caplog.clear()
    # compiled, the checkpoint and its policy go into the block's graph (q/k rotate in real arithmetic
    # there, 1 ulp from eager's complex multiply: see test_torch_compile_per_block_trains_the_same_lora)
    compiled = train(deeper_models, data, tmp_path / "keep_compiled", gradient_checkpointing=True,
                     gradient_checkpointing_keep_attention=True, torch_compile=True,
                     dynamo_backend="eager")  # fmt: skip
    assert "gradient checkpointing keeps each block's attention output" in caplog.text
    assert "without --torch_compile" not in caplog.text
    assert compiled.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=1e-5, atol=1e-6)


def test_cudnn_attention_puts_cudnns_kernel_first_for_the_run(deeper_models, data, tmp_path, caplog, monkeypatch):
    """The CPU has no cuDNN attention, so SDPA takes the next kernel: the same LoRA as without the flag."""
    from torch.nn.attention import SDPBackend

    from library import flux_attention

    asked = []
    real_sdpa_kernel = flux_attention.sdpa_kernel

    def recorded(backends, **kwargs):
        asked.append(tuple(backends))
        return real_sdpa_kernel(backends, **kwargs)

    monkeypatch.setattr(flux_attention, "sdpa_kernel", recorded)
    with caplog.at_level(logging.INFO):
        with_cudnn = train(deeper_models, data, tmp_path / "cudnn", cudnn_attention=True)
    assert "attention uses cuDNN's fused kernel first" in caplog.text
    cudnn_first = (SDPBackend.CUDNN_ATTENTION, *flux_attention.DEFAULT_ATTENTION_BACKENDS)
    assert asked and set(asked) == {cudnn_first}
    asked.clear()
    plain = train(deeper_models, data, tmp_path / "plain")
    assert asked and set(asked) == {flux_attention.DEFAULT_ATTENTION_BACKENDS}  # the next run leaves it out again
    assert_same(plain, with_cudnn)


def test_the_dit_reaches_the_gpu_only_after_the_caches_and_the_text_encoders_leave(tiny_model_files, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """While the AE and the text encoders fill the caches, the DiT waits on the CPU (the 8-12 GB recipes
    do not fit all of them at once), T5 goes to the GPU only to encode, and the AE leaves after caching."""
    from library.flux_ae import AutoEncoder
    from library.flux_models import Flux

    events = []
    place, move = Flux.move_to_device_except_swap_blocks, flux_train_network.move_text_encoders
    encode = flux_train_network.FluxNetworkTrainer.encode_captions_to_numpy
    monkeypatch.setattr(Flux, "move_to_device_except_swap_blocks",
                        lambda self, device: events.append("dit placed") or place(self, device))
    # the accelerator's device (a torch.device: the GPU on a GPU machine) against the literal "cpu"
    monkeypatch.setattr(flux_train_network, "move_text_encoders", lambda encoders, device: events.append(
        "text encoders to " + ("the device" if isinstance(device, torch.device) else device))
        or move(encoders, device))  # fmt: skip
    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "encode_captions_to_numpy",
                        lambda self, ctx, captions: events.append("encode") or encode(self, ctx, captions))
    ae_to = AutoEncoder.to
    monkeypatch.setattr(AutoEncoder, "to", lambda self, *args, **kwargs: events.append(
        "ae to " + ("the device" if isinstance(args[0], torch.device) else str(args[0])))
        or ae_to(self, *args, **kwargs))  # fmt: skip
    data = dataset(tmp_path)
    flags = dict(steps=1, network_train_unet_only=True, cache_latents=True, cache_text_encoder_outputs_to_disk=True)
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(tmp_path / "first"), **flags)) == 0
    first = events[: events.index("dit placed") + 1]
    assert first[:2] == ["ae to the device", "ae to cpu"]  # the latents cached: the AE waits on the CPU
    assert "encode" in first and "text encoders to the device" in first
    assert first[-2:] == ["text encoders to cpu", "dit placed"] and "text encoders to cpu" not in first[:-2]
    events.clear()
    assert flux_train_network.main(base_argv(tiny_model_files, data, str(tmp_path / "second"), **flags)) == 0
    assert events[: events.index("dit placed") + 1] == ["ae to the device", "ae to cpu", "text encoders to cpu",
                                                        "dit placed"]  # all cached  # fmt: skip


def test_text_encoder_outputs_cached_from_fp8_encoders_are_not_reused_by_wider_ones(tiny_model_files, tmp_path):
    import glob

    data = dataset(tmp_path)

    def cache_files_after(name, **flags):
        train(tiny_model_files, data, tmp_path / name, mixed_precision="bf16", cache_text_encoder_outputs_to_disk=True,
              **flags)  # fmt: skip
        return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(data.image_dir, "*_flux_te.npz"))}

    from_fp8 = cache_files_after("fp8", fp8_base=True)
    wide = cache_files_after("bf16")
    assert wide.keys() == from_fp8.keys() and all(wide[p] != from_fp8[p] for p in wide)
    assert cache_files_after("fp8_dit_only", fp8_base=True, fp8_base_unet=True) == wide  # encoders not in fp8


def test_position_ids_stay_fp32_in_bf16_training(tiny_model_files, tmp_path, monkeypatch):
    """bf16 holds whole numbers only up to 256: a bucket over 4096 px would get wrong RoPE positions."""
    from library.flux_models import Flux

    forward, seen = Flux.forward, set()
    monkeypatch.setattr(Flux, "forward", lambda self, *a, **k: seen.add(k["img_ids"].dtype) or forward(self, *a, **k))
    train(tiny_model_files, dataset(tmp_path), tmp_path / "out", mixed_precision="bf16")
    assert seen == {torch.float32}
