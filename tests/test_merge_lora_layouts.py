"""networks/flux_merge_lora.py on checkpoints of other layouts: a diffusers-layout DiT gets exactly the merge of
the BFL file, module kind by module kind (fused qkv and linear1 split, the final modulation's halves swapped), and
a plain fp8 checkpoint is merged in float, then saved in float32 or, asked to, in fp8.

The LoRAs are written by hand (sd-scripts key names, random factors), so they can reach modules the trainer's
network does not (the embedders and the modulations)."""

import pytest
import torch

from library.flux_key_mapping import bfl_to_diffusers, diffusers_to_bfl
from library.safetensors_io import load_safetensors, read_metadata, save_safetensors
from tests.test_merge_lora import deltas, merge

RATIO = 0.7
COMMON = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1",
          "single_blocks.1.linear2", "final_layer.linear", "img_in", "txt_in"]  # fmt: skip
FLUX_ONLY = ["final_layer.adaLN_modulation.1", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
             "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"]  # fmt: skip


def hand_written_lora(path, base: dict, modules: list[str], version: str, rank=3, alpha=1.5, seed=3) -> str:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module in modules:
        out_dim, in_dim = base[f"{module}.weight"].shape
        name = "lora_unet_" + module.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_safetensors(sd, path, {"ss_base_model_version": version})
    return str(path)


def assert_within_an_ulp(merged: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Within one float32 unit of the largest weight: the merge's own rounding, nothing more."""
    ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(expected.abs().max())).item()
    assert (merged.double() - expected).abs().max().item() <= ulp, msg


@pytest.mark.parametrize(
    "model_type, modules, version, architecture",
    [("chroma", COMMON, "chroma", "chroma"), ("dev", COMMON + FLUX_ONLY, "flux1", "flux-1-dev")],
)
def test_a_diffusers_layout_checkpoint_gets_the_bfl_merge_of_every_module_kind(
    tiny_model_files, tmp_path, model_type, modules, version, architecture
):
    bfl_file = {"chroma": tiny_model_files.chroma, "dev": tiny_model_files.flux_dev}[model_type]
    base = load_safetensors(bfl_file)
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_safetensors(bfl_to_diffusers(base), diffusers_file)
    lora = hand_written_lora(tmp_path / "lora.safetensors", base, modules, version)
    bfl_out, diffusers_out = tmp_path / "bfl_merged.safetensors", tmp_path / "diffusers_merged.safetensors"
    for source, out in ((bfl_file, bfl_out), (diffusers_file, diffusers_out)):
        assert merge("--flux_model", source, "--save_to", out, "--models", lora, "--ratios", RATIO) == 0

    merged, merged_diffusers = load_safetensors(bfl_out), load_safetensors(diffusers_out)
    assert "double_blocks.0.img_attn.qkv.weight" not in merged_diffusers  # it stays in diffusers' layout
    back = diffusers_to_bfl(merged_diffusers)
    assert back.keys() == merged.keys() == base.keys()
    for key in merged:
        assert torch.equal(back[key], merged[key]), key
    change = deltas(load_safetensors(lora))
    for module in modules:
        assert_within_an_ulp(merged[f"{module}.weight"], base[f"{module}.weight"].double()
                             + RATIO * change["lora_unet_" + module.replace(".", "_")], module)  # fmt: skip
    touched = {f"{m}.weight" for m in modules}
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in touched)

    # the layout itself, read without the project's key mapping: fused rows split in order, halves swapped
    qkv = merged["double_blocks.0.img_attn.qkv.weight"]
    width = qkv.shape[1]
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(merged_diffusers[f"transformer_blocks.0.attn.{part}.weight"], qkv[i * width:(i + 1) * width])
    linear1 = merged["single_blocks.0.linear1.weight"]
    assert torch.equal(merged_diffusers["single_transformer_blocks.0.proj_mlp.weight"], linear1[3 * width:])
    if model_type == "dev":
        shift, scale = merged["final_layer.adaLN_modulation.1.weight"].chunk(2)
        assert torch.equal(merged_diffusers["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert read_metadata(bfl_out)["modelspec.architecture"] == architecture


@pytest.mark.parametrize("precision", [None, "fp8"])
def test_a_plain_fp8_checkpoint_is_merged_in_float_and_saved_as_float32_or_fp8(tiny_model_files, tmp_path,
                                                                                precision):
    base = load_safetensors(tiny_model_files.flux_dev)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in base.items()}
    fp8_file = tmp_path / "fp8.safetensors"
    save_safetensors(fp8, fp8_file)
    module = "double_blocks.0.img_attn.qkv"
    lora = hand_written_lora(tmp_path / "lora.safetensors", base, [module], "flux1", rank=4, alpha=4.0)
    out = tmp_path / "merged.safetensors"
    assert merge("--flux_model", fp8_file, "--save_to", out, "--models", lora,
                 *(["--save_precision", precision] if precision else [])) == 0  # fmt: skip
    merged = load_safetensors(out)
    assert merged.keys() == base.keys()
    change = deltas(load_safetensors(lora))["lora_unet_" + module.replace(".", "_")]
    expected = fp8[f"{module}.weight"].double() + change
    if precision is None:  # every tensor float32, the fp8 ones widened exactly, the update not rounded to fp8
        assert {v.dtype for v in merged.values()} == {torch.float32}
        assert_within_an_ulp(merged[f"{module}.weight"], expected, module)
        assert all(torch.equal(merged[k], fp8[k].float()) for k in fp8 if k != f"{module}.weight")
    else:  # every float tensor cast, norms and biases too; the merged weight is the float sum then cast
        assert {v.dtype for v in merged.values()} == {torch.float8_e4m3fn}
        assert torch.equal(merged[f"{module}.weight"].float(), expected.float().to(torch.float8_e4m3fn).float())
        assert all(torch.equal(merged[k], fp8[k].to(torch.float8_e4m3fn)) for k in fp8 if k != f"{module}.weight")
