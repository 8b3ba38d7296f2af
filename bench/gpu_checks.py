"""Correctness checks for the code paths that only a CUDA machine exercises, in one short run.

    python bench/gpu_checks.py [--device cuda] [--checks swap,fp8,...] [--out gpu_checks.jsonl]

The test suite runs on CPU, where block-swap transfers are no-ops and fp8 matmuls run on the
CPU kernels. Here, on the GPU, each check compares against a reference computed in the same run:

    swap        loss and LoRA gradients with --blocks_to_swap equal those without, bit for bit
                (with deterministic attention), for bf16 and fp8 bases, with and without
                gradient checkpointing, over two steps with a no-grad forward (validation,
                sampling) in between
    fp8         fp8 and fp8-scaled block outputs against bf16: finite, and scaled error < plain
    trainer     flux_train_network.py end to end on CUDA: bf16, --fp8_base, checkpointing,
                --blocks_to_swap, a sample image
    keep_attention   checkpointing that keeps attention outputs runs no attention kernel in
                backward and gives plain checkpointing's loss, and its gradients within the
                run-to-run difference of plain checkpointing, with the attention kernels users get
    compile     per-block torch.compile gives the eager loss and gradients (within bf16 noise)
    compile_swap      compiled block calls with --blocks_to_swap (the recomputation outside the
                graphs) give the eager swapped model's loss and gradients
    trainer_compile   the trainer with --torch_compile instead of fp8 and block swap

Each check prints PASS/FAIL with its figures and appends a JSON line to --out; the exit status
is the number of failed checks. On a CPU (``--device cpu``) it runs as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.flux_attention import FUSED_ATTENTION_OPS  # noqa: E402
from library.flux_utils import prepare_img_ids  # noqa: E402
from library.tiny_models import random_model, tiny_flux_params, write_model, write_tiny_models  # noqa: E402
from networks import lora_flux  # noqa: E402


def mid_params():
    """Wide enough that kernels and transfers are real GPU work (hidden 512, head dim 128)."""
    return tiny_flux_params(depth=4, depth_single=6, hidden_size=512, num_heads=4, axes_dim=[16, 56, 56],
                            context_in_dim=256, vec_in_dim=128)  # fmt: skip


def mid_inputs(p, device, side=16, txt=64):
    g = torch.Generator().manual_seed(0)
    x = dict(
        img=torch.randn(2, side * side, p.in_channels, generator=g),
        img_ids=prepare_img_ids(2, side, side),
        txt=torch.randn(2, txt, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(2, txt, 3),
        timesteps=torch.tensor([0.3, 0.85]),
        y=torch.randn(2, p.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 3.5]),
    )
    return {k: v.to(device) for k, v in x.items()}


class AttentionKernelCalls(TorchDispatchMode):
    """Counts the fused attention kernels (flash, memory-efficient, cuDNN) that eager code runs while
    it is active. Seen at dispatch, so an output that selective checkpointing hands back is not
    counted (the profiler would count it); a compiled graph's kernels are not seen at all."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in FUSED_ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def build(device, dtype, fp8=False, swap=0, checkpointing=False, seed=5, keep_attention=False):
    from library.fp8 import quantize_dit_

    model = random_model(mid_params(), seed=seed).to(dtype)
    model.requires_grad_(False)
    if fp8:
        quantize_dit_(model, dtype)
    if swap:
        model.enable_block_swap(swap, device)
        model.move_to_device_except_swap_blocks(device)
    else:
        model.to(device)
    if checkpointing:
        model.enable_gradient_checkpointing(keep_attention=keep_attention)
    model.train()
    torch.manual_seed(0)
    lora = lora_flux.create_network(1.0, 8, 8, None, [None, None], model)
    for name, p in lora.named_parameters():
        if "lora_up" in name:
            p.data.normal_(0, 0.05)
    lora.apply_to([None, None], model)
    lora.to(device).requires_grad_(True)
    return model, lora


def lora_steps(model, lora, x, device, steps=2, backward_attention: AttentionKernelCalls | None = None):
    """Loss and LoRA gradients of ``steps`` steps (no optimizer: the same weights each time), with a
    no-grad forward before each, as validation or sampling would do; ``backward_attention`` counts
    the attention kernels the backward passes run."""
    results = []
    for _ in range(steps):
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            model(**x)
        lora.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16):
            loss = model(**x).float().square().mean()
        if backward_attention is None:
            loss.backward()
        else:
            with backward_attention:
                loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}))
    return results


