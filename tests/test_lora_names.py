"""Golden LoRA module names and tensor shapes (spec §g.1): what ComfyUI, diffusers and sd-scripts load."""

import pytest
import torch

from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import create_network

DOUBLE_LINEARS = [
    "img_mod_lin",
    "img_attn_qkv",
    "img_attn_proj",
    "img_mlp_0",
    "img_mlp_2",
    "txt_mod_lin",
    "txt_attn_qkv",
    "txt_attn_proj",
    "txt_mlp_0",
    "txt_mlp_2",
]
SINGLE_LINEARS = ["linear1", "linear2", "modulation_lin"]
CLIP_LINEARS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
T5_LINEARS = [
    "layer_0_SelfAttention_q",
    "layer_0_SelfAttention_k",
    "layer_0_SelfAttention_v",
    "layer_0_SelfAttention_o",
    "layer_1_DenseReluDense_wi_0",
    "layer_1_DenseReluDense_wi_1",
    "layer_1_DenseReluDense_wo",
]


def tiny_clip(layers: int = 12, hidden: int = 32, intermediate: int = 64):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_t5(layers: int = 24, d_model: int = 32, d_ff: int = 64, heads: int = 4, d_kv: int = 8):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=layers,
        num_heads=heads,
        vocab_size=100,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def expected_dit_names(depth: int, depth_single: int, modulated: bool = True) -> set[str]:
    double = [n for n in DOUBLE_LINEARS if modulated or "mod" not in n]
    single = [n for n in SINGLE_LINEARS if modulated or "modulation" not in n]
    return {f"lora_unet_double_blocks_{i}_{n}" for i in range(depth) for n in double} | {
        f"lora_unet_single_blocks_{i}_{n}" for i in range(depth_single) for n in single
    }


def module_names(network) -> list[str]:
    return [lora.lora_name for lora in network.text_encoder_loras + network.unet_loras]


def test_full_depth_flux_gives_the_304_dit_modules_named_as_sd_scripts():
    model = random_model(tiny_flux_params(depth=19, depth_single=38))
    network = create_network(1.0, 4, 1, None, [None, None], model)
    names = module_names(network)
    assert len(names) == 304 == len(set(names))
    assert set(names) == expected_dit_names(19, 38)


def test_full_depth_chroma_gives_228_dit_modules_without_modulation_layers():
    model = random_model(tiny_chroma_params(depth=19, depth_single=38))
    network = create_network(1.0, 4, 1, None, [None, None], model)
    names = module_names(network)
    assert len(names) == 228
    assert set(names) == expected_dit_names(19, 38, modulated=False)


def test_clip_l_modules_are_named_with_the_checkpoint_text_model_prefix():
    # transformers 5 has no `text_model` level; ComfyUI and diffusers map `lora_te1_text_model_...`
    model = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 1, None, [tiny_clip(12), None], model)
    te_names = [lora.lora_name for lora in network.text_encoder_loras]
    assert len(te_names) == 72
    assert set(te_names) == {f"lora_te1_text_model_encoder_layers_{i}_{n}" for i in range(12) for n in CLIP_LINEARS}


def test_t5_modules_exist_only_with_train_t5xxl():
    model = random_model(tiny_flux_params())
    t5 = tiny_t5(24)
    without = create_network(1.0, 4, 1, None, [None, t5], model)
    assert without.text_encoder_loras == []
    with_t5 = create_network(1.0, 4, 1, None, [None, t5], model, train_t5xxl="True")
    te_names = [lora.lora_name for lora in with_t5.text_encoder_loras]
    assert len(te_names) == 168
    assert set(te_names) == {f"lora_te3_encoder_block_{i}_{n}" for i in range(24) for n in T5_LINEARS}


def test_missing_text_encoders_are_skipped_and_chroma_takes_only_t5():
    chroma = random_model(tiny_chroma_params())
    network = create_network(1.0, 4, 1, None, [None, tiny_t5(2)], chroma, train_t5xxl="True")
    prefixes = {lora.lora_name[:8] for lora in network.all_loras()}
    assert prefixes == {"lora_te3", "lora_une"}


def test_state_dict_keys_shapes_and_alpha_scalars_follow_the_file_format():
    p = tiny_flux_params()
    model = random_model(p)
    clip = tiny_clip(1)
    network = create_network(1.0, 8, 4, None, [clip, None], model)
    sd = network.state_dict()
    h, mlp = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    expected = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (8, h),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (3 * h, 8),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": (h, 8),
        "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": (mlp, 8),
        "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": (8, mlp),
        "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": (6 * h, 8),
        "lora_unet_double_blocks_1_txt_mod_lin.lora_up.weight": (6 * h, 8),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": (3 * h + mlp, 8),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": (8, h + mlp),
        "lora_unet_single_blocks_1_modulation_lin.lora_up.weight": (3 * h, 8),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (8, 32),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (64, 8),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # every module has exactly down, up and a 0-dim float alpha
    names = {k.split(".")[0] for k in sd}
    assert set(sd) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert all(a.ndim == 0 and a.dtype == torch.float32 and a.item() == 4.0 for a in alphas)


def test_full_width_clip_l_module_shapes_match_the_spec_table():
    network = create_network(
        1.0, 4, 1, None, [tiny_clip(1, 768, 3072), None], random_model(tiny_flux_params()), img_attn_dim="0"
    )
    sd = network.state_dict()
    assert tuple(sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape) == (4, 768)
    assert tuple(sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape) == (3072, 4)


@pytest.mark.slow
def test_full_width_t5_module_shapes_match_the_spec_table():
    t5 = tiny_t5(layers=1, d_model=4096, d_ff=10240, heads=64, d_kv=64)
    network = create_network(1.0, 4, 1, None, [None, t5], random_model(tiny_flux_params()), train_t5xxl="True")
    sd = network.state_dict()
    assert tuple(sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"].shape) == (4, 4096)
    assert tuple(sd["lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_up.weight"].shape) == (10240, 4)


def test_in_dims_layers_are_named_as_sd_scripts():
    model = random_model(tiny_flux_params(guidance_embed=True))
    network = create_network(1.0, 4, 1, None, [None, None], model, in_dims="[4,2,2,2,4]", train_blocks="single")
    in_names = {lora.lora_name for lora in network.unet_loras if "blocks" not in lora.lora_name}
    assert in_names == {
        "lora_unet_img_in",
        "lora_unet_time_in_in_layer",
        "lora_unet_time_in_out_layer",
        "lora_unet_vector_in_in_layer",
        "lora_unet_vector_in_out_layer",
        "lora_unet_guidance_in_in_layer",
        "lora_unet_guidance_in_out_layer",
        "lora_unet_txt_in",
    }
