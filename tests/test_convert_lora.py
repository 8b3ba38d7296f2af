"""convert_flux_lora.py: sd-scripts <-> ai-toolkit / diffusers LoRA files. Round trips keep every module's
weight change; golden key names; converted files load in diffusers (peft) and give our model's output."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import convert_flux_lora
from library.flux_key_mapping import bfl_to_diffusers
from library.lora_formats import merge_identical_downs, to_ai_toolkit, to_sd_scripts
from library.model_hashes import precalculate_safetensors_hashes
from library.safetensors_io import load_safetensors, read_metadata, save_safetensors
from library.text_encoders import load_clip_l, load_t5xxl
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import SPLIT_QKV_METADATA_KEY, create_network, create_network_from_weights
from tests.test_lora_diffusers_interop import models  # noqa: F401  (the full-width fixture)
from tests.test_lora_math import dit_inputs, randomize_lora
from tests.test_merge_lora import deltas, diffusers_flux, run_diffusers, write_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(src, dst, src_path, dst_path) -> int:
    return convert_flux_lora.main(
        ["--src", src, "--dst", dst, "--src_path", str(src_path), "--dst_path", str(dst_path)]
    )


def assert_same_changes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, delta in a.items():
        torch.testing.assert_close(b[name], delta, rtol=1e-6, atol=1e-6 * delta.abs().max().item(), msg=name)


@pytest.fixture(scope="module")
def encoders(tiny_model_files):
    return load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu"), load_t5xxl(
        tiny_model_files.t5xxl, torch.float32, "cpu"
    )


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("plain", dict(alpha=3.0, in_dims="[2,2,2,2,2]")),
        ("split_qkv", dict(alpha=1.0, split_qkv="True")),
        ("rank_8_alpha_1", dict(dim=8, alpha=1.0)),
        ("chroma", dict(alpha=16.0, in_dims="[2,0,0,0,2]")),
    ],
)
def test_sd_scripts_to_diffusers_and_back_keeps_every_weight_change(encoders, tmp_path, case, kwargs):
    model = random_model(tiny_chroma_params() if case == "chroma" else tiny_flux_params())
    text_encoders = [None, None] if case == "chroma" else [encoders[0], None]
    original = write_lora(tmp_path / "lora.safetensors", model, text_encoders, **kwargs)
    ait, back = tmp_path / "ait.safetensors", tmp_path / "back.safetensors"
    assert convert("sd-scripts", "diffusers", original, ait) == 0
    assert convert("ai-toolkit", "sd-scripts", ait, back) == 0
    source, returned = load_safetensors(original), load_safetensors(back)
    assert_same_changes(deltas(source), deltas(returned))
    assert {k: v.shape for k, v in returned.items()} == {k: v.shape for k, v in source.items()}

    converted = load_safetensors(ait)
    assert all(k.startswith(("transformer.", "text_encoder.")) and ".lora_" in k for k in converted)
    q = converted["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert q.shape == (kwargs.get("dim", 4), 64)  # split_qkv files split into their per-part rank-4 LoRAs
    if case == "split_qkv":
        assert read_metadata(back)[SPLIT_QKV_METADATA_KEY] == "fused_alpha_x_splits"
    # every module's change, as diffusers / peft apply it: B @ A (scale 1)
    for name, delta in deltas(source).items():
        if name == "lora_unet_double_blocks_1_img_attn_proj":
            b = converted["transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight"]
            a = converted["transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight"]
            torch.testing.assert_close(b.double() @ a.double(), delta, rtol=1e-5, atol=1e-6 * delta.abs().max().item())


def test_t5_modules_are_listed_and_left_out(tiny_model_files, encoders, tmp_path, caplog):
    model = random_model(tiny_flux_params())
    original = write_lora(tmp_path / "lora.safetensors", model, list(encoders), train_t5xxl="True")
    with caplog.at_level(logging.WARNING):
        assert convert("sd-scripts", "ai-toolkit", original, tmp_path / "ait.safetensors") == 0
    (message,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert "14 modules or keys" in message and "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo" in message
    converted = load_safetensors(tmp_path / "ait.safetensors")
    assert sum(k.startswith("text_encoder.text_model.encoder.layers.") for k in converted) == 2 * 12
    assert not any("te3" in k or "encoder.block" in k for k in converted)


def test_ai_toolkit_file_to_sd_scripts_golden_keys(tmp_path):
    """By default (--src ai-toolkit --dst sd-scripts) q/k/v fuse block-diagonally; missing parts stay zero."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    h, r = 16, 2
    ait = {}
    for part in ("to_q", "to_k", "to_v"):
        ait[f"transformer.transformer_blocks.3.attn.{part}.lora_A.weight"] = rand(r, h)
        ait[f"transformer.transformer_blocks.3.attn.{part}.lora_B.weight"] = rand(h, r)
        ait[f"transformer.single_transformer_blocks.0.attn.{part}.lora_A.weight"] = rand(r, h)
        ait[f"transformer.single_transformer_blocks.0.attn.{part}.lora_B.weight"] = rand(h, r)
    ait["transformer.single_transformer_blocks.0.proj_out.lora_A.weight"] = rand(r, h + 4 * h)
    ait["transformer.single_transformer_blocks.0.proj_out.lora_B.weight"] = rand(h, r)
    ait["transformer.single_transformer_blocks.0.proj_out.alpha"] = torch.tensor(1.0)
    ait["text_encoder.text_model.encoder.layers.5.mlp.fc1.lora_A.weight"] = rand(r, h)
    ait["text_encoder.text_model.encoder.layers.5.mlp.fc1.lora_B.weight"] = rand(4 * h, r)
    src = tmp_path / "ait.safetensors"
    save_safetensors(ait, src, {"format": "pt"})
    out = tmp_path / "sds.safetensors"
    assert convert_flux_lora.main(["--src_path", str(src), "--dst_path", str(out)]) == 0
    sds = load_safetensors(out)
    assert {k: tuple(v.shape) for k, v in sds.items()} == {
        "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": (3 * r, h),
        "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": (3 * h, 3 * r),
        "lora_unet_double_blocks_3_img_attn_qkv.alpha": (),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": (3 * r, h),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": (3 * h + 4 * h, 3 * r),
        "lora_unet_single_blocks_0_linear1.alpha": (),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": (r, 5 * h),
        "lora_unet_single_blocks_0_linear2.lora_up.weight": (h, r),
        "lora_unet_single_blocks_0_linear2.alpha": (),
        "lora_te1_text_model_encoder_layers_5_mlp_fc1.lora_down.weight": (r, h),
        "lora_te1_text_model_encoder_layers_5_mlp_fc1.lora_up.weight": (4 * h, r),
        "lora_te1_text_model_encoder_layers_5_mlp_fc1.alpha": (),
    }
    assert sds["lora_unet_double_blocks_3_img_attn_qkv.alpha"].item() == 3 * r  # scale 1
    assert sds["lora_unet_single_blocks_0_linear2.alpha"].item() == 1.0  # the file's alpha: scale 1/2
    change = deltas(sds)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        prefix = f"transformer.transformer_blocks.3.attn.{part}"
        expected = ait[f"{prefix}.lora_B.weight"].double() @ ait[f"{prefix}.lora_A.weight"].double()
        torch.testing.assert_close(change["lora_unet_double_blocks_3_img_attn_qkv"][i * h : (i + 1) * h], expected)
    assert change["lora_unet_single_blocks_0_linear1"][3 * h :].abs().max() == 0  # no proj_mlp in the file
    metadata = read_metadata(out)
    assert metadata["format"] == "pt" and metadata[SPLIT_QKV_METADATA_KEY] == "fused_alpha_x_splits"


