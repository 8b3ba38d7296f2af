"""OneTrainer's FLUX.1 LoRA files, in the key names its savers write (Nerogar/OneTrainer: modules/util/convert/
lora/convert_flux_lora.py, convert_clip.py, convert_t5.py, convert_lora_util.py): the OMI format (BFL module paths,
a fused projection's parts numbered, under lora_transformer. / lora_clip_l. / lora_t5., or transformer. / clip_l. /
t5. in later versions) and the legacy one (diffusers paths with "_", CLIP-L lora_te1_, T5 lora_te2_; Chroma's T5
lora_te_). Built here from the tables in those files, they merge into the model and convert as the change
they hold: each part's alpha / rank * up @ down, in its rows of the fused weight."""

import pytest
import torch

import convert_flux_lora
from library.lora_formats import to_sd_scripts
from library.safetensors_io import load_safetensors, save_safetensors
from tests.test_merge_lora import deltas, merge

# OMI module (BFL path, parts numbered) -> (weight in the BFL checkpoint, rows of it the module changes, the legacy
# name: diffusers' path with "_"); the tiny model is 64 wide with an MLP of 256; linear1 is q, k, v, MLP input
QKV, LINEAR1 = "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"
FINAL = "final_layer.adaLN_modulation.1.weight"
DIT = {
    "double_blocks.0.img_attn.qkv.0": (QKV, slice(0, 64), "transformer_blocks_0_attn_to_q"),
    "double_blocks.0.img_attn.qkv.1": (QKV, slice(64, 128), "transformer_blocks_0_attn_to_k"),
    "double_blocks.0.img_attn.qkv.2": (QKV, slice(128, 192), "transformer_blocks_0_attn_to_v"),
    "double_blocks.1.txt_attn.qkv.1": ("double_blocks.1.txt_attn.qkv.weight", slice(64, 128),  # k alone
                                       "transformer_blocks_1_attn_add_k_proj"),
    "single_blocks.0.linear1.0": (LINEAR1, slice(0, 64), "single_transformer_blocks_0_attn_to_q"),
    "single_blocks.0.linear1.2": (LINEAR1, slice(128, 192), "single_transformer_blocks_0_attn_to_v"),
    "single_blocks.0.linear1.3": (LINEAR1, slice(192, 448), "single_transformer_blocks_0_proj_mlp"),
    "single_blocks.1.linear2": ("single_blocks.1.linear2.weight", slice(None), "single_transformer_blocks_1_proj_out"),
    "double_blocks.1.img_mod.lin": ("double_blocks.1.img_mod.lin.weight", slice(None),
                                    "transformer_blocks_1_norm1_linear"),
    "img_in.proj": ("img_in.weight", slice(None), "x_embedder"),  # OMI's name of x_embedder
    # OMI keeps BFL's (shift, scale) order; diffusers' names hold (scale, shift)
    "final_layer.adaLN_modulation.1": (FINAL, slice(None), "norm_out_linear"),
}  # fmt: skip
CLIP = {"text_model.encoder.layers.1.self_attn.q_proj": "text_model.encoder.layers.1.self_attn.q_proj.weight"}
T5 = {"encoder.block.0.layer.1.DenseReluDense.wi_0": "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"}
# (DiT, CLIP-L, T5) prefixes; the legacy names join them to the module path with "_" for "."
SPELLINGS = {"omi": ("lora_transformer.", "lora_clip_l.", "lora_t5."), "omi_later": ("transformer.", "clip_l.", "t5."),
             "legacy": ("lora_transformer_", "lora_te1_", "lora_te2_"),
             "legacy_chroma_t5": ("lora_transformer_", "lora_te1_", "lora_te_")}  # fmt: skip


def _module(g, sd, key, weight, rows, alpha, swap_halves=False):
    out_features, in_features = weight[rows].shape
    down, up = torch.randn(4, in_features, generator=g), torch.randn(out_features, 4, generator=g) * 0.1
    sd[f"{key}.lora_down.weight"], sd[f"{key}.alpha"] = down, torch.tensor(alpha)
    sd[f"{key}.lora_up.weight"] = torch.cat(up.chunk(2)[::-1]) if swap_halves else up
    delta = torch.zeros_like(weight, dtype=torch.float64)
    delta[rows] = alpha / 4 * (up.double() @ down.double())
    return delta


