"""Peak RSS growth while loading a DiT file of at least 1 GB.

    python bench/load_memory.py [--folder DIR] [--double-blocks 7] [--layout bfl|diffusers|comfy-fp8] [--fp8]

Writes a FLUX-architecture checkpoint (hidden 1024; fp32, or bf16 / ComfyUI's scaled fp8 for the
other layouts) and loads it in a fresh process through ``library.flux_utils.load_flow_model``, at
the file's dtype or, with ``--fp8``, as ``--fp8_base`` loads it (block Linears in fp8, the rest in
bf16); prints file size, model size, RSS growth above the post-import baseline, and the growth
over the model's size (target: at most 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, resource, sys
import torch
from library.flux_utils import load_flow_model

def peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

baseline = peak_kib()
fp8 = sys.argv[2] == "fp8"
_, model = load_flow_model(sys.argv[1], torch.bfloat16 if fp8 else None, "cpu", fp8_block_linears=fp8)
tensors = list(model.parameters()) + list(model.buffers())
print(json.dumps({"baseline_kib": baseline, "peak_kib": peak_kib(),
                  "params": sum(p.numel() for p in model.parameters()),
                  "model_bytes": sum(t.numel() * t.element_size() for t in tensors)}))
"""

LAYOUTS = ("bfl", "diffusers", "comfy-fp8")


def write_checkpoint(path: str, double_blocks: int, layout: str = "bfl") -> int:
    """A FLUX-architecture file: BFL's layout in fp32, diffusers' in bf16, or ComfyUI's scaled fp8
    (block Linear weights in e4m3fn, each with a ``scale_weight``, the rest in bf16)."""
    import torch

    from library.flux_key_mapping import bfl_to_diffusers
    from library.flux_models import Flux
    from library.fp8 import FP8, block_linears
    from library.safetensors_io import save_safetensors
    from library.tiny_models import tiny_flux_params

    params = tiny_flux_params(
        hidden_size=1024, num_heads=8, axes_dim=[32, 48, 48], context_in_dim=256, vec_in_dim=256,
        depth=double_blocks, depth_single=0,
    )
    with torch.device("meta"):
        model = Flux(params)
    dtype = torch.float32 if layout == "bfl" else torch.bfloat16
    sd = {k: torch.full(v.shape, 0.01, dtype=dtype) for k, v in model.state_dict().items()}
    if layout == "diffusers":
        sd = bfl_to_diffusers(sd)
    elif layout == "comfy-fp8":
        for name, _ in block_linears(model):
            sd[f"{name}.weight"] = sd[f"{name}.weight"].float().mul(20).to(FP8)
            sd[f"{name}.scale_weight"] = torch.tensor(0.05)
        sd["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_safetensors(sd, path)
    return os.path.getsize(path)


def measure(path: str, fp8: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-c", _CHILD, path, "fp8" if fp8 else "as-stored"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["file_bytes"] = os.path.getsize(path)
    result["growth_bytes"] = (result["peak_kib"] - result["baseline_kib"]) * 1024
    result["ratio"] = result["growth_bytes"] / result["file_bytes"]
    result["model_ratio"] = result["growth_bytes"] / result["model_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--double-blocks", type=int, default=7,
                        help="7 blocks at hidden 1024 make about 1.06 GB in fp32 (twice as many for bf16)")
    parser.add_argument("--layout", choices=LAYOUTS, default="bfl",
                        help="bfl (fp32), diffusers (bf16) or comfy-fp8 (ComfyUI's scaled fp8); default bfl")
    parser.add_argument("--fp8", action="store_true", help="load as --fp8_base does (default: at the file's dtype)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = os.path.join(folder, "big.safetensors")
        write_checkpoint(path, args.double_blocks, args.layout)
        r = measure(path, args.fp8)
    print(f"file size       {r['file_bytes'] / 2**30:.3f} GiB ({args.layout})")
    print(f"model size      {r['model_bytes'] / 2**30:.3f} GiB" + (" (--fp8_base)" if args.fp8 else ""))
    print(f"peak RSS growth {r['growth_bytes'] / 2**30:.3f} GiB above the post-import baseline")
    print(f"growth / model  {r['model_ratio']:.3f} (target <= 1.3)")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
