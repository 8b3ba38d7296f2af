"""--gradient_checkpointing_keep_attention: selective checkpointing that keeps each block's attention
output, so that the recompute before a block's backward runs every op of the block except the
attention kernel. Counted by op on the CPU: the same loss and LoRA gradients, bit for bit, as plain
checkpointing, for FLUX.1 and Chroma (masked attention), with and without swapped blocks."""

import copy

import pytest
import torch

import flux_train_network
from bench.gpu_checks import AttentionKernelCalls
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from tests.test_block_swap import lora_step
from tests.test_flux_models import chroma_mask, dit_inputs
from tests.training_helpers import base_argv, dataset


def model_and_inputs(kind: str):
    p = tiny_flux_params(depth=4, depth_single=6) if kind == "flux" else tiny_chroma_params(depth=4, depth_single=6)
    extra = {"guidance": torch.tensor([3.5, 3.5])} if kind == "flux" else {"txt_attention_mask": chroma_mask([3, 7], 7)}
    return random_model(p, seed=8).train().requires_grad_(False), {**dit_inputs(p), **extra}


def step_counting_backward_attention(model, inputs: dict, monkeypatch):
    """lora_step, with the attention kernels that its backward pass runs counted."""
    calls = AttentionKernelCalls()
    backward = torch.Tensor.backward

    def counted_backward(tensor, *args, **kwargs):
        with calls:
            backward(tensor, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "backward", counted_backward)
        loss, grads = lora_step(model, inputs, {})
    return loss, grads, calls.count


@pytest.mark.parametrize("swap", [0, 3], ids=["resident", "swapped"])
@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_the_recompute_skips_attention_and_the_gradients_stay_the_same(kind, swap, monkeypatch):
    plain, inputs = model_and_inputs(kind)
    blocks = len(plain.double_blocks) + len(plain.single_blocks)
    kept = copy.deepcopy(plain)
    if swap:
        kept.enable_block_swap(swap, "cpu", simulate=True)
        kept.move_to_device_except_swap_blocks("cpu")
    plain.enable_gradient_checkpointing()
    kept.enable_gradient_checkpointing(keep_attention=True)

    loss_plain, grads_plain, recomputed_plain = step_counting_backward_attention(plain, inputs, monkeypatch)
    loss_kept, grads_kept, recomputed_kept = step_counting_backward_attention(kept, inputs, monkeypatch)
    assert recomputed_plain == blocks  # plain checkpointing runs every block's attention again
    assert recomputed_kept == 0
    assert torch.equal(loss_plain, loss_kept)
    assert grads_plain.keys() == grads_kept.keys() and grads_plain
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_kept[name]), name


def test_without_checkpointing_the_setting_changes_nothing():
    """It is a checkpointing option: in eval mode, or with checkpointing off, blocks run as usual."""
    model, inputs = model_and_inputs("flux")
    reference = model(**inputs)
    model.enable_gradient_checkpointing(keep_attention=True)
    model.disable_gradient_checkpointing()
    assert not model.checkpoint_keep_attention
    assert torch.equal(model(**inputs), reference)


def test_conflicting_model_settings_are_refused():
    model, _ = model_and_inputs("flux")
    with pytest.raises(ValueError, match="defeats cpu-offloaded checkpointing"):
        model.enable_gradient_checkpointing(cpu_offload=True, keep_attention=True)
    model.disable_gradient_checkpointing()
    model.enable_gradient_checkpointing(keep_attention=True)
    with pytest.raises(ValueError, match="compiled blocks cannot keep attention outputs"):
        model.compile_blocks(backend="eager")
    compiled, _ = model_and_inputs("flux")
    compiled.compile_blocks(backend="eager")
    with pytest.raises(ValueError, match="compiled blocks cannot keep attention outputs"):
        compiled.enable_gradient_checkpointing(keep_attention=True)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "--gradient_checkpointing_keep_attention changes what gradient checkpointing keeps: "
             "add --gradient_checkpointing"),
        ({"gradient_checkpointing": True, "cpu_offload_checkpointing": True},
         "--gradient_checkpointing_keep_attention keeps attention outputs on the GPU, which "
         "--cpu_offload_checkpointing is there to avoid"),
        ({"gradient_checkpointing": True, "torch_compile": True},
         "--gradient_checkpointing_keep_attention cannot be combined with --torch_compile"),
    ],
    ids=["needs-checkpointing", "not-with-cpu-offload", "not-with-compile"],
)  # fmt: skip
def test_trainer_refuses_what_cannot_work(tiny_model_files, tmp_path, capsys, flags, message):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"),
                     gradient_checkpointing_keep_attention=True, **flags)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert message in capsys.readouterr().err
