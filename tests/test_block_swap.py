"""Block swapping (--blocks_to_swap): the split by depth, the offloader's schedule step by step,
and equality of loss and gradients with and without swapping (transfers are no-ops on a CPU,
so offloaded weights are replaced by NaN placeholders: a block run while not resident would
poison the result)."""

import copy

import pytest
import torch

import flux_train_network
from library.flux_layers import DoubleStreamBlock
from library.offloading import max_blocks_to_swap, swap_split
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks import lora_flux
from tests.test_flux_models import chroma_mask, dit_inputs
from tests.training_helpers import base_argv, dataset


# odd N: double = N // 2 rounds down, the extra unit goes to the single blocks (spec §f.1)
@pytest.mark.parametrize("n, expected", [(1, (0, 2)), (15, (7, 16)), (16, (8, 16)), (18, (9, 18)), (22, (11, 22)),
                                         (27, (13, 28)), (28, (14, 28)), (35, (17, 36))])  # fmt: skip
def test_split_is_sd_scripts_at_flux_depth(n, expected):
    assert swap_split(n, 19, 38) == expected


def test_bounds_follow_the_loaded_model_depth():
    assert max_blocks_to_swap(19, 38) == 35
    with pytest.raises(ValueError, match="at most 35"):
        swap_split(36, 19, 38)
    assert max_blocks_to_swap(8, 38) == 24  # a pruned model: 6 double + 18 units of single blocks
    assert swap_split(20, 8, 38) == (6, 28)  # the double blocks that do not fit go to the single side
    assert swap_split(24, 8, 38) == (6, 36)
    with pytest.raises(ValueError, match="8 double and 38 single blocks"):
        swap_split(25, 8, 38)
    assert max_blocks_to_swap(2, 4) == 1 and swap_split(1, 2, 4) == (0, 2)
    assert max_blocks_to_swap(2, 2) == 0


def swap_model(kind="flux", n=2, simulate=True, **kw):
    p = tiny_flux_params(depth=4, depth_single=6) if kind == "flux" else tiny_chroma_params(depth=4, depth_single=6)
    model = random_model(p, seed=5).train()
    model.requires_grad_(False)
    if n:
        model.enable_block_swap(n, "cpu", simulate=simulate, **kw)
        model.move_to_device_except_swap_blocks("cpu")
    return model


def test_offloader_schedule_step_by_step():
    model = swap_model(record=True)
    double, single = model.offloaders
    assert (double.num_swap, single.num_swap) == (1, 2)
    assert (double.placement(), single.placement()) == ("DDDH", "DDDDHH")
    double.log.clear()
    single.log.clear()
    seen = []
    for i, block in enumerate(model.single_blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append(("forward", i, single.placement())))
        block.register_full_backward_pre_hook(lambda m, g, i=i: seen.append(("backward", i, single.placement())))
    lora = lora_flux.create_network(1.0, 4, 4, None, [None, None], model)
    lora.apply_to([None, None], model)
    x = dit_inputs(model.params)

    out = model(**x, guidance=torch.tensor([3.5, 3.5]))
    # "*": the upload was issued on the side stream; the block waits for it before it runs
    assert seen == [
        ("forward", 0, "DDDDHH"),
        ("forward", 1, "HDDDD*H"),
        ("forward", 2, "HHDDD*D*"),
        ("forward", 3, "HHDDD*D*"),
        ("forward", 4, "HHDDDD*"),
        ("forward", 5, "HHDDDD"),
    ]
    assert single.log == [("offload", 0), ("upload", 4), ("offload", 1), ("upload", 5), ("wait", 4), ("wait", 5)]
    assert double.log == [("offload", 0), ("upload", 3), ("wait", 3)]
    assert (double.placement(), single.placement()) == ("HDDD", "HHDDDD")
    seen.clear()
    single.log.clear()
    double.log.clear()

    out.square().mean().backward()
    # the backward visits the blocks in reverse and brings the host blocks back, one ahead
    assert seen == [
        ("backward", 5, "HHDDDD"),
        ("backward", 4, "HD*DDDH"),
        ("backward", 3, "D*D*DDHH"),
        ("backward", 2, "D*D*DDHH"),
        ("backward", 1, "D*DDDHH"),
        ("backward", 0, "DDDDHH"),
    ]
    assert single.log == [("offload", 5), ("upload", 1), ("offload", 4), ("upload", 0), ("wait", 1), ("wait", 0)]
    assert double.log == [("offload", 3), ("upload", 0), ("wait", 0)]
    assert (double.placement(), single.placement()) == ("DDDH", "DDDDHH")  # what the next forward expects


