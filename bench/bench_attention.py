"""Attention kernels at FLUX.1's training shape: which ones work, and how fast, forward + backward.

    python bench/bench_attention.py [--out bench/attention_results.jsonl] [--tokens 4608]

FLUX.1 at 1024² attends over 4608 tokens (4096 image + 512 text) with 24 heads of 128. Each case
is one SDPA backend (flash, efficient, cudnn, math) and one q/k layout:

    contiguous   q, k, v each (B, L, H, D), as diffusers lays them out
    strided      q and k views into one (B, L, 2, H, D) buffer, as library.flux_attention writes them

Each case first checks its output and gradients against the math kernel at 1024 tokens, then
times forward + backward at --tokens (median of --steps). On CUDA every case runs in its own
process, because a kernel fault (cuDNN's backward faulted on an H100 with torch 2.11) ends
the CUDA context; a case whose process dies is recorded as such. Results append to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.child_runs import run_in_child  # noqa: E402

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
LAYOUTS = ("contiguous", "strided")


def qkv(layout: str, batch: int, tokens: int, heads: int, head_dim: int, device, dtype, seed: int = 0):
    """q, k, v (B, H, L, D) views, laid out as ``layout`` says, as leaves that take gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if layout == "contiguous":
        leaves = [torch.randn(batch, tokens, heads, head_dim, generator=g).to(device, dtype) for _ in range(3)]
        leaves = [t.requires_grad_(True) for t in leaves]
        return leaves, [t.transpose(1, 2) for t in leaves]
    qk = torch.randn(batch, tokens, 2, heads, head_dim, generator=g).to(device, dtype).requires_grad_(True)
    v = torch.randn(batch, tokens, heads, head_dim, generator=g).to(device, dtype).requires_grad_(True)
    q, k = qk.unbind(2)
    return [qk, v], [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)]


def attend(backend: str, q, k, v):
    with sdpa_kernel([BACKENDS[backend]]):
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)  # (B, L, H·D), as joint_attention returns it


def case_inputs(layout: str, tokens: int, device, dtype, seed: int = 0):
    """(leaves, (q, k, v), gradient of the output) for one forward + backward."""
    heads = 24 if device.type == "cuda" else 4
    leaves, views = qkv(layout, 1, tokens, heads, 128, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(1, tokens, heads * 128, generator=g).to(device, dtype)
    return leaves, views, grad_out


def forward_backward(backend: str, inputs):
    leaves, (q, k, v), grad_out = inputs
    for t in leaves:
        t.grad = None
    out = attend(backend, q, k, v)
    out.backward(grad_out, retain_graph=True)  # the q/k/v views are reused by the next step
    return out.detach(), [t.grad for t in leaves]


def run_case(backend: str, layout: str, args, device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"backend": backend, "layout": layout, "device": describe(device), "torch": torch.__version__}
    try:
        check_tokens = min(1024, args.tokens)
        out, grads = forward_backward(backend, case_inputs(layout, check_tokens, device, dtype))
        ref_out, ref_grads = forward_backward("math", case_inputs(layout, check_tokens, device, torch.float32))
        errors = [
            (a.float() - b).norm().item() / b.norm().item()
            for a, b in zip([out, *grads], [ref_out, *ref_grads], strict=True)
        ]
        result["worst_relative_error"] = max(errors)
        result["ok"] = max(errors) < (2e-2 if dtype == torch.bfloat16 else 1e-4)
        times = []
        inputs = case_inputs(layout, args.tokens, device, dtype)  # made once: the timing is the kernels'
        for step in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            forward_backward(backend, inputs)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        heads = 24 if device.type == "cuda" else 4
        flops = 3.5 * 4 * args.tokens**2 * heads * 128  # forward 4·L²·H·D, backward 2.5x that
        result.update(
            ms=round(statistics.median(times) * 1e3, 3), tflops=round(flops / statistics.median(times) / 1e12, 1)
        )
    except Exception as e:  # noqa: BLE001  (a failing kernel is a result)
        result.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                      traceback=traceback.format_exc(limit=3)[-1500:])  # fmt: skip
    return result


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default="bench/attention_results.jsonl", help="JSON lines file results are appended to"
    )
    parser.add_argument("--tokens", type=int, default=4608, help="sequence length timed (default 4608)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (default 3)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cases", default=None, help="backend:layout,... (default: every backend and layout)")
    parser.add_argument("--in-process", action="store_true", help="run every case in this process")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = [c.split(":") for c in args.cases.split(",")] if args.cases else [(b, l) for b in BACKENDS for l in LAYOUTS]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for backend, layout in cases:
        if device.type == "cuda" and len(cases) > 1 and not args.in_process:
            child_argv = [*argv, "--cases", f"{backend}:{layout}", "--in-process"]
            failure = {"backend": backend, "layout": layout, "ok": False}
            result, recorded = run_in_child(__file__, child_argv, args.out, failure)
            if recorded:  # the child wrote and printed it
                results.append(result)
                continue
        else:
            result = run_case(backend, layout, args, device)
        results.append(result)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        status = f"{result['ms']} ms, {result['tflops']} TFLOP/s" if "ms" in result else result.get("error", "")
        print(f"{backend:9s} {layout:10s} {'ok  ' if result['ok'] else 'FAIL'} {status}", flush=True)
    return results


if __name__ == "__main__":
    main()
