"""Edges of LoRA key-format detection and conversion (library/lora_names.py, library/lora_formats.py) that the
other LoRA tests leave open, found by a mutation round: the exact names of every CLIP-L module and of bare BFL
module paths, block indices past 9, OneTrainer's T5 modules and numbered parts it cannot have, peft metadata
precedence and pattern anchoring, the MLP width a linear1 gets, dtypes, the split of the scale on fused
modules, and merge_identical_downs keeping every weight change."""

import json
import re

import pytest
import torch

from library.errors import UserError
from library.lora_formats import (
    LoRAWeights,
    canonical_format,
    formats_in,
    merge_identical_downs,
    to_ai_toolkit,
    to_sd_scripts,
)
from library.lora_names import (
    ai_toolkit_to_sd_scripts_name,
    ait_module_name,
    respelled_key,
    sd_scripts_to_ai_toolkit_names,
)
from library.safetensors_io import load_safetensors, save_safetensors


def _rand(g, *shape):
    return torch.randn(*shape, generator=g)


def _delta(sd, name):
    """An sd-scripts module's weight change, alpha / rank * up @ down (alpha 0 or none: scale 1)."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else 0.0
    return up @ down * (alpha / down.shape[0] if alpha else 1.0)


# ---- names --------------------------------------------------------------------------------

# transformers' CLIPTextModel module paths (CLIPEncoderLayer: self_attn.{q,k,v,out}_proj, mlp.fc1 / fc2)
CLIP_NAMES = {
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
}


@pytest.mark.parametrize("sds, path", list(CLIP_NAMES.items()))
def test_every_clip_l_module_has_its_transformers_name_both_ways(sds, path):
    name, module = f"lora_te1_text_model_encoder_layers_11_{sds}", f"text_encoder.text_model.encoder.layers.11.{path}"
    assert sd_scripts_to_ai_toolkit_names(name) == (module,)
    assert ai_toolkit_to_sd_scripts_name(module) == (name, 0, 1)
    g = torch.Generator().manual_seed(0)
    down, up = _rand(g, 4, 8), _rand(g, 8, 4)
    out = to_ai_toolkit({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    assert set(out.state_dict) == {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} and out.unsupported == []


def test_a_clip_l_module_no_lora_targets_is_listed_not_a_crash():
    sd = {
        "lora_te1_text_model_encoder_layers_0_layer_norm1.lora_down.weight": torch.ones(4, 8),
        "lora_te1_text_model_encoder_layers_0_layer_norm1.lora_up.weight": torch.ones(8, 4),
        "lora_unet_img_in.lora_down.weight": torch.ones(4, 8),
        "lora_unet_img_in.lora_up.weight": torch.ones(8, 4),
    }
    assert sd_scripts_to_ai_toolkit_names("lora_te1_text_model_encoder_layers_0_layer_norm1") is None
    converted = to_ai_toolkit(sd)
    assert converted.unsupported == ["lora_te1_text_model_encoder_layers_0_layer_norm1"]
    assert set(converted.state_dict) == {"transformer.x_embedder.lora_A.weight", "transformer.x_embedder.lora_B.weight"}


@pytest.mark.parametrize("sds, module", [
    ("lora_unet_double_blocks_18_img_attn_proj", "transformer.transformer_blocks.18.attn.to_out.0"),
    ("lora_unet_single_blocks_37_linear2", "transformer.single_transformer_blocks.37.proj_out"),
])  # fmt: skip
def test_block_indices_past_9_convert_in_every_naming(sds, module):
    """FLUX.1 has 19 double and 38 single blocks: diffusers' and OneTrainer's names of blocks 10 on."""
    assert ai_toolkit_to_sd_scripts_name(module) == (sds, 0, 1)
    onetrainer = "lora_transformer_" + module.removeprefix("transformer.").replace(".", "_")
    assert respelled_key(f"{onetrainer}.lora_down.weight") == f"{module}.lora_A.weight"
    g = torch.Generator().manual_seed(1)
    sd = {f"{module}.lora_A.weight": _rand(g, 4, 8), f"{module}.lora_B.weight": _rand(g, 8, 4)}
    converted = to_sd_scripts(sd)
    assert set(converted.state_dict) == {f"{sds}.lora_down.weight", f"{sds}.lora_up.weight", f"{sds}.alpha"}
    assert converted.unsupported == []


@pytest.mark.parametrize("bfl, sds", [
    ("txt_in", "lora_unet_txt_in"),
    ("time_in.in_layer", "lora_unet_time_in_in_layer"),
    ("vector_in.out_layer", "lora_unet_vector_in_out_layer"),
    ("guidance_in.in_layer", "lora_unet_guidance_in_in_layer"),
    ("final_layer.linear", "lora_unet_final_layer_linear"),
])  # fmt: skip
def test_bare_bfl_paths_of_conditioning_and_final_layers_are_read(bfl, sds):
    """ComfyUI-style peft files with no component prefix name BFL's modules as they are."""
    assert ait_module_name(bfl) == f"transformer.{bfl}"
    g = torch.Generator().manual_seed(2)
    down, up = _rand(g, 4, 8), _rand(g, 16, 4)
    converted = to_sd_scripts({f"{bfl}.lora_A.weight": down, f"{bfl}.lora_B.weight": up})
    assert converted.unsupported == []
    assert set(converted.state_dict) == {f"{sds}.lora_down.weight", f"{sds}.lora_up.weight", f"{sds}.alpha"}
    assert torch.equal(converted.state_dict[f"{sds}.lora_up.weight"], up)


