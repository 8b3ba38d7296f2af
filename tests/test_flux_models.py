"""The DiTs and the AE against diffusers as an independent implementation, config inference,
masking and gradient checkpointing."""

import dataclasses

import pytest
import torch
from torch import nn

from library.chroma_models import Chroma, ChromaParams, infer_chroma_params
from library.flux_key_mapping import bfl_to_diffusers, diffusers_to_bfl
from library.flux_layers import DoubleStreamBlock, SingleStreamBlock
from library.flux_models import Flux, FluxParams, configs, infer_flux_params
from library.flux_utils import pack_latents, prepare_img_ids
from library.tiny_models import random_model, tiny_ae_params, tiny_chroma_params, tiny_flux_params

diffusers = pytest.importorskip("diffusers")


def close_to_reference(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Max abs difference within 1e-4 of the output scale."""
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0.1, "degenerate output: the comparison would prove nothing"
    assert (ours - ref).abs().max().item() <= 1e-4 * scale


def diffusers_flux(p: FluxParams) -> nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=p.in_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed,
        axes_dims_rope=tuple(p.axes_dim),
    ).eval()


def diffusers_chroma(p: ChromaParams) -> nn.Module:
    return diffusers.ChromaTransformer2DModel(
        patch_size=1,
        in_channels=p.in_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        axes_dims_rope=tuple(p.axes_dim),
        approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden_size,
        approximator_layers=p.approximator_depth,
    ).eval()


def dit_inputs(p, batch=2, h=3, w=5, txt_len=7, seed=0):
    """Non-square latents (6x10 latent pixels -> 3x5 patches), batch 2."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, 2 * h, 2 * w, generator=g)
    return dict(
        img=pack_latents(latents),
        img_ids=prepare_img_ids(batch, h, w),
        txt=torch.randn(batch, txt_len, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.tensor([0.3, 0.85])[:batch],
        y=torch.randn(batch, max(p.vec_in_dim, 1), generator=g),
    )


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_flux_dit_matches_diffusers(guidance_embed):
    p = tiny_flux_params(guidance_embed)
    model = random_model(p, seed=1)
    reference = diffusers_flux(p)
    reference.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    x = dit_inputs(p)
    guidance = torch.tensor([3.5, 4.0]) if guidance_embed else None
    with torch.no_grad():
        ours = model(**x, guidance=guidance)
        ref = reference(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=guidance,
            return_dict=False,
        )[0]
    close_to_reference(ours, ref)


def chroma_mask(batch_lengths, txt_len):
    mask = torch.zeros(len(batch_lengths), txt_len, dtype=torch.long)
    for i, n in enumerate(batch_lengths):
        mask[i, :n] = 1
    return mask


def test_chroma_dit_with_padded_t5_mask_matches_diffusers():
    p = tiny_chroma_params()
    model = random_model(p, seed=2)
    reference = diffusers_chroma(p)
    reference.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    x = dit_inputs(p, txt_len=8)
    mask = chroma_mask([3, 6], 8)
    # diffusers' pipeline attends to the real tokens plus one padding token, as Chroma was trained
    seq_mask = torch.arange(8)[None] <= mask.sum(1, keepdim=True)
    full_mask = torch.cat([seq_mask, torch.ones(2, x["img"].shape[1], dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ours = model(**x, txt_attention_mask=mask)
        ref = reference(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            attention_mask=full_mask,
            return_dict=False,
        )[0]
    close_to_reference(ours, ref)


def test_chroma_mask_equals_truncating_the_text_after_one_padding_token():
    p = tiny_chroma_params()
    model = random_model(p, seed=3)
    x = dit_inputs(p, batch=1, txt_len=8)
    with torch.no_grad():
        masked = model(**x, txt_attention_mask=chroma_mask([3], 8))
        short = dict(x, txt=x["txt"][:, :4], txt_ids=x["txt_ids"][:, :4])
        truncated = model(**short, txt_attention_mask=torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(masked, truncated, rtol=0, atol=1e-5)


def test_flux_t5_mask_hides_padding_tokens_from_the_image():
    p = tiny_flux_params()
    model = random_model(p, seed=4)
    x = dit_inputs(p, batch=1, txt_len=8)
    mask = chroma_mask([5], 8)
    g = torch.tensor([3.5])
    with torch.no_grad():
        out = model(**x, guidance=g, txt_attention_mask=mask)
        changed_padding = x["txt"].clone()
        changed_padding[:, 5:] += 10.0
        out_changed = model(**dict(x, txt=changed_padding), guidance=g, txt_attention_mask=mask)
        unmasked = model(**dict(x, txt=changed_padding), guidance=g)
    torch.testing.assert_close(out, out_changed, rtol=0, atol=1e-5)
    assert (out - unmasked).abs().max() > 1e-3  # without the mask the padding does matter


def test_dev_model_requires_guidance():
    p = tiny_flux_params(True)
    with pytest.raises(ValueError, match="guidance"):
        random_model(p)(**dit_inputs(p))


def test_chroma_get_mod_vectors_shape_and_order():
    p = tiny_chroma_params(depth=2, depth_single=3)
    assert p.mod_index_length == 3 * 3 + 12 * 2 + 2
    model = random_model(p, seed=5)
    vectors = model.get_mod_vectors(torch.tensor([0.5, 0.2]), None, 2)
    assert vectors.shape == (2, p.mod_index_length, p.hidden_size)
    assert not vectors.requires_grad
    # the final layer's vectors are the last two; perturbing them changes only the output scale/shift
    x = dit_inputs(p)
    with torch.no_grad():
        base = model(**x, txt_attention_mask=torch.ones(2, 7), mod_vectors=vectors)
        shifted = vectors.clone()
        shifted[:, -2] += 1.0  # shift of the final layer
        out = model(**x, txt_attention_mask=torch.ones(2, 7), mod_vectors=shifted)
    bias_effect = model.final_layer.linear.weight.sum(dim=1)
    torch.testing.assert_close(out - base, bias_effect.expand_as(out), rtol=1e-4, atol=1e-4)


def test_full_size_configs_are_inferred_from_shapes():
    for name, params in configs.items():
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
        assert infer_flux_params(shapes) == params, name
    with torch.device("meta"):
        chroma = Chroma(ChromaParams(guidance_embed=False))
        shapes = {k: tuple(v.shape) for k, v in chroma.state_dict().items()}
    inferred = infer_chroma_params(shapes)
    assert inferred == ChromaParams(guidance_embed=False)
    assert inferred.mod_index_length == 344


@pytest.mark.parametrize(
    "params",
    [
        dataclasses.replace(configs["dev"], depth=8, depth_single_blocks=38),  # pruned, e.g. Flex-like
        dataclasses.replace(configs["schnell"], depth=5, depth_single_blocks=10, qkv_bias=False),
        tiny_flux_params(True, depth=1, depth_single=3, mlp_ratio=2.0),
    ],
    ids=["pruned-dev", "pruned-schnell-no-qkv-bias", "tiny"],
)
def test_pruned_and_tiny_configs_are_inferred(params):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
    assert infer_flux_params(shapes) == params


def test_rope_axes_come_from_metadata_then_head_dim():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(tiny_flux_params()).state_dict().items()}
    assert infer_flux_params(shapes).axes_dim == [4, 6, 6]
    assert infer_flux_params(shapes, {"axes_dim": "[8, 4, 4]"}).axes_dim == [8, 4, 4]


def test_block_classes_and_plain_linear_projections_for_third_party_lora():
    model = random_model(tiny_flux_params())
    assert type(model.double_blocks[0]).__name__ == "DoubleStreamBlock"
    assert type(model.single_blocks[0]).__name__ == "SingleStreamBlock"
    for block in (*model.double_blocks, *model.single_blocks):
        assert isinstance(block, (DoubleStreamBlock, SingleStreamBlock))
    linears = {n for n, m in model.double_blocks[0].named_modules() if type(m) is nn.Linear}
    assert linears == {
        "img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
        "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2",
    }  # fmt: skip
    linears = {n for n, m in model.single_blocks[0].named_modules() if type(m) is nn.Linear}
    assert linears == {"linear1", "linear2", "modulation.lin"}


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_gradient_checkpointing_gives_identical_gradients(kind):
    p = tiny_flux_params() if kind == "flux" else tiny_chroma_params()
    model = random_model(p, seed=6).train()
    x = dit_inputs(p)
    extra = {"guidance": torch.tensor([3.5, 3.5])} if kind == "flux" else {"txt_attention_mask": chroma_mask([3, 7], 7)}

    def grads():
        model.zero_grad()
        img = x["img"].clone().requires_grad_(True)
        out = model(**dict(x, img=img), **extra)
        out.square().mean().backward()
        return out.detach(), img.grad.clone(), model.double_blocks[0].img_attn.qkv.weight.grad.clone()

    model.disable_gradient_checkpointing()
    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.equal(a, b)


def test_ae_matches_diffusers_autoencoderkl():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    p = tiny_ae_params()
    ae = random_model(p, seed=7)
    reference = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(p.ch_mult),
        up_block_types=["UpDecoderBlock2D"] * len(p.ch_mult),
        block_out_channels=[p.ch * m for m in p.ch_mult],
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), reference.config), strict=True)
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, logvar = ae.encoder(images).chunk(2, dim=1)
        posterior = reference.encode(images).latent_dist
        close_to_reference(mean * 100, posterior.mean * 100)  # tiny random AEs give small moments
        close_to_reference(logvar, posterior.logvar)
        ae.reg.sample = False
        scaled = ae.encode(images)
        torch.testing.assert_close(scaled, 0.3611 * (posterior.mean - 0.1159), rtol=0, atol=1e-5)
        decoded = ae.decode(latents)
        ref_decoded = reference.decode(latents / reference.config.scaling_factor + reference.config.shift_factor)
        close_to_reference(decoded, ref_decoded.sample)


@pytest.mark.slow
def test_full_width_key_mapping_agrees_with_diffusers_bfl_converter():
    """hidden 3072, one double and one single block: diffusers' own converter is the oracle both ways."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    params = dataclasses.replace(configs["dev"], depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16) for k, s in shapes.items()}
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert ours.keys() == expected.keys()
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    back = diffusers_to_bfl(expected)
    assert back.keys() == bfl.keys()
    for key in bfl:
        assert torch.equal(back[key], bfl[key]), key
