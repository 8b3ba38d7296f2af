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
from tests.test_block_swap import attach_lora, lora_step
from tests.test_flux_models import chroma_mask, dit_inputs
from tests.training_helpers import base_argv, dataset


def model_and_inputs(kind: str, depth: int = 4, depth_single: int = 6):
    params = tiny_flux_params if kind == "flux" else tiny_chroma_params
    p = params(depth=depth, depth_single=depth_single)
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


def test_lora_dropouts_draw_the_same_masks_in_the_selective_recompute():
    """Dropout, rank dropout and module dropout draw random numbers inside the checkpointed block;
    the recompute must draw the same ones whichever ops it replays."""
    from networks import lora_flux

    grads = []
    for keep in (False, True):
        model, inputs = model_and_inputs("flux", depth=2, depth_single=2)
        model.enable_gradient_checkpointing(keep_attention=keep)
        torch.manual_seed(0)
        lora = lora_flux.create_network(1.0, 4, 4, None, [None, None], model, neuron_dropout=0.2,
                                        rank_dropout=0.3, module_dropout=0.3)  # fmt: skip
        for name, p in lora.named_parameters():
            if "lora_up" in name:
                p.data.normal_(0, 0.05)
        lora.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
        lora.requires_grad_(True).train()
        torch.manual_seed(5)
        model(**inputs).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_the_setting_lasts_until_checkpointing_is_disabled():
    model, _ = model_and_inputs("flux")
    model.enable_gradient_checkpointing(keep_attention=True)
    model.enable_gradient_checkpointing()  # without the argument the setting is kept
    assert model.checkpoint_keep_attention
    model.disable_gradient_checkpointing()
    assert not model.checkpoint_keep_attention and not model.gradient_checkpointing


def test_keeping_attention_and_offloading_to_the_cpu_are_refused_together():
    model, _ = model_and_inputs("flux")
    with pytest.raises(ValueError, match="defeats cpu-offloaded checkpointing"):
        model.enable_gradient_checkpointing(cpu_offload=True, keep_attention=True)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_attention"])
def test_compiled_blocks_take_the_checkpoint_and_its_policy_into_their_graph(keep):
    """With --torch_compile the checkpoint is traced with the block, and AOT autograd's split into
    forward and backward graphs follows the policy (aot_eager: that split, as inductor gets it, run
    op by op). A compiled graph's kernels are invisible to dispatch modes: the profiler counts them."""
    eager, inputs = model_and_inputs("flux", depth=1, depth_single=1)
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        model.enable_gradient_checkpointing(keep_attention=keep)
    torch._dynamo.reset()
    compiled.compile_blocks(backend="aot_eager")
    loss_eager, grads_eager = lora_step(eager, inputs, {})
    lora = attach_lora(compiled)
    lora_step(compiled, inputs, {}, lora)  # compiles (tracing runs the ops too: the profiler would count them)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss_compiled, grads_compiled = lora_step(compiled, inputs, {}, lora)
    attention_forwards = sum(
        e.count for e in profile.key_averages() if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu"
    )
    blocks = len(eager.double_blocks) + len(eager.single_blocks)
    # the forward runs each block's attention once; the recompute again, unless the outputs are kept
    assert attention_forwards == blocks * (1 if keep else 2)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    assert grads_eager.keys() == grads_compiled.keys() and grads_eager
    for name in grads_eager:
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "--gradient_checkpointing_keep_attention changes what gradient checkpointing keeps: "
             "add --gradient_checkpointing"),
        ({"gradient_checkpointing": True, "cpu_offload_checkpointing": True},
         "--gradient_checkpointing_keep_attention keeps attention outputs on the GPU, which "
         "--cpu_offload_checkpointing is there to avoid"),
    ],
    ids=["needs-checkpointing", "not-with-cpu-offload"],
)  # fmt: skip
def test_trainer_refuses_what_cannot_work(tiny_model_files, tmp_path, capsys, flags, message):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"),
                     gradient_checkpointing_keep_attention=True, **flags)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert message in capsys.readouterr().err