# ---- OneTrainer's names ---------------------------------------------------------------------

T5_MODULES = ["0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v", "0.SelfAttention.o",
              "1.DenseReluDense.wi_0", "1.DenseReluDense.wi_1", "1.DenseReluDense.wo"]  # fmt: skip


@pytest.mark.parametrize("prefix", ["lora_t5.", "t5."])
@pytest.mark.parametrize("module", T5_MODULES)
def test_every_t5_module_in_onetrainers_omi_names_is_an_sd_scripts_te3_module(prefix, module):
    name = "lora_te3_encoder_block_3_layer_" + module.replace(".", "_")
    for suffix, expected in ((".lora_down.weight", ".lora_down.weight"), (".lora_A.weight", ".lora_down.weight"),
                             (".lora_up.weight", ".lora_up.weight"), (".lora_B.weight", ".lora_up.weight"),
                             (".alpha", ".alpha")):  # fmt: skip
        assert respelled_key(f"{prefix}encoder.block.3.layer.{module}{suffix}") == name + expected


@pytest.mark.parametrize("key", [
    "t5.shared.lora_A.weight",  # T5's embedding: no module a LoRA targets
    "lora_t5.encoder.final_layer_norm.lora_down.weight",
    "lora_transformer.double_blocks.0.img_attn.qkv.3.lora_down.weight",  # q, k, v are parts 0 to 2
    "lora_transformer.single_blocks.2.linear1.4.lora_up.weight",  # q, k, v, MLP input are 0 to 3
    "lora_transformer_transformer_blocks_0_attn_norm_q.lora_down.weight",  # an RMSNorm, not a Linear
])  # fmt: skip
def test_names_of_modules_no_flux_lora_has_keep_their_own_keys(key):
    """They are listed as left out under the name the file gives them (a crash or a made-up name before)."""
    assert respelled_key(key) == key
    sd = {
        key: torch.ones(4, 8) if "down" in key or "lora_A" in key else torch.ones(8, 4),
        "transformer.x_embedder.lora_A.weight": torch.ones(4, 8),
        "transformer.x_embedder.lora_B.weight": torch.ones(8, 4),
    }
    assert to_sd_scripts(sd).unsupported == [key]


