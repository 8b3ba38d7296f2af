"""Per-item time to get a training batch from the latent disk cache vs decoding and encoding images.

    python bench/bench_cache.py [--items 300] [--size 64] [--batch 4] [--encoder standin|tiny_ae]

Both paths are timed in the same run on the same tiny PNG images (random noise, so the PNGs do
not compress away), through the dataset code the trainer uses:
  - "decode+encode": dataset batch without a cache (read PNG, resize, crop, to tensor) plus one
    encoder call per batch;
  - "disk cache": dataset batch with --cache_latents_to_disk files present (np.load per item).
The default encoder is the tests' stand-in (8x8 average pool + 1x1 projection), which costs almost
nothing, so the decode+encode figure is a lower bound for a real AE; `--encoder tiny_ae` uses the
project's AutoEncoder at test width (real architecture, tiny channels), still far cheaper than the
full AE. Prints both per-item times and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.caches import LatentCacher  # noqa: E402
from library.dataset_config import load_dataset_configs  # noqa: E402
from library.datasets import build_dataset_groups  # noqa: E402
from tests.dataset_helpers import StandInEncoder, make_args, make_image, write_toml  # noqa: E402


def _encoder(kind: str):
    if kind == "standin":
        return StandInEncoder()
    from library.tiny_models import random_model, tiny_ae_params

    ae = random_model(tiny_ae_params(), seed=0)
    ae.reg.sample = False
    return ae


def _time_all(group, encode=None) -> float:
    t0 = time.perf_counter()
    for i in range(len(group)):
        b = group[i]
        if encode is not None:
            with torch.no_grad():
                encode(b["images"])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--encoder", choices=["standin", "tiny_ae"], default="standin")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    # one thread: on a shared 2-core machine torch's thread pool spends ~10 ms per tiny op waiting
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the missing-caption warning is expected here
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "img")
        for i in range(a.items):
            make_image(os.path.join(folder, f"{i:05d}.png"), (a.size, a.size), seed=i)
        cfg = write_toml(os.path.join(tmp, "c.toml"), f"""
            [[datasets]]
            resolution = {a.size}
            batch_size = {a.batch}
              [[datasets.subsets]]
              image_dir = "{folder}"
            """)
        configs = load_dataset_configs(make_args("--dataset_config", cfg))
        plain, _ = build_dataset_groups(configs, seed=0)
        cached, _ = build_dataset_groups(configs, seed=0)
        enc = _encoder(a.encoder)
        LatentCacher(enc, "bench", to_disk=True, batch_size=a.batch).cache([cached])
        plain.set_current_epoch(1)
        cached.set_current_epoch(1)
        _time_all(cached), _time_all(plain, enc.encode)  # warm the page cache and allocator
        t_cache = min(_time_all(cached) for _ in range(a.repeats))
        t_encode = min(_time_all(plain, enc.encode) for _ in range(a.repeats))
    n = a.items
    print(f"items={n} size={a.size}x{a.size} batch={a.batch} encoder={a.encoder} threads={torch.get_num_threads()}")
    print(f"decode+encode: {t_encode / n * 1e3:.3f} ms/item")
    print(f"disk cache:    {t_cache / n * 1e3:.3f} ms/item")
    print(f"ratio (decode+encode / disk cache): {t_encode / t_cache:.2f}x")


if __name__ == "__main__":
    main()
