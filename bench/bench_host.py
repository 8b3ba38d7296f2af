"""Host work per training step: FLUX.1's full depth (19 double, 38 single blocks) at a width of 64,
on the CPU, so that the arithmetic costs next to nothing and what is timed is the per-operator work
of Python, autograd and the dispatcher. On a fast GPU that work is what the GPU waits for when a
step is launch-bound (``bench/RESULTS.md``, ninth session).

    python bench/bench_host.py [--settings a,b,bk,ref] [--steps 15]

The settings are ``bench_gpu.py``'s (LoRA rank 16 on the default targets, AdamW), in fp32 with
one thread. Prints the median milliseconds of a step, the ATen operators dispatched in one step,
and each setting's time over the diffusers reference's (ref) measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_gpu  # noqa: E402
from library.flux_models import FluxParams  # noqa: E402


def full_depth_params(depth: int = 19, depth_single: int = 38) -> FluxParams:
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                      mlp_ratio=4.0, num_heads=4, depth=depth, depth_single_blocks=depth_single,
                      axes_dim=[4, 6, 6])  # fmt: skip


class CountOperators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(name: str, params: FluxParams, steps: int, warmup: int) -> dict:
    setting = bench_gpu.SETTINGS[name]
    device, dtype = torch.device("cpu"), torch.float32
    if setting.get("diffusers"):
        _, forward, trainable = bench_gpu.build_diffusers(params, device, setting, dtype)
    else:
        _, forward, trainable = bench_gpu.build_ours(params, device, setting, True, dtype)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    x = bench_gpu.inputs(params, 4, 8, device, dtype)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        bench_gpu.train_step(forward, x, optimizer, device, dtype)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    with CountOperators() as counter:
        bench_gpu.train_step(forward, x, optimizer, device, dtype)
    return {"setting": name, "ms": statistics.median(times) * 1e3, "operators": counter.count}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="a,b,bk,ref", help="bench_gpu.py settings (default a,b,bk,ref)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per setting (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (default 3)")
    parser.add_argument("--depth", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"),
                        help="blocks (default FLUX.1's 19 38)")  # fmt: skip
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in bench_gpu.SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(bench_gpu.SETTINGS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = full_depth_params(*args.depth)
        results = [measure(name, params, args.steps, args.warmup) for name in names]
    finally:
        torch.set_num_threads(threads)
    ref = next((r["ms"] for r in results if r["setting"] == "ref"), None)
    for r in results:
        ratio = f"  {r['ms'] / ref:.2f} of ref" if ref else ""
        print(f"{r['setting']:4s} {r['ms']:8.1f} ms/step  {r['operators']:6d} operators{ratio}", flush=True)
    return results


if __name__ == "__main__":
    main()
