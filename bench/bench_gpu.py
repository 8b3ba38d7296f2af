"""LoRA training step of the full FLUX.1-dev DiT on one GPU: this project's memory settings and
diffusers + peft as the reference, with random weights (nothing is downloaded).

    python bench/bench_gpu.py [--settings a,b,c,d18,d28,ref] [--out bench/gpu_results.jsonl]

Every setting trains a rank-16 LoRA on the default targets (every Linear of the double and
single blocks) with torch AdamW, at 1024x1024 (4096 image + 512 text tokens), batch 1, under
bf16 autocast, and prints seconds per step (median of --steps after --warmup), peak VRAM,
achieved TFLOP/s and model-FLOPs utilisation (FLOPs from ``library.flux_models.training_flops``):

    a     bf16 base, no gradient checkpointing
    ac    (a) with cuDNN attention first (--cudnn_attention)
    b     bf16 base, gradient checkpointing
    bk    (b) keeping each block's attention output (--gradient_checkpointing_keep_attention)
    bc    (b) with cuDNN attention first (--cudnn_attention)
    c     fp8 base (--fp8_base), checkpointing
    ck    (c) keeping each block's attention output
    cs    fp8 base with per-row scales (--fp8_scaled), checkpointing
    d18   fp8 base, checkpointing, --blocks_to_swap 18
    d28   fp8 base, checkpointing, --blocks_to_swap 28
    ref   diffusers FluxTransformer2DModel + peft LoRA of the same rank and targets, as (b), with
          the attention kernels ours uses (cuDNN's left out)
    refc  (ref) with SDPA's own choice of kernel (cuDNN's first on an H100 with torch 2.11)

Each setting builds its own model, catches its own failure (out of memory included) and appends
one JSON line to --out as it finishes, so a crash or timeout keeps what was measured. Checked with
torch 2.8, 2.11 (the H100's), 2.13 and 2.14; 2.4 lacks the checkpoint policies the project imports.
``--tiny`` runs every setting at a tiny width (the CPU smoke test uses it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.flux_models import Flux, FluxParams, configs, training_flops  # noqa: E402
from library.flux_utils import prepare_img_ids  # noqa: E402

SETTINGS = {
    "a": dict(checkpointing=False),
    "ac": dict(checkpointing=False, cudnn=True),
    "b": dict(checkpointing=True),
    "bk": dict(checkpointing=True, keep_attention=True),
    "bc": dict(checkpointing=True, cudnn=True),
    "c": dict(checkpointing=True, fp8=True),
    "ck": dict(checkpointing=True, fp8=True, keep_attention=True),
    "cs": dict(checkpointing=True, fp8=True, scaled=True),
    "d18": dict(checkpointing=True, fp8=True, swap=18),
    "d28": dict(checkpointing=True, fp8=True, swap=28),
    "ref": dict(checkpointing=True, diffusers=True),
    "refc": dict(checkpointing=True, diffusers=True, cudnn=True),
}
DEFAULT_SETTINGS = "a,b,c,d18,d28,ref"
# dense bf16 peak TFLOP/s by device name (substring, lower case)
PEAK_TFLOPS = {"h200": 989.0, "h100 pcie": 756.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0, "4090": 165.0}
# peft targets equivalent to lora_flux's defaults (diffusers splits the fused qkv and linear1)
DIFFUSERS_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear"
    r"|proj_mlp|proj_out|norm\.linear)"
)


def tiny_params() -> FluxParams:
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                      mlp_ratio=4.0, num_heads=4, depth=4, depth_single_blocks=8, axes_dim=[4, 6, 6])  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build_ours(params: FluxParams, device, setting: dict, tiny: bool, dtype: torch.dtype):
    from library.fp8 import quantize_dit_
    from library.offloading import max_blocks_to_swap
    from networks import lora_flux

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            dit = Flux(params)
    finally:
        torch.set_default_dtype(previous)
    dit.requires_grad_(False)
    if setting.get("cudnn"):
        from library import flux_attention

        flux_attention.use_cudnn_attention(True)  # as --cudnn_attention
    if setting.get("fp8"):
        quantize_dit_(dit, dtype, scaled=setting.get("scaled", False))
    swap = setting.get("swap")
    if swap:
        if tiny:
            swap = min(swap, max_blocks_to_swap(params.depth, params.depth_single_blocks))
        dit.enable_block_swap(swap, device)
        dit.move_to_device_except_swap_blocks(device)
    if setting["checkpointing"]:
        dit.enable_gradient_checkpointing(keep_attention=setting.get("keep_attention", False))
    dit.train(setting["checkpointing"])
    network = lora_flux.create_network(1.0, 16, 16, None, [None, None], dit)
    network.apply_to([None, None], dit, apply_text_encoder=False, apply_unet=True)
    network.to(device)
    network.requires_grad_(True)
    params_ = [p for p in network.parameters() if p.requires_grad]

    def forward(x):
        return dit(img=x["img"], img_ids=x["img_ids"], txt=x["txt"], txt_ids=x["txt_ids"],
                   timesteps=x["timesteps"], y=x["y"], guidance=x["guidance"])  # fmt: skip

    return dit, forward, params_


def build_diffusers(params: FluxParams, device, setting: dict, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
                num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
                num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
                pooled_projection_dim=params.vec_in_dim, guidance_embeds=True, axes_dims_rope=tuple(params.axes_dim),
            )  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    # without "cudnn", the attention kernels ours uses (library.flux_attention leaves cuDNN's out)
    torch.backends.cuda.enable_cudnn_sdp(bool(setting.get("cudnn")))
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=DIFFUSERS_TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # LoRA weights in fp32 under autocast, as in our trainer
    if setting["checkpointing"]:
        model.enable_gradient_checkpointing()
    model.train()

    def forward(x):
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"], return_dict=False)[0]  # fmt: skip

    return model, forward, trainable


def inputs(params: FluxParams, side: int, txt_tokens: int, device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    x = dict(
        img=torch.randn(1, side * side, params.in_channels, generator=g),
        img_ids=prepare_img_ids(1, side, side),
        txt=torch.randn(1, txt_tokens, params.context_in_dim, generator=g),
        txt_ids=torch.zeros(1, txt_tokens, 3),
        timesteps=torch.tensor([0.6]),
        y=torch.randn(1, params.vec_in_dim, generator=g),
        guidance=torch.tensor([1.0]),
        target=torch.randn(1, side * side, params.out_channels, generator=g),
    )
    return {k: v.to(device, dtype if k in ("img", "txt", "y") else torch.float32) for k, v in x.items()}


def run_setting(name: str, args, params: FluxParams, device: torch.device) -> dict:
    setting = SETTINGS[name]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    side = 4 if args.tiny else 64
    txt_tokens = 8 if args.tiny else 512
    result = {"setting": name, **{k: v for k, v in setting.items()}, "compile": bool(args.compile),
              "device": describe_device(device),
              "torch": torch.__version__, "img_tokens": side * side, "txt_tokens": txt_tokens}  # fmt: skip
    model = None
    from library import flux_attention

    backends = flux_attention.ATTENTION_BACKENDS  # "bc" changes them for its own run
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        if setting.get("diffusers"):
            model, forward, trainable = build_diffusers(params, device, setting, dtype)
        else:
            model, forward, trainable = build_ours(params, device, setting, args.tiny, dtype)
        if args.compile and not setting.get("diffusers"):
            model.compile_blocks()  # as the trainer's --torch_compile
        result["build_s"] = round(time.perf_counter() - start, 2)
        result["lora_params"] = sum(p.numel() for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        x = inputs(params, side, txt_tokens, device, dtype)
        sync(device)
        if device.type == "cuda":
            result["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for step in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            loss = train_step(forward, x, optimizer, device, dtype)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        s = statistics.median(times)
        flops = training_flops(params, side * side, txt_tokens, 1, setting["checkpointing"], 16,
                               keep_attention=setting.get("keep_attention", False))  # fmt: skip
        peak = peak_tflops(device, args.peak_tflops)
        result.update(s_per_step=round(s, 4), step_times=[round(t, 4) for t in times],
                      flop_per_step=flops, tflop_per_step=round(flops / 1e12, 2),
                      achieved_tflops=round(flops / s / 1e12, 3),
                      loss_finite=all(v == v and abs(v) != float("inf") for v in losses),
                      losses=[round(v, 6) for v in losses])  # fmt: skip
        # the same seeds in every setting: the losses of two settings with the same base precision
        # (d28 and d28 compiled, say) follow each other to within the precision's rounding
        if name in args.profile.split(","):
            step = lambda: train_step(forward, x, optimizer, device, dtype)  # noqa: E731
            result["profile"] = profile_step(name, args, device, step)
        if peak:
            result["mfu"] = round(flops / s / (peak * 1e12), 3)
        if device.type == "cuda":
            result["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    except Exception as e:  # noqa: BLE001  (each setting reports its own failure and the run goes on)
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        result["traceback"] = traceback.format_exc(limit=4)[-2000:]
    finally:
        flux_attention.ATTENTION_BACKENDS = backends
        model = forward = trainable = optimizer = x = loss = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a kernel fault broke the CUDA context: the error above is the result
                pass
    return result


def train_step(forward, x: dict, optimizer, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = forward(x)
    loss = F.mse_loss(out.float(), x["target"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def profile_step(name: str, args, device: torch.device, step) -> str:
    """One more step under torch.profiler; writes the top operators by device time next to --out."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = events.table(sort_by=key if device.type == "cuda" else "self_cpu_time_total", row_limit=40)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    suffix = "_compiled" if args.compile else ""
    path = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"profile_{name}{suffix}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(table or "")
    return path


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated (default {DEFAULT_SETTINGS})")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per setting (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    parser.add_argument("--out", default="bench/gpu_results.jsonl", help="JSON lines file results are appended to")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny width instead of FLUX.1-dev (smoke test)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block of our model")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="base weights and autocast dtype (default bf16; fp32 only for the CPU smoke test)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for the MFU")
    parser.add_argument(
        "--profile",
        default="",
        metavar="SETTINGS",
        help="comma-separated settings to profile one more step of; each table goes next to --out",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads while it runs (default: torch's)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every setting in this process (on CUDA each setting gets its own process by "
        "default, so that a crash that ends the CUDA context does not end the others)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, parser)
    finally:
        torch.set_num_threads(threads)


def run_in_child(name: str, args) -> dict:
    """Runs one setting in a child process; records the child's exit if it died without a result."""
    from bench.child_runs import run_in_child as run_child

    child_argv = [*args.argv, "--settings", name, "--in-process"]
    result, recorded = run_child(__file__, child_argv, args.out, {"setting": name})
    if not recorded:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{name:4s} FAILED {result['error']}", flush=True)
    return result


def run(args, parser) -> list[dict]:
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = tiny_params() if args.tiny else configs["dev"]
    print(f"{describe_device(device)}, torch {torch.__version__}, "
          f"{'tiny' if args.tiny else 'FLUX.1-dev'} DiT, LoRA rank 16, AdamW")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for name in names:
        if device.type == "cuda" and len(names) > 1 and not args.in_process:
            result = run_in_child(name, args)
            results.append(result)
            continue
        result = run_setting(name, args, params, device)
        result["dtype"] = args.dtype
        results.append(result)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        if "error" in result:
            print(f"{name:4s} FAILED {result['error']}", flush=True)
        else:
            print(f"{name:4s} {result['s_per_step']:.3f} s/step  peak {result.get('peak_vram_gib', '-')} GiB  "
                  f"{result['achieved_tflops']} TFLOP/s  MFU {result.get('mfu', '-')}", flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