def check_swap(device) -> dict:
    """Bitwise, so attention runs in the deterministic math kernel: flash attention's backward
    accumulates with atomics and differs from run to run (``floor``: two runs without swapping)."""
    from torch.nn.attention import SDPBackend

    from library import flux_attention

    x = mid_inputs(mid_params(), device)
    backends = flux_attention.ATTENTION_BACKENDS
    flux_attention.ATTENTION_BACKENDS = [SDPBackend.MATH]
    try:
        cases = []
        for fp8 in (False, True):
            for checkpointing in (False, True):
                reference = lora_steps(*build(device, torch.bfloat16, fp8, 0, checkpointing), x, device)
                again = lora_steps(*build(device, torch.bfloat16, fp8, 0, checkpointing), x, device)
                swapped = lora_steps(*build(device, torch.bfloat16, fp8, 4, checkpointing), x, device)
                floor, floor_equal = compare_steps(reference, again)
                worst, equal = compare_steps(reference, swapped)
                cases.append(dict(fp8=fp8, checkpointing=checkpointing, equal=equal, max_grad_diff=worst,
                                  floor_equal=floor_equal, floor=floor, loss=reference[-1][0].item()))  # fmt: skip
    finally:
        flux_attention.ATTENTION_BACKENDS = backends
    return dict(ok=all(c["equal"] for c in cases), cases=cases)


def compare_steps(a, b) -> tuple[float, bool]:
    """(largest gradient difference, whether losses and gradients are bitwise equal) of two lora_steps results."""
    worst, equal = 0.0, True
    for (loss_a, grads_a), (loss_b, grads_b) in zip(a, b, strict=True):
        equal &= bool(torch.equal(loss_a, loss_b)) and grads_a.keys() == grads_b.keys() and bool(grads_a)
        for name in grads_a:
            worst = max(worst, (grads_a[name] - grads_b[name]).abs().max().item())
            equal &= bool(torch.equal(grads_a[name], grads_b[name]))
    return worst, equal


def check_keep_attention(device) -> dict:
    x = mid_inputs(mid_params(), device)
    blocks = 2 * (mid_params().depth + mid_params().depth_single_blocks)  # per run of two steps
    cases = []
    for fp8, swap in ((False, 0), (True, 0), (True, 4)):
        counts, runs = {}, {}
        for name, keep in (("plain", False), ("again", False), ("kept", True)):
            calls = AttentionKernelCalls()
            model, lora = build(device, torch.bfloat16, fp8, swap, checkpointing=True, keep_attention=keep)
            runs[name] = lora_steps(model, lora, x, device, backward_attention=calls)
            counts[name] = calls.count
        floor, _ = compare_steps(runs["plain"], runs["again"])
        worst, equal = compare_steps(runs["plain"], runs["kept"])
        losses_equal = all(torch.equal(a[0], b[0]) for a, b in zip(runs["plain"], runs["kept"], strict=True))
        ok = counts["plain"] == blocks and counts["kept"] == 0 and losses_equal and worst <= 2 * floor
        cases.append(dict(fp8=fp8, swap=swap, backward_attention_calls=counts, losses_equal=losses_equal,
                          max_grad_diff=worst, equal=equal, floor=floor, ok=ok))  # fmt: skip
    return dict(ok=all(c["ok"] for c in cases), cases=cases)


