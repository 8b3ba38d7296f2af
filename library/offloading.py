"""Block swapping (``--blocks_to_swap N``): keep only part of the DiT's block weights on the GPU.

Of each block list (double, single) with n blocks, S are swapped. Before a forward the first
n − S blocks are on the device and the last S on the host. In the forward, after block i < S
has run, its weights leave and block n − S + i's are uploaded into the freed buffers, on a side
stream, overlapped with the blocks in between. The backward, which visits the blocks in
reverse, undoes this: when block i's backward starts, block i + 1 leaves and the next host
block needed (S − p for p = n − 1 − i) is uploaded, so that after the backward the layout is
again the one a forward expects.

Differences from sd-scripts' ``ModelOffloader`` (spec §f.1):

* The base is frozen, so every swapped block keeps a (pinned) host copy of its weights and
  "offloading" only rebinds the weights to it: nothing is copied back to the host, which
  halves the traffic.
* The schedule is driven by the model's block loop and by autograd markers placed on each
  block's outputs, not by module hooks, so it stays exact with gradient checkpointing.
* Every forward first restores the forward-start layout if something (a forward without a
  backward: validation, sampling, DOP's base pass) left it otherwise, so no caller has to
  remember ``prepare_block_swap_before_forward()`` (it is still there for them).
* A block used when it is not resident is uploaded on the spot: a schedule mistake costs time,
  never correctness. Weights replaced from outside (e.g. ``--base_weights`` merged into them)
  are detected by address and adopted.

On a machine without CUDA the transfers are no-ops but the schedule runs and is recorded in
``log`` when ``record=True``; ``simulate=True`` makes host-resident weights NaN so that a
block run while not resident poisons the result (for tests).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

RESERVED_BLOCKS = 2  # blocks of each list that always stay resident (sd-scripts' bound)
PINNED_SLAB_BYTES = 1 << 28  # 256 MiB, a power of two: torch's pinned allocator takes it as it is


# ---- how many blocks of each kind ----------------------------------------------------------------


def swap_limits(num_double: int, num_single: int) -> tuple[int, int]:
    """The most double and single blocks that can be swapped."""
    return max(0, num_double - RESERVED_BLOCKS), max(0, num_single - RESERVED_BLOCKS)


def max_blocks_to_swap(num_double: int, num_single: int) -> int:
    """The largest ``--blocks_to_swap`` for a model of this depth (35 for FLUX.1's 19 + 38)."""
    max_double, max_single = swap_limits(num_double, num_single)
    return max_double + max_single // 2


def swap_split(blocks_to_swap: int, num_double: int, num_single: int) -> tuple[int, int]:
    """(double blocks, single blocks) to swap for ``--blocks_to_swap N``.

    One unit is a double block or two single blocks (about the same weight). sd-scripts'
    split, N // 2 double and 2 · (N − N // 2) single blocks, is kept wherever the model has
    room for it (always at FLUX.1's depth); a pruned model moves the units that do not fit
    in one kind to the other.
    """
    n = int(blocks_to_swap)
    if n < 0:
        raise ValueError(f"--blocks_to_swap must be 0 or more, not {n}")
    max_double, max_single = swap_limits(num_double, num_single)
    low, high = max(0, n - max_single // 2), min(n, max_double)
    if low > high:
        raise ValueError(
            f"--blocks_to_swap {n} is more than this model allows: it has {num_double} double and {num_single} "
            f"single blocks, of which at most {max_double} double and {max_single} single can be swapped "
            f"(one unit = one double or two single blocks), so at most {max_blocks_to_swap(num_double, num_single)}"
        )
    double = min(max(n // 2, low), high)
    return double, 2 * (n - double)


# ---- the offloader -------------------------------------------------------------------------------


class _BeforeBackward(torch.autograd.Function):
    """Identity whose backward calls ``callback`` first: the block's backward is about to start."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: accelerate's one-process device has no index, the tensors placed
    on it report one, and ``cuda != cuda:0``, so no swap buffer was ever found to be on the device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _linears(block: nn.Module) -> list[nn.Linear]:
    return [m for m in block.modules() if isinstance(m, nn.Linear)]


def _pointers(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


class PinnedArena:
    """Page-locked host copies packed into slabs of ``slab_bytes``, a power of two. torch rounds every
    pinned allocation up to a power of two, so one allocation per weight cost FLUX.1's swapped blocks
    about a third more RAM (28 GiB for 21); packed first-fit, a slab's unused tail is what is lost. A
    weight larger than a slab gets an allocation of its own. ``allocate(n)`` gives n bytes (uint8)."""

    ALIGN = 512  # bytes: each copy starts on a boundary that suits any dtype and the DMA engine

    def __init__(self, slab_bytes: int = PINNED_SLAB_BYTES, allocate=None):
        self.slab_bytes = slab_bytes
        self.allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self.slabs: list[list] = []  # [slab, bytes used]

    def copy_of(self, t: Tensor) -> Tensor:
        size = t.numel() * t.element_size()
        if size > self.slab_bytes:
            return self._place(self.allocate(size), 0, t)
        slab = next((s for s in self.slabs if s[1] + size <= self.slab_bytes), None)
        if slab is None:
            slab = [self.allocate(self.slab_bytes), 0]
            self.slabs.append(slab)
        start = slab[1]
        slab[1] = -(-(start + size) // self.ALIGN) * self.ALIGN
        return self._place(slab[0], start, t)

    @staticmethod
    def _place(buffer: Tensor, start: int, t: Tensor) -> Tensor:
        copy = buffer[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        return copy.copy_(t)


class ModelOffloader:
    """Swaps the Linear weights of the last ``num_swap`` blocks of ``blocks`` (biases, norms and
    everything else stay on the device)."""

    def __init__(
        self,
        name: str,
        blocks: nn.ModuleList,
        num_swap: int,
        device: str | torch.device,
        *,
        record: bool = False,
        simulate: bool = False,
    ):
        self.name = name
        self.blocks = blocks
        self.n = len(blocks)
        self.num_swap = int(num_swap)
        if self.num_swap < 0 or (self.num_swap > 0 and self.num_swap >= self.n):
            raise ValueError(f"cannot swap {num_swap} of {self.n} {name} blocks")
        self.device = _with_index(torch.device(device))
        self.cuda = self.device.type == "cuda"
        self.simulate = simulate and not self.cuda
        self.log: list[tuple[str, int]] | None = [] if record else None
        self.linears = [_linears(b) for b in blocks]
        self.swappable = sorted(set(range(self.num_swap)) | set(range(self.n - self.num_swap, self.n)))
        self.host: dict[int, list[Tensor]] = {}
        self.placed: dict[int, list[int]] = {}  # addresses of the weights this offloader last bound
        self.resident = [True] * self.n
        self.pending: dict[int, object] = {}
        self.free_buffers: list[list[Tensor]] = []
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.arena = PinnedArena() if self.cuda else None
        for i in self.swappable:
            self.host[i] = [self._to_host(lin.weight.data) for lin in self.linears[i]]
            for lin, host in zip(self.linears[i], self.host[i], strict=True):
                if lin.weight.device.type == "cpu":  # the loaded weights go as their pinned copies come, not at the end
                    lin.weight.data = host
            self.placed[i] = _pointers(lin.weight.data for lin in self.linears[i])

    # ---- the layout -------------------------------------------------------------------------------

    def forward_start_layout(self) -> list[bool]:
        return [i < self.n - self.num_swap for i in range(self.n)]

    def placement(self) -> str:
        """One letter per block: D on the device, H on the host (and * when an upload is pending)."""
        return "".join(("D" if r else "H") + ("*" if i in self.pending else "") for i, r in enumerate(self.resident))

    def prepare_block_swap_before_forward(self) -> None:
        """Puts the blocks where a forward expects them (a no-op when they already are)."""
        target = self.forward_start_layout()
        for i in self.swappable:
            if self.resident[i] and not target[i]:
                self._offload(i)
        for i in self.swappable:
            if target[i] and not self.resident[i]:
                self._upload(i)

    # ---- the schedule -----------------------------------------------------------------------------

    def wait_for_block(self, i: int) -> None:
        """Makes block i usable by the computation that follows (uploading it now if it is not there)."""
        if not self.resident[i]:
            self._upload(i)
        if i in self.pending:
            event = self.pending.pop(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            self._note("wait", i)

    def after_forward(self, i: int) -> None:
        if i < self.num_swap:
            self._offload(i)
            self._upload(self.n - self.num_swap + i)

    def mark_for_backward(self, i: int, outputs):
        """Wraps a block's outputs so that ``before_backward(i)`` runs when their gradients arrive."""
        tensors = outputs if isinstance(outputs, tuple) else (outputs,)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return outputs
        marked = _BeforeBackward.apply(lambda: self.before_backward(i), *tensors)
        return marked if isinstance(outputs, tuple) else marked[0]

    def before_backward(self, i: int) -> None:
        p = self.n - 1 - i
        if 0 < p <= self.num_swap:
            if self.resident[i + 1] and i + 1 >= self.n - self.num_swap:
                self._offload(i + 1)
            self._upload(self.num_swap - p)
        self.wait_for_block(i)

    # ---- transfers --------------------------------------------------------------------------------

    def _note(self, what: str, i: int) -> None:
        if self.log is not None:
            self.log.append((what, i))

    def _to_host(self, t: Tensor) -> Tensor:
        if not self.cuda:
            return t.detach().to("cpu")
        if t.device.type == "cpu" and t.is_pinned():
            return t.detach()
        return self.arena.copy_of(t.detach())  # page-locked: uploads can be asynchronous

    def _offload(self, i: int, reuse_buffers: bool = True) -> None:
        if not self.resident[i]:
            return
        linears = self.linears[i]
        current = [lin.weight.data for lin in linears]
        if _pointers(current) != self.placed[i]:  # replaced from outside since we placed them: adopt
            self.host[i] = [self._to_host(t) for t in current]
        event = self.pending.pop(i, None)
        if event is not None:  # an upload into these buffers may still run: nothing reuses or frees them before it ends
            torch.cuda.current_stream(self.device).wait_event(event)
        if reuse_buffers and self.cuda and all(t.device == self.device for t in current):
            self.free_buffers.append(current)  # the next upload copies into them
        targets = [torch.full_like(h, float("nan")) for h in self.host[i]] if self.simulate else self.host[i]
        for lin, t in zip(linears, targets, strict=True):
            lin.weight.data = t
        self.placed[i] = _pointers(targets)
        self.resident[i] = False
        self._note("offload", i)

    def _upload(self, i: int) -> None:
        if self.resident[i]:
            return
        linears = self.linears[i]
        current = [lin.weight.data for lin in linears]
        if _pointers(current) != self.placed[i]:
            self.host[i] = [self._to_host(t) for t in current]
        event = None
        if self.cuda:
            buffers = self._buffers_like(self.host[i])
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # the buffers' last users are enqueued
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                for buffer, host in zip(buffers, self.host[i], strict=True):
                    buffer.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            buffers = self.host[i]
        for lin, t in zip(linears, buffers, strict=True):
            lin.weight.data = t
        self.placed[i] = _pointers(buffers)
        self.resident[i] = True
        self.pending[i] = event
        self._note("upload", i)

    def _buffers_like(self, hosts: list[Tensor]) -> list[Tensor]:
        for k, buffers in enumerate(self.free_buffers):
            if [(b.shape, b.dtype) for b in buffers] == [(h.shape, h.dtype) for h in hosts]:
                return self.free_buffers.pop(k)
        return [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in hosts]

    def host_resident_linears(self) -> list[nn.Linear]:
        return [lin for i, r in enumerate(self.resident) if not r for lin in self.linears[i]]


def move_to_device_except_swapped(model: nn.Module, offloaders: list[ModelOffloader], device) -> None:
    """``model.to(device)`` without ever putting the host-resident blocks' weights on the device."""
    for offloader in offloaders:
        for i in offloader.swappable:
            if not offloader.forward_start_layout()[i] and offloader.resident[i]:
                offloader._offload(i, reuse_buffers=False)  # free the device memory now
    parked = [(lin, lin.weight.data) for o in offloaders for lin in o.host_resident_linears()]
    for lin, _ in parked:
        lin.weight.data = torch.empty(0, dtype=lin.weight.dtype)
    model.to(device)
    for lin, data in parked:
        lin.weight.data = data
    for offloader in offloaders:
        for i in offloader.swappable:  # the resident swappable blocks now live in fresh device tensors
            if offloader.resident[i]:
                offloader.placed[i] = _pointers(lin.weight.data for lin in offloader.linears[i])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


_BLOCK_KEY = re.compile(r"(?:^|\.)(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)\.(\d+)\.")


def checkpoint_block_counts(ckpt_path: str) -> tuple[int, int]:
    """(double, single) block counts of a DiT file, shards or diffusers folder, from its header only."""
    from library.safetensors_io import checkpoint_files, read_keys

    found: dict[str, int] = {}
    for file in checkpoint_files(ckpt_path):
        for key in read_keys(file):
            m = _BLOCK_KEY.search(key)
            if m:
                kind = "single" if m.group(1).startswith("single") else "double"
                found[kind] = max(found.get(kind, 0), int(m.group(2)) + 1)
    return found.get("double", 0), found.get("single", 0)


def check_offload_args(args) -> None:
    """Refuses block-swap and checkpointing options (cpu offload, keeping attention) that cannot work;
    the bound on ``--blocks_to_swap`` comes from the checkpoint's real depth (its header only is read)."""
    from library.errors import UserError

    # --split_mode alone is turned into --blocks_to_swap 18 before this check: name the flag the user gave
    from_split_mode = getattr(args, "split_mode", False) and getattr(args, "swap_from_split_mode", False)
    swap = f"--split_mode (--blocks_to_swap {args.blocks_to_swap})" if from_split_mode else "--blocks_to_swap"
    if args.cpu_offload_checkpointing:
        if not args.gradient_checkpointing:
            raise UserError("--cpu_offload_checkpointing moves what gradient checkpointing keeps to the CPU: "
                            "add --gradient_checkpointing")  # fmt: skip
        if args.blocks_to_swap:
            raise UserError(f"--cpu_offload_checkpointing cannot be combined with {swap}: use one of them")
    if args.gradient_checkpointing_keep_attention:
        if not args.gradient_checkpointing:
            raise UserError("--gradient_checkpointing_keep_attention changes what gradient checkpointing keeps: "
                            "add --gradient_checkpointing")  # fmt: skip
        if args.cpu_offload_checkpointing:
            raise UserError("--gradient_checkpointing_keep_attention keeps attention outputs on the GPU, which "
                            "--cpu_offload_checkpointing is there to avoid: use one of them")  # fmt: skip
    if args.blocks_to_swap and args.torch_compile:  # compiled graphs keep their weights for backward (Flux._run)
        if not args.gradient_checkpointing:
            raise UserError(f"--torch_compile with {swap} needs --gradient_checkpointing: without it, "
                            "each compiled block keeps its weights for its backward, so every swapped block "
                            "would stay on the GPU")  # fmt: skip
        if args.gradient_checkpointing_keep_attention:
            raise UserError("--gradient_checkpointing_keep_attention cannot be combined with --torch_compile and "
                            f"{swap}: it needs the checkpoint inside the compiled graph, which keeps every "
                            "swapped block's weights on the GPU until backward. Drop one of them")  # fmt: skip
    if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be 0 or more, not {args.blocks_to_swap}")
    if args.blocks_to_swap and args.pretrained_model_name_or_path:
        double, single = checkpoint_block_counts(args.pretrained_model_name_or_path)
        try:
            swap_split(args.blocks_to_swap, double, single)
        except ValueError as e:
            given = " (set by --split_mode)" if from_split_mode else ""
            raise UserError(f"{args.pretrained_model_name_or_path}: {e}{given}") from None
