"""The embedded demo: trains a FLUX.1-dev LoRA end to end on tiny models, on CPU, in about a minute.

    python demo.py [--output ./output/demo] [--steps 12]

It writes tiny random models in the real checkpoint formats (BFL DiT, ae.safetensors, ComfyUI-style
CLIP-L and T5 files, tokenizers), a small image/caption dataset with its TOML, then runs the real
``flux_train_network.py`` through ``accelerate launch`` with latent and text-encoder caching to disk,
a sample image and validation, and prints where the LoRA and the sample went.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def training_command(models, data, output_dir: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
        "--num_cpu_threads_per_process", str(min(2, os.cpu_count() or 1)),
        os.path.join(ROOT, "flux_train_network.py"),
        "--pretrained_model_name_or_path", models.flux_dev,
        "--clip_l", models.clip_l, "--t5xxl", models.t5xxl, "--ae", models.ae,
        "--tokenizer_cache_dir", models.tokenizer_cache_dir,
        "--dataset_config", data.dataset_toml,
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_alpha", "4",
        "--network_train_unet_only",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-3",
        "--max_train_steps", str(steps), "--seed", "42",
        "--guidance_scale", "1.0", "--timestep_sampling", "shift", "--model_prediction_type", "raw",
        "--max_data_loader_n_workers", "0",
        "--sample_prompts", data.sample_prompts, "--sample_every_n_steps", str(steps),
        "--output_dir", output_dir, "--output_name", "demo_lora",
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join("output", "demo"),
                        help="folder for everything it writes (default output/demo)")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from library.demo_data import write_demo_dataset
    from library.tiny_models import write_tiny_models

    start = time.time()
    output = os.path.abspath(args.output)
    models = write_tiny_models(os.path.join(output, "models"))
    data = write_demo_dataset(os.path.join(output, "dataset"), validation_split=0.34)
    lora_dir = os.path.join(output, "lora")
    sample_pattern = os.path.join(lora_dir, "sample", "*.png")
    earlier_samples = set(glob.glob(sample_pattern))  # a rerun into the same folder: report only this run's
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(training_command(models, data, lora_dir, args.steps), env=env)
    if result.returncode != 0:
        print(f"demo: training failed (exit {result.returncode})", file=sys.stderr)
        return result.returncode
    lora = os.path.join(lora_dir, "demo_lora.safetensors")
    samples = sorted(set(glob.glob(sample_pattern)) - earlier_samples)
    print(f"\nLoRA:   {lora}")
    for sample in samples:
        print(f"sample: {sample}")
    print(f"demo finished in {time.time() - start:.0f} s")
    return 0 if os.path.isfile(lora) and samples else 1


if __name__ == "__main__":
    sys.exit(main())
