"""Block swapping on its CUDA code path, run on the CPU: streams and events are fakes, host copies are
separate tensors (as pinned copies are), and uploads copy into reused device buffers. Loss and LoRA
gradients equal those without swapping bit for bit, later steps allocate no device buffers, the loaded
weights are bound to their host copies as these are made, a buffer whose upload may still run is waited
for before it is reused, an index-less ``cuda`` device gets the current index, and the host copies are
packed into slabs whose size torch's pinned allocator does not round up."""

import copy

import pytest
import torch
from torch import nn

from library import offloading
from library.offloading import ModelOffloader
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from tests.cuda_fakes import FakeEvent
from tests.test_block_swap import attach_lora
from tests.test_checkpoint_recompute import extra_inputs
from tests.test_flux_models import dit_inputs


class CudaPathOffloader(ModelOffloader):
    """A ``ModelOffloader`` that takes its CUDA path with the CPU as the device. Off the device the weights
    are NaN (``simulate``): a block run while not resident, or a backward reading a buffer since reused for
    another block, poisons the result."""

    def __init__(self, name, blocks, num_swap, device="cpu"):
        super().__init__(name, blocks, num_swap, device)
        self.cuda, self.simulate, self.stream = True, True, torch.cuda.Stream(self.device)

    def _to_host(self, t):
        return t.detach().clone()  # a copy, as the pinned one is


def params(kind):
    return (tiny_flux_params if kind == "flux" else tiny_chroma_params)(depth=4, depth_single=6)


def enable_swap(model, double, single):
    model.offloaders = (CudaPathOffloader("double", model.double_blocks, double),
                        CudaPathOffloader("single", model.single_blocks, single))  # fmt: skip
    # model.to(device) makes new tensors, as a move to a GPU does: to the CPU it would keep the resident
    # blocks' host copies as their device weights, and uploads would copy into other blocks' host copies
    model.to = lambda device: model._apply(torch.clone)
    model.move_to_device_except_swap_blocks("cpu")
    del model.to
    return model.offloaders


@pytest.fixture
def uploads(monkeypatch):
    """One entry per upload on the CUDA path: whether it found free device buffers to copy into."""
    reused = []
    buffers_like = ModelOffloader._buffers_like

    def counting(self, hosts):
        free = len(self.free_buffers)
        buffers = buffers_like(self, hosts)
        reused.append(len(self.free_buffers) < free)
        return buffers

    monkeypatch.setattr(ModelOffloader, "_buffers_like", counting)
    return reused


def step(model, lora, x, extra, between=False):
    lora.zero_grad(set_to_none=True)
    out = model(**x, **extra)
    if between:  # validation or DOP's base pass: a forward without backward before the graded one's backward
        with torch.no_grad():
            lora.set_multiplier(0.0)
            model(**x, **extra)
            lora.set_multiplier(1.0)
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, checkpointing, between", [
    ("flux", False, False), ("flux", True, False), ("chroma", False, False), ("chroma", True, False),
    ("flux", False, True),
], ids=["flux", "flux-checkpointing", "chroma", "chroma-checkpointing", "flux-no_grad_forward_between"])  # fmt: skip
def test_loss_and_gradients_on_the_cuda_path_equal_those_without_swap(fake_cuda, uploads, kind, checkpointing, between):
    plain = random_model(params(kind), seed=5).train().requires_grad_(False)
    swapped = copy.deepcopy(plain)
    double, single = enable_swap(swapped, 1, 4)  # what --blocks_to_swap 3 gives at this depth
    for offloader in (double, single):
        # the CUDA path indeed: device weights apart from the host copies, NaN while on the host
        assert all(lin.weight.isnan().all() for lin in offloader.host_resident_linears())
        hosts = {h.data_ptr() for i in offloader.host for h in offloader.host[i]}
        assert not hosts & {lin.weight.data_ptr() for i in offloader.swappable if offloader.resident[i]
                            for lin in offloader.linears[i]}  # fmt: skip
    if checkpointing:
        plain.enable_gradient_checkpointing()
        swapped.enable_gradient_checkpointing()
    x, extra = dit_inputs(plain.params), extra_inputs(kind)
    loss_plain, grads_plain = step(plain, attach_lora(plain), x, extra)  # a no-grad forward would not change it
    lora = attach_lora(swapped)
    for n in range(2):
        uploads.clear()
        loss, grads = step(swapped, lora, x, extra, between)
        assert torch.isfinite(loss) and torch.equal(loss, loss_plain), n
        assert grads.keys() == grads_plain.keys() and grads
        for name in grads:
            assert torch.equal(grads[name], grads_plain[name]), (n, name)
    # every upload of the second step copied into buffers freed by an offload: none was allocated
    assert uploads and all(uploads)


