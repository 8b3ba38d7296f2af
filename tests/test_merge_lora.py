"""networks/flux_merge_lora.py: LoRAs merged into the DiT / CLIP-L / T5 files give the outputs of the
LoRAs applied at run time; ai-toolkit LoRAs reach every block; merged LoRAs apply each ratio once."""

import json
import logging
import os
import struct

import pytest
import torch

import convert_flux_lora
from library.flux_key_mapping import bfl_to_diffusers
from library.flux_utils import load_flow_model
from library.safetensors_io import load_safetensors, read_header, read_metadata, save_safetensors
from library.text_encoders import load_clip_l, load_t5xxl
from library.tiny_models import random_model, tiny_flux_params, write_model
from library.tiny_text_encoders import write_tiny_t5
from networks import flux_merge_lora
from networks.lora_flux import create_network, create_network_from_weights
from tests.test_lora_math import assert_close_to, dit_inputs, randomize_lora


def write_lora(path, model, text_encoders=(None, None), dim=4, alpha=2.0, seed=1, std=0.1, **kwargs) -> str:
    """A LoRA file with random non-zero weights, saved as the trainer saves them."""
    network = create_network(1.0, dim, alpha, None, list(text_encoders), model, **kwargs)
    randomize_lora(network, seed, std)
    network.save_weights(path, None, {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"})
    return str(path)


def deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's weight change as any plain loader reads an sd-scripts file: alpha / rank * up @ down."""
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            alpha = sd[f"{name}.alpha"].float().item() if f"{name}.alpha" in sd else down.shape[0]
            out[name] = sd[f"{name}.lora_up.weight"].double() @ down.double() * (alpha / down.shape[0])
    return out


def merge(*args) -> int:
    return flux_merge_lora.main([str(a) for a in args])


def run(model, x):
    with torch.no_grad():
        return model(**x)


def test_merged_dit_equals_the_lora_applied_at_run_time(tiny_model_files, dev, tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", dev, in_dims="[2,2,2,2,2]")
    out = tmp_path / "merged.safetensors"
    assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", out, "--models", lora, "--ratios", 0.7) == 0

    x = dit_inputs(dev.params)
    base = run(dev, x)
    network, weights = create_network_from_weights(0.7, lora, None, [None, None], dev, for_inference=True)
    network.apply_to([None, None], dev)
    network.load_state_dict(weights)
    try:
        applied = run(dev, x)
    finally:
        network.set_enabled(False)
    _, merged = load_flow_model(str(out), torch.float32, "cpu")
    assert_close_to(run(merged, x), applied, base)

    metadata = read_metadata(out)
    assert metadata["modelspec.architecture"] == "flux-1-dev"
    assert metadata["modelspec.merged_from"] == "flux1-dev, a"
    assert metadata["modelspec.title"] == "merged"
    assert {v.dtype for v in load_safetensors(out).values()} == {torch.float32}  # save precision = merge precision


def test_save_precision_casts_every_float_tensor(tiny_model_files, dev, tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", dev)
    out = tmp_path / "merged_bf16.safetensors"
    argv = ["--flux_model", tiny_model_files.flux_dev, "--save_to", out, "--models", lora, "--save_precision", "bf16"]
    assert merge(*argv, "--no_metadata") == 0
    merged = load_safetensors(out)
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    assert not any(k.startswith("modelspec.") for k in read_metadata(out))
    base = load_safetensors(tiny_model_files.flux_dev)
    assert merged.keys() == base.keys()
    assert torch.equal(merged["final_layer.linear.weight"], base["final_layer.linear.weight"].bfloat16())


def test_precision_is_the_merge_arithmetics_dtype_and_the_default_save_dtype(tiny_model_files, dev, tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", dev, dim=4, alpha=2.0)
    out = tmp_path / "merged.safetensors"
    assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", out, "--models", lora, "--ratios", 0.5,
                 "--precision", "bf16") == 0  # fmt: skip
    merged = load_safetensors(out)
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    name, key = "lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj.weight"
    sd = load_safetensors(lora)
    up, down = (sd[f"{name}.lora_{w}.weight"].bfloat16() for w in ("up", "down"))
    base = load_safetensors(tiny_model_files.flux_dev)[key].bfloat16()
    assert torch.equal(merged[key], base + (up @ down) * (0.5 * 2.0 / 4))  # each step in bf16, as asked


def test_text_encoder_loras_merge_into_clip_l_and_t5(tiny_model_files, dev, tmp_path):
    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    t5 = load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")
    lora = write_lora(tmp_path / "te.safetensors", dev, [clip, t5], train_t5xxl="True", std=0.2)
    clip_out, t5_out = tmp_path / "clip_merged.safetensors", tmp_path / "t5_merged.safetensors"
    args = ["--clip_l", tiny_model_files.clip_l, "--clip_l_save_to", clip_out, "--t5xxl", tiny_model_files.t5xxl]
    assert merge(*args, "--t5xxl_save_to", t5_out, "--models", lora, "--ratios", 1.5) == 0

    ids = torch.tensor([[0, 5, 9, 17, 2, 1]])
    base = run(clip, {"input_ids": ids}).last_hidden_state, run(t5, {"input_ids": ids}).last_hidden_state
    network, weights = create_network_from_weights(1.5, lora, None, [clip, t5], dev, for_inference=True)
    network.apply_to([clip, t5], dev, apply_unet=False)
    network.load_state_dict(weights, strict=False)
    applied = run(clip, {"input_ids": ids}).last_hidden_state, run(t5, {"input_ids": ids}).last_hidden_state
    network.set_enabled(False)
    clip_merged = load_clip_l(str(clip_out), torch.float32, "cpu")
    t5_merged = load_t5xxl(str(t5_out), torch.float32, "cpu")
    merged = (
        run(clip_merged, {"input_ids": ids}).last_hidden_state,
        run(t5_merged, {"input_ids": ids}).last_hidden_state,
    )
    for m, a, b in zip(merged, applied, base, strict=True):
        assert_close_to(m, a, b)


def diffusers_flux(params, depth, depth_single):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=depth, num_single_layers=depth_single,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim, guidance_embeds=True,
        axes_dims_rope=tuple(params.axes_dim),
    ).eval()  # fmt: skip


def run_diffusers(model, x):
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"], return_dict=False)[0]  # fmt: skip


def test_ai_toolkit_lora_merges_into_all_19_double_blocks(tmp_path):
    """The reference is diffusers + peft applying the same file at run time (sd-scripts misses block 18)."""
    pytest.importorskip("peft")
    params = tiny_flux_params(depth=19, depth_single=38)
    ours = random_model(params, seed=4)
    base_file = write_model(ours, str(tmp_path / "deep.safetensors"))
    reference = diffusers_flux(params, 19, 38)
    reference.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and "_blocks." in name:
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    assert sum(".transformer_blocks.18.attn.to_q." in k for k in lora) == 2
    lora_file = str(tmp_path / "ai_toolkit.safetensors")
    save_safetensors(lora, lora_file)
    out = tmp_path / "merged.safetensors"
    assert merge("--flux_model", base_file, "--save_to", out, "--models", lora_file, "--ratios", 0.6) == 0

    x = dit_inputs(params, batch=1)
    x.pop("txt_attention_mask")
    base = run(ours, x)
    reference.load_lora_adapter({k: v * (0.6 if ".lora_B." in k else 1.0) for k, v in lora.items()},
                                prefix="transformer", adapter_name="ait")  # fmt: skip
    _, merged = load_flow_model(str(out), torch.float32, "cpu")
    assert_close_to(run(merged, x), run_diffusers(reference, x), base)
    merged_sd, base_sd = load_safetensors(out), ours.state_dict()
    changed = [i for i in range(19) if not torch.equal(merged_sd[f"double_blocks.{i}.img_attn.qkv.weight"],
                                                       base_sd[f"double_blocks.{i}.img_attn.qkv.weight"])]  # fmt: skip
    assert changed == list(range(19))


@pytest.mark.parametrize("alpha", [2.0, -2.0])  # a negative alpha hung the conversion to diffusers' names
def test_a_diffusers_layout_dit_gets_the_same_merge(tiny_model_files, dev, tmp_path, caplog, alpha):
    lora = write_lora(tmp_path / "a.safetensors", dev, alpha=alpha, split_qkv="True", in_dims="[2,2,2,2,2]")
    diffusers_file = tmp_path / "dev_diffusers.safetensors"
    save_safetensors(bfl_to_diffusers(load_safetensors(tiny_model_files.flux_dev)), diffusers_file)
    bfl_out, diffusers_out = tmp_path / "bfl_merged.safetensors", tmp_path / "diffusers_merged.safetensors"
    assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", bfl_out, "--models", lora) == 0
    with caplog.at_level(logging.WARNING):
        args = ["--flux_model", diffusers_file, "--save_to", diffusers_out, "--models", lora]
        assert merge(*args, "--diffusers", "--mem_eff_load_save") == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--diffusers has no effect") for m in warnings)
    assert any(m.startswith("--mem_eff_load_save has no effect") for m in warnings)
    assert not any("match nothing" in m for m in warnings)
    x = dit_inputs(dev.params)
    _, from_bfl = load_flow_model(str(bfl_out), torch.float32, "cpu")
    _, from_diffusers = load_flow_model(str(diffusers_out), torch.float32, "cpu")
    assert_close_to(run(from_diffusers, x), run(from_bfl, x), run(dev, x))


def test_two_loras_merged_into_the_dit_both_apply_with_their_ratios(tiny_model_files, dev, tmp_path):
    """Both LoRAs change the same weights: each merged weight is W + a * delta W_a + b * delta W_b."""
    a = write_lora(tmp_path / "a.safetensors", dev, dim=4, alpha=2.0, seed=1)
    b = write_lora(tmp_path / "b.safetensors", dev, dim=2, alpha=8.0, seed=2)
    out = tmp_path / "ab_merged.safetensors"
    assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", out, "--models", a, b,
                 "--ratios", 0.5, -1.2) == 0  # fmt: skip
    base, merged = load_safetensors(tiny_model_files.flux_dev), load_safetensors(out)
    da, db = deltas(load_safetensors(a)), deltas(load_safetensors(b))
    assert da.keys() == db.keys()
    names = flux_merge_lora.lora_name_map(list(base), "flux")
    for name in da:
        key = names[name]
        change = merged[key].double() - base[key].double()
        expected = 0.5 * da[name] - 1.2 * db[name]
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item(), msg=name)
    untouched = set(base) - {names[name] for name in da}
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)


