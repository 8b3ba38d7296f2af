"""Latents cached in RAM and on disk give the same batches, for odd image sizes and every bucket setting.

The AE is the deterministic stand-in of tests/dataset_helpers; each sample is also checked against the
stand-in run on the image prepared (resized, cropped, flipped) independently of the caches.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from library.caches import LatentCacher
from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from library.images import prepare_image
from tests.dataset_helpers import StandInEncoder, make_args, make_image, write_toml

SIZES = [(17, 33), (8, 200), (200, 8), (16, 16), (15, 15), (33, 17), (64, 63), (1, 1), (300, 40)]
BUCKETS = "enable_bucket = true\nbucket_reso_steps = 16\nmin_bucket_reso = 16\nmax_bucket_reso = 128"


def _group(tmp_path, general: str, subset: str):
    for i, size in enumerate(SIZES):
        path = tmp_path / "img" / f"i{i}.png"
        if not path.exists():
            make_image(path, size, seed=i, mode="RGBA")
    cfg = write_toml(tmp_path / "c.toml", f"""
        [general]
        {general}
        [[datasets]]
        resolution = 32
        batch_size = 3
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'img'}"
          {subset}
        """)  # fmt: skip
    return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=1)[0]


def _samples(group) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]]:
    group.set_current_epoch(1)
    out = {}
    for b in (group[i] for i in range(len(group))):
        for j, path in enumerate(b["image_paths"]):
            mask = None if b["alpha_masks"] is None else b["alpha_masks"][j]
            out[os.path.basename(path)] = (b["latents"][j], mask, b["flippeds"][j])
    return out


@pytest.mark.parametrize("subset", ["", "flip_aug = true", "flip_aug = true\nalpha_mask = true"])
@pytest.mark.parametrize("general", [BUCKETS, "enable_bucket = false"], ids=["buckets", "no_buckets"])
def test_ram_and_disk_latent_caches_give_the_same_batches_for_odd_image_sizes(tmp_path, general, subset):
    ram_group = _group(tmp_path, general, subset)
    LatentCacher(StandInEncoder(), "ae", False, batch_size=2).cache([ram_group])
    disk_group = _group(tmp_path, general, subset)
    LatentCacher(StandInEncoder(), "ae", True, batch_size=2).cache([disk_group])
    assert all(e.latents is None for e in disk_group.entries())  # read back from the files
    ram, disk = _samples(ram_group), _samples(disk_group)
    assert sorted(ram) == sorted(disk) == sorted(f"i{i}.png" for i in range(len(SIZES)))

    enc = StandInEncoder()
    for e in disk_group.entries():
        name = os.path.basename(e.path)
        (lat, mask, flipped), (disk_lat, disk_mask, disk_flipped) = ram[name], disk[name]
        assert flipped == disk_flipped and torch.equal(lat, disk_lat)
        assert (mask is None) == (disk_mask is None) == ("alpha_mask" not in subset)
        rgb, alpha, _, _ = prepare_image(e.path, e.bucket, e.resized, e.subset.interpolation, None, mask is not None)
        if flipped:
            rgb, alpha = rgb[:, ::-1], None if alpha is None else alpha[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert lat.shape == (16, e.bucket[1] // 8, e.bucket[0] // 8)
        assert torch.allclose(lat, enc.encode(x)[0], atol=1e-5), name
        if mask is not None:
            assert torch.equal(mask, disk_mask) and torch.equal(mask, torch.from_numpy(alpha.copy()))
    if "flip_aug" in subset:
        assert 0 < sum(f for _, _, f in ram.values()) < len(SIZES)


def test_images_too_small_for_any_bucket_without_upscaling_stop_the_dataset_build_naming_them(tmp_path):
    with pytest.raises(UserError) as ei:
        _group(tmp_path, "enable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = 16", "")
    img = tmp_path / "img"
    assert str(ei.value) == (
        f"{tmp_path / 'c.toml'}: datasets[0]: 5 image(s) fit no bucket with bucket_no_upscale: kept at their area, "
        f"a side would be under bucket_reso_steps (16): {img / 'i1.png'} (8x200), {img / 'i2.png'} (200x8), "
        f"{img / 'i4.png'} (15x15), {img / 'i7.png'} (1x1), {img / 'i8.png'} (300x40). "
        "Remove or upscale them, or crop the very thin ones."
    )