def test_numbered_parts_of_onetrainers_fused_modules_are_diffusers_parts():
    assert respelled_key("lora_transformer.single_blocks.2.linear1.3.lora_down.weight") == (
        "transformer.single_transformer_blocks.2.proj_mlp.lora_A.weight"
    )
    assert respelled_key("transformer.double_blocks.1.txt_attn.qkv.2.lora_up.weight") == (
        "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight"
    )


# ---- detection and refusals -------------------------------------------------------------------


def test_format_names_and_aliases():
    assert [canonical_format(n) for n in ("diffusers", "ai-toolkit", "sd-scripts")] == [
        "ai-toolkit", "ai-toolkit", "sd-scripts"]  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("unknown LoRA format 'kohya': expected one of diffusers, "
                                                   "ai-toolkit, sd-scripts")):  # fmt: skip
        canonical_format("kohya")


def test_a_file_of_no_lora_is_named_by_its_first_three_keys():
    with pytest.raises(UserError) as e:
        formats_in(["a.weight", "b.weight", "c.weight", "d.weight"], "x.safetensors")
    assert str(e.value).endswith("its first keys are: a.weight, b.weight, c.weight")


def test_a_one_dimensional_down_is_a_damaged_module():
    sd = {"lora_unet_img_in.lora_down.weight": torch.ones(4), "lora_unet_img_in.lora_up.weight": torch.ones(8, 4)}
    with pytest.raises(UserError, match=re.escape("f.safetensors: module lora_unet_img_in is damaged: its down is "
                                                  "(4,) and its up (8, 4), so their ranks disagree")):  # fmt: skip
        to_ai_toolkit(sd, source="f.safetensors")


def test_a_down_without_its_up_is_listed_as_left_out():
    sd = {
        "lora_unet_img_in.lora_down.weight": torch.ones(4, 8),
        "lora_unet_txt_in.lora_down.weight": torch.ones(4, 8),
        "lora_unet_txt_in.lora_up.weight": torch.ones(8, 4),
    }
    converted = to_ai_toolkit(sd)
    assert converted.unsupported == ["lora_unet_img_in.lora_down.weight"]
    assert set(converted.state_dict) == {"transformer.context_embedder.lora_A.weight",
                                         "transformer.context_embedder.lora_B.weight"}  # fmt: skip


def test_a_lora_a_without_its_lora_b_is_named_as_incomplete():
    sd = {"transformer.x_embedder.lora_A.weight": torch.ones(4, 8), "transformer.zz.lora_A.weight": torch.ones(4, 8)}
    with pytest.raises(UserError) as e:
        to_sd_scripts(sd, source="half.safetensors")
    assert str(e.value) == (
        "half.safetensors: transformer.x_embedder.lora_A.weight has no lora_B beside it; the file is incomplete"
    )


def test_converting_into_a_files_own_format_says_which_it_is():
    sds = {"lora_unet_img_in.lora_down.weight": torch.ones(4, 8), "lora_unet_img_in.lora_up.weight": torch.ones(8, 4)}
    ait = {
        "transformer.x_embedder.lora_A.weight": torch.ones(4, 8),
        "transformer.x_embedder.lora_B.weight": torch.ones(8, 4),
    }
    assert to_sd_scripts(sds).source_format == "sd-scripts" and to_sd_scripts(sds).state_dict.keys() == sds.keys()
    assert to_ai_toolkit(ait).source_format == "ai-toolkit" and to_ai_toolkit(ait).state_dict.keys() == ait.keys()


def test_left_out_modules_are_listed_sorted_both_ways():
    ones = {"A": torch.ones(4, 8), "B": torch.ones(8, 4)}
    ait = {f"transformer.{m}.lora_{ab}.weight": ones[ab] for m in ("zz", "x_embedder", "aa") for ab in "AB"}
    assert to_sd_scripts(ait).unsupported == ["transformer.aa", "transformer.zz"]
    sds = {f"lora_unet_{m}.lora_{d}.weight": ones["A" if d == "down" else "B"]
           for m in ("zz", "img_in", "aa") for d in ("down", "up")}  # fmt: skip
    assert to_ai_toolkit(sds).unsupported == ["lora_unet_aa", "lora_unet_zz"]


