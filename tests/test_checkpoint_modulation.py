"""Gradient checkpointing leaves each FLUX block's modulation outside the checkpoint: it depends on
the conditioning vector alone, so the backward does not recompute it (one read of the modulation
weights a step, not two), and every gradient stays what it is without checkpointing."""

import pytest
import torch

from library.flux_layers import Modulation
from library.tiny_models import random_model, tiny_flux_params
from tests.test_flux_models import dit_inputs

GUIDANCE = torch.tensor([3.5, 2.0])


def step(model) -> tuple[dict[str, torch.Tensor], int]:
    """Every parameter's gradient after one forward + backward, and the modulation Linears' calls."""
    calls = []
    hooks = [m.lin.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if type(m) is Modulation]
    model.zero_grad()
    model(**dit_inputs(model.params), guidance=GUIDANCE).square().mean().backward()
    for hook in hooks:
        hook.remove()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize(
    "checkpointing",
    [{}, {"cpu_offload": True}, {"keep_attention": True}],
    ids=["recompute", "cpu_offload", "keep_attention"],
)
def test_the_modulation_runs_once_a_step_with_the_gradients_of_no_checkpointing(checkpointing):
    p = tiny_flux_params(guidance_embed=True)
    plain = random_model(p, seed=0).train()
    checkpointed = random_model(p, seed=0).train()
    checkpointed.enable_gradient_checkpointing(**checkpointing)
    reference, modulations = step(plain)
    grads, calls = step(checkpointed)
    assert modulations == 2 * len(plain.double_blocks) + len(plain.single_blocks)
    assert calls == modulations  # not recomputed in backward
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert reference["double_blocks.0.img_mod.lin.weight"].abs().max() > 0
