"""LoRA files as other tools name their keys (ComfyUI, OneTrainer, peft; library/lora_names.py), read by every
tool as the sd-scripts file they stand for; a module given twice under two spellings is refused."""

import json
import logging
import re

import pytest
import torch

from library.errors import UserError
from library.lora_formats import PEFT_METADATA_KEY, to_ai_toolkit, to_sd_scripts
from library.safetensors_io import load_safetensors, save_safetensors
from library.tiny_models import random_model, tiny_flux_params
from tests.test_convert_lora import assert_same_changes, convert, encoders  # noqa: F401  (a fixture)
from tests.test_merge_lora import deltas, write_lora


def _respelled(sd: dict, spelling: str, model) -> dict:
    """An sd-scripts LoRA state dict as another tool writes the same modules."""
    if spelling == "comfyui":  # ComfyUI's "extract and save LoRA": BFL paths, lora_down / lora_up
        paths = {"lora_unet_" + name.replace(".", "_"): name for name, _ in model.named_modules()}
        out = {}
        for key, value in sd.items():
            module, _, rest = key.partition(".")
            out[f"diffusion_model.{paths[module]}.{rest}" if module in paths else key] = value
        return out
    ait = to_ai_toolkit(sd).state_dict
    if spelling == "peft":  # peft's own adapter file: one model, base_model.model. prefix
        return {"base_model.model." + k.removeprefix("transformer."): v for k, v in ait.items()
                if k.startswith("transformer.")}  # fmt: skip
    # OneTrainer: diffusers paths with "_" and lora_down / lora_up; text-encoder modules as sd-scripts names them
    out = {k: v for k, v in sd.items() if k.startswith("lora_te1_")}
    for key, value in ait.items():
        if key.startswith("transformer."):
            module, _, kind = key.removeprefix("transformer.").partition(".lora_")
            kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
            out[f"lora_transformer_{module.replace('.', '_')}.{kind}"] = value
    return out


@pytest.mark.parametrize("spelling", ["comfyui", "onetrainer", "peft"])
def test_other_tools_spellings_of_the_formats_are_read(encoders, tmp_path, spelling):  # noqa: F811
    """ComfyUI, OneTrainer and peft write the same modules under other names: they were refused as
    LoRAs for another model."""
    model = random_model(tiny_flux_params())
    source = load_safetensors(write_lora(tmp_path / "lora.safetensors", model, [encoders[0], None], alpha=3.0))
    respelled = _respelled(source, spelling, model)
    assert not any(k.startswith(("lora_unet_", "transformer.")) for k in respelled)
    expected = {k: v for k, v in deltas(source).items() if spelling != "peft" or k.startswith("lora_unet_")}
    converted = to_sd_scripts(respelled)
    assert converted.unsupported == []
    assert_same_changes(expected, deltas(converted.state_dict))
    # and into diffusers' naming (OneTrainer's text-encoder modules too)
    assert_same_changes(expected, deltas(to_sd_scripts(to_ai_toolkit(respelled).state_dict).state_dict))
    # the tools read them too: the LoRA converter with its default --src ai-toolkit
    save_safetensors(respelled, tmp_path / "other.safetensors")
    assert convert("ai-toolkit", "sd-scripts", tmp_path / "other.safetensors", tmp_path / "back.safetensors") == 0
    assert_same_changes(expected, deltas(load_safetensors(tmp_path / "back.safetensors")))


