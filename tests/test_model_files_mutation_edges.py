"""Edges the second half of a mutation round over the FLUX autoencoder, the BFL <-> diffusers key mapping, the
model loaders and Chroma found untested: each test fails on one or more hand-made changes of that code that the
rest of the suite let pass."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import CheckpointError
from library.tiny_models import random_model, tiny_ae_params, tiny_chroma_params, tiny_flux_params

# ---- the DiT loader ----


def test_fp8_scaled_without_a_compute_dtype_stores_block_linears_as_plain_fp8_casts(dev_file):
    """``dtype=None`` keeps the file's dtype: --fp8_scaled's per-row scales need a compute dtype, so without one
    the block Linears are cast to e4m3fn as they are and get no scales."""
    from library.flux_utils import load_flow_model

    path, model = dev_file
    _, loaded = load_flow_model(path, None, "cpu", fp8_block_linears=True, fp8_scaled=True)
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"):
        linear, source = loaded.get_submodule(name), model.get_submodule(name)
        assert linear.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(linear.weight.float(), source.weight.to(torch.float8_e4m3fn).float()), name
        assert "weight_scale" not in dict(linear.named_buffers()), name
    assert not any(k.endswith("weight_scale") for k in loaded.state_dict())
    assert loaded.img_in.weight.dtype == torch.float32 and torch.equal(loaded.img_in.weight, model.img_in.weight)


def test_eleven_missing_keys_name_ten_and_the_count_and_ten_name_all(dev_file):
    from library.flux_utils import assign_state_dict, dit_on_meta

    _, model = dev_file
    keys = sorted(model.state_dict())
    for n, suffix in ((11, ", ... (11 in all)"), (10, "")):
        gone = keys[:n]
        sd = {k: v for k, v in model.state_dict().items() if k not in gone}
        with pytest.raises(CheckpointError) as e:
            assign_state_dict(dit_on_meta(tiny_flux_params(True)), sd, "src.safetensors")
        assert str(e.value) == (f"src.safetensors: missing keys: {', '.join(gone[:10])}{suffix}. "
                                "The file is incomplete or not the model it was given as")  # fmt: skip


def test_an_unknown_model_type_is_named_before_the_file_is_read(dev_file):
    from library.flux_utils import check_flow_model_file

    path, _ = dev_file
    with pytest.raises(CheckpointError, match=r"--model_type must be one of flux, chroma, not 'sd3'"):
        check_flow_model_file(path, "sd3")


# ---- the autoencoder ----


def test_an_sd_vae_with_only_a_post_quant_conv_is_named_as_one(tmp_path):
    from library.flux_utils import check_ae_file

    sd = random_model(tiny_ae_params(), seed=1).state_dict()
    save_file(dict(sd, **{"post_quant_conv.weight": torch.zeros(16, 16, 1, 1)}), str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"sd_vae\.safetensors: a Stable Diffusion VAE \(16 latent channels"):
        check_ae_file(str(tmp_path / "sd_vae.safetensors"))


def test_the_autoencoder_reports_the_device_its_weights_are_on():
    from library.flux_ae import AutoEncoder, PosteriorMeanEncoder

    with torch.device("meta"):
        ae = AutoEncoder(tiny_ae_params())
    assert ae.device.type == "meta" and PosteriorMeanEncoder(ae).device.type == "meta"


# ---- Chroma ----


def test_chroma_casts_given_fp32_modulation_vectors_to_the_image_dtype():
    model = random_model(tiny_chroma_params(depth=1, depth_single=1), seed=3).to(torch.bfloat16)
    x = dict(_chroma_inputs(model, dtype=torch.bfloat16), txt_attention_mask=torch.ones(1, 5))
    with torch.no_grad():
        vectors = model.get_mod_vectors(x["timesteps"], None, 1).float()
        out = model(**x, mod_vectors=vectors)
        expected = model(**x, mod_vectors=vectors.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def _chroma_inputs(model, img_len=4, txt_len=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        img=torch.randn(1, img_len, 64, generator=g).to(dtype),
        img_ids=torch.stack([torch.zeros(img_len), torch.arange(img_len) // 2, torch.arange(img_len) % 2], -1)[None],
        txt=torch.randn(1, txt_len, model.params.context_in_dim, generator=g).to(dtype),
        txt_ids=torch.zeros(1, txt_len, 3),
        timesteps=torch.tensor([0.5]),
    )


def test_chroma_without_the_t5_mask_is_refused_naming_the_flag():
    model = random_model(tiny_chroma_params(depth=1, depth_single=1), seed=3)
    with pytest.raises(ValueError, match=r"Chroma needs the T5 attention mask \(--apply_t5_attn_mask\)"):
        model(**_chroma_inputs(model))


def test_a_chroma_without_single_blocks_reads_the_image_tokens_after_the_text_as_diffusers_does():
    """Without single blocks the final layer gets the joint stream (text, then image): its last tokens."""
    diffusers = pytest.importorskip("diffusers")
    from library.flux_key_mapping import bfl_to_diffusers

    p = tiny_chroma_params(depth=2, depth_single=0)
    model = random_model(p, seed=4)
    reference = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=0, attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim, axes_dims_rope=tuple(p.axes_dim),
        approximator_num_channels=p.approximator_in_dim, approximator_hidden_dim=p.approximator_hidden_size,
        approximator_layers=p.approximator_depth,
    ).eval()  # fmt: skip
    reference.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    x = _chroma_inputs(model, img_len=6, txt_len=8)
    with torch.no_grad():
        ours = model(**x, txt_attention_mask=torch.ones(1, 8))
        ref = reference(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                        img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False)[0]  # fmt: skip
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_a_chroma_file_without_the_approximator_input_is_named_incomplete_not_flux(tmp_path):
    from library.flux_utils import check_flow_model_file

    sd = random_model(tiny_chroma_params(depth=1, depth_single=1), seed=2).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("distilled_guidance_layer.in_proj.")}
    save_file(sd, str(tmp_path / "chroma_cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"chroma_cut\.safetensors: incomplete DiT checkpoint \(no "
                                              r"'distilled_guidance_layer\.in_proj\.weight'\)"):  # fmt: skip
        check_flow_model_file(str(tmp_path / "chroma_cut.safetensors"), "chroma")


@pytest.mark.parametrize("depth", [0, 1], ids=["single-blocks-only", "with-double-blocks"])
def test_chroma_params_are_inferred_back_from_the_shapes_and_rope_axes_from_the_metadata(depth):
    """A Chroma pruned to single blocks (its MLP width read from linear1, q/k/v biases as the full model's) and an
    approximator of three layers are read back as built; RoPE axes given in the metadata win over the default."""
    from library.chroma_models import Chroma, infer_chroma_params

    params = tiny_chroma_params(depth=depth, depth_single=2, mlp_ratio=2.0, approximator_depth=3)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Chroma(params).state_dict().items()}
    assert infer_chroma_params(shapes) == params
    assert infer_chroma_params(shapes, {"axes_dim": "[8, 4, 4]"}).axes_dim == [8, 4, 4]
