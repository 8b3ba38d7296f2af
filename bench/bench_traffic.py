"""Memory traffic of one LoRA training step of the full FLUX.1-dev DiT, counted without a GPU.

    python bench/bench_traffic.py [--settings a,b,bk,c,ref] [--batch 1] [--top 12] [--tiny]

On a GPU the kernels outside the matrix products and attention (norms, RoPE, modulation, casts,
GELU, LoRA's additions) are memory-bound: their time follows the bytes they read and write.
This script runs one forward and backward of ``bench_gpu.py``'s settings (the same model, LoRA,
inputs and bf16 autocast) on fake tensors (torch's ``FakeTensorMode``: shapes and dtypes, no
memory, no arithmetic, so FLUX.1-dev at 1024² takes seconds on any CPU) and adds up, for every
such kernel, the bytes of its tensor arguments and results. Views and allocations move nothing
and are not counted; a broadcast argument counts at its own size. Matrix products and fused
attention are counted apart: their time follows their FLOPs. Thin products are the exception,
in a column of their own: a product with a dimension of at most 64 (LoRA's rank-16 products, the
modulation's one-row products) is memory-bound too. The time column divides both by --bandwidth.

CUDA autocast and CPU autocast cast different ops to fp32. The step runs on the CPU with CUDA's
rules emulated (:func:`cuda_autocast_rules`): the ops of CUDA's fp32 list that these models call
get their low-precision inputs cast to fp32, and the reductions that CUDA autocast runs with
``dtype=float32`` get that argument. The figure is an estimate of HBM traffic (a kernel that
reads its input twice or keeps it in cache is counted once), for comparing implementations and
changes on the same scale.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_gpu  # noqa: E402
from library.flux_attention import FUSED_ATTENTION_OPS  # noqa: E402
from library.flux_models import configs  # noqa: E402

SETTINGS = ("a", "b", "bk", "c", "ck", "ref")  # bench_gpu's settings that run on one device without swapping
DEFAULT_SETTINGS = "a,b,bk,c,ref"
# compute-bound kernels, counted apart (their time follows their FLOPs): matrix products, and the
# fused attention kernels with their backward
_ATTENTION = [op.overloadpacket.__name__ for op in FUSED_ATTENTION_OPS]
_ATTENTION += [f"{name}_backward" for name in _ATTENTION]
MATMUL_OPS = frozenset(["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", *_ATTENTION])
# ... except a product with a dimension this small (LoRA's rank-16 products, the modulation's
# one-row products): it does about that many multiply-adds per element it reads or writes, far
# below the ~300 an H100 needs to be compute-bound, so its time follows its bytes: counted as "thin"
THIN_PRODUCTS, THIN_DIM = frozenset(["mm", "addmm", "bmm", "baddbmm"]), 64

# ops that allocate or alias without touching memory
FREE_OPS = frozenset({
    "empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided", "_unsafe_view", "detach", "alias",
    "lift_fresh", "_local_scalar_dense",
})  # fmt: skip
WRITE_ONLY_OPS = frozenset({"fill_", "zero_"})
# CUDA autocast (aten/src/ATen/autocast_mode.cpp): inputs cast to fp32 ("fp32" policy), and reductions
# given dtype=float32 ("fp32_set_opt_dtype"), for the functions these models call
CUDA_FP32_CAST = {
    F: ("layer_norm", "group_norm", "mse_loss"),
    torch: ("layer_norm", "rsqrt", "pow", "exp", "log"),
    torch.Tensor: ("rsqrt", "pow", "__pow__", "exp", "log"),
}
CUDA_FP32_DTYPE = {
    F: ("softmax",),
    torch: ("sum", "softmax"),
    torch.Tensor: ("sum", "softmax"),
    torch.linalg: ("vector_norm",),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _cast_inputs_to_fp32(fn):
    def wrapper(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):

            def up(t):
                return t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t

            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _reduce_in_fp32(fn):
    def wrapper(*args, **kwargs):
        low = args and isinstance(args[0], torch.Tensor) and args[0].dtype in LOW_PRECISION
        if torch.is_autocast_enabled("cpu") and low and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """While active, ``torch.autocast("cpu")`` casts like CUDA autocast for the ops listed above."""
    originals = []
    for wrap, table in ((_cast_inputs_to_fp32, CUDA_FP32_CAST), (_reduce_in_fp32, CUDA_FP32_DTYPE)):
        for owner, names in table.items():
            for name in names:
                originals.append((owner, name, getattr(owner, name)))
                setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, fn in reversed(originals):
            setattr(owner, name, fn)


class TrafficCounter(TorchDispatchMode):
    """Bytes read and written, and calls, per aten op; matrix products and attention under "matmul"."""

    def __init__(self):
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.tensors: list[tuple[str, torch.Size, torch.dtype]] = []  # every result: (op, shape, dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE_OPS or func.namespace == "prim":
            return out
        # an out= argument is written, not read (an in-place op's self is both, and counts twice)
        written = {a.name for a in func._schema.arguments if a.kwarg_only and a.alias_info and a.alias_info.is_write}
        read = {k: v for k, v in (kwargs or {}).items() if k not in written}
        inputs = [t for t in tree_flatten((args, read))[0] if isinstance(t, torch.Tensor)]
        if name in WRITE_ONLY_OPS:
            inputs = []
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not inputs and not outputs:  # no tensor touched (torch.promote_types, ...): not a kernel
            return out
        key = "matmul" if name in MATMUL_OPS else name
        if name in THIN_PRODUCTS and min(_product_dims(name, args)) <= THIN_DIM:
            key = "thin"
        self.bytes[key] += sum(t.numel() * t.element_size() for t in inputs + outputs)
        self.calls[key] += 1
        self.tensors += [(name, t.shape, t.dtype) for t in outputs]
        return out

    @property
    def elementwise_bytes(self) -> int:
        return sum(v for k, v in self.bytes.items() if k not in ("matmul", "thin"))

    @property
    def elementwise_calls(self) -> int:
        return sum(v for k, v in self.calls.items() if k not in ("matmul", "thin"))


def _product_dims(name: str, args) -> tuple[int, int, int]:
    """(M, K, N) of a (batched) matrix product (M x K) @ (K x N); addmm and baddbmm take the addend first."""
    a, b = args[1:3] if name in ("addmm", "baddbmm") else args[:2]
    return a.shape[-2], a.shape[-1], b.shape[-1]


def count_step(name: str, params, side: int, txt_tokens: int, batch: int = 1) -> TrafficCounter:
    """One forward and backward of ``bench_gpu``'s setting ``name``, on fake tensors, counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    setting, device, dtype = bench_gpu.SETTINGS[name], torch.device("cpu"), torch.bfloat16
    counter = TrafficCounter()
    module_to = torch.nn.Module.to
    # one device, so nothing has to move (and fake parameters cannot be swapped for moved ones)
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            if setting.get("diffusers"):
                _, forward, _ = bench_gpu.build_diffusers(params, device, setting, dtype)
            else:
                _, forward, _ = bench_gpu.build_ours(params, device, setting, False, dtype)
            x = bench_gpu.inputs(params, side, txt_tokens, device, dtype)  # one sample, repeated
            x = {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in x.items()}
            with cuda_autocast_rules(), counter:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = forward(x)
                F.mse_loss(out.float(), x["target"]).backward()
    finally:
        torch.nn.Module.to = module_to
    return counter


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated from {','.join(SETTINGS)} "
                        f"(default {DEFAULT_SETTINGS}; see bench_gpu.py)")  # fmt: skip
    parser.add_argument("--top", type=int, default=0, help="also list each setting's N largest ops")
    parser.add_argument(
        "--bandwidth", type=float, default=3.35, help="TB/s for the time column (default 3.35: H100 SXM)"
    )
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1, as bench_gpu.py)")
    parser.add_argument("--tiny", action="store_true", help="bench_gpu's tiny width (smoke test)")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    params, side, txt_tokens = (bench_gpu.tiny_params(), 4, 8) if args.tiny else (configs["dev"], 64, 512)
    model = "tiny" if args.tiny else "FLUX.1-dev"
    print(f"{model} DiT, batch {args.batch} of {side * side} image + {txt_tokens} text tokens, LoRA rank 16, "
          "bf16 autocast with CUDA's rules; one forward + backward")  # fmt: skip
    time_column = f"ms at {args.bandwidth:g} TB/s"
    print(f"{'setting':8s} {'elementwise GiB':>16s} {'kernels':>8s} {'thin products GiB':>18s} {time_column:>16s}"
          f" {'matmul/attention calls':>23s}")  # fmt: skip
    results = []
    for name in names:
        start = time.perf_counter()
        counter = count_step(name, params, side, txt_tokens, args.batch)
        result = dict(setting=name, elementwise_bytes=counter.elementwise_bytes, kernels=counter.elementwise_calls,
                      thin_bytes=counter.bytes["thin"], thin_calls=counter.calls["thin"],
                      matmul_calls=counter.calls["matmul"], seconds=round(time.perf_counter() - start, 1))  # fmt: skip
        results.append(result)
        ms = (counter.elementwise_bytes + counter.bytes["thin"]) / (args.bandwidth * 1e12) * 1e3
        print(f"{name:8s} {counter.elementwise_bytes / 2**30:16.2f} {counter.elementwise_calls:8d}"
              f" {counter.bytes['thin'] / 2**30:18.2f} {ms:16.1f} {counter.calls['matmul']:23d}",
              flush=True)  # fmt: skip
        largest = [(op, n) for op, n in counter.bytes.most_common() if op not in ("matmul", "thin")][: args.top]
        for op, n in largest:
            print(f"    {op:36s} {n / 2**30:9.2f} GiB {counter.calls[op]:6d} calls")
    ref = next((r for r in results if r["setting"] == "ref"), None)
    # the reference checkpoints, as (b) does: compare it with the settings that checkpoint too
    comparable = [r for r in results if ref and r is not ref and bench_gpu.SETTINGS[r["setting"]]["checkpointing"]]
    for r in comparable:
        traffic, kernels = r["elementwise_bytes"] / ref["elementwise_bytes"], r["kernels"] / ref["kernels"]
        thin = r["thin_bytes"] / ref["thin_bytes"]
        print(f"{r['setting']}/ref: elementwise traffic {traffic:.3f}, kernels {kernels:.3f}, thin products {thin:.3f}")
    return results


if __name__ == "__main__":
    main()