# ---- alphas -------------------------------------------------------------------------------------


def test_an_alpha_of_zero_means_scale_one_as_in_sd_scripts():
    """sd-scripts' LoRAModule: ``alpha = lora_dim if alpha is None or alpha == 0``."""
    g = torch.Generator().manual_seed(3)
    down, up = _rand(g, 4, 8), _rand(g, 8, 4)
    assert LoRAWeights(down, up, 0.0).scale == 1.0
    assert torch.equal(LoRAWeights(down, up, 0.0).delta(), up @ down)
    assert torch.equal(LoRAWeights(down, up, 2.0).delta(), (up @ down) * 0.5)
    name = "lora_unet_double_blocks_0_img_attn_proj"
    out = to_ai_toolkit({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                         f"{name}.alpha": torch.tensor(0.0)}).state_dict  # fmt: skip
    assert torch.equal(out["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"], down)
    assert torch.equal(out["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"], up)


def _to_out_alpha(metadata, extra=None):
    sd = {
        "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.ones(4, 8),
        "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.ones(8, 4),
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": torch.ones(4, 8),
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": torch.ones(32, 4),
        **(extra or {}),
    }
    out = to_sd_scripts(sd, {"lora_adapter_metadata": metadata}).state_dict
    return (out["lora_unet_double_blocks_0_img_attn_proj.alpha"].item(),
            out["lora_unet_double_blocks_0_img_mlp_0.alpha"].item())  # fmt: skip


def test_peft_metadata_precedence_and_pattern_anchoring():
    # no JSON: ignored (alpha = rank, scale 1)
    assert _to_out_alpha("{not json") == (4.0, 4.0)
    # a pipeline file's transformer.* entries come before the plain ones
    assert _to_out_alpha(json.dumps({"lora_alpha": 2, "transformer.lora_alpha": 8})) == (8.0, 8.0)
    # an .alpha tensor in the file comes before the metadata
    assert _to_out_alpha(
        json.dumps({"lora_alpha": 8}), {"transformer.transformer_blocks.0.attn.to_out.0.alpha": torch.tensor(2.0)}
    ) == (2.0, 8.0)
    # peft's get_pattern_key: re.match(rf"(.*\.)?({pattern})$", path): whole trailing segments only
    pattern = {"lora_alpha": 8, "alpha_pattern": {"ff.net.0": 16, "attn.to_out.0": 12}}
    assert _to_out_alpha(json.dumps(pattern)) == (12.0, 8.0)


# ---- fusing into qkv / linear1 --------------------------------------------------------------------

H, MLP = 16, 32
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")