def check_fp8(device) -> dict:
    from library.fp8 import make_fp8_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 3072, bias=True, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.004)  # FLUX-like magnitudes, mostly below e4m3's normal range
    x = torch.randn(4096, 3072, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        errors = {}
        for scaled in (False, True):
            quantized = make_fp8_linear(copy.deepcopy(linear), scaled=scaled)
            with torch.autocast(device.type, torch.bfloat16):
                out = quantized(x)
            errors["scaled" if scaled else "plain"] = ((out.float() - exact).norm() / exact.norm()).item()
    ok = all(v == v for v in errors.values()) and errors["scaled"] < errors["plain"]
    return dict(ok=ok, relative_error=errors)


def check_compile(device) -> dict:
    x = mid_inputs(mid_params(), device)
    eager = lora_steps(*build(device, torch.bfloat16, checkpointing=True), x, device, steps=1)[0]
    model, lora = build(device, torch.bfloat16, checkpointing=True)
    model.compile_blocks()  # as the trainer's --torch_compile
    start = time.perf_counter()
    compiled = lora_steps(model, lora, x, device, steps=2)[-1]
    seconds = time.perf_counter() - start
    loss_diff = abs(eager[0].item() - compiled[0].item()) / abs(eager[0].item())
    grad_rel = max(((eager[1][n] - compiled[1][n]).norm() / eager[1][n].norm().clamp_min(1e-12)).item()
                   for n in eager[1])  # fmt: skip
    return dict(ok=loss_diff < 1e-2 and grad_rel < 5e-2, loss_rel_diff=loss_diff, worst_grad_rel_diff=grad_rel,
                compile_and_2_steps_s=round(seconds, 1))  # fmt: skip


def check_compile_swap(device) -> dict:
    x = mid_inputs(mid_params(), device)
    eager = lora_steps(*build(device, torch.bfloat16, swap=4, checkpointing=True), x, device)
    model, lora = build(device, torch.bfloat16, swap=4, checkpointing=True)
    model.compile_blocks()
    compiled = lora_steps(model, lora, x, device)  # two steps, each after a forward without backward
    worst_loss = max(abs(a[0].item() - b[0].item()) / abs(a[0].item()) for a, b in zip(eager, compiled, strict=True))
    worst_grad = max(((a[1][n] - b[1][n]).norm() / a[1][n].norm().clamp_min(1e-12)).item()
                     for a, b in zip(eager, compiled, strict=True) for n in a[1])  # fmt: skip
    finite = all(torch.isfinite(g).all().item() for _, grads in compiled for g in grads.values())
    return dict(ok=finite and worst_loss < 1e-2 and worst_grad < 5e-2, loss_rel_diff=worst_loss,
                worst_grad_rel_diff=worst_grad, finite=finite)  # fmt: skip


def check_trainer(device, compile_blocks: bool = False) -> dict:
    from safetensors.torch import load_file

    import flux_train_network
    from library.demo_data import write_demo_dataset
    from tests.training_helpers import base_argv

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = write_tiny_models(os.path.join(tmp, "models"))
        deeper = tiny_flux_params(depth=4, depth_single=6)  # deep enough to swap blocks
        models.flux_dev = write_model(random_model(deeper, seed=3), os.path.join(tmp, "models", "deeper.safetensors"))
        data = write_demo_dataset(os.path.join(tmp, "data"))
        common = dict(mixed_precision="bf16", gradient_checkpointing=True, sample_prompts=data.sample_prompts,
                      sample_every_n_steps=4, sample_sampler="euler")  # fmt: skip
        runs_flags = {"compile": dict(torch_compile=True, **common)} if compile_blocks else {
            "fp8_swap": dict(fp8_base=True, blocks_to_swap=2, **common)}  # fmt: skip
        for name, flags in runs_flags.items():
            out = os.path.join(tmp, name)
            code = flux_train_network.main(base_argv(models, data, out, steps=4, **flags))
            lora = os.path.join(out, "lora.safetensors")
            finite = os.path.isfile(lora) and all(torch.isfinite(t).all().item() for t in load_file(lora).values())
            sample_dir = os.path.join(out, "sample")
            samples = os.listdir(sample_dir) if os.path.isdir(sample_dir) else []
            runs[name] = dict(exit=code, lora_finite=finite, samples=len(samples))
    return dict(ok=all(r["exit"] == 0 and r["lora_finite"] and r["samples"] for r in runs.values()), runs=runs)


CHECKS = {
    "swap": check_swap,
    "fp8": check_fp8,
    "trainer": check_trainer,
    "keep_attention": check_keep_attention,
    "compile": check_compile,
    "compile_swap": check_compile_swap,
    "trainer_compile": lambda device: check_trainer(device, compile_blocks=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated (default {','.join(CHECKS)})")
    parser.add_argument("--out", default=None, help="JSON lines file results are appended to")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}", flush=True)
    failed = 0
    for check in args.checks.split(","):
        start = time.perf_counter()
        try:
            result = CHECKS[check](device)
        except Exception as e:  # noqa: BLE001  (report and go on to the next check)
            result = dict(ok=False, error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:])
        result = dict(check=check, device=name, torch=torch.__version__, seconds=round(time.perf_counter() - start, 1),
                      **result)  # fmt: skip
        failed += not result["ok"]
        print(("PASS " if result["ok"] else "FAIL ") + json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