@pytest.mark.parametrize("alpha, rank, down_factor, up_factor", [
    (1.0, 16, 0.25, 0.25),  # scale 1/16: halved into down and doubled out of up until they balance
    (1.0, 4, 0.5, 0.5),
    (2.0, 16, 0.25, 0.5),  # scale 1/8: balance is not reached exactly; down keeps the smaller share
    (16.0, 16, 1.0, 1.0),
    (32.0, 16, 2.0, 1.0),  # a scale above 1 stays on down
    (-1.0, 16, -0.25, 0.25),  # a negative scale is split by its size, its sign on down (sd-scripts hangs)
    (-32.0, 16, -2.0, 1.0),
])  # fmt: skip
def test_the_scale_is_split_between_a_and_b_as_sd_scripts_splits_it(alpha, rank, down_factor, up_factor):
    """Their product is what matters to a loader, but the split is what sd-scripts writes: files compare equal."""
    down, up = torch.randn(rank, 8), torch.randn(8, rank)
    name = "lora_unet_double_blocks_0_img_attn_proj"
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    out = to_ai_toolkit(sd).state_dict
    part = "transformer.transformer_blocks.0.attn.to_out.0"
    assert torch.equal(out[f"{part}.lora_A.weight"], down * down_factor)
    assert torch.equal(out[f"{part}.lora_B.weight"], up * up_factor)