@pytest.mark.parametrize("module, shapes, mlp", [
    ("transformer.transformer_blocks.0.ff_context.net.0.proj", ((4, H), (MLP, 4)), MLP),
    ("transformer.transformer_blocks.0.ff.net.2", ((4, MLP), (H, 4)), MLP),
    ("transformer.single_transformer_blocks.1.proj_out", ((4, H + MLP), (H, 4)), MLP),
    ("transformer.proj_out", ((4, H), (8, 4)), 4 * H),  # the final layer says nothing of the MLP
    (None, None, 4 * H),  # no MLP module at all: FLUX's ratio of 4
])  # fmt: skip
def test_a_linear1_without_proj_mlp_gets_the_mlp_width_the_file_shows(module, shapes, mlp):
    g = torch.Generator().manual_seed(4)
    sd = {}
    for part in QKV:
        sd[f"transformer.single_transformer_blocks.0.{part}.lora_A.weight"] = _rand(g, 4, H)
        sd[f"transformer.single_transformer_blocks.0.{part}.lora_B.weight"] = _rand(g, H, 4)
    if module:
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = _rand(g, *shapes[0]), _rand(g, *shapes[1])
    out = to_sd_scripts(sd).state_dict
    assert out["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * H + mlp, 12)


def test_parts_fuse_in_q_k_v_order_whatever_the_files_order():
    g = torch.Generator().manual_seed(5)
    parts = {p: (_rand(g, 2, H), _rand(g, H, 2)) for p in QKV}
    sd = {}
    for p in reversed(QKV):
        sd[f"transformer.transformer_blocks.0.{p}.lora_A.weight"] = parts[p][0]
        sd[f"transformer.transformer_blocks.0.{p}.lora_B.weight"] = parts[p][1]
    out = to_sd_scripts(sd).state_dict
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert torch.equal(out[f"{name}.lora_down.weight"], torch.cat([parts[p][0] for p in QKV]))
    assert torch.equal(out[f"{name}.lora_up.weight"], torch.block_diag(*(parts[p][1] for p in QKV)))


def test_half_precision_files_keep_their_dtype_both_ways():
    g = torch.Generator().manual_seed(6)
    sd = {}
    for part in QKV:
        sd[f"transformer.transformer_blocks.0.{part}.lora_A.weight"] = _rand(g, 4, H).bfloat16()
        sd[f"transformer.transformer_blocks.0.{part}.lora_B.weight"] = _rand(g, H, 4).bfloat16()
        sd[f"transformer.transformer_blocks.0.{part}.alpha"] = torch.tensor(1.0)  # scaled into the fused up
    sds = to_sd_scripts(sd).state_dict
    assert {sds[k].dtype for k in sds if not k.endswith(".alpha")} == {torch.bfloat16}
    name = "lora_unet_double_blocks_0_img_attn_proj"
    plain = {
        f"{name}.lora_down.weight": _rand(g, 4, H).bfloat16(),
        f"{name}.lora_up.weight": _rand(g, H, 4).bfloat16(),
        f"{name}.alpha": torch.tensor(1.0),
    }  # scale 1/4, folded into both
    assert {v.dtype for v in to_ai_toolkit(plain).state_dict.values()} == {torch.bfloat16}


# ---- splitting qkv / linear1 ----------------------------------------------------------------------


def _split_qkv(g, alpha=0.75, ranks=(4, 4, 4)):
    """A split_qkv-style sd-scripts qkv module: a rank per part, block-diagonal up (a part of rank 0: zero rows)."""
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    up = torch.block_diag(*(_rand(g, H, r) if r else torch.zeros(H, 0) for r in ranks))
    sd = {
        f"{name}.lora_down.weight": _rand(g, sum(ranks), H),
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(alpha),
    }
    return name, sd


def test_a_qkv_module_with_more_rows_than_q_k_v_is_damaged():
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    sd = {f"{name}.lora_down.weight": torch.ones(4, H), f"{name}.lora_up.weight": torch.ones(3 * H + 1, 4)}
    with pytest.raises(UserError) as e:
        to_ai_toolkit(sd, source="q.safetensors")
    assert str(e.value) == (
        f"q.safetensors: module {name} is damaged: its up has {3 * H + 1} rows, but a q, k, v projection of input "
        f"width {H} has {3 * H} ({H} each)"
    )


def test_a_fused_modules_scale_is_split_as_sd_scripts_splits_it():
    """alpha / rank = 0.75 / 12 = 1/16: a quarter on each part's A and B, as for a plain module."""
    name, sd = _split_qkv(torch.Generator().manual_seed(7))
    out = to_ai_toolkit(sd).state_dict
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    for i, part in enumerate(QKV):
        prefix = f"transformer.transformer_blocks.0.{part}"
        assert torch.equal(out[f"{prefix}.lora_A.weight"], down[4 * i : 4 * i + 4] * 0.25)
        assert torch.equal(out[f"{prefix}.lora_B.weight"], up[H * i : H * i + H, 4 * i : 4 * i + 4] * 0.25)


def test_a_part_with_no_ranks_of_its_own_is_left_out():
    """q and v of rank 4, k of none (its rows of up all zero): no empty to_k module is written."""
    name, sd = _split_qkv(torch.Generator().manual_seed(8), alpha=8.0, ranks=(4, 0, 4))
    out = to_ai_toolkit(sd).state_dict
    assert set(out) == {f"transformer.transformer_blocks.0.{p}.lora_{ab}.weight"
                        for p in ("attn.to_q", "attn.to_v") for ab in "AB"}  # fmt: skip
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    assert torch.equal(out["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"], down[4:])
    assert torch.equal(out["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"], up[2 * H :, 4:])


def test_split_parts_are_written_to_a_file_as_tensors_of_their_own(tmp_path):
    """safetensors refuses tensors that share memory: each part is a copy, not a view of the fused module."""
    g = torch.Generator().manual_seed(9)
    name = "lora_unet_single_blocks_0_linear1"  # a plain LoRA on the fused Linear: every part gets the whole down
    plain = {f"{name}.lora_down.weight": _rand(g, 4, H), f"{name}.lora_up.weight": _rand(g, 3 * H + MLP, 4)}
    for sd in (plain, _split_qkv(g, alpha=12.0)[1]):  # scale 1: nothing is copied by scaling
        out = to_ai_toolkit(sd).state_dict
        source = sd[next(k for k in sd if k.endswith("lora_down.weight"))].untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() != source for t in out.values())  # no view of the input
        save_safetensors(out, tmp_path / "parts.safetensors")
        back = load_safetensors(tmp_path / "parts.safetensors")
        assert back.keys() == out.keys() and all(torch.equal(back[k], out[k]) for k in out)