def test_the_loaded_weights_are_bound_to_their_host_copies_as_these_are_made(fake_cuda):
    model = random_model(params("flux"), seed=5)
    loaded = {lin: (lin.weight.data_ptr(), lin.weight.detach().clone()) for lin in model.modules()
              if isinstance(lin, nn.Linear)}  # fmt: skip
    offloaders = (CudaPathOffloader("double", model.double_blocks, 1),
                  CudaPathOffloader("single", model.single_blocks, 4))  # fmt: skip
    # no move_to_device_except_swap_blocks yet: a loaded block must not outlive its copy until then, or the
    # host holds the model twice at setup
    for offloader in offloaders:
        assert offloader.swappable
        for i, linears in enumerate(offloader.linears):
            for k, lin in enumerate(linears):
                pointer, values = loaded[lin]
                if i in offloader.swappable:
                    host = offloader.host[i][k]
                    assert lin.weight.data_ptr() == host.data_ptr() != pointer, (offloader.name, i, k)
                    assert torch.equal(host, values)
                else:
                    assert lin.weight.data_ptr() == pointer  # (double blocks 1 and 2) not copied: kept


def test_offloading_a_block_whose_upload_is_pending_waits_for_that_upload_first(fake_cuda):
    model = random_model(params("flux"), seed=5)
    double, _ = enable_swap(model, 1, 2)
    assert double.placement() == "DDDH"
    order = fake_cuda.log

    class FreeBuffers(list):  # its appends go to the log of the streams' waits
        def append(self, buffers):
            order.append(("free", offloading._pointers(buffers)))
            super().append(buffers)

    double.free_buffers = FreeBuffers()
    double.after_forward(0)  # block 0's buffers are freed, block 3 is uploaded into them on the side stream
    upload = double.pending[3]
    assert isinstance(upload, FakeEvent) and upload.stream is double.stream
    buffers = offloading._pointers(lin.weight.data for lin in double.linears[3])
    order.clear()
    # a forward that comes before block 3 ran (its backward skipped, say) moves block 3 out again: its
    # buffers go back to free_buffers, and the upload of block 0 copies into them; on a GPU the copy
    # into them may still run, so the current stream must wait on exactly that upload's event first
    double.prepare_block_swap_before_forward()
    assert order[:2] == [("wait", fake_cuda.current, upload), ("free", buffers)]
    assert fake_cuda.current_waits() == [upload] and 3 not in double.pending
    # an upload already waited for (the block ran) is not waited for again when the block leaves
    order.clear()
    double.wait_for_block(0)
    double.after_forward(0)
    assert len(fake_cuda.current_waits()) == 1 and fake_cuda.current_waits()[0] is not upload


def test_an_index_less_cuda_device_gets_the_current_index(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert offloading._with_index(torch.device("cuda")) == torch.device("cuda", 1)
    assert offloading._with_index(torch.device("cuda", 2)) == torch.device("cuda", 2)
    assert offloading._with_index(torch.device("cpu")) == torch.device("cpu")
    # the offloader keeps a block's buffers for reuse only if they are on its device, and tensors on
    # accelerate's one-process device "cuda" report "cuda:<current>"
    blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    assert CudaPathOffloader("blocks", blocks, 1, device="cuda").device == torch.device("cuda", 1)


def test_host_copies_are_packed_first_fit_into_slabs_of_a_power_of_two():
    # torch rounds each pinned allocation up to a power of two: one per weight cost a third more RAM
    sizes = []

    def allocate(n):
        sizes.append(n)
        return torch.empty(n, dtype=torch.uint8)  # (pinned on a GPU machine)

    arena = offloading.PinnedArena(slab_bytes=1024, allocate=allocate)
    g = torch.Generator().manual_seed(0)
    originals = [torch.randn(10, 10, generator=g), torch.randn(100, generator=g).bfloat16(),
                 torch.randn(300, generator=g).to(torch.float8_e4m3fn), torch.randn(300, generator=g),
                 torch.randn(10, 10, generator=g)]  # 400, 200, 300, 1200 (more than a slab) and 400 bytes
    copies = [arena.copy_of(t) for t in originals]
    assert sizes == [1024, 1024, 1200]
    for original, copy_ in zip(originals, copies, strict=True):
        assert copy_.dtype == original.dtype and copy_.shape == original.shape
        assert torch.equal(copy_.view(torch.uint8), original.view(torch.uint8))
        assert copy_.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    slab = [c.untyped_storage().data_ptr() for c in copies]
    assert slab[0] == slab[1] and slab[2] == slab[4] and len({slab[0], slab[2], slab[3]}) == 3  # the last fills a tail
    offsets = [c.storage_offset() * c.element_size() for c in copies]
    assert offsets == [0, 512, 0, 0, 512]  # each copy on a 512-byte boundary


def test_the_cuda_path_copies_weights_to_the_host_through_the_arena():
    offloader = ModelOffloader.__new__(ModelOffloader)
    offloader.cuda = True
    offloader.arena = offloading.PinnedArena(slab_bytes=4096, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    weight = torch.randn(8, 8)
    host = offloader._to_host(weight)
    assert torch.equal(host, weight) and host.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    assert host.untyped_storage().data_ptr() == offloader.arena.slabs[0][0].untyped_storage().data_ptr()
