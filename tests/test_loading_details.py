"""Loading details that other tests leave open: pruned DiT layouts, fp8 load dtypes, what a file is
said to be, text-encoder storage dtypes and LoRA file handling. Each test checks the behaviour against
an independent reference (closed-form values, transformers' or diffusers' models, the real layouts)."""

from __future__ import annotations

import pytest
import torch

from library.checkpoint_kinds import describe_checkpoint
from library.flux_key_mapping import bfl_to_diffusers
from library.flux_models import Flux, infer_flux_params
from library.flux_utils import load_flow_model
from library.fp8 import FP8, dit_load_dtype, store_linears_in_fp8
from library.safetensors_io import save_safetensors
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params, write_model


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- flux_utils / infer_flux_params ------------------------------------------------------------


@pytest.mark.parametrize("mlp_ratio", [2.0, 4.0])
def test_a_dit_pruned_to_single_blocks_only_is_inferred_and_loaded(tmp_path, mlp_ratio):
    """With no double block the MLP width comes from linear1 = 3 * hidden (q, k, v) + mlp hidden."""
    params = tiny_flux_params(True, depth=0, depth_single=3, mlp_ratio=mlp_ratio)
    with torch.device("meta"):
        shapes = _shapes(Flux(params))
    assert shapes["single_blocks.0.linear1.weight"][0] == 3 * 64 + int(64 * mlp_ratio)
    assert infer_flux_params(shapes) == params
    source = random_model(params, seed=5)
    _, model = load_flow_model(write_model(source, str(tmp_path / "single_only.safetensors")), None, "cpu")
    assert model.params.mlp_ratio == mlp_ratio and len(model.double_blocks) == 0
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ---- fp8 --------------------------------------------------------------------------------------


def _comfy_scaled(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout: block matrices in e4m3fn with a per-tensor ``scale_weight``."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for key, value in weights.items():
        if "blocks." in key and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / 448.0
            out[key] = (value.float() / scale).to(FP8)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def test_a_comfy_scaled_fp8_dit_loads_in_the_compute_dtype_not_fp32_or_as_stored(tmp_path):
    """Its block weights are e4m3fn like a plain fp8 file's, but they only mean something once scaled:
    they load in the compute dtype (bf16: half the memory of the fp32 a dtype of None would give)."""
    source = random_model(tiny_flux_params(), seed=4)
    sd = _comfy_scaled(source.state_dict())
    assert all(v.dtype == FP8 for k, v in sd.items() if "blocks." in k and k.endswith(".weight") and v.ndim == 2)
    for prefix in ("", "model.diffusion_model."):
        path = str(tmp_path / f"comfy{len(prefix)}.safetensors")
        save_safetensors({prefix + k: v for k, v in sd.items()}, path)
        assert dit_load_dtype(path, torch.bfloat16) == torch.bfloat16
        assert dit_load_dtype(path, torch.float16) == torch.float16
    plain = str(tmp_path / "plain_fp8.safetensors")
    save_safetensors({k: v.to(FP8) if v.ndim == 2 and "blocks." in k else v for k, v in source.state_dict().items()},
                     plain)  # fmt: skip
    assert dit_load_dtype(plain, torch.bfloat16) is None


def test_row_scales_of_an_all_zero_row_stay_finite_and_the_row_dequantizes_to_zeros():
    """Closed form: a row whose max |w| is m gets 2^ceil(log2(m / 448)); an all-zero row (pruned or
    zero-initialised outputs) must not give a scale of 0 and NaN weights."""
    from library.fp8 import dequantize_weight, quantize_weight, row_scales

    weight = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-3e-3, 1e-3, 2e-3]])
    scales = row_scales(weight)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert scales[0].item() == 2.0**-8 and scales[2].item() == 2.0**-17
    quantized, scale = quantize_weight(weight, scaled=True)
    restored = dequantize_weight(quantized, scale, torch.float32)
    assert torch.equal(restored[1], torch.zeros(3))
    assert torch.isfinite(restored).all()
    torch.testing.assert_close(restored, weight, rtol=2**-3, atol=0)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_text_encoder_linears_are_stored_in_the_fp8_type_asked_for(tmp_path, fp8):
    """flux_minimal_inference stores merged text encoders in --t5xxl_dtype / --clip_l_dtype, e5m2 included."""
    from library.text_encoders import load_t5xxl
    from library.tiny_text_encoders import write_tiny_t5

    path = tmp_path / "t5.safetensors"
    write_tiny_t5(path, vocab=64)
    t5 = load_t5xxl(path, torch.float32, "cpu")
    store_linears_in_fp8(t5, fp8)
    linears = [m for m in t5.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == fp8 for m in linears)
    assert t5.shared.weight.dtype == torch.float32
    assert t5.encoder.final_layer_norm.weight.dtype == torch.float32
    direct = load_t5xxl(path, fp8, "cpu", compute_dtype=torch.bfloat16)  # --t5xxl_dtype fp8_e5m2 loads so
    assert all(m.weight.dtype == fp8 for m in direct.modules() if isinstance(m, torch.nn.Linear))
    assert direct.shared.weight.dtype == torch.bfloat16