# ---- merge_identical_downs --------------------------------------------------------------------------


def _copies(down, up, alpha):
    name = "lora_unet_double_blocks_0_txt_attn_qkv"
    return name, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}


def test_merged_downs_keep_the_files_alpha():
    """Three copies of a rank-4 down with alpha 6 (scale 6 / 12): rank 4 with alpha 2 keeps the change."""
    g = torch.Generator().manual_seed(10)
    down = _rand(g, 4, H)
    name, sd = _copies(torch.cat([down] * 3), torch.block_diag(*(_rand(g, H, 4) for _ in range(3))), 6.0)
    expected = _delta(sd, name)
    merged = merge_identical_downs(dict(sd))
    assert merged[f"{name}.lora_down.weight"].shape == (4, H) and merged[f"{name}.alpha"].item() == 2.0
    torch.testing.assert_close(_delta(merged, name), expected)


def test_downs_that_differ_slightly_are_not_merged():
    g = torch.Generator().manual_seed(11)
    down = _rand(g, 4, H)
    name, sd = _copies(
        torch.cat([down, down + 1e-4, down]), torch.block_diag(*(_rand(g, H, 4) for _ in range(3))), 12.0
    )
    merged = merge_identical_downs(dict(sd))
    assert all(torch.equal(merged[k], sd[k]) for k in sd)


def test_blocks_of_other_widths_or_overlapping_columns_are_kept_as_they_are():
    """Copied downs (d, d, d of rank 2) under an up whose blocks are not one rank-2 block each: merging them
    would crash (widths 3, 1, 2) or change the weight (k's columns 1-2 hold d's rows 1, 0, not 0, 1)."""
    g = torch.Generator().manual_seed(12)
    d = _rand(g, 2, H)
    for columns in ((range(0, 3), range(3, 4), range(4, 6)), (range(0, 2), range(1, 3), range(4, 6))):
        up = torch.zeros(3 * H, 6)
        for i, cols in enumerate(columns):
            up[i * H : (i + 1) * H, cols.start : cols.stop] = _rand(g, H, len(cols))
        name, sd = _copies(torch.cat([d] * 3), up, 6.0)
        expected = _delta(sd, name)
        merged = merge_identical_downs(dict(sd))
        torch.testing.assert_close(_delta(merged, name), expected)
        assert all(torch.equal(merged[k], sd[k]) for k in sd)
