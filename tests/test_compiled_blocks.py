"""q, k, v of the joint attention: the eager autograd node and the form written out for
torch.compile give the same numbers and gradients, and a compiled block traces as one graph."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from library.flux_attention import _attention_inputs_composed, attention_inputs
from library.flux_layers import DoubleStreamBlock, QKNorm, SingleStreamBlock
from library.flux_models import Flux
from library.flux_utils import prepare_img_ids
from library.tiny_models import randomize_, tiny_flux_params


def streams(gelu_rest: bool, dtype=torch.float32):
    """Two streams (text 5, image 12 tokens), 2 heads of 8, projections that carry an MLP part when ``gelu_rest``."""
    g = torch.Generator().manual_seed(0)
    heads, head_dim = 2, 8
    width = 3 * heads * head_dim + (24 if gelu_rest else 0)
    projections = [torch.randn(2, n, width, generator=g, dtype=dtype).requires_grad_(True) for n in (5, 12)]
    norms = [randomize_(QKNorm(head_dim), seed) for seed in (1, 2)]
    ids = torch.cat((torch.zeros(2, 5, 3), prepare_img_ids(2, 3, 4)), dim=1)
    pe = Flux(tiny_flux_params(axes_dim=[2, 2, 4], num_heads=heads, hidden_size=heads * head_dim)).pe_embedder(ids)
    return projections, norms, pe, heads


@pytest.mark.parametrize("gelu_rest", [False, True], ids=["double", "single"])
def test_compiled_form_matches_the_autograd_node(gelu_rest):
    projections, norms, pe, heads = streams(gelu_rest)
    eager = attention_inputs(projections, norms, pe, heads, gelu_rest)
    composed = _attention_inputs_composed(projections, norms, pe, heads, gelu_rest)
    assert len(eager) == len(composed) == 3 + (len(projections) if gelu_rest else 0)  # an MLP input per stream
    for a, b in zip(eager, composed, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    weights = [torch.randn_like(t) for t in eager]
    params = [*projections, *(p for n in norms for p in n.parameters())]
    grads_eager = torch.autograd.grad(sum((t * w).sum() for t, w in zip(eager, weights, strict=True)), params)
    grads_composed = torch.autograd.grad(sum((t * w).sum() for t, w in zip(composed, weights, strict=True)), params)
    for a, b in zip(grads_eager, grads_composed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def block_inputs(p, double: bool):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 12, p.hidden_size, generator=g, requires_grad=True)
    txt = torch.randn(1, 5, p.hidden_size, generator=g, requires_grad=True)
    vec = torch.randn(1, p.hidden_size, generator=g)
    pe = Flux(p).pe_embedder(torch.cat((torch.zeros(1, 5, 3), prepare_img_ids(1, 3, 4)), dim=1))
    return (img, txt, vec, pe) if double else (torch.cat((txt, img), 1), vec, pe)


@pytest.mark.parametrize("double", [True, False], ids=["double", "single"])
def test_a_compiled_block_is_one_graph_forward_and_backward(double):
    """The eager node's in-place backward (``out=`` into strided views) and complex RoPE would split a
    compiled block into four graphs run partly in eager mode."""
    p = tiny_flux_params()
    block = randomize_(DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, qkv_bias=True) if double
                       else SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio), 4)  # fmt: skip
    block.requires_grad_(False)
    inputs = block_inputs(p, double)
    torch._dynamo.reset()
    counter = CompileCounter()
    out = torch.compile(block, backend=counter)(*inputs)
    sum(o.sum() for o in (out if double else (out,))).backward()
    assert counter.frame_count == 1
    expected = block(*inputs)
    for a, b in zip(out if double else (out,), expected if double else (expected,), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_stay_one_graph_each_where_dynamo_cannot_ask_torch_for_autocast(monkeypatch):
    """Dynamo before torch 2.13 cannot trace ``torch.amp.is_autocast_available`` (a C function); the
    fused LayerNorm-and-modulation and the LoRA modules ask it on every call, and with torch 2.11 a
    compiled double block broke into ten graphs. Here the query is made untraceable as it is there."""
    from tests.test_block_swap import attach_lora, lora_step
    from tests.test_flux_models import dit_inputs

    monkeypatch.setattr(torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available))
    model = randomize_(Flux(tiny_flux_params(depth=1, depth_single=1)), 5).train()
    model.requires_grad_(False)
    torch._dynamo.reset()
    counter = CompileCounter()
    model.compile_blocks(backend=counter)
    lora_step(model, dit_inputs(model.params), {"guidance": torch.tensor([3.5, 3.5])}, attach_lora(model))
    assert counter.frame_count == 2  # one graph per block


def test_a_compiled_checkpoint_keeping_attention_gets_the_two_selective_modes(monkeypatch):
    """Compiled, checkpointing's context function must return the two selective-checkpoint dispatch
    modes (torch 2.11 asserts it). Torch calls it during AOT autograd's tracing, where torch < 2.13
    reports no compilation, so the choice has to be made where dynamo traces the block call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from library import flux_models

    made = {}
    monkeypatch.setattr(flux_models, "checkpoint", lambda block, *args, context_fn, **kw: made.update(fn=context_fn))
    with monkeypatch.context() as compiling:
        compiling.setattr(torch.compiler, "is_compiling", lambda: True)
        flux_models.call_block(torch.nn.Identity(), "keep_attention", torch.zeros(1))
    forward, recompute = made["fn"]()  # later, outside dynamo's tracing
    assert isinstance(forward, TorchDispatchMode) and isinstance(recompute, TorchDispatchMode)
    flux_models.call_block(torch.nn.Identity(), "keep_attention", torch.zeros(1))  # eager
    forward, recompute = made["fn"]()
    assert isinstance(forward, TorchDispatchMode) and not isinstance(recompute, TorchDispatchMode)


