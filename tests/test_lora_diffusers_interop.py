"""Files saved here load through diffusers' kohya-LoRA converter and peft into FluxTransformer2DModel.

diffusers' converter hard-codes FLUX.1's widths for single blocks, so this runs at full width
(hidden 3072) with one double and one single block (about 545 M parameters, 2.5 GB of RAM).
The diffusers model shares the base weights of ours (peft adds LoRA layers beside them).
"""

import pytest
import torch

from library.flux_key_mapping import bfl_to_diffusers
from library.flux_models import Flux, FluxParams
from library.flux_utils import pack_latents, prepare_img_ids
from library.safetensors_io import load_safetensors
from library.tiny_models import randomize_
from networks.lora_flux import create_network
from tests.test_lora_math import randomize_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers  # noqa: E402

pytestmark = pytest.mark.slow

# BFL names of the conditioning layers (in_dims) and the diffusers names the converter gives them
IN_LAYER_NAMES = {
    "lora_unet_img_in": "x_embedder",
    "lora_unet_txt_in": "context_embedder",
    "lora_unet_time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "lora_unet_time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "lora_unet_vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "lora_unet_vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "lora_unet_guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "lora_unet_guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
}


@pytest.fixture(scope="module")
def models():
    params = FluxParams(depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        ours = Flux(params)
    ours.to_empty(device="cpu")
    randomize_(ours, seed=0, std=0.02).eval()
    with torch.device("meta"):
        reference = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    reference.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        img=pack_latents(torch.randn(1, 16, 4, 6, generator=g)),
        img_ids=prepare_img_ids(1, 2, 3),
        txt=torch.randn(1, 5, 4096, generator=g),
        txt_ids=torch.zeros(1, 5, 3),
        timesteps=torch.tensor([0.6]),
        y=torch.randn(1, 768, generator=g),
        guidance=torch.tensor([3.5]),
    )
    return ours, reference.eval(), inputs


def run_ours(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


def run_diffusers(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]


def assert_same_output(ours: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> None:
    scale = reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= 1e-4 * scale
    assert (reference - base).abs().max().item() > 1e-2 * scale, "the LoRA barely changes the output"


def converted(file) -> dict[str, torch.Tensor]:
    return _convert_kohya_flux_lora_to_diffusers(dict(load_safetensors(file)))


def test_full_width_key_shapes_match_the_spec_table(models):
    ours, _, _ = models
    network = create_network(1.0, 4, 1, None, [None, None], ours)
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert len(network.unet_loras) == 13
    expected = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 4),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": (),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": (3072, 4),
        "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": (12288, 4),
        "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": (4, 12288),
        "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": (18432, 4),
        "lora_unet_double_blocks_0_txt_mod_lin.lora_up.weight": (18432, 4),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": (21504, 4),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": (4, 15360),
        "lora_unet_single_blocks_0_modulation_lin.lora_up.weight": (9216, 4),
    }
    assert {k: shapes[k] for k in expected} == expected


def test_plain_lora_with_in_dims_gives_the_same_output_in_diffusers(models, tmp_path):
    ours, reference, x = models
    base = run_ours(ours, x)
    network = create_network(1.0, 4, 2, None, [None, None], ours, in_dims="[4,4,4,4,4]")
    network.apply_to([None, None], ours)
    randomize_lora(network, seed=3, std=0.05)
    try:
        expected = run_ours(ours, x)
        file = tmp_path / "plain.safetensors"
        network.save_weights(file, None, None)
        state_dict = converted(file)

        # diffusers 0.42.1's converter returns the conditioning layers without the `transformer.` prefix,
        # so FluxPipeline.load_lora_weights (which keeps `transformer.` keys only) silently drops them
        dropped = {k for k in state_dict if not k.startswith("transformer.")}
        assert {k.rsplit(".lora_", 1)[0] for k in dropped} == set(IN_LAYER_NAMES.values())
        reference.load_lora_adapter(state_dict, prefix="transformer", adapter_name="as_diffusers_loads_it")
        for name in IN_LAYER_NAMES:
            getattr(network, name).enabled = False
        without_in_dims = run_ours(ours, x)
        assert_same_output(run_diffusers(reference, x), without_in_dims, base)
        assert (expected - without_in_dims).abs().max() > 1e-2 * expected.abs().max(), "in_dims LoRAs matter"
        for name in IN_LAYER_NAMES:
            getattr(network, name).enabled = True
        reference.delete_adapters("as_diffusers_loads_it")

        # with the prefix restored, every module of the file applies and the outputs agree
        fixed = {("transformer." + k if k in dropped else k): v for k, v in state_dict.items()}
        reference.load_lora_adapter(fixed, prefix="transformer", adapter_name="complete")
        assert_same_output(run_diffusers(reference, x), expected, base)
    finally:
        network.set_enabled(False)
        if "complete" in getattr(reference, "peft_config", {}):
            reference.delete_adapters("complete")


def test_split_qkv_file_gives_the_trained_output_in_diffusers(models, tmp_path):
    ours, reference, x = models
    base = run_ours(ours, x)
    network = create_network(1.0, 4, 2, None, [None, None], ours, split_qkv="True")
    network.apply_to([None, None], ours)
    randomize_lora(network, seed=4, std=0.05)
    try:
        trained = run_ours(ours, x)
        file = tmp_path / "split.safetensors"
        network.save_weights(file, None, None)
        state_dict = converted(file)
        assert all(k.startswith("transformer.") for k in state_dict)
        # the converter recognises the block-diagonal up matrix and gives one rank-4 LoRA per chunk
        assert tuple(state_dict["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape) == (4, 3072)
        assert tuple(state_dict["transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight"].shape) == (3072, 4)
        assert tuple(state_dict["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].shape) == (12288, 4)
        reference.load_lora_adapter(state_dict, prefix="transformer", adapter_name="split")
        assert_same_output(run_diffusers(reference, x), trained, base)
    finally:
        network.set_enabled(False)
        if "split" in getattr(reference, "peft_config", {}):
            reference.delete_adapters("split")


def test_clip_l_lora_names_are_the_ones_diffusers_maps_to_clip_layers():
    from library.tiny_models import random_model, tiny_flux_params
    from tests.test_lora_names import tiny_clip

    model = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 2, None, [tiny_clip(2), None], model, train_blocks="single", single_dim="0")
    network.apply_to(None, None, apply_unet=False)
    state_dict = _convert_kohya_flux_lora_to_diffusers(dict(network.state_dict()))
    assert len(state_dict) == 2 * len(network.text_encoder_loras) == 24
    layers = {k.split(".")[4] for k in state_dict}
    assert layers == {"0", "1"}
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in state_dict)