def test_negative_alpha_modules_convert_both_ways_with_their_weight_change(tmp_path):
    """A negative alpha (a LoRA that subtracts) made the conversion loop forever; plain and fused modules,
    split_qkv-style and plain on the fused Linear, keep delta W = alpha / rank * up @ down, sign included."""
    g = torch.Generator().manual_seed(4)
    h, r = 16, 4
    shapes = {"lora_unet_double_blocks_0_img_attn_proj": (h, h, r, -2.0),
              "lora_unet_double_blocks_0_img_attn_qkv": (h, 3 * h, 3 * r, -3.0),  # block-diagonal up
              "lora_unet_single_blocks_0_linear1": (h, 3 * h + 4 * h, r, -0.5),  # plain LoRA on the fused Linear
              "lora_unet_final_layer_adaLN_modulation_1": (h, 2 * h, r, -8.0)}  # fmt: skip
    sd = {}
    for name, (in_features, out_features, rank, alpha) in shapes.items():
        up = torch.randn(out_features, rank, generator=g)
        if name.endswith("qkv"):
            up = torch.block_diag(*(torch.randn(h, r, generator=g) for _ in range(3)))
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.randn(rank, in_features, generator=g), up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    src, ait, back = (tmp_path / f"{n}.safetensors" for n in ("src", "ait", "back"))
    save_safetensors(sd, src)
    assert convert("sd-scripts", "ai-toolkit", src, ait) == 0
    assert convert("ai-toolkit", "sd-scripts", ait, back) == 0
    assert_same_changes(deltas(sd), deltas(load_safetensors(back)))
    converted = load_safetensors(ait)
    a, b = (converted[f"transformer.transformer_blocks.0.attn.to_out.0.lora_{x}.weight"].double() for x in "AB")
    torch.testing.assert_close(b @ a, deltas(sd)["lora_unet_double_blocks_0_img_attn_proj"])
    to_k = [converted[f"transformer.transformer_blocks.0.attn.to_k.lora_{x}.weight"].double() for x in "AB"]
    torch.testing.assert_close(to_k[1] @ to_k[0], deltas(sd)["lora_unet_double_blocks_0_img_attn_qkv"][h : 2 * h])


def test_diffusers_lora_alpha_metadata_is_honoured():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    sd = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": a,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": b}  # fmt: skip
    peft = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {}}
    converted = to_sd_scripts(sd, {"lora_adapter_metadata": json.dumps(peft)}).state_dict
    assert deltas(converted)["lora_unet_double_blocks_0_img_attn_proj"].allclose(2 * (b @ a).double())

    # overlapping alpha patterns: the first that matches wins, as in peft
    peft["transformer.alpha_pattern"] = {"to_out.0": 4, "attn.to_out.0": 12}
    converted = to_sd_scripts(sd, {"lora_adapter_metadata": json.dumps(peft)}).state_dict
    assert deltas(converted)["lora_unet_double_blocks_0_img_attn_proj"].allclose((b @ a).double())



@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer.", ""])
def test_peft_files_with_bfl_module_names_read_as_sd_scripts_modules(prefix):
    """ComfyUI-style peft files name BFL's own modules: their weights already have sd-scripts' layout
    (fused q, k, v; the final modulation's halves in BFL's order), so only the names change."""
    g = torch.Generator().manual_seed(3)
    modules = {"double_blocks.0.img_attn.qkv": (24, 8), "single_blocks.1.linear1": (40, 8),
               "final_layer.adaLN_modulation.1": (16, 8), "img_in": (8, 6)}  # fmt: skip
    sd, expected = {}, {}
    for module, (out_features, in_features) in modules.items():
        down, up = torch.randn(4, in_features, generator=g), torch.randn(out_features, 4, generator=g)
        sd[f"{prefix}{module}.lora_A.weight"], sd[f"{prefix}{module}.lora_B.weight"] = down, up
        expected["lora_unet_" + module.replace(".", "_")] = up.double() @ down.double()
    sd[f"{prefix}img_in.alpha"] = torch.tensor(2.0)
    expected["lora_unet_img_in"] *= 0.5
    converted = to_sd_scripts(sd)
    assert converted.unsupported == [] and deltas(converted.state_dict).keys() == expected.keys()
    for name, delta in deltas(converted.state_dict).items():
        torch.testing.assert_close(delta, expected[name], msg=name)