def test_unmatched_modules_are_listed(tiny_model_files, dev, tmp_path, caplog):
    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    lora = write_lora(tmp_path / "both.safetensors", dev, [clip, None])
    with caplog.at_level(logging.WARNING):
        assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", tmp_path / "m.safetensors",
                     "--models", lora) == 0  # fmt: skip
    (record,) = [r for r in caplog.records if "match nothing" in r.getMessage()]
    message = record.getMessage()
    assert "12 modules match nothing" in message and "give --clip_l / --t5xxl" in message
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in message


@pytest.mark.parametrize(
    "case, message",
    [
        ("ratios", "--ratios: 1 given for 2 --models; give one per LoRA"),
        ("nothing_matches", "none of its 12 modules (e.g. lora_te1_text_model_encoder_layers_0_"),
        ("other_model", "the LoRA is for another model"),
        # the output width fits; the input width does not
        ("other_input_width", "img_attn_proj changes a 64x32 weight, but double_blocks.0.img_attn.proj.weight in "),
        ("more_ratios", "--ratios: 2 given for 1 --models; give one per LoRA"),
        ("scaled_fp8", "--flux_model {tmp}/scaled.safetensors: a ComfyUI scaled-fp8 checkpoint cannot be merged into"),
        # its update was added to the fp8 numbers, then multiplied by their scale: a tiny part of it merged
        ("scaled_fp8_t5", "--t5xxl {tmp}/t5_scaled.safetensors: a ComfyUI scaled-fp8 checkpoint cannot be merged"),
        ("clip_save_to_without_clip", "--clip_l_save_to needs --clip_l: the model to merge into"),
        ("save_to_without_flux_model", "--save_to is the merged DiT's file: give --flux_model too"),
        ("fp8_precision", "--precision fp8: the merge arithmetic needs float, fp16 or bf16"),
        ("overwrite", "is one of the input files"),
        ("clip_without_save_to", "--clip_l needs --clip_l_save_to"),
        ("oft", "OFT (oft_* keys) files are not supported"),
        ("dora", "dora.safetensors: DoRA (dora_scale keys) files are not supported"),
        ("dora_lora_merge", "dora.safetensors: DoRA (dora_scale keys) files are not supported"),
        ("no_flux_module", "none of its 1 LoRA modules (e.g. base_model.model.unet.0.to_q.lora_A.weight) is a FLUX"),
        ("no_flux_module_lora_merge", "none of its 1 LoRA modules (e.g. base_model.model.unet.0.to_q.lora_A.weight)"),
        ("folder", "a folder; give a single .safetensors file"),
        ("loras_of_other_widths", "img_attn_proj changes a 96x96 weight but"),
        ("loras_of_other_widths_concat", "the LoRAs are for different models"),
        ("device", "--working_device gpu0: not a device name"),
        # it passed the check, then the merge crashed with "Cannot copy out of meta tensor"
        ("meta_device", "--loading_device meta: the meta device holds no data; give a device to compute on"),
        ("unknown_dtype", "tensor 'extra' has the dtype 'F4', which this torch"),
        ("outputs_collide", "--clip_l_save_to {out} is also --save_to; give each result its own file"),
        ("t5_output_collides", "--t5xxl_save_to {te} is also --clip_l_save_to"),
        ("save_to_folder", "--save_to {tmp}/adir: is a folder; give a file name"),
        ("save_to_under_a_file", "--save_to {lora}/m.safetensors: {lora} is a file, not a folder"),
        ("damaged", "lora.safetensors: module lora_unet_double_blocks_0_img_attn_proj is damaged: its down is (4, 64)"),
        ("damaged_lora_merge", "module lora_unet_double_blocks_0_img_attn_proj is damaged"),
        ("fused_damaged_into_diffusers_dit", "lora.safetensors: module lora_unet_single_blocks_0_linear1 is damaged: "
                                             "its up has 150 rows, but a linear1 of input width 64 has more than 192"),
        # an SDXL LoRA has no diffusers name: into a diffusers-layout DiT it matched nothing, with an IndexError
        ("sdxl_into_diffusers_dit", "none of its 1 modules (e.g. lora_unet_input_blocks_4_1_proj_in) is in"),
    ],
)
def test_user_errors_stop_before_writing(tiny_model_files, dev, tmp_path, capsys, case, message):
    lora = write_lora(tmp_path / "lora.safetensors", dev)
    out = tmp_path / "out.safetensors"
    flux = ["--flux_model", tiny_model_files.flux_dev, "--save_to", out]
    if case == "ratios":
        args = [*flux, "--models", lora, lora, "--ratios", 1.0]
    elif case == "nothing_matches":
        clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
        te_only = write_lora(tmp_path / "te.safetensors", dev, [clip, None], train_blocks="single", single_dim="0",
                             single_mod_dim="0")  # fmt: skip
        args = [*flux, "--models", te_only]
    elif case == "other_model":
        wide = random_model(tiny_flux_params(hidden_size=96, num_heads=6))
        args = [*flux, "--models", write_lora(tmp_path / "wide.safetensors", wide)]
    elif case == "other_input_width":
        weights = load_safetensors(lora)
        weights["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.ones(4, 32)
        save_safetensors(weights, lora)
        args = [*flux, "--models", lora]
    elif case == "more_ratios":
        args = [*flux, "--models", lora, "--ratios", 1.0, 0.5]
    elif case == "scaled_fp8":  # ComfyUI's scaled fp8: its weights are fp8 x scale_weight
        weights = load_safetensors(tiny_model_files.flux_dev)
        weights["double_blocks.0.img_attn.proj.scale_weight"] = torch.tensor(0.5)
        save_safetensors(weights, tmp_path / "scaled.safetensors")
        args = ["--flux_model", tmp_path / "scaled.safetensors", "--save_to", out, "--models", lora]
    elif case == "scaled_fp8_t5":
        write_tiny_t5(tmp_path / "t5_scaled.safetensors", fp8="scaled")
        args = ["--t5xxl", tmp_path / "t5_scaled.safetensors", "--t5xxl_save_to", out, "--models", lora]
    elif case == "clip_save_to_without_clip":
        args = [*flux, "--clip_l_save_to", tmp_path / "te.safetensors", "--models", lora]
    elif case == "save_to_without_flux_model":
        args = ["--save_to", out, "--clip_l", tiny_model_files.clip_l, "--clip_l_save_to", tmp_path / "te.safetensors",
                "--models", lora]  # fmt: skip
    elif case == "fp8_precision":
        args = [*flux, "--models", lora, "--precision", "fp8"]
    elif case.startswith("loras_of_other_widths"):  # same rank, no base model: no weight to check against
        wide = random_model(tiny_flux_params(hidden_size=96, num_heads=6))
        args = ["--save_to", out, "--models", lora, write_lora(tmp_path / "wide.safetensors", wide)]
        args += ["--concat"] if case.endswith("concat") else []
    elif case == "device":
        args = [*flux, "--models", lora, "--working_device", "gpu0"]
    elif case == "meta_device":
        args = [*flux, "--models", lora, "--loading_device", "meta"]
    elif case == "overwrite":
        args = ["--save_to", lora, "--models", lora]
    elif case == "clip_without_save_to":
        args = [*flux, "--clip_l", tiny_model_files.clip_l, "--models", lora]
    elif case.startswith("dora"):  # a DoRA file's LoRA keys alone are another change
        weights = load_safetensors(lora)
        weights["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, 64)
        save_safetensors(weights, tmp_path / "dora.safetensors")
        args = [*(flux if case == "dora" else ["--save_to", out]), "--models", tmp_path / "dora.safetensors"]
    elif case.startswith("no_flux_module"):
        sdxl = tmp_path / "sdxl.safetensors"
        save_safetensors({"base_model.model.unet.0.to_q.lora_A.weight": torch.ones(4, 8),
                          "base_model.model.unet.0.to_q.lora_B.weight": torch.ones(8, 4)}, sdxl)  # fmt: skip
        args = [*(flux if case == "no_flux_module" else ["--save_to", out]), "--models", sdxl]
    elif case == "unknown_dtype":  # a DiT file with one tensor of a dtype this torch does not know
        header, metadata, start = read_header(tiny_model_files.flux_dev)
        end = max(e["data_offsets"][1] for e in header.values())
        header["extra"] = {"dtype": "F4", "shape": [4], "data_offsets": [end, end + 2]}
        text = json.dumps({**header, "__metadata__": metadata}).encode()
        with open(tiny_model_files.flux_dev, "rb") as f:
            data = f.read()[start : start + end]
        (tmp_path / "f4.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data + bytes(2))
        args = ["--flux_model", tmp_path / "f4.safetensors", "--save_to", out, "--models", lora]
    elif case == "folder":  # e.g. a diffusers transformer/ folder
        args = ["--flux_model", tmp_path, "--save_to", out, "--models", lora]
    elif case == "outputs_collide":
        args = [*flux, "--clip_l", tiny_model_files.clip_l, "--clip_l_save_to", out, "--models", lora]
    elif case == "t5_output_collides":
        te = tmp_path / "te.safetensors"
        args = [*flux, "--clip_l", tiny_model_files.clip_l, "--clip_l_save_to", te, "--t5xxl", tiny_model_files.t5xxl,
                "--t5xxl_save_to", te, "--models", lora]  # fmt: skip
    elif case == "save_to_folder":
        (tmp_path / "adir").mkdir()
        args = ["--flux_model", tiny_model_files.flux_dev, "--save_to", tmp_path / "adir", "--models", lora]
    elif case == "save_to_under_a_file":
        args = ["--flux_model", tiny_model_files.flux_dev, "--save_to", f"{lora}/m.safetensors", "--models", lora]
    elif case.startswith("damaged"):  # lora_up's rank is not lora_down's
        weights = load_safetensors(lora)
        weights["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.ones(64, 3)
        save_safetensors(weights, lora)
        args = [*(flux if case == "damaged" else ["--save_to", out]), "--models", lora]
    elif case.endswith("into_diffusers_dit"):
        diffusers_file = tmp_path / "dev_diffusers.safetensors"
        save_safetensors(bfl_to_diffusers(load_safetensors(tiny_model_files.flux_dev)), diffusers_file)
        if case.startswith("sdxl"):
            lora, name = tmp_path / "sdxl.safetensors", "lora_unet_input_blocks_4_1_proj_in"
            weights = {f"{name}.lora_down.weight": torch.ones(4, 8), f"{name}.lora_up.weight": torch.ones(8, 4),
                       f"{name}.alpha": torch.tensor(2.0)}  # fmt: skip
        else:  # linear1's split was q, k, v of 64 rows and the rest: to_v got 22 rows and proj_mlp none
            weights = load_safetensors(lora)
            weights["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.ones(150, 4)
        save_safetensors(weights, lora)
        args = ["--flux_model", diffusers_file, "--save_to", out, "--models", lora]
    else:
        save_safetensors(
            {"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.zeros(2, 2)}, tmp_path / "o.safetensors"
        )
        args = ["--save_to", out, "--models", tmp_path / "o.safetensors"]
    assert merge(*args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    message = message.format(out=out, tmp=tmp_path, lora=lora, te=tmp_path / "te.safetensors")
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not out.exists()
    if case in ("t5_output_collides", "clip_save_to_without_clip", "save_to_without_flux_model"):
        assert not (tmp_path / "te.safetensors").exists()


def test_modules_a_diffusers_layout_dit_cannot_name_are_listed(tiny_model_files, dev, tmp_path, caplog):
    diffusers_file = tmp_path / "dev_diffusers.safetensors"
    save_safetensors(bfl_to_diffusers(load_safetensors(tiny_model_files.flux_dev)), diffusers_file)
    lora = write_lora(tmp_path / "lora.safetensors", dev)
    weights = load_safetensors(lora)
    name = "lora_unet_input_blocks_4_1_proj_in"  # one module of another model: before, it was dropped silently
    weights.update({f"{name}.lora_down.weight": torch.ones(4, 8), f"{name}.lora_up.weight": torch.ones(8, 4)})
    save_safetensors(weights, lora)
    with caplog.at_level(logging.WARNING):
        assert merge("--flux_model", diffusers_file, "--save_to", tmp_path / "m.safetensors", "--models", lora) == 0
    (record,) = [r for r in caplog.records if "match nothing" in r.getMessage()]
    assert record.getMessage().endswith(f"1 modules match nothing in the given models and are not merged: {name}")


def test_a_failed_write_is_one_line_and_leaves_no_file(tiny_model_files, dev, tmp_path, capsys, monkeypatch):
    """The disk fills part-way through the merged DiT: one line, and neither the file nor its temporary."""
    import errno

    count = []

    class FailingReader(flux_merge_lora.SafetensorsReader):  # the DiT's reader, which feeds the writer
        def get(self, key, *args, **kwargs):
            count.append(key)
            if len(count) == 5:  # after four tensors are written
                raise OSError(errno.ENOSPC, "No space left on device", str(out))
            return super().get(key, *args, **kwargs)

    monkeypatch.setattr(flux_merge_lora, "SafetensorsReader", FailingReader)
    out = tmp_path / "out" / "m.safetensors"
    lora = write_lora(tmp_path / "lora.safetensors", dev)
    assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", out, "--models", lora) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: [Errno 28] No space left on device: '{out}'"
    assert len(count) == 5 and os.listdir(tmp_path / "out") == []


def test_sd_scripts_split_qkv_files_merge_and_convert_at_their_trained_strength(tiny_model_files, dev, tmp_path):
    """sd-scripts keeps the per-part alpha on its split files' fused modules, which plain loaders
    apply at 1/3 (qkv) or 1/4 (linear1) strength (spec §k.7); these tools apply what was trained."""
    network = create_network(1.0, 4, 2, None, [None, None], dev, split_qkv="True")
    randomize_lora(network, 3, 0.1)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    for name in [k.removesuffix(".alpha") for k in weights if k.endswith(".alpha")]:
        if name.endswith(("_qkv", "_linear1")):
            weights[f"{name}.alpha"] /= 3 if "_double_blocks_" in name else 4  # sd-scripts' layout
    lora = tmp_path / "sd_scripts_split.safetensors"
    save_safetensors(weights, lora, {"ss_network_args": '{"split_qkv": "True"}'})
    trained = {lora.lora_name: lora.delta_weight() for lora in network.all_loras()}
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"

    out = tmp_path / "merged.safetensors"
    assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", out, "--models", lora) == 0
    base, merged = load_safetensors(tiny_model_files.flux_dev), load_safetensors(out)
    for name, key in ((qkv, "double_blocks.0.img_attn.qkv.weight"), (linear1, "single_blocks.1.linear1.weight")):
        torch.testing.assert_close(merged[key] - base[key], trained[name], rtol=1e-4, atol=1e-6)

    ait = tmp_path / "ait.safetensors"
    assert convert_flux_lora.main(["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path", str(lora),
                                   "--dst_path", str(ait)]) == 0  # fmt: skip
    converted = load_safetensors(ait)
    prefix = "transformer.transformer_blocks.0.attn"
    parts = [converted[f"{prefix}.{p}.lora_B.weight"] @ converted[f"{prefix}.{p}.lora_A.weight"]
             for p in ("to_q", "to_k", "to_v")]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts), trained[qkv], rtol=1e-5, atol=1e-7)


def test_loras_of_another_base_model_are_named(tiny_model_files, dev, tmp_path, caplog):
    """A Chroma LoRA's module names fit FLUX.1: it was merged into it, or with FLUX.1 LoRAs, in silence."""
    lora = write_lora(tmp_path / "lora.safetensors", dev)
    chroma = str(tmp_path / "chroma_labelled.safetensors")
    save_safetensors(load_safetensors(lora), chroma, {**read_metadata(lora), "ss_base_model_version": "chroma"})
    with caplog.at_level(logging.WARNING):
        assert merge("--flux_model", tiny_model_files.flux_dev, "--save_to", tmp_path / "m.safetensors",
                     "--models", chroma) == 0  # fmt: skip
        assert merge("--save_to", tmp_path / "l.safetensors", "--models", chroma, lora) == 0
    assert caplog.messages.count(f"--models {chroma} was trained on chroma (ss_base_model_version), and this model "
                                 "is flux1") == 1  # fmt: skip
    assert (f"--models were trained on different base models ({chroma}: chroma, {lora}: flux1): their merge is "
            "recorded as chroma") in caplog.messages  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and the other way: a FLUX.1 LoRA into Chroma
        assert merge("--flux_model", tiny_model_files.chroma, "--save_to", tmp_path / "c.safetensors",
                     "--models", lora) == 0  # fmt: skip
    assert f"--models {lora} was trained on flux1 (ss_base_model_version), and this model is chroma" in (
        caplog.messages)
