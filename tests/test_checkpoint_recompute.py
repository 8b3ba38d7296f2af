"""Eager gradient checkpointing of a block keeps nothing from its forward but its inputs, and a
LoRA on a frozen DiT gets the gradients it gets without checkpointing: in every block, the first
(whose inputs need no gradient) included, with dropout drawing the same masks again."""

import pytest
import torch

from library.flux_models import call_block
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import create_network
from tests.test_flux_models import chroma_mask, dit_inputs
from tests.test_lora_math import randomize_lora


def lora_dit(kind: str, **network_kwargs):
    p = tiny_flux_params() if kind == "flux" else tiny_chroma_params()
    model = random_model(p, seed=0).requires_grad_(False).train()
    network = create_network(1.0, 4, 2, None, [None, None], model, **network_kwargs)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    randomize_lora(network, seed=3)
    network.train()
    return model, network


def extra_inputs(kind: str) -> dict:
    return {"guidance": torch.tensor([3.5, 3.5])} if kind == "flux" else {"txt_attention_mask": chroma_mask([3, 7], 7)}


def lora_gradients(model, network, kind: str, checkpointing: bool, bf16: bool = False) -> dict[str, torch.Tensor]:
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    network.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**dit_inputs(model.params), **extra_inputs(kind))
    out.float().square().mean().backward()
    return {name: p.grad for name, p in network.named_parameters()}


@pytest.mark.parametrize("kind", ["flux", "chroma"])
@pytest.mark.parametrize("dropout", [None, 0.3], ids=["no_dropout", "dropout"])
def test_lora_gradients_equal_those_without_checkpointing(kind, dropout):
    model, network = lora_dit(kind, dropout=dropout, rank_dropout=dropout)
    plain = lora_gradients(model, network, kind, checkpointing=False)
    checkpointed = lora_gradients(model, network, kind, checkpointing=True)
    assert checkpointed.keys() == plain.keys()
    missing = [name for name, grad in checkpointed.items() if grad is None]
    assert not missing  # the first double block's inputs need no gradient, its LoRAs still get one
    for name, grad in checkpointed.items():
        assert torch.equal(grad, plain[name]), name
    first_block = [g for name, g in checkpointed.items() if "double_blocks_0_" in name]
    assert first_block and all(g.abs().max() > 0 for g in first_block)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
@pytest.mark.parametrize("train_blocks", ["single", "double_from_1"])
def test_blocks_without_a_lora_and_without_inputs_needing_a_gradient_are_checkpointed(kind, train_blocks):
    # a LoRA on the single blocks alone (or double blocks from 1), no gradient into the embedders (unet-only):
    # the first double block's outputs need no gradient either, where torch's reentrant checkpoint stopped
    # the backward ("none of output has requires_grad=True")
    options = {"train_blocks": "single"} if train_blocks == "single" else {"train_double_block_indices": "1"}
    model, network = lora_dit(kind, **options)
    plain = lora_gradients(model, network, kind, checkpointing=False)
    checkpointed = lora_gradients(model, network, kind, checkpointing=True)
    assert checkpointed.keys() == plain.keys() and not any("double_blocks_0_" in name for name in plain)
    for name, grad in checkpointed.items():
        assert grad is not None and torch.equal(grad, plain[name]), name


def test_a_checkpointed_block_keeps_only_its_inputs_for_backward():
    model, _ = lora_dit("flux")
    p = model.params
    block = model.double_blocks[1]
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 15, p.hidden_size, generator=g, requires_grad=True)
    txt = torch.randn(2, 7, p.hidden_size, generator=g, requires_grad=True)
    vec = torch.randn(2, p.hidden_size, generator=g)
    pe = model.pe_embedder(torch.zeros(2, 22, 3))
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain = call_block(block, None, img, txt, vec, pe)
    kept_by_the_plain_block = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        checkpointed = call_block(block, "recompute", img, txt, vec, pe)
    assert kept_by_the_plain_block > 20
    assert sorted(saved) == sorted([img.shape, txt.shape, vec.shape, pe.shape])
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.equal(a, b)
    sum(o.square().sum() for o in checkpointed).backward()
    assert img.grad.abs().max() > 0 and txt.grad.abs().max() > 0


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_the_recomputation_runs_under_the_forwards_autocast(kind):
    """The backward runs outside the autocast block; the recomputed blocks must still compute in bf16."""
    model, network = lora_dit(kind)
    plain = lora_gradients(model, network, kind, checkpointing=False, bf16=True)
    checkpointed = lora_gradients(model, network, kind, checkpointing=True, bf16=True)
    fp32 = lora_gradients(model, network, kind, checkpointing=False)
    for name, grad in checkpointed.items():
        assert torch.equal(grad, plain[name]), name
    assert any(not torch.equal(plain[name], fp32[name]) for name in plain)  # bf16 really changed the numbers
