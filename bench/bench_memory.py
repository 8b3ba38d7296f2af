"""Peak host memory (RSS) of checkpoint loading and of a short training run, with and without fp8.

    python bench/bench_memory.py [--folder DIR] [--steps 2]

Writes a FLUX-architecture DiT of about 200 M parameters (hidden 1024, 3 double + 6 single
blocks, bf16 file of about 0.4 GB, and an fp8 copy of it) beside the tiny text encoders and AE,
then measures each case in a fresh process (VmHWM / VmRSS from /proc/self/status, growth above
the post-import baseline):

- loading: the bf16 file in bf16; the bf16 file quantized to fp8 (``--fp8_base``); the fp8 file
  kept as stored;
- training: ``flux_train_network.py`` for ``--steps`` steps, ``--mixed_precision bf16``, with
  and without ``--fp8_base``: RSS after the models are loaded, peak while loading, peak while
  training (the high-water mark is reset after loading).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_COMMON = r"""
import json, sys
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""

_LOAD_CHILD = _COMMON + r"""
import torch
from library.flux_utils import load_flow_model
from library.fp8 import dit_load_dtype, quantize_dit_
path, mode = sys.argv[1], sys.argv[2]
base = status()["VmRSS"]
if mode == "bf16":
    _, model = load_flow_model(path, torch.bfloat16, "cpu")
else:  # as the trainer's --fp8_base (and --fp8_scaled) do
    scaled = mode == "fp8_scaled"
    _, model = load_flow_model(path, dit_load_dtype(path, torch.bfloat16), "cpu", fp8_block_linears=True,
                               fp8_scaled=scaled)
    quantize_dit_(model, torch.bfloat16, scaled=scaled)
s = status()
print(json.dumps({"baseline": base, "peak": s["VmHWM"], "after": s["VmRSS"]}))
"""

_TRAIN_CHILD = _COMMON + r"""
import accelerate, transformers, torch  # noqa: F401  (imported before the baseline: not model memory)
import flux_train_network, train_network, library.training_loop  # noqa: F401
argv = json.loads(sys.argv[1])
marks = {"baseline": status()["VmRSS"]}
original = flux_train_network.FluxNetworkTrainer.load_target_model
def load_and_mark(self, *args, **kwargs):
    models = original(self, *args, **kwargs)
    s = status()
    marks.update(load_peak=s["VmHWM"], after_load=s["VmRSS"])
    reset_peak()
    return models
flux_train_network.FluxNetworkTrainer.load_target_model = load_and_mark
assert flux_train_network.main(argv) == 0
s = status()
marks.update(train_peak=s["VmHWM"], end=s["VmRSS"])
print(json.dumps(marks))
"""


def write_files(folder: str) -> dict:
    import torch

    from library.demo_data import write_demo_dataset
    from library.flux_models import Flux
    from library.safetensors_io import save_safetensors
    from library.tiny_models import TINY_CLIP_DIM, TINY_T5_DIM, randomize_, tiny_flux_params, write_tiny_models

    files = write_tiny_models(os.path.join(folder, "tiny"))
    params = tiny_flux_params(hidden_size=1024, num_heads=8, axes_dim=[16, 56, 56], depth=3, depth_single=6,
                              context_in_dim=TINY_T5_DIM, vec_in_dim=TINY_CLIP_DIM)  # fmt: skip
    model = randomize_(Flux(params), seed=0, std=0.02)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    bf16 = os.path.join(folder, "dit-bf16.safetensors")
    save_safetensors(sd, bf16)
    fp8 = os.path.join(folder, "dit-fp8.safetensors")
    save_safetensors({k: v.to(torch.float8_e4m3fn) if "blocks." in k and v.ndim == 2 else v for k, v in sd.items()},
                     fp8)  # fmt: skip
    data = write_demo_dataset(os.path.join(folder, "data"), resolution=64, batch_size=1, num_images=2)
    return {"tiny": files, "bf16": bf16, "fp8": fp8, "data": data,
            "params": sum(v.numel() for v in sd.values())}  # fmt: skip


def child(code: str, *argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_argv(files: dict, out: str, steps: int, fp8: bool) -> list[str]:
    tiny, data = files["tiny"], files["data"]
    argv = [
        "--pretrained_model_name_or_path", files["bf16"], "--clip_l", tiny.clip_l, "--t5xxl", tiny.t5xxl,
        "--ae", tiny.ae, "--tokenizer_cache_dir", tiny.tokenizer_cache_dir, "--dataset_config", data.dataset_toml,
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_train_unet_only",
        "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0",
        "--output_dir", out, "--output_name", "lora", "--t5xxl_max_token_length", "16",
        "--mixed_precision", "bf16", "--cache_latents", "--cache_text_encoder_outputs", "--learning_rate", "1e-4",
    ]  # fmt: skip
    return argv + (["--fp8_base"] if fp8 else [])


def gib(n: float) -> str:
    return f"{n / 2**30:6.3f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (default 2)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        files = write_files(folder)
        sizes = {k: os.path.getsize(files[k]) for k in ("bf16", "fp8")}
        print(f"DiT: {files['params'] / 1e6:.0f} M parameters; bf16 file {gib(sizes['bf16'])}, "
              f"fp8 file {gib(sizes['fp8'])}")  # fmt: skip
        print("loading (growth above the post-import RSS):")
        cases = (("bf16 file -> bf16", "bf16", "bf16"), ("bf16 file -> fp8 (--fp8_base)", "bf16", "fp8"),
                 ("bf16 file -> fp8 (--fp8_scaled)", "bf16", "fp8_scaled"),
                 ("fp8 file -> fp8, as stored", "fp8", "fp8"))  # fmt: skip
        for label, path, mode in cases:
            r = child(_LOAD_CHILD, files[path], mode)
            print(f"  {label:32s} peak {gib(r['peak'] - r['baseline'])}  after {gib(r['after'] - r['baseline'])}  "
                  f"peak/file {(r['peak'] - r['baseline']) / sizes[path]:.2f}")  # fmt: skip
        print(f"training, {args.steps} steps, --mixed_precision bf16 (growth above the post-import RSS):")
        for fp8 in (False, True):
            out = os.path.join(folder, f"out-{fp8}")
            r = child(_TRAIN_CHILD, json.dumps(train_argv(files, out, args.steps, fp8)))
            base = r["baseline"]
            print(f"  {'--fp8_base' if fp8 else 'bf16 base ':11s} load peak {gib(r['load_peak'] - base)}  "
                  f"after load {gib(r['after_load'] - base)}  training peak {gib(r['train_peak'] - base)}  "
                  f"(absolute peak {gib(max(r['load_peak'], r['train_peak']))})")  # fmt: skip


if __name__ == "__main__":
    main()
