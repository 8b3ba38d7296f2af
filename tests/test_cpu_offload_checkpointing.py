"""--cpu_offload_checkpointing: the block inputs that checkpointing keeps go through the offload
function (a real copy here, since model and "host" are both the CPU), and gradients equal plain
checkpointing, for FLUX.1 and Chroma."""

import pytest
import torch

import flux_train_network
from library import flux_models
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from tests.test_block_swap import lora_step
from tests.test_flux_models import chroma_mask, dit_inputs
from tests.training_helpers import base_argv, dataset


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_cpu_offloaded_checkpointing_gradients_equal_plain_checkpointing(kind, monkeypatch):
    p = tiny_flux_params(depth=2, depth_single=3) if kind == "flux" else tiny_chroma_params(depth=2, depth_single=3)
    x = dit_inputs(p)
    extra = {"guidance": torch.tensor([3.5, 3.5])} if kind == "flux" else {"txt_attention_mask": chroma_mask([3, 7], 7)}

    def step(cpu_offload: bool):
        model = random_model(p, seed=8).train().requires_grad_(False)
        model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
        return lora_step(model, x, extra)

    loss_plain, grads_plain = step(cpu_offload=False)
    offloaded = []

    def offload(t):
        copy = t.clone()  # a separate tensor, as a device-to-host copy would make
        offloaded.append(copy)
        return copy

    monkeypatch.setattr(flux_models, "offload_activation", offload)
    loss_offloaded, grads_offloaded = step(cpu_offload=True)
    # each double block offloads (img, txt), each single block x (recomputation stops before the offload)
    assert len(offloaded) == 2 * p.depth + p.depth_single_blocks
    assert torch.equal(loss_plain, loss_offloaded)
    assert grads_plain.keys() == grads_offloaded.keys() and grads_plain
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_offloaded[name]), name


def test_cpu_offload_only_acts_with_checkpointing_in_training():
    p = tiny_flux_params()
    model = random_model(p, seed=8).train()
    model.cpu_offload_checkpointing = True  # as the trainer sets it at load time
    assert not model.gradient_checkpointing
    model.enable_gradient_checkpointing()  # without an argument the setting is kept
    assert model.cpu_offload_checkpointing
    model.disable_gradient_checkpointing()
    assert not model.cpu_offload_checkpointing


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"cpu_offload_checkpointing": True}, "--cpu_offload_checkpointing moves what gradient checkpointing keeps "
                                              "to the CPU: add --gradient_checkpointing"),
        ({"cpu_offload_checkpointing": True, "gradient_checkpointing": True, "blocks_to_swap": 1},
         "--cpu_offload_checkpointing cannot be combined with --blocks_to_swap"),
    ],
    ids=["needs-checkpointing", "not-with-block-swap"],
)  # fmt: skip
def test_cpu_offload_checkpointing_errors_are_clear(tiny_model_files, tmp_path, capsys, flags, message):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), **flags)
    assert flux_train_network.main(argv) == 1
    assert message in capsys.readouterr().err


def test_cpu_offloaded_checkpointing_with_compiled_blocks(monkeypatch):
    """The offloaded checkpoint stays eager around the compiled block call (what it keeps must reach
    the offload function), and trains the same gradients as without compiling."""
    p = tiny_flux_params(depth=2, depth_single=2)
    x = dit_inputs(p)
    extra = {"guidance": torch.tensor([3.5, 3.5])}
    offloaded = []

    def offload(t):
        offloaded.append(t.shape)
        return t.clone()

    monkeypatch.setattr(flux_models, "offload_activation", offload)
    results = []
    for compiled in (False, True):
        model = random_model(p, seed=8).train().requires_grad_(False)
        model.enable_gradient_checkpointing(cpu_offload=True)
        if compiled:
            torch._dynamo.reset()
            model.compile_blocks(backend="eager")
        results.append(lora_step(model, x, extra))
    assert len(offloaded) == 2 * (2 * p.depth + p.depth_single_blocks)  # both runs offload every block's output
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    for name in grads_eager:
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], rtol=1e-5, atol=1e-6)