def test_compiled_blocks_do_not_recompile_for_new_batch_sizes_and_token_counts():
    """Buckets change the token count, a last short batch the batch size: with symbolic shapes from
    the start, only the first batch of 1 adds variants (dynamo always specialises sizes of 1)."""
    model = randomize_(Flux(tiny_flux_params(depth=2, depth_single=2)), 5).train()
    model.requires_grad_(False)
    model.img_in.requires_grad_(True)  # something before the blocks is trained, as with a LoRA
    torch._dynamo.reset()
    counter = CompileCounter()
    model.compile_blocks(backend=counter)
    variants = []
    for batch, (h, w) in ((2, (3, 4)), (1, (3, 4)), (2, (4, 5)), (1, (2, 6))):
        g = torch.Generator().manual_seed(batch * h * w)
        out = model(
            img=torch.randn(batch, h * w, 64, generator=g), img_ids=prepare_img_ids(batch, h, w),
            txt=torch.randn(batch, 7, 32, generator=g), txt_ids=torch.zeros(batch, 7, 3),
            timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, 32, generator=g),
            guidance=torch.full((batch,), 3.5),
        )  # fmt: skip
        out.square().mean().backward()
        variants.append(counter.frame_count)
    # double blocks with and without an input gradient (block 0 has none), single blocks and the last
    # single block (image tokens out): 4 variants. A batch of 1 adds 3: by then dynamo has seen two
    # output_from values, so one single-block variant serves both. New token counts add none.
    assert variants == [4, 7, 7, 7]


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "fp8_scaled"])
def test_a_compiled_fp8_block_is_one_graph(scaled):
    """--fp8_base with --torch_compile: the fp8 Linear's autograd node traces inside the block's graph."""
    from library.fp8 import quantize_dit_

    p = tiny_flux_params()
    block = randomize_(DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, qkv_bias=True), 4)
    holder = torch.nn.Module()
    holder.double_blocks = torch.nn.ModuleList([block])
    quantize_dit_(holder, torch.bfloat16, scaled=scaled)
    block.requires_grad_(False)
    img, txt, vec, pe = block_inputs(p, True)
    img, txt = (t.detach().bfloat16().requires_grad_(True) for t in (img, txt))
    torch._dynamo.reset()
    counter = CompileCounter()
    with torch.autocast("cpu", torch.bfloat16):
        out = torch.compile(block, backend=counter)(img, txt, vec.bfloat16(), pe)
    sum(o.float().sum() for o in out).backward()
    assert counter.frame_count == 1
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_compiled_block_calls_read_the_weights_block_swapping_puts_in_place():
    """Swapping rebinds each Linear's weight; the compiled call takes parameters as inputs, so it
    computes with the resident ones (simulated host weights are NaN and would poison the result)."""
    from tests.test_block_swap import attach_lora, lora_step, swap_model
    from tests.test_flux_models import dit_inputs

    plain = swap_model("flux", n=0)
    swapped = copy.deepcopy(plain)
    swapped.enable_block_swap(3, "cpu", simulate=True)
    swapped.move_to_device_except_swap_blocks("cpu")
    for model in (plain, swapped):
        model.enable_gradient_checkpointing()
    torch._dynamo.reset()
    swapped.compile_blocks(backend="aot_eager")
    x, extra = dit_inputs(plain.params), {"guidance": torch.tensor([3.5, 3.5])}
    loss_plain, grads_plain = lora_step(plain, x, extra)
    lora = attach_lora(swapped)
    for _ in range(2):  # from the layout of a fresh model, then from the one a backward leaves
        loss_swapped, grads_swapped = lora_step(swapped, x, extra, lora)
        torch.testing.assert_close(loss_swapped, loss_plain, rtol=1e-6, atol=0)
        for name in grads_plain:
            torch.testing.assert_close(grads_swapped[name], grads_plain[name], rtol=1e-5, atol=1e-6)


