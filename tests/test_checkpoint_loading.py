"""Loading DiT and AE files in every layout users have, and the errors for files that cannot be used."""

import json
import logging
import os
import re

import pytest
import torch

from library.errors import CheckpointError
from library.flux_key_mapping import bfl_to_diffusers
from library.flux_utils import load_ae, load_flow_model, pack_latents, prepare_img_ids, unpack_latents
from library.safetensors_io import load_safetensors, save_safetensors
from library.tiny_models import random_model, tiny_ae_params, tiny_chroma_params, tiny_flux_params, write_model


@pytest.fixture
def dev_model():
    return random_model(tiny_flux_params(True), seed=11)


def assert_same_weights(loaded, source):
    sd = source.state_dict()
    assert loaded.state_dict().keys() == sd.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_bfl_file_loads_with_inferred_config(tmp_path, dev_model):
    path = write_model(dev_model, str(tmp_path / "dev.safetensors"))
    is_schnell, model = load_flow_model(path, torch.float32, "cpu")
    assert not is_schnell
    assert model.params == dev_model.params
    assert_same_weights(model, dev_model)
    assert not any(p.is_meta for p in model.parameters())


def test_schnell_is_detected_from_missing_guidance_embedder(tmp_path):
    source = random_model(tiny_flux_params(False), seed=12)
    is_schnell, model = load_flow_model(write_model(source, str(tmp_path / "s.safetensors")), None, "cpu")
    assert is_schnell and model.guidance_in is None


def test_comfyui_prefix_is_stripped(tmp_path, dev_model):
    prefixed = {f"model.diffusion_model.{k}": v for k, v in dev_model.state_dict().items()}
    save_safetensors(prefixed, tmp_path / "comfy.safetensors")
    _, model = load_flow_model(str(tmp_path / "comfy.safetensors"), None, "cpu")
    assert_same_weights(model, dev_model)


def test_diffusers_file_folder_and_shards_load(tmp_path, dev_model):
    diffusers_sd = bfl_to_diffusers(dev_model.state_dict())
    save_safetensors(diffusers_sd, tmp_path / "flux_diffusers.safetensors")
    _, from_file = load_flow_model(str(tmp_path / "flux_diffusers.safetensors"), None, "cpu")
    assert_same_weights(from_file, dev_model)

    folder = tmp_path / "FLUX.1-dev [fp32]" / "transformer"  # brackets: a glob pattern matched no shard
    folder.mkdir(parents=True)
    keys = sorted(diffusers_sd)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        save_safetensors(
            {k: diffusers_sd[k] for k in part}, folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        )
    _, from_folder = load_flow_model(str(tmp_path / "FLUX.1-dev [fp32]"), None, "cpu")
    assert_same_weights(from_folder, dev_model)
    _, from_shard = load_flow_model(str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"), None, "cpu")
    assert_same_weights(from_shard, dev_model)
    # the index diffusers writes beside its shards (it was "not a .safetensors file, or a damaged one")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"diffusion_pytorch_model-0000{1 if k in keys[:half] else 2}-of-00002.safetensors" for k in keys}}))
    _, from_index = load_flow_model(str(index), None, "cpu")
    assert_same_weights(from_index, dev_model)
    # a shard that is not there is named (it was "incomplete DiT checkpoint (no 'double_blocks.0...')")
    os.remove(folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    for given in (tmp_path / "FLUX.1-dev [fp32]", folder / "diffusion_pytorch_model-00002-of-00002.safetensors", index):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(given))}: 1 of 2 shards are missing: "
                                                  r"diffusion_pytorch_model-00001-of-00002\.safetensors; download"):
            load_flow_model(str(given), None, "cpu")


def test_chroma_file_loads(tmp_path):
    source = random_model(tiny_chroma_params(), seed=13)
    path = write_model(source, str(tmp_path / "chroma.safetensors"))
    is_schnell, model = load_flow_model(path, None, "cpu", model_type="chroma")
    assert not is_schnell
    assert model.params == source.params
    assert_same_weights(model, source)


def test_fp8_file_is_cast_to_the_requested_dtype(tmp_path, dev_model):
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in dev_model.state_dict().items()}
    save_safetensors(fp8, tmp_path / "fp8.safetensors")
    _, model = load_flow_model(str(tmp_path / "fp8.safetensors"), torch.float32, "cpu")
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, fp8[key].to(torch.float32)), key
    _, kept = load_flow_model(str(tmp_path / "fp8.safetensors"), None, "cpu")
    assert kept.img_in.weight.dtype == torch.float8_e4m3fn