def onetrainer_lora(files, spelling):
    """A OneTrainer file (alphas 1 to 8) and the change of every weight it touches, per checkpoint file."""
    g = torch.Generator().manual_seed(5)
    dit, clip, t5 = (load_safetensors(f) for f in (files.flux_dev, files.clip_l, files.t5xxl))
    (dit_prefix, clip_prefix, t5_prefix), legacy = SPELLINGS[spelling], spelling.startswith("legacy")
    name = (lambda module: module.replace(".", "_")) if legacy else (lambda module: module)  # noqa: E731
    sd, changes = {}, {"dit": {}, "clip": {}, "t5": {}}
    for i, (module, (weight, rows, legacy_name)) in enumerate(DIT.items()):
        key = dit_prefix + (legacy_name if legacy else module)
        delta = _module(g, sd, key, dit[weight], rows, float(1 + i % 8), legacy and legacy_name == "norm_out_linear")
        changes["dit"][weight] = changes["dit"].get(weight, 0) + delta
    for module, weight in CLIP.items():
        changes["clip"][weight] = _module(g, sd, clip_prefix + name(module), clip[weight], slice(None), 2.0)
    for module, weight in T5.items():
        changes["t5"][weight] = _module(g, sd, t5_prefix + name(module), t5[weight], slice(None), 8.0)
    return sd, changes


def assert_merged(files, tmp_path, lora, changes):
    """Merged into the DiT, CLIP-L and T5: each weight moved by its change, every other one kept."""
    out = {part: tmp_path / f"{part}_merged.safetensors" for part in changes}
    assert merge("--flux_model", files.flux_dev, "--save_to", out["dit"], "--clip_l", files.clip_l, "--clip_l_save_to",
                 out["clip"], "--t5xxl", files.t5xxl, "--t5xxl_save_to", out["t5"], "--models", lora) == 0  # fmt: skip
    for part, source in (("dit", files.flux_dev), ("clip", files.clip_l), ("t5", files.t5xxl)):
        before, after = load_safetensors(source), load_safetensors(out[part])
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert moved == set(changes[part]), part
        for key, delta in changes[part].items():
            torch.testing.assert_close(after[key].double() - before[key].double(), delta, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_onetrainer_files_merge_and_convert_with_every_module(tiny_model_files, tmp_path, spelling):
    """OMI's numbered parts (qkv.1, linear1.3), img_in.proj, lora_clip_l. and lora_t5. were no FLUX modules to the
    reader (the parts were left out, the rest of the file applied without them), and neither were the legacy
    names of T5 modules (lora_te2_ for FLUX.1, lora_te_ for Chroma, where sd-scripts says lora_te3_)."""
    sd, changes = onetrainer_lora(tiny_model_files, spelling)
    lora = tmp_path / "onetrainer.safetensors"
    save_safetensors(sd, lora)
    assert_merged(tiny_model_files, tmp_path, lora, changes)

    converted = to_sd_scripts(sd, source=str(lora))
    assert converted.unsupported == []
    assert sorted(deltas(converted.state_dict)) == [
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0",
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_img_mod_lin",
        "lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in",
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear2",
    ]  # fmt: skip
    # the converter writes the same changes in sd-scripts' format (its default --src reads the file)
    out = tmp_path / "sd_scripts.safetensors"
    assert convert_flux_lora.main(["--src_path", str(lora), "--dst_path", str(out)]) == 0
    written = deltas(load_safetensors(out))
    for name, part, weight in [
        ("lora_unet_single_blocks_0_linear1", "dit", LINEAR1),
        ("lora_unet_final_layer_adaLN_modulation_1", "dit", FINAL),
        ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", "t5", *T5.values()),
    ]:
        torch.testing.assert_close(written[name], changes[part][weight], atol=1e-6, rtol=1e-4, msg=name)


def test_sdxl_text_encoder_2_names_are_not_read_as_t5():
    """lora_te2_ is SDXL's CLIP-G too: only T5's own module paths (encoder_block_) are respelled."""
    name = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    sd = {f"{name}.lora_down.weight": torch.ones(4, 8), f"{name}.lora_up.weight": torch.ones(8, 4),
          "transformer.x_embedder.lora_A.weight": torch.ones(4, 64),
          "transformer.x_embedder.lora_B.weight": torch.ones(64, 4)}  # fmt: skip
    assert set(to_sd_scripts(sd).state_dict) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight",
                                                 "lora_unet_img_in.lora_down.weight", "lora_unet_img_in.lora_up.weight",
                                                 "lora_unet_img_in.alpha"}  # fmt: skip