def swapped_and_plain_compiled(backend, checkpointing: str | None):
    """The tiny swap model with 3 units swapped and without, each with ``checkpointing`` (None,
    "recompute" or "keep_attention"), compiled with ``backend`` and given a LoRA:
    ((model, lora) unswapped, (model, lora) swapped)."""
    from tests.test_block_swap import attach_lora, swap_model

    plain = swap_model("flux", n=0)
    swapped = copy.deepcopy(plain)
    swapped.enable_block_swap(3, "cpu", simulate=True)
    swapped.move_to_device_except_swap_blocks("cpu")
    torch._dynamo.reset()
    for model in (plain, swapped):
        if checkpointing:
            model.enable_gradient_checkpointing(keep_attention=checkpointing == "keep_attention")
        model.compile_blocks(backend=backend)
    return (plain, attach_lora(plain)), (swapped, attach_lora(swapped))


def storages_saved_in_forward(model) -> set[int]:
    from tests.test_flux_models import dit_inputs

    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**dit_inputs(model.params), guidance=torch.tensor([3.5, 3.5])).square().mean()
    loss.backward()
    return saved


def block_weight_storages(model) -> set[int]:
    blocks = [*model.double_blocks, *model.single_blocks]
    linears = [m for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return {m.weight.untyped_storage().data_ptr() for m in linears}


def test_compiled_swapped_blocks_keep_no_weights_for_backward():
    """AOT autograd (as inductor) saves aliases of a checkpointed block's weights for its backward.
    With blocks swapped, that kept every swapped block on the GPU until backward (FLUX.1 with 28
    swapped on an H100: 34.6 GiB against 6.4 eager), so the recomputation then runs outside the
    graph: nothing the forward saves shares storage with a block weight, host copies included."""
    (plain, _), (swapped, _) = swapped_and_plain_compiled("aot_eager", "recompute")
    assert storages_saved_in_forward(plain) & block_weight_storages(plain)  # what the hooks see otherwise
    host_copies = {t.untyped_storage().data_ptr() for o in swapped.offloaders for ts in o.host.values() for t in ts}
    assert not storages_saved_in_forward(swapped) & (block_weight_storages(swapped) | host_copies)


@pytest.mark.parametrize("checkpointing", [None, "keep_attention"], ids=["no_checkpointing", "keep_attention"])
def test_swapped_blocks_run_eagerly_where_a_compiled_graph_would_keep_their_weights(checkpointing):
    """Training without checkpointing, or keeping attention (whose policy needs the checkpoint inside
    the graph), would leave the compiled graphs holding the weights until backward: with blocks
    swapped those steps run the blocks eagerly (the trainer refuses both with --torch_compile), with
    the same loss and gradients; unswapped, the blocks are compiled."""
    from tests.test_block_swap import lora_step
    from tests.test_flux_models import dit_inputs

    counters = {"plain": CompileCounter(), "swapped": CompileCounter()}
    (plain, plain_lora), (swapped, swapped_lora) = swapped_and_plain_compiled(counters["plain"], checkpointing)
    swapped.compile_blocks(backend=counters["swapped"])
    x, extra = dit_inputs(plain.params), {"guidance": torch.tensor([3.5, 3.5])}
    loss_plain, grads_plain = lora_step(plain, x, extra, plain_lora)
    loss_swapped, grads_swapped = lora_step(swapped, x, extra, swapped_lora)
    assert counters["plain"].frame_count > 0 and counters["swapped"].frame_count == 0
    torch.testing.assert_close(loss_swapped, loss_plain, rtol=1e-6, atol=0)
    for name in grads_plain:
        torch.testing.assert_close(grads_swapped[name], grads_plain[name], rtol=1e-5, atol=1e-6)


def test_module_dropout_compiles_into_the_graph_and_still_drops():
    """Eager, module dropout is a Python branch on a random draw; compiled, that branch broke the graph
    at every LoRA module, so --torch_compile compiled nothing with module_dropout. Compiled, the draw
    is a tensor that zeroes the module's update instead: one graph, the base output where it drops."""
    from networks.lora_modules import LoRAModule

    linear = torch.nn.Linear(8, 8)
    lora = LoRAModule("lora_unet_x", linear, 1.0, 4, 1, module_dropout=0.5)
    lora.apply_to()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.train()
    x = torch.randn(2, 8)
    counter = CompileCounter()
    compiled = torch.compile(lambda x: linear(x), backend=counter, fullgraph=True)
    torch.manual_seed(0)
    outs = [compiled(x) for _ in range(40)]
    assert counter.frame_count == 1
    base = torch.nn.functional.linear(x, linear.weight, linear.bias)
    dropped = sum(torch.equal(out, base) for out in outs)
    assert 8 <= dropped <= 32  # about half at 0.5, and never the same on every call
    lora.eval()  # no dropout outside training
    assert not any(torch.equal(compiled(x), base) for _ in range(5))