def comfy_quant_marker(fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """comfy-kitchen's per-layer marker: the layer's format as UTF-8 JSON in a uint8 tensor."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def comfy_scaled(sd: dict, layout: str) -> tuple[dict, dict]:
    """(file tensors, scale per weight key): 2-D weights in e4m3fn with a per-tensor scale, in ComfyUI's older
    layout (``scale_weight``, a ``scaled_fp8`` marker) or comfy-kitchen's (``weight_scale`` + ``comfy_quant``)."""
    out, scales = {}, {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2:
            layer, scale = key[: -len(".weight")], value.abs().max() / 448.0
            out[key], scales[key] = (value / scale).to(torch.float8_e4m3fn), scale
            if layout == "scale_weight":
                out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = scale.reshape(()), torch.tensor(1.0)
            else:
                out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale.reshape(()), torch.tensor(1.0)
                out[f"{layer}.comfy_quant"] = comfy_quant_marker()
        else:
            out[key] = value
    if layout == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, scales


@pytest.mark.parametrize("layout", ["scale_weight", "comfy_quant", "quantization_metadata"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_scaled_fp8_scales_are_applied(tmp_path, dev_model, prefix, layout, caplog):
    """comfy-kitchen's layout (weight_scale beside a comfy_quant marker, or its layers listed in the file's
    _quantization_metadata) crashed with an IndexError: its scalar weight_scale was taken for this project's
    per-row scales."""
    sd, scales = comfy_scaled(dev_model.state_dict(), "scale_weight" if layout == "scale_weight" else "comfy_quant")
    metadata = None
    if layout == "quantization_metadata":
        layers = {prefix + k[: -len(".comfy_quant")]: {"format": "float8_e4m3fn"} for k in sd if k.endswith("_quant")}
        sd = {k: v for k, v in sd.items() if not k.endswith(".comfy_quant")}
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_safetensors({prefix + k: v for k, v in sd.items()}, tmp_path / "scaled.safetensors", metadata=metadata)
    with caplog.at_level(logging.WARNING):
        _, model = load_flow_model(str(tmp_path / "scaled.safetensors"), torch.float32, "cpu")
    assert "unexpected" not in caplog.text  # the marker tensor is not a weight to complain about
    weight = model.double_blocks[0].img_attn.qkv.weight
    original = dev_model.double_blocks[0].img_attn.qkv.weight
    expected = (
        sd["double_blocks.0.img_attn.qkv.weight"].to(torch.float32) * scales["double_blocks.0.img_attn.qkv.weight"]
    )
    assert torch.equal(weight, expected)
    # ignoring the scale would leave weights hundreds of times too large
    assert (weight - original).abs().max() < 0.1 * original.abs().max()


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_blockwise"])
def test_other_comfy_quant_formats_stop_naming_the_layer(tmp_path, dev_model, fmt):
    sd, _ = comfy_scaled(dev_model.state_dict(), "comfy_quant")
    sd["double_blocks.0.img_attn.qkv.comfy_quant"] = comfy_quant_marker(fmt)
    save_safetensors(sd, tmp_path / "quantized.safetensors")
    with pytest.raises(CheckpointError, match=rf"quantized\.safetensors: double_blocks\.0\.img_attn\.qkv is "
                                              rf"quantized as {fmt} \(ComfyUI's quantized layout\)"):  # fmt: skip
        load_flow_model(str(tmp_path / "quantized.safetensors"), torch.float32, "cpu")


def test_chroma_file_as_flux_says_which_model_type_to_use(tmp_path):
    path = write_model(random_model(tiny_chroma_params()), str(tmp_path / "chroma.safetensors"))
    with pytest.raises(CheckpointError, match=r"chroma\.safetensors is a Chroma model: add --model_type chroma"):
        load_flow_model(path, None, "cpu", model_type="flux")


def test_flux_file_as_chroma_says_which_model_type_to_use(tmp_path, dev_model):
    path = write_model(dev_model, str(tmp_path / "dev.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"dev\.safetensors is a FLUX\.1 model, not Chroma: use --model_type flux"
    ):
        load_flow_model(path, None, "cpu", model_type="chroma")


def test_truncated_file_is_named(tmp_path, dev_model):
    path = write_model(dev_model, str(tmp_path / "dev.safetensors"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"dev\.safetensors: file is truncated"):
        load_flow_model(path, None, "cpu")


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 a zip pickle" * 10, b"\xff" * 64], ids=["empty", "pickle", "junk"]
)
def test_non_safetensors_file_is_named(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: not a \.safetensors file"):
        load_flow_model(str(path), None, "cpu")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.safetensors: file not found"):
        load_flow_model(str(tmp_path / "nowhere.safetensors"), None, "cpu")


def test_missing_keys_are_listed_from_the_header(tmp_path, dev_model, monkeypatch):
    """Found from the header, before any tensor is read (the load read the whole file first)."""
    from library import flux_utils

    sd = dev_model.state_dict()
    del sd["double_blocks.1.txt_mlp.2.bias"], sd["single_blocks.0.norm.key_norm.scale"]
    save_safetensors(sd, tmp_path / "partial.safetensors")
    monkeypatch.setattr(flux_utils.SafetensorsReader, "get", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError) as error:
        load_flow_model(str(tmp_path / "partial.safetensors"), None, "cpu")
    assert str(error.value) == (f"{tmp_path / 'partial.safetensors'}: incomplete checkpoint, missing keys: "
                                "double_blocks.1.txt_mlp.2.bias, single_blocks.0.norm.key_norm.scale")  # fmt: skip


def test_unexpected_keys_are_warned_once(tmp_path, dev_model, caplog):
    sd = dict(dev_model.state_dict(), **{"extra.one": torch.zeros(1), "extra.two": torch.zeros(1)})
    save_safetensors(sd, tmp_path / "extra.safetensors")
    with caplog.at_level(logging.WARNING):
        _, model = load_flow_model(str(tmp_path / "extra.safetensors"), None, "cpu")
    warnings = [r for r in caplog.records if "unexpected keys" in r.getMessage()]
    assert len(warnings) == 1
    assert "extra.one" in warnings[0].getMessage() and "extra.two" in warnings[0].getMessage()
    assert_same_weights(model, dev_model)


def test_ae_loads_with_inferred_widths(tmp_path):
    source = random_model(tiny_ae_params(), seed=14)
    ae = load_ae(write_model(source, str(tmp_path / "ae.safetensors")), torch.float32, "cpu")
    assert ae.params == source.params
    assert_same_weights(ae, source)


def test_text_encoder_file_given_as_ae_says_what_it_is(tmp_path):
    t5_like = {"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}
    save_safetensors(t5_like, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"t5xxl_fp16\.safetensors: expected the FLUX autoencoder.*a T5 text encoder \(give it as --t5xxl\)",
    ):
        load_ae(str(tmp_path / "t5xxl_fp16.safetensors"), None, "cpu")


def test_ae_file_given_as_dit_says_what_it_is(tmp_path):
    path = write_model(random_model(tiny_ae_params()), str(tmp_path / "ae.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"expected a FLUX\.1 or Chroma DiT, but this file looks like an autoencoder \(give it as --ae\)",
    ):
        load_flow_model(path, None, "cpu")


def test_pack_latents_uses_channel_then_patch_row_then_column_order():
    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    packed = pack_latents(latents)
    assert packed.shape == (2, 2 * 3, 64)
    token = 1 * 3 + 2  # patch row 1, patch column 2
    expected = torch.stack([latents[1, c, 2 + ph, 4 + pw] for c in range(16) for ph in range(2) for pw in range(2)])
    assert torch.equal(packed[1, token], expected)
    assert torch.equal(unpack_latents(packed, 2, 3), latents)


def test_img_ids_hold_row_and_column():
    ids = prepare_img_ids(2, 3, 4)
    assert ids.shape == (2, 12, 3)
    assert torch.equal(ids[1, 7], torch.tensor([0.0, 1.0, 3.0]))
    assert torch.all(ids[..., 0] == 0)


def test_loader_casts_tensors_one_at_a_time(tmp_path, dev_model):
    path = tmp_path / "dev.safetensors"
    write_model(dev_model, str(path))
    half = load_safetensors(path, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    only = load_safetensors(path, keys=["img_in.weight"])
    assert list(only) == ["img_in.weight"] and torch.equal(only["img_in.weight"], dev_model.img_in.weight)


def test_a_chroma_variant_without_img_in_is_named_as_such_not_sent_back_to_the_same_flag(tmp_path):
    # e.g. a pixel-space Chroma (``img_in_patch``): the file looks like Chroma, so "give it as the main model
    # with --model_type chroma" would contradict itself
    sd = random_model(tiny_chroma_params(), seed=3).state_dict()
    sd["img_in_patch.weight"] = sd.pop("img_in.weight")
    save_safetensors(sd, tmp_path / "radiance.safetensors")
    for model_type in ("chroma", "flux"):
        with pytest.raises(CheckpointError) as e:
            load_flow_model(str(tmp_path / "radiance.safetensors"), None, "cpu", model_type=model_type)
        assert "looks like a Chroma DiT but has no 'img_in.weight'" in str(e.value)
        assert "a variant this trainer does not read" in str(e.value) and "--model_type" not in str(e.value)