def test_a_peft_adapter_reads_its_alpha_from_the_config_beside_it(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_safetensors({"base_model.model.transformer_blocks.0.attn.to_out.0.lora_A.weight": a,
                      "base_model.model.transformer_blocks.0.attn.to_out.0.lora_B.weight": b},
                     adapter / "adapter_model.safetensors")  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    assert convert("ai-toolkit", "sd-scripts", adapter / "adapter_model.safetensors", tmp_path / "out.safetensors") == 0
    (delta,) = deltas(load_safetensors(tmp_path / "out.safetensors")).values()
    torch.testing.assert_close(delta, 2 * (b.double() @ a.double()))  # lora_alpha / r = 2

    # the folder itself is named as one, with the file to give
    assert convert("ai-toolkit", "sd-scripts", adapter, tmp_path / "folder.safetensors") == 1
    assert capsys.readouterr().err.strip().endswith(
        f"{adapter}: a folder; give the LoRA file in it (a peft adapter's is adapter_model.safetensors)"
    )
    # a config that is no JSON is named
    (adapter / "adapter_config.json").write_text("{r: 4")
    assert convert("ai-toolkit", "sd-scripts", adapter / "adapter_model.safetensors", tmp_path / "x.safetensors") == 1
    assert f"{adapter / 'adapter_config.json'}: the peft adapter's config cannot be read" in capsys.readouterr().err


def test_a_mixed_file_lists_what_it_cannot_convert_in_either_direction():
    """OneTrainer's files hold both namings: into diffusers' naming, a module of neither was dropped unnamed."""
    a, b = torch.ones(4, 8), torch.ones(8, 4)
    sd = {"lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight": a,
          "lora_transformer_transformer_blocks_0_attn_to_out_0.lora_up.weight": b,
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b,
          "transformer.distilled_guidance_layer.layers.0.linear_1.lora_A.weight": a,
          "transformer.distilled_guidance_layer.layers.0.linear_1.lora_B.weight": b}  # fmt: skip
    unknown = "transformer.distilled_guidance_layer.layers.0.linear_1"
    for converted in (to_sd_scripts(sd), to_ai_toolkit(sd)):
        assert converted.unsupported == [unknown]
    assert to_sd_scripts(sd).source_format == "ai-toolkit and sd-scripts"


@pytest.mark.parametrize("sd, message", [
    ({"base_model.model.x_embedder.lora_A.weight": torch.ones(4, 6), "transformer.x_embedder.lora_A.weight":
      torch.ones(4, 6)}, "base_model.model.x_embedder.lora_A.weight and transformer.x_embedder.lora_A.weight are "
                         "one tensor (transformer.x_embedder.lora_A.weight) in two spellings"),
    ({"x_embedder.lora_A.weight": torch.ones(4, 6), "x_embedder.lora_B.weight": torch.ones(8, 4),
      "transformer.x_embedder.lora_A.weight": torch.ones(4, 6), "transformer.x_embedder.lora_B.weight":
      torch.ones(8, 4)}, "transformer.x_embedder is in it twice, under two spellings"),
    ({f"text_encoder.{path}encoder.layers.0.mlp.fc1.lora_{ab}.weight": torch.ones(4, 8) if ab == "A" else
      torch.ones(8, 4) for path in ("text_model.", "") for ab in "AB"},
     "text_encoder.encoder.layers.0.mlp.fc1 is in it twice, under two spellings"),
    ({"lora_unet_img_in.lora_down.weight": torch.ones(4, 6), "lora_unet_img_in.lora_up.weight": torch.ones(8, 4),
      "transformer.x_embedder.lora_A.weight": torch.ones(4, 6), "transformer.x_embedder.lora_B.weight":
      torch.ones(8, 4)}, "lora_unet_img_in and transformer.x_embedder are one module in two namings"),
])  # fmt: skip
def test_one_module_in_two_namings_is_refused(sd, message):
    """One would have replaced the other in silence."""
    from library.errors import UserError

    with pytest.raises(UserError, match=re.escape(f"twice.safetensors: {message}")):
        to_sd_scripts(sd, source="twice.safetensors")


def test_onetrainer_names_of_whole_modules_and_t5_modules_beside_them_are_read():
    """Its conditioning and final-layer modules (lora_transformer_x_embedder ...) were never applied, and its
    T5 modules (lora_te2_ in its legacy names, sd-scripts' lora_te3_) are kept beside the converted DiT modules."""
    sd = {"lora_transformer_x_embedder.lora_down.weight": torch.ones(4, 64),
          "lora_transformer_x_embedder.lora_up.weight": torch.ones(32, 4),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(4, 8),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(8, 4)}  # fmt: skip
    converted = to_sd_scripts(sd)
    assert set(converted.state_dict) == {"lora_unet_img_in.lora_down.weight", "lora_unet_img_in.lora_up.weight",
                                         "lora_unet_img_in.alpha",
                                         "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
                                         "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"}  # fmt: skip
    assert converted.unsupported == [] and converted.source_format == "ai-toolkit and sd-scripts"


def test_a_bfl_named_module_beside_its_sd_scripts_name_is_refused():
    sd = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.ones(4, 32),
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.ones(32, 4),
          "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.ones(4, 32),
          "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.ones(32, 4)}  # fmt: skip
    with pytest.raises(UserError, match="lora_unet_double_blocks_0_img_attn_proj and transformer.double_blocks.0."
                                        "img_attn.proj are one module in two namings"):  # fmt: skip
        to_sd_scripts(sd)


def _adapter(tmp_path, name, metadata=None):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    save_safetensors({"base_model.model.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.ones(4, 32),
                      "base_model.model.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.ones(32, 4)},
                     folder / name, metadata)  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    return folder / name


def test_the_peft_config_serves_its_own_adapter_file_alone(tmp_path):
    """Another file beside it, or an adapter file recording its own alphas, keeps what it says."""
    from networks.lora_flux_files import read_lora_file

    assert PEFT_METADATA_KEY not in read_lora_file(_adapter(tmp_path, "other.safetensors"))[1]
    own = json.dumps({"r": 4, "lora_alpha": 2})
    assert read_lora_file(_adapter(tmp_path, "adapter_model.safetensors", {PEFT_METADATA_KEY: own}))[1][
        PEFT_METADATA_KEY] == own  # fmt: skip


def test_the_trainer_reads_other_formats_with_their_alphas_and_names_what_it_leaves_out(tmp_path, caplog):
    """--network_weights / --base_weights: a diffusers file's peft alphas give its scale (alpha = rank was
    taken otherwise), and modules no FLUX.1 / Chroma LoRA has are named."""
    from networks.lora_flux_files import read_lora_file_as_sd_scripts

    path = tmp_path / "d.safetensors"
    save_safetensors({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.ones(4, 32),
                      "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.ones(32, 4),
                      "transformer.foo.lora_A.weight": torch.ones(4, 32), "transformer.foo.lora_B.weight":
                      torch.ones(32, 4)}, path, {PEFT_METADATA_KEY: json.dumps({"r": 4, "lora_alpha": 8})})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        state_dict, _ = read_lora_file_as_sd_scripts(path)
    assert state_dict["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 8.0
    assert caplog.messages == [f"{path}: left out, as no FLUX.1 / Chroma LoRA module: transformer.foo"]
