"""Peak RSS growth while loading a DiT file of at least 1 GB at its own dtype.

    python bench/load_memory.py [--folder DIR] [--double-blocks 7]

Writes a FLUX-architecture checkpoint (hidden 1024, fp32) and loads it in a fresh process
through ``library.flux_utils.load_flow_model``; prints file size, RSS growth above the
post-import baseline, and their ratio (target: at most 1.3).
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
_, model = load_flow_model(sys.argv[1], None, "cpu")
print(json.dumps({"baseline_kib": baseline, "peak_kib": peak_kib(),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def write_checkpoint(path: str, double_blocks: int) -> int:
    import torch

    from library.flux_models import Flux
    from library.safetensors_io import save_safetensors
    from library.tiny_models import tiny_flux_params

    params = tiny_flux_params(
        hidden_size=1024, num_heads=8, axes_dim=[32, 48, 48], context_in_dim=256, vec_in_dim=256,
        depth=double_blocks, depth_single=0,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    save_safetensors({k: torch.full(s, 0.01) for k, s in shapes.items()}, path)
    return os.path.getsize(path)


def measure(path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD, path], check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["file_bytes"] = os.path.getsize(path)
    result["growth_bytes"] = (result["peak_kib"] - result["baseline_kib"]) * 1024
    result["ratio"] = result["growth_bytes"] / result["file_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--double-blocks", type=int, default=7, help="7 blocks at hidden 1024 make about 1.06 GB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = os.path.join(folder, "big.safetensors")
        write_checkpoint(path, args.double_blocks)
        r = measure(path)
    print(f"file size      {r['file_bytes'] / 2**30:.3f} GiB")
    print(f"peak RSS growth {r['growth_bytes'] / 2**30:.3f} GiB above the post-import baseline")
    print(f"ratio          {r['ratio']:.3f} (target <= 1.3)")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
