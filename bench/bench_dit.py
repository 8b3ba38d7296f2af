"""DiT forward+backward with a frozen base (gradient to the input only, as in LoRA training):
this project's model vs diffusers' FluxTransformer2DModel on identical weights, in one run.

    python bench/bench_dit.py [--threads 2] [--repeats 5] [--rounds 4] [--clock wall|cpu] [--keep-freed-memory]

Default shape: hidden 768, 6 heads, 2 double + 4 single blocks, 1024 image + 256 text tokens,
fp32 on CPU. Prints the best per-round median of each and their ratio ours/diffusers (lower is
better), and the median and spread of the per-round ratios. On a shared machine
``--repeats 1 --rounds 30`` gives the steadier figure: each round is then one step of each,
back to back, so both see the same load, and the median per-round ratio is the one to quote,
with its bootstrap 95% interval (100 rounds on the shared 2-core machine: about ±2%).

glibc hands large freed blocks back to the kernel, so each step touches fresh pages again, and
the model that allocates more pays more for it. ``--keep-freed-memory`` reruns the benchmark with
glibc told to keep and reuse freed memory (``KEEP_FREED_MEMORY``), which takes that out.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

KEEP_FREED_MEMORY = {  # glibc malloc tunables: no mmap for large blocks, no trimming of the heap
    "MALLOC_MMAP_THRESHOLD_": str(2**32),
    "MALLOC_TRIM_THRESHOLD_": str(2**36),
    "MALLOC_TOP_PAD_": str(2**30),
}

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.flux_key_mapping import bfl_to_diffusers  # noqa: E402
from library.flux_utils import prepare_img_ids  # noqa: E402
from library.tiny_models import random_model, tiny_flux_params  # noqa: E402


def keeps_freed_memory() -> bool:
    return all(os.environ.get(k) == v for k, v in KEEP_FREED_MEMORY.items())


def median_interval(values: list[float], confidence: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap interval of the median (seeded, so a run's figures reproduce from its ratios): how
    far the quoted median could move on this machine's noise."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * resamples)], medians[min(int((1 - tail) * resamples), resamples - 1)]


def timed(step, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of --repeats steps each (default 4)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time: with --threads 1 it is not inflated by "
                        "other processes sharing the cores (default wall)")
    parser.add_argument("--img-tokens", type=int, default=1024, help="a square number (32x32 patches = 512 px)")
    parser.add_argument("--txt-tokens", type=int, default=256)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="rerun with glibc keeping freed memory for reuse (see above)")
    args = parser.parse_args()
    if args.keep_freed_memory and not keeps_freed_memory():
        # glibc reads these when the process starts: start again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel

    p = tiny_flux_params(
        hidden_size=768, num_heads=6, axes_dim=[16, 56, 56], depth=2, depth_single=4,
        context_in_dim=4096, vec_in_dim=768,
    )
    ours = random_model(p, seed=0).requires_grad_(False)
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
        num_attention_heads=6, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval().requires_grad_(False)
    theirs.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)

    side = int(args.img_tokens**0.5)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, side * side, 64, generator=g)
    txt = torch.randn(1, args.txt_tokens, 4096, generator=g)
    y = torch.randn(1, 768, generator=g)
    img_ids, txt_ids = prepare_img_ids(1, side, side), torch.zeros(1, args.txt_tokens, 3)
    t, guidance = torch.tensor([0.5]), torch.tensor([3.5])

    def step_ours():
        x = img.clone().requires_grad_(True)
        ours(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance).sum().backward()

    def step_theirs():
        x = img.clone().requires_grad_(True)
        out = theirs(
            hidden_states=x, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
            img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False,
        )[0]
        out.sum().backward()

    step_ours(), step_theirs()  # warm-up
    # interleave (alternating which goes first) so that drift in machine load hits both alike
    ours_times, theirs_times = [], []
    for r in range(args.rounds):
        pair = [(step_ours, ours_times), (step_theirs, theirs_times)]
        for step, times in pair if r % 2 == 0 else pair[::-1]:
            times.append(timed(step, args.repeats, time.perf_counter if args.clock == "wall" else time.process_time))
    ours_s, theirs_s = min(ours_times), min(theirs_times)
    rounds = [a / b for a, b in zip(ours_times, theirs_times, strict=True)]
    print(f"shape: hidden 768, 6 heads, 2 double + 4 single, {side * side} img + {args.txt_tokens} txt tokens, "
          f"fp32, {args.threads} threads, {args.clock} clock"
          + (", freed memory kept" if keeps_freed_memory() else ""))
    print(f"ours      {ours_s * 1000:8.1f} ms / forward+backward")
    print(f"diffusers {theirs_s * 1000:8.1f} ms / forward+backward")
    low, high = median_interval(rounds)
    print(f"per-round ratios {min(rounds):.3f}-{max(rounds):.3f}, median {statistics.median(rounds):.3f} "
          f"(95% interval {low:.3f}-{high:.3f}; {args.rounds} rounds of {args.repeats} steps each)")
    print(f"ratio ours/diffusers {ours_s / theirs_s:.3f}")


if __name__ == "__main__":
    main()
