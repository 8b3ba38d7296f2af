"""Shared helpers for the dataset tests: tiny images, argument namespaces, stand-in encoders."""

from __future__ import annotations

import argparse
import hashlib
import os
import textwrap

import numpy as np
import torch
from PIL import Image

from library.dataset_args import add_dataset_arguments


def make_args(*argv: str, **overrides) -> argparse.Namespace:
    """Parsed dataset arguments plus the trainer's --seed and --train_batch_size."""
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--train_batch_size", type=int, default=1)
    args = parser.parse_args(list(argv))
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def make_image(path, size=(64, 64), seed: int = 0, mode: str = "RGB", **save_kwargs) -> str:
    """A random-noise image of `size` (W, H) saved at `path` in `mode`."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    img = img.convert(mode) if mode != "RGBA" else img
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img.save(str(path), **save_kwargs)
    return str(path)


def make_folder(
    folder, names_sizes: dict[str, tuple[int, int]], captions: dict[str, str] | None = None, ext: str = ".txt"
) -> str:
    """Images named by `names_sizes` ({"a.png": (W, H)}) plus optional caption files."""
    os.makedirs(folder, exist_ok=True)
    for i, (name, size) in enumerate(names_sizes.items()):
        make_image(os.path.join(folder, name), size, seed=i)
    for name, cap in (captions or {}).items():
        with open(os.path.join(folder, os.path.splitext(name)[0] + ext), "w", encoding="utf-8") as f:
            f.write(cap)
    return str(folder)


def write_toml(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return str(path)


class StandInEncoder:
    """A deterministic AE stand-in: 8x8 average pooling, then a fixed random 1x1 projection to 16 channels.

    Records the batch sizes it was called with, so tests can count what was (re-)encoded.
    """

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(16, 3, generator=g)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.calls: list[int] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.einsum("oc,bchw->bohw", self.proj, pooled)

    @property
    def images_encoded(self) -> int:
        return sum(self.calls)


class FakeTextEncoder:
    """Deterministic `encode_captions`: outputs derived from a hash of the caption; records captions seen."""

    def __init__(self, t5_len: int = 8, width: int = 16, dtype=np.float32):
        self.t5_len, self.width, self.dtype = t5_len, width, dtype
        self.seen: list[str] = []

    def __call__(self, captions: list[str]) -> list[dict[str, np.ndarray]]:
        self.seen.extend(captions)
        outs = []
        for c in captions:
            seed = int.from_bytes(hashlib.sha256(c.encode()).digest()[:4], "little")
            rng = np.random.default_rng(seed)
            n = min(len(c.split()), self.t5_len)
            mask = np.zeros(self.t5_len, np.int64)
            mask[: n + 1] = 1
            outs.append(
                {
                    "l_pooled": rng.standard_normal(self.width).astype(self.dtype),
                    "t5_out": rng.standard_normal((self.t5_len, self.width)).astype(self.dtype),
                    "txt_ids": np.zeros((self.t5_len, 3), np.float32),
                    "t5_attn_mask": mask,
                }
            )
        return outs


def bucketed_group(tmp_path, sizes, extra="", repeats=1, batch=2, seed=5, subset_extra=""):
    """The training group of one bucketed dataset (resolution 64, buckets 32-128 in steps of 16) over a folder of
    images of ``sizes``; ``extra`` and ``subset_extra`` add TOML lines to the dataset and its subset."""
    from library.dataset_config import load_dataset_configs
    from library.datasets import build_dataset_groups

    make_folder(tmp_path / "img", sizes)
    cfg = write_toml(
        tmp_path / "c.toml",
        f"""
        [[datasets]]
        resolution = 64
        enable_bucket = true
        min_bucket_reso = 32
        max_bucket_reso = 128
        bucket_reso_steps = 16
        batch_size = {batch}
        {extra}
          [[datasets.subsets]]
          image_dir = "{tmp_path / "img"}"
          num_repeats = {repeats}
          {subset_extra}
        """,
    )
    train, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=seed)
    return train