def test_bare_diffusers_names_of_whole_modules_are_read():
    sd = {"x_embedder.lora_A.weight": torch.ones(4, 6), "x_embedder.lora_B.weight": torch.ones(8, 4)}
    converted = to_sd_scripts(sd)
    assert converted.unsupported == [] and set(deltas(converted.state_dict)) == {"lora_unet_img_in"}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"lora_unet_img_in.dora_scale": torch.ones(1, 6)}, "DoRA (dora_scale keys) files are not supported"),
        ({"transformer.x_embedder.lora_magnitude_vector": torch.ones(8)},
         "DoRA (peft's lora_magnitude_vector keys) files are not supported"),
        ({"lora_unet_txt_in.lokr_w1": torch.ones(2, 2)}, "LoKr (lokr_* keys) files are not supported"),
        ({"lora_unet_txt_in.hada_w1_a": torch.ones(2, 2)}, "LoHa (hada_* keys) files are not supported"),
    ],
)
def test_other_adapters_beside_lora_modules_are_refused(extra, message):
    from library.errors import UserError

    lora = {"lora_unet_img_in.lora_down.weight": torch.ones(4, 6), "lora_unet_img_in.lora_up.weight": torch.ones(8, 4)}
    with pytest.raises(UserError, match=re.escape(f"mixed.safetensors: {message}")):
        to_sd_scripts({**lora, **extra}, source="mixed.safetensors")
    # as --network_weights or --base_weights
    with pytest.raises(UserError, match=re.escape(f"mixed.safetensors: {message}")):
        create_network_from_weights(1.0, "mixed.safetensors", None, [None, None], None, weights_sd={**lora, **extra})


def test_a_peft_file_of_no_flux_module_is_refused():
    from library.errors import UserError

    sd = {"base_model.model.unet.down.0.lora_A.weight": torch.ones(4, 6),
          "base_model.model.unet.down.0.lora_B.weight": torch.ones(8, 4)}  # fmt: skip
    with pytest.raises(UserError, match="sdxl.safetensors: none of its 1 LoRA modules .* is a FLUX.1 / Chroma module"):
        to_sd_scripts(sd, source="sdxl.safetensors")