# ---- checkpoint_kinds -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_flux_and_chroma_dits_are_named_as_such_in_either_layout(layout):
    """Error messages say what a misplaced file is: diffusers' layout has no double_blocks."""
    flux = random_model(tiny_flux_params(), seed=0).state_dict()
    chroma = random_model(tiny_chroma_params(), seed=0).state_dict()
    if layout == "diffusers":
        flux, chroma = bfl_to_diffusers(flux), bfl_to_diffusers(chroma)
        assert not any("double_blocks" in k for k in (*flux, *chroma))
    assert describe_checkpoint(list(flux)).startswith("a FLUX DiT")
    assert describe_checkpoint(list(chroma)).startswith("a Chroma DiT")


# ---- networks/lora_flux -------------------------------------------------------------------------


def test_load_weights_reports_the_modules_the_file_lacks_and_the_weights_it_has_in_excess(tmp_path, caplog):
    import logging

    from library.safetensors_io import load_safetensors
    from networks.lora_flux import create_network

    model = random_model(tiny_flux_params(), seed=0)
    trained = create_network(1.0, 4, 2, None, [None, None], model)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    full = tmp_path / "full.safetensors"
    trained.save_weights(full, None, None)
    weights = load_safetensors(full)
    dropped = sorted({k.split(".")[0] for k in weights if k.startswith("lora_unet_double_blocks_0_")})
    assert len(dropped) == 10  # the ten Linears of a double block
    kept = {k: v for k, v in weights.items() if k.split(".")[0] not in dropped}
    kept["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 64)
    partial = tmp_path / "partial.safetensors"
    save_safetensors(kept, partial)

    fresh = create_network(1.0, 4, 2, None, [None, None], model)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="networks.lora_flux"):
        info = fresh.load_weights(partial)
    assert info.unexpected_keys == ["lora_unet_not_a_layer.lora_down.weight"]
    assert sorted({k.split(".")[0] for k in info.missing_keys}) == dropped
    assert "10 modules of this network are not in the file and start untrained" in caplog.text
    assert "1 weights have no module here and are ignored" in caplog.text
    after = fresh.state_dict()
    for key, value in after.items():
        source = before if key.split(".")[0] in dropped else weights
        assert torch.equal(value, source[key]), key


def test_a_diffusers_dit_with_row_scales_stops_at_the_header_check(tmp_path):
    """Its separate q, k, v scales cannot follow the fused BFL weights: a message before any loading, where the
    header check let it pass and the loader ended in a KeyError traceback."""
    from library.errors import CheckpointError
    from library.flux_utils import check_flow_model_file

    weights = bfl_to_diffusers(random_model(tiny_flux_params()).state_dict())
    weights["transformer_blocks.0.attn.to_q.weight_scale"] = torch.ones(weights["transformer_blocks.0.attn.to_q.weight"]
                                                                         .shape[0])  # fmt: skip
    path = tmp_path / "flux_diffusers_scaled.safetensors"
    save_safetensors(weights, path)
    for load in (lambda: check_flow_model_file(str(path)), lambda: load_flow_model(str(path), None, "cpu")):
        with pytest.raises(CheckpointError, match=r"diffusers-layout DiT with per-row fp8 scales \(transformer_blocks"):
            load()


def test_a_shard_of_single_blocks_is_named_as_part_of_a_dit():
    """A second shard of a BFL-layout DiT was "no known model"."""
    keys = [f"single_blocks.{i}.linear1.weight" for i in range(3)]
    expected = "a part of a FLUX or Chroma DiT (single blocks only: one shard of a split checkpoint?)"
    assert describe_checkpoint(keys) == expected
    assert describe_checkpoint(["model.diffusion_model." + k for k in keys]) == expected


