"""The DiT's hand-written backward pieces (fused q/k norm + RoPE, the one-sample LayerNorm
modulation) against diffusers' autograd: the gradient of every parameter, batch 1 and 2."""

import pytest
import torch

from library.flux_key_mapping import bfl_to_diffusers
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from tests.test_flux_models import chroma_mask, diffusers_chroma, diffusers_flux, dit_inputs


def gradients(model, loss_fn) -> dict[str, torch.Tensor]:
    model.train().requires_grad_(True)
    model.zero_grad()
    loss_fn().square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours: dict, reference: dict) -> None:
    mapped = bfl_to_diffusers(ours)
    assert mapped.keys() == reference.keys()
    for name, ref in reference.items():
        scale = ref.abs().max().item()
        assert (mapped[name] - ref).abs().max().item() <= 1e-4 * scale + 1e-9, name


@pytest.mark.parametrize("batch", [1, 2])
def test_flux_parameter_gradients_match_diffusers(batch):
    p = tiny_flux_params()
    model = random_model(p, seed=11)
    reference = diffusers_flux(p)
    reference.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    x = dit_inputs(p, batch=batch)
    guidance = torch.tensor([3.5, 2.0])[:batch]
    ours = gradients(model, lambda: model(**x, guidance=guidance))
    theirs = gradients(reference, lambda: reference(
        hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
        img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=guidance, return_dict=False)[0])  # fmt: skip
    assert_same_gradients(ours, theirs)


@pytest.mark.parametrize("batch", [1, 2])
def test_chroma_parameter_gradients_match_diffusers(batch):
    p = tiny_chroma_params()
    model = random_model(p, seed=12)
    reference = diffusers_chroma(p)
    reference.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    x = dit_inputs(p, batch=batch, txt_len=8)
    mask = chroma_mask([3, 6][:batch], 8)
    seq_mask = torch.arange(8)[None] <= mask.sum(1, keepdim=True)
    full_mask = torch.cat([seq_mask, torch.ones(batch, x["img"].shape[1], dtype=torch.bool)], dim=1)
    ours = gradients(model, lambda: model(**x, txt_attention_mask=mask))
    theirs = gradients(reference, lambda: reference(
        hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"], img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0], attention_mask=full_mask, return_dict=False)[0])  # fmt: skip
    # the approximator runs without gradient in our model (it is frozen in LoRA training)
    theirs = {k: v for k, v in theirs.items() if not k.startswith("distilled_guidance_layer.")}
    ours = {k: v for k, v in ours.items() if not k.startswith("distilled_guidance_layer.")}
    assert_same_gradients(ours, theirs)