def test_plain_lora_on_a_fused_linear_comes_back_in_its_shape():
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g)
    copies = {"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": torch.cat([down] * 3),
              "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": torch.block_diag(*up.split(8)),
              "lora_unet_double_blocks_0_txt_attn_qkv.alpha": torch.tensor(12.0)}  # fmt: skip
    restored = merge_identical_downs(dict(copies))
    assert restored["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape == (4, 8)
    torch.testing.assert_close(deltas(restored)["lora_unet_double_blocks_0_txt_attn_qkv"], up.double() @ down.double())


@pytest.mark.parametrize("split", ["False", "True"])
def test_converted_file_gives_our_output_in_diffusers_at_tiny_width(tmp_path, split):
    pytest.importorskip("peft")
    params = tiny_flux_params()
    ours = random_model(params, seed=6)
    reference = diffusers_flux(params, 2, 2)
    reference.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)
    x = dit_inputs(params, batch=1)
    x.pop("txt_attention_mask")
    network = create_network(1.0, 4, 2.0, None, [None, None], ours, in_dims="[2,2,2,2,2]", split_qkv=split)
    network.apply_to([None, None], ours)
    randomize_lora(network, seed=7, std=0.1)
    with torch.no_grad():
        expected = ours(**x)
    network.save_weights(tmp_path / "lora.safetensors", None, None)
    assert convert("sd-scripts", "diffusers", tmp_path / "lora.safetensors", tmp_path / "ait.safetensors") == 0
    reference.load_lora_adapter(load_safetensors(tmp_path / "ait.safetensors"), prefix="transformer")
    torch.testing.assert_close(run_diffusers(reference, x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    network.set_enabled(False)
    with torch.no_grad():
        assert (ours(**x) - expected).abs().max() > 1e-2 * expected.abs().max(), "the LoRA matters"


@pytest.mark.slow
def test_converted_file_loads_in_diffusers_at_full_width_and_matches_its_own_converter(models, tmp_path):  # noqa: F811
    """One double and one single block at hidden 3072, where diffusers' kohya converter works too."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from tests.test_lora_diffusers_interop import assert_same_output, run_ours
    from tests.test_lora_diffusers_interop import run_diffusers as run_reference

    ours, reference, x = models
    base = run_ours(ours, x)
    network = create_network(1.0, 4, 2.0, None, [None, None], ours, in_dims="[4,4,4,4,4]")
    network.apply_to([None, None], ours)
    randomize_lora(network, seed=3, std=0.05)
    try:
        expected = run_ours(ours, x)
        network.save_weights(tmp_path / "lora.safetensors", None, None)
        assert convert("sd-scripts", "ai-toolkit", tmp_path / "lora.safetensors", tmp_path / "ait.safetensors") == 0
        converted = load_safetensors(tmp_path / "ait.safetensors")
        reference.load_lora_adapter(converted, prefix="transformer", adapter_name="converted")
        assert_same_output(run_reference(reference, x), expected, base)
    finally:
        network.set_enabled(False)
        if "converted" in getattr(reference, "peft_config", {}):
            reference.delete_adapters("converted")

    theirs = _convert_kohya_flux_lora_to_diffusers(dict(load_safetensors(tmp_path / "lora.safetensors")))
    theirs = {(k if k.startswith("transformer.") else "transformer." + k): v for k, v in theirs.items()}
    modules = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert modules == {k.rsplit(".lora_", 1)[0] for k in theirs}
    g = torch.Generator().manual_seed(0)
    for module in sorted(modules):  # B @ A compared through a random projection (the full products are GBs)
        probe = torch.randn(converted[f"{module}.lora_A.weight"].shape[1], 8, generator=g, dtype=torch.float64)
        ours_, theirs_ = (sd[f"{module}.lora_B.weight"].double() @ (sd[f"{module}.lora_A.weight"].double() @ probe)
                          for sd in (converted, theirs))  # fmt: skip
        torch.testing.assert_close(ours_, theirs_, rtol=1e-5, atol=1e-8, msg=module)


def test_metadata_is_copied_and_hashes_recomputed(tmp_path):
    model = random_model(tiny_flux_params())
    original = write_lora(tmp_path / "lora.safetensors", model)
    source_metadata = read_metadata(original)
    out = tmp_path / "ait.safetensors"
    assert convert("sd-scripts", "ai-toolkit", original, out) == 0
    metadata = read_metadata(out)
    assert {k: v for k, v in metadata.items() if not k.startswith("sshs_")} == {
        k: v for k, v in source_metadata.items() if not k.startswith("sshs_")
    }
    assert metadata["sshs_model_hash"] != source_metadata["sshs_model_hash"]
    expected = precalculate_safetensors_hashes(load_safetensors(out), metadata)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path", "{ait}"],
         "is in ai-toolkit's format, not sd-scripts's: pass --src ai-toolkit"),
        (["--src", "diffusers", "--dst", "ai-toolkit", "--src_path", "{ait}"],
         "are the same format: nothing to convert"),
        (["--src_path", "{ae}"], "not a LoRA in sd-scripts' format"),
        (["--src_path", "{ait}", "--dst_path", "{ait}"], "is the source file"),
        (["--src_path", "{missing}"], "file not found"),
        (["--src_path", "{ait}", "--dst_path", "{tmp}"], "is a folder; give a file name"),
        (["--src_path", "{damaged}"], "damaged.safetensors: module transformer.proj_out is damaged"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line(tiny_model_files, tmp_path, capsys, args, message):
    ait = tmp_path / "ait.safetensors"
    save_safetensors({"transformer.proj_out.lora_A.weight": torch.zeros(1, 4),
                      "transformer.proj_out.lora_B.weight": torch.zeros(4, 1)}, ait)  # fmt: skip
    damaged = tmp_path / "damaged.safetensors"  # lora_B's rank is not lora_A's: it was converted as it was
    save_safetensors({"transformer.proj_out.lora_A.weight": torch.zeros(1, 4),
                      "transformer.proj_out.lora_B.weight": torch.zeros(4, 2)}, damaged)  # fmt: skip
    paths = {"ait": ait, "ae": tiny_model_files.ae, "missing": tmp_path / "missing.safetensors", "tmp": tmp_path,
             "damaged": damaged}  # fmt: skip
    args = [a.format(**paths) for a in args]
    if "--dst_path" not in args:
        args += ["--dst_path", str(tmp_path / "out.safetensors")]
    assert convert_flux_lora.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not (tmp_path / "out.safetensors").exists()


def test_the_source_file_under_another_spelling_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_safetensors({"transformer.proj_out.lora_A.weight": torch.ones(1, 4),
                      "transformer.proj_out.lora_B.weight": torch.ones(4, 1)}, "x.safetensors")  # fmt: skip
    before = (tmp_path / "x.safetensors").read_bytes()
    assert convert_flux_lora.main(["--src_path", "x.safetensors", "--dst_path", "./x.safetensors"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --dst_path ./x.safetensors is the source file: give another name (the source is kept)"
    assert (tmp_path / "x.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]
    # another name for the same file: a link here, a name in another case on Windows' and macOS' file systems
    os.link(tmp_path / "x.safetensors", tmp_path / "X.safetensors")
    assert convert_flux_lora.main(["--src_path", "x.safetensors", "--dst_path", "X.safetensors"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("is the source file: give another name "
                                                                     "(the source is kept)")  # fmt: skip


def test_a_missing_dst_path_is_one_error_line(tmp_path, capsys):
    ait = tmp_path / "ait.safetensors"
    save_safetensors({"transformer.proj_out.lora_A.weight": torch.ones(1, 4),
                      "transformer.proj_out.lora_B.weight": torch.ones(4, 1)}, ait)  # fmt: skip
    assert convert_flux_lora.main(["--src_path", str(ait)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error:")] == [
        "error: --src_path and --dst_path are required: the LoRA to convert and where to write it"
    ]
    assert os.listdir(tmp_path) == ["ait.safetensors"]


def test_a_failed_write_is_one_error_line(tmp_path, capsys, monkeypatch):
    import errno

    import library.safetensors_io

    out = tmp_path / "out.safetensors"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(library.safetensors_io, "save_safetensors", full_disk)
    ait = tmp_path / "ait.safetensors"
    save_safetensors({"transformer.proj_out.lora_A.weight": torch.ones(1, 4),
                      "transformer.proj_out.lora_B.weight": torch.ones(4, 1)}, ait)  # fmt: skip
    assert convert_flux_lora.main(["--src_path", str(ait), "--dst_path", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.strip().splitlines() if line.startswith("error:")] == [
        f"error: [Errno 28] No space left on device: '{out}'"
    ]
    assert not out.exists()


def test_peft_alpha_metadata_is_dropped_when_its_alphas_become_alpha_tensors(tmp_path):
    """sd-scripts output carries the alphas in .alpha tensors; a stale lora_adapter_metadata would
    tell a diffusers loader to scale them a second time."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    src = tmp_path / "peft.safetensors"
    peft = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {}}
    save_safetensors({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": a,
                      "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": b},
                     src, {"lora_adapter_metadata": json.dumps(peft), "format": "pt"})  # fmt: skip
    out = tmp_path / "sds.safetensors"
    assert convert("diffusers", "sd-scripts", src, out) == 0
    assert read_metadata(out) == {"format": "pt"}
    converted = load_safetensors(out)
    assert converted["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 8.0
    (delta,) = deltas(converted).values()
    torch.testing.assert_close(delta, 2 * b.double() @ a.double())


def test_both_script_paths_run_as_programs(tmp_path):
    model = random_model(tiny_flux_params())
    original = write_lora(tmp_path / "lora.safetensors", model)
    out = tmp_path / "ait.safetensors"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "convert_flux_lora.py"), "--src", "sd-scripts",
                           "--dst", "diffusers", "--src_path", original, "--dst_path", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert deltas(load_safetensors(original)).keys() == deltas(to_sd_scripts(load_safetensors(out)).state_dict).keys()
    failed = subprocess.run([sys.executable, os.path.join(ROOT, "networks", "convert_flux_lora.py"), "--src_path",
                             original, "--dst_path", str(tmp_path / "x.safetensors")],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    error = f"error: {original} is in sd-scripts's format, not ai-toolkit's: pass --src sd-scripts"
    assert failed.stderr.strip().splitlines()[-1] == error


def test_an_output_name_other_than_safetensors_is_warned_about(tmp_path, caplog):
    ait = tmp_path / "ait.safetensors"
    save_safetensors({"transformer.proj_out.lora_A.weight": torch.ones(1, 4),
                      "transformer.proj_out.lora_B.weight": torch.ones(4, 1)}, ait)  # fmt: skip
    out = tmp_path / "out.ckpt"
    with caplog.at_level("WARNING"):
        assert convert_flux_lora.main(["--src_path", str(ait), "--dst_path", str(out)]) == 0
    assert load_safetensors(out)["lora_unet_final_layer_linear.lora_up.weight"].shape == (4, 1)
    (record,) = [r for r in caplog.records if "whatever its name" in r.getMessage()]
    assert record.getMessage().startswith(f"--dst_path {out}: the file is written in safetensors format")


def test_converting_a_damaged_sd_scripts_lora_names_the_file(tmp_path, capsys):
    from networks import convert_flux_lora

    damaged = tmp_path / "damaged.safetensors"  # lora_up's rank is not lora_down's
    safetensors.torch.save_file({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 4),
                                 "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(4, 3)},
                                str(damaged))  # fmt: skip
    out = tmp_path / "out.safetensors"
    assert convert_flux_lora.main(["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path", str(damaged),
                                   "--dst_path", str(out)]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {damaged}: module lora_unet_final_layer_linear is damaged: its down is "
                              "(2, 4) and its up (4, 3)")  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("module, rows, message", [
    # linear1's parts were cut at 64, 64, 64 and the rest: 150 rows gave to_v 22 rows and proj_mlp none, exit 0
    ("single_blocks_0_linear1", 150, "its up has 150 rows, but a linear1 of input width 64 has more than 192 "
                                     "(q, k, v of 64 each and the MLP input)"),
    ("single_blocks_0_linear1", 192, "its up has 192 rows, but a linear1 of input width 64 has more than 192 "
                                     "(q, k, v of 64 each and the MLP input)"),
    ("double_blocks_0_img_attn_qkv", 100, "its up has 100 rows, but a q, k, v projection of input width 64 has "
                                          "192 (64 each)"),
])  # fmt: skip
def test_a_damaged_fused_module_stops_the_conversion_naming_file_and_module(tmp_path, capsys, module, rows, message):
    name = f"lora_unet_{module}"
    src, out = tmp_path / "bad.safetensors", tmp_path / "out.safetensors"
    save_safetensors({f"{name}.lora_down.weight": torch.randn(4, 64), f"{name}.lora_up.weight": torch.randn(rows, 4),
                      "lora_unet_img_in.lora_down.weight": torch.randn(4, 64),
                      "lora_unet_img_in.lora_up.weight": torch.randn(64, 4)}, src)  # fmt: skip
    assert convert("sd-scripts", "ai-toolkit", src, out) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {src}: module {name} is damaged: {message}"
    assert not out.exists()


@pytest.mark.parametrize("to_v, shapes", [
    ((64, 50), "to_v 64 -> 50"),  # written as a qkv of 178 rows, exit 0
    ((32, 64), "to_v 32 -> 64"),  # a RuntimeError from torch.cat
])  # fmt: skip
def test_damaged_parts_of_a_fused_module_stop_the_conversion_naming_file_and_module(tmp_path, capsys, to_v, shapes):
    attn = "transformer.single_transformer_blocks.0.attn"
    sd = {f"{attn}.{part}.lora_{ab}.weight": torch.randn(4, 64) if ab == "A" else torch.randn(64, 4)
          for part in ("to_q", "to_k") for ab in "AB"}  # fmt: skip
    sd[f"{attn}.to_v.lora_A.weight"] = torch.randn(4, to_v[0])
    sd[f"{attn}.to_v.lora_B.weight"] = torch.randn(to_v[1], 4)
    src, out = tmp_path / "bad.safetensors", tmp_path / "out.safetensors"
    save_safetensors(sd, src)
    assert convert("ai-toolkit", "sd-scripts", src, out) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {src}: module lora_unet_single_blocks_0_linear1 is damaged: its parts are {attn}.to_q 64 -> 64, "
        f"{attn}.to_k 64 -> 64, {attn}.{shapes} (inputs -> outputs), but they must share one input width and q, k, v "
        "must give out as many as they take in"
    )
    assert not out.exists()