@pytest.mark.parametrize("keys, expected", [
    (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"], "a large language model's text encoder"),
    (["model.layers.7.self_attn.q_proj.weight", "model.layers.7.mlp.gate_proj.weight"],
     "a large language model's text encoder"),  # one shard of several
    (["vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight"],
     "a CLIP vision model, not a text encoder"),  # ComfyUI's clip_vision_l
    (["text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.embeddings.token_embedding.weight"],
     "a CLIP text encoder (give it as --clip_l)"),
    (["encoder.layers.11.self_attn.q_proj.weight"], "a CLIP text encoder (give it as --clip_l)"),  # a later shard
])  # fmt: skip
def test_text_encoders_flux_does_not_use_are_not_sent_to_clip_l(keys, expected):
    """A vision tower and Qwen / Llama / Gemma files were "a CLIP text encoder (give it as --clip_l)", and --clip_l
    then said the file was a CLIP text encoder without its embeddings."""
    assert describe_checkpoint(keys).startswith(expected)


# ---- whole checkpoints and files the model cannot take ------------------------------------------


@pytest.mark.parametrize("ae_prefix", ["vae.", "first_stage_model."])
def test_a_whole_checkpoint_gives_its_dit_and_its_ae_reading_only_their_own_tensors(tmp_path, monkeypatch, ae_prefix):
    """ComfyUI's whole checkpoints hold the DiT, the AE and the text encoders: the DiT load read (and cast and held)
    every tensor, and --ae could not read the file at all."""
    from library import flux_utils
    from library.flux_utils import load_ae
    from library.tiny_models import tiny_ae_params

    dit, ae = random_model(tiny_flux_params(True), seed=3), random_model(tiny_ae_params(), seed=4)
    whole = {f"model.diffusion_model.{k}": v for k, v in dit.state_dict().items()}
    whole |= {f"{ae_prefix}{k}": v for k, v in ae.state_dict().items()}
    whole["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(8, 4)
    save_safetensors(whole, tmp_path / "flux1-dev-whole.safetensors")
    read = []
    get = flux_utils.SafetensorsReader.get
    monkeypatch.setattr(flux_utils.SafetensorsReader, "get", lambda self, key: read.append(key) or get(self, key))
    _, loaded = load_flow_model(str(tmp_path / "flux1-dev-whole.safetensors"), torch.float32, "cpu")
    assert read and all(k.startswith("model.diffusion_model.") for k in read)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in loaded.state_dict().items())
    read.clear()
    loaded_ae = load_ae(str(tmp_path / "flux1-dev-whole.safetensors"), torch.float32, "cpu")
    assert read and all(k.startswith(ae_prefix) for k in read)
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in loaded_ae.state_dict().items())


def test_int8_tensors_outside_the_dit_do_not_refuse_it(tmp_path):
    """Only the DiT's own weights are looked at: a whole checkpoint's int8 text encoder is not the DiT's."""
    dit = random_model(tiny_flux_params(True), seed=6)
    whole = {f"model.diffusion_model.{k}": v for k, v in dit.state_dict().items()}
    whole["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(4, 4).char()
    whole["model.diffusion_model.extra.index.weight"] = torch.zeros(3, dtype=torch.int64)  # no tensor of the DiT
    save_safetensors(whole, tmp_path / "whole.safetensors")
    _, loaded = load_flow_model(str(tmp_path / "whole.safetensors"), torch.float32, "cpu")
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("case, message", [
    ("int8", r"double_blocks\.0\.img_attn\.qkv\.weight is stored as I8: an int8 or 4-bit quantized file"),
    ("packed", r"1 tensors are not of the shape the rest of the file gives them, e\.g\. single_blocks\.0\.linear2\."
               r"weight \[\d+, \d+\] where \[\d+, \d+\]: a damaged or repacked \(quantized\) file"),
])  # fmt: skip
def test_a_dit_the_model_cannot_take_stops_before_a_tensor_is_read(tmp_path, monkeypatch, case, message):
    """bitsandbytes' int8 weights and repacked 4-bit ones passed the header check and stopped with torch's own
    error after the whole file was read."""
    from library import flux_utils
    from library.errors import CheckpointError

    sd = random_model(tiny_flux_params(True), seed=5).state_dict()
    if case == "int8":
        sd["double_blocks.0.img_attn.qkv.weight"] = sd["double_blocks.0.img_attn.qkv.weight"].to(torch.int8)
        sd["double_blocks.0.img_attn.qkv.SCB"] = torch.ones(sd["double_blocks.0.img_attn.qkv.weight"].shape[0])
    else:
        w = sd["single_blocks.0.linear2.weight"]
        sd["single_blocks.0.linear2.weight"] = w.reshape(-1, w.shape[1] // 2)[: w.numel() // 4]
    save_safetensors(sd, tmp_path / "odd.safetensors")
    monkeypatch.setattr(flux_utils.SafetensorsReader, "get", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError, match=message):
        load_flow_model(str(tmp_path / "odd.safetensors"), torch.float32, "cpu")


@pytest.mark.parametrize("keys, expected", [
    (["shared.weight", "encoder.embed_tokens.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"],
     "a T5 text encoder (give it as --t5xxl)"),  # T5 has embed_tokens too: it is no language model
    (["model.diffusion_model.img_in.weight", "vae.encoder.conv_in.weight", "text_encoders.clip_l.transformer.x"],
     "a whole FLUX checkpoint (DiT, autoencoder and text encoders in one file"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
     "a Stable Diffusion model (SD 1.x, SDXL or SD3)"),  # a whole SD checkpoint has the same parts
    (["input_blocks.0.0.weight", "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj"
      ".weight"], "a Stable Diffusion model (SD 1.x, SDXL or SD3), not FLUX.1 or Chroma"),
    (["text_model.embeddings.token_embedding.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight"],
     "a CLIP text encoder (give it as --clip_l)"),  # OpenAI's whole CLIP (text and vision), which --clip_l reads
])  # fmt: skip
def test_whole_checkpoints_and_t5_files_are_named_as_what_they_are(keys, expected):
    assert describe_checkpoint(keys).startswith(expected)