def attach_lora(model):
    """A rank-4 LoRA on ``model`` whose up weights are not zero (so every gradient is)."""
    torch.manual_seed(0)
    lora = lora_flux.create_network(1.0, 4, 4, None, [None, None], model)
    for name, p in lora.named_parameters():
        if "lora_up" in name:
            p.data.normal_(0, 0.05)
    lora.apply_to([None, None], model)
    lora.requires_grad_(True)
    return lora


def lora_step(model, x, extra, lora=None):
    """Loss and LoRA gradients of one step (with a new :func:`attach_lora` unless ``lora`` is given)."""
    lora = lora or attach_lora(model)
    lora.zero_grad(set_to_none=True)
    loss = model(**x, **extra).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["flux", "chroma"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_loss_and_gradients_with_swapped_blocks_equal_those_without(kind, checkpointing):
    plain = swap_model(kind, n=0)
    swapped = copy.deepcopy(plain)
    swapped.enable_block_swap(3, "cpu", simulate=True)
    swapped.move_to_device_except_swap_blocks("cpu")
    x = dit_inputs(plain.params)
    extra = {"guidance": torch.tensor([3.5, 3.5])} if kind == "flux" else {"txt_attention_mask": chroma_mask([3, 7], 7)}
    if checkpointing:
        plain.enable_gradient_checkpointing()
        swapped.enable_gradient_checkpointing()
    with torch.no_grad():  # a forward without backward (validation, sampling) in between
        swapped(**x, **extra)
    assert swapped.offloaders[1].placement() != "DDDDHH"
    loss_plain, grads_plain = lora_step(plain, x, extra)
    loss_swapped, grads_swapped = lora_step(swapped, x, extra)
    assert torch.isfinite(loss_swapped)
    assert torch.equal(loss_plain, loss_swapped)
    assert grads_plain.keys() == grads_swapped.keys() and grads_plain
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_swapped[name]), name


def test_weights_replaced_after_setup_are_used():
    """--base_weights merges into the base after block swap is set up: the new weights must be used
    (this needs the real host weights, not the NaN placeholders)."""
    model = swap_model(n=3, simulate=False)
    reference = copy.deepcopy(swap_model(n=0))
    x = dit_inputs(model.params)
    with torch.no_grad():
        for target in (model, reference):
            for block in (target.double_blocks[0], target.double_blocks[3], target.single_blocks[5]):
                for lin in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
                    lin.weight.data = lin.weight.data * 1.5  # rebinding, as LoRA merge_to does
        expected = reference(**x, guidance=torch.tensor([3.5, 3.5]))
        for _ in range(2):
            torch.testing.assert_close(model(**x, guidance=torch.tensor([3.5, 3.5])), expected, rtol=0, atol=0)
    assert isinstance(model.double_blocks[0], DoubleStreamBlock)


def test_blocks_to_swap_beyond_the_model_depth_is_refused(tiny_model_files, tmp_path, capsys):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), blocks_to_swap=1)
    assert flux_train_network.main(argv) == 1
    err = capsys.readouterr().err
    assert "--blocks_to_swap 1 is more than this model allows: it has 2 double and 2 single blocks" in err
    assert "so at most 0" in err
