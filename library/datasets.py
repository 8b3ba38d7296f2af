"""Datasets: entries in buckets, per-epoch shuffled batches, augmentation, and the validation split.

Public API (the trainer's view):

    configs = dataset_config.load_dataset_configs(args)      # parse + validate (UserError)
    dataset_config.check_caching(configs, args)              # refuse what caching cannot honour
    train, val = build_dataset_groups(configs, seed=args.seed, validation_seed=None)
    # val is None when no subset has validation_split > 0.

    DatasetGroup (a torch Dataset whose items are whole batches; use
    DataLoader(group, batch_size=1, shuffle=False, collate_fn=collate_first)):
        len(group)                      batches per epoch, all datasets together
        group[i]                        batch i of the current epoch (dict below)
        group[(p, i)]                   the same, at position p of the epoch: its step is s + p // accumulation
        group.set_current_epoch(e)      1-based, as sd-scripts; reshuffles (pure function of seed, e)
        group.set_current_step(s), group.set_max_train_steps(n)   token warm-up
        group.set_accumulation(k)       micro-batches a step
        group.use_shared_counters(epoch_value, step_value)        multiprocessing.Value for workers
        group.datasets, group.entries(), group.num_train_images, group.num_reg_images, group.bucket_info()
    Caches fill entries in place (library.caches), on every process, before training:
        LatentCacher(ae, cache_files.file_fingerprint(ae_path), to_disk=args.cache_latents_to_disk,
                     batch_size=args.vae_batch_size, skip_cache_check=args.skip_cache_check,
                     process_index=acc.process_index, num_processes=acc.num_processes).cache([train, val])
        TextEncoderCacher(encode_captions, {"t5xxl_max_token_length": n, "apply_t5_attn_mask": m,
                          "encoders": fingerprint}, m, to_disk=..., batch_size=args.text_encoder_batch_size,
                          ...).cache([train, val])
        then accelerator.wait_for_everyone() and caches.check_disk_caches_complete([train, val], te=True).
    Validation groups keep one fixed order and epoch 0 for their per-sample draws, so every
    evaluation sees the same batches.

    A batch is a dict:
        image_keys, image_paths, captions (processed), flippeds, is_reg, custom_attributes: lists
        loss_weights (B,) float32: prior_loss_weight for regularisation images, else 1
        network_multipliers (B,) float32
        latents (B, 16, H/8, W/8) float32 when latents are cached, else None
        images (B, 3, H, W) float32 in [-1, 1] when latents are not cached, else None
        alpha_masks (B, H, W) float32 in [0, 1], or None when no image of the batch uses alpha_mask
        text_encoder_outputs: {l_pooled, t5_out, txt_ids, t5_attn_mask} stacked tensors (zero-padded
            to the longest) when cached, else None
        original_sizes_hw, crop_top_lefts, target_sizes_hw: (B, 2) int64; bucket_reso: (W, H)

Randomness: every per-sample draw (flip, random crop, colour, caption shuffles) comes from
`sample_rng(seed, epoch, batch_index, slot)`, and batch order from `random.Random(seed + epoch)`,
so results do not depend on the number of processes or DataLoader workers, and no global RNG is
touched. Batches never mix buckets. Without enable_bucket, images are resized to cover the
single bucket and cropped, as sd-scripts does only on its caching path (spec §k.22).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from library.buckets import BucketSelector, adjust_min_max_reso, check_reso_steps, make_bucket_resolutions
from library.captions import caption_for_cache, process_caption
from library.dataset_config import DatasetConfig, SubsetConfig
from library.dataset_sources import ImageRecord, scan_subset, split_subset
from library.errors import UserError
from library.images import canonical_path, choose_crop, color_aug, prepare_image

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, batch_index: int, slot: int, stream: str = "") -> random.Random:
    """The generator for one sample's random choices; a pure function of its arguments."""
    return random.Random(f"{stream}:{seed}:{epoch}:{batch_index}:{slot}")


@dataclass(eq=False)
class ImageEntry:
    """One image of one dataset. Caches fill the latent / text-encoder fields."""

    path: str
    caption: str
    subset: SubsetConfig
    num_repeats: int
    size: tuple[int, int]  # original (W, H)
    bucket: tuple[int, int] = (0, 0)  # (W, H)
    resized: tuple[int, int] = (0, 0)  # (W, H) before cropping to the bucket
    latents: torch.Tensor | None = None  # RAM cache
    latents_flipped: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None
    latents_npz: str | None = None  # disk cache
    te_outputs: dict[str, np.ndarray] | None = None
    te_npz: str | None = None
    tags: str | None = None  # a metadata file's tags; None for images in folders

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg

    @property
    def has_latents(self) -> bool:
        return self.latents is not None or self.latents_npz is not None


class FluxDataset(torch.utils.data.Dataset):
    """One [[datasets]] entry (one resolution and batch size); items are batches."""

    def __init__(self, config: DatasetConfig, entries: list[ImageEntry], seed: int, stream: str, is_training: bool):
        self.config = config
        self.entries = entries
        self.seed = seed
        self.stream = stream
        self.is_training = is_training
        self.batch_size = config.batch_size
        # regularisation images times their configured repeats, before they are repeated to match the training
        # images (sd-scripts' num_reg_images, which the metadata records)
        self.num_reg_images = 0
        self.epoch = 0
        self.step = 0  # token warm-up's step; with positions (batch_at), the step of the epoch's first batch
        self.accumulation = 1
        self.max_train_steps = 0
        self._shared: tuple | None = None
        self._order_cache: tuple[int, list] | None = None
        self._assign_buckets()

    # --- buckets --------------------------------------------------------------------------
    def _assign_buckets(self) -> None:
        cfg = self.config
        if cfg.enable_bucket:
            check_reso_steps(cfg.bucket_reso_steps, cfg.where)
            if cfg.bucket_no_upscale:
                selector = BucketSelector(cfg.resolution, cfg.bucket_reso_steps, None, no_upscale=True)
            else:
                lo, hi = adjust_min_max_reso(
                    cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps, cfg.where
                )
                resos = make_bucket_resolutions(cfg.resolution, lo, hi, cfg.bucket_reso_steps)
                selector = BucketSelector(cfg.resolution, cfg.bucket_reso_steps, resos)
        else:
            w, h = cfg.resolution
            if w % 16 or h % 16:
                raise UserError(
                    f"{cfg.where}: resolution {cfg.resolution} is not a multiple of 16 in both sides, which FLUX "
                    "needs without buckets; use e.g. resolution = [1024, 1024] or enable_bucket = true."
                )
            selector = BucketSelector(cfg.resolution, None, [cfg.resolution])
        buckets: dict[tuple[int, int], list[ImageEntry]] = {}
        self.ar_errors = []
        unfit = [e for e in self.entries if min(selector.select(*e.size).bucket) <= 0]
        if unfit:
            shown = ", ".join(f"{e.path} ({e.size[0]}x{e.size[1]})" for e in unfit[:5])
            raise UserError(
                f"{cfg.where}: {len(unfit)} image(s) fit no bucket with bucket_no_upscale: kept at their area, a side "
                f"would be under bucket_reso_steps ({cfg.bucket_reso_steps}): {shown}"
                + (f" and {len(unfit) - 5} more" if len(unfit) > 5 else "")
                + ". Remove or upscale them, or crop the very thin ones."
            )
        for e in self.entries:
            choice = selector.select(*e.size)
            e.bucket, e.resized = choice.bucket, choice.resized
            self.ar_errors.append(abs(choice.ar_error))
            buckets.setdefault(e.bucket, []).extend([e] * e.num_repeats)
        self.bucket_resos = sorted(buckets)
        self.buckets = [buckets[r] for r in self.bucket_resos]
        self._batch_refs = [
            (b, k) for b, items in enumerate(self.buckets) for k in range(math.ceil(len(items) / self.batch_size))
        ]

    def epoch_batches(self, epoch: int) -> list[list[ImageEntry]]:
        """The batches of `epoch` in order; a pure function of (seed, epoch)."""
        if self._order_cache and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = random.Random(self.seed + epoch)
        refs = list(self._batch_refs)
        buckets = [list(b) for b in self.buckets]
        # validation is shuffled too, always as epoch 1: a fixed order that mixes the buckets, so that
        # --max_validation_steps does not see only the first bucket
        rng.shuffle(refs)
        for b in buckets:
            rng.shuffle(b)
        out = [buckets[b][k * self.batch_size : (k + 1) * self.batch_size] for b, k in refs]
        self._order_cache = (epoch, out)
        return out

    def bucket_info(self) -> dict:
        pairs = zip(self.bucket_resos, self.buckets, strict=True)
        return {
            "buckets": {i: {"resolution": r, "count": len(b)} for i, (r, b) in enumerate(pairs)},
            "mean_img_ar_error": float(np.mean(self.ar_errors)) if self.ar_errors else 0.0,
        }

    # --- counters ---------------------------------------------------------------------------
    def _counters(self) -> tuple[int, int]:
        if self._shared is not None:
            return int(self._shared[0].value), int(self._shared[1].value)
        return self.epoch, self.step

    def __len__(self) -> int:
        return len(self._batch_refs)

    # --- items ------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        return self.batch_at(index)

    def batch_at(self, index: int, position: int | None = None) -> dict:
        """Batch ``index`` of the current epoch. With ``position`` (its place in this process's epoch) the
        step it trains at is the epoch's first step plus position // accumulation, not the step counter's
        value when a DataLoader worker fetched it ahead."""
        epoch, step = self._counters()
        if not self.is_training:
            epoch = 0  # validation batches are the same every time they are evaluated
        if position is not None:
            step += position // self.accumulation
        batch = self.epoch_batches(epoch)[index]
        return self.make_batch(batch, epoch, step, index)

    def make_batch(self, batch: list[ImageEntry], epoch: int, step: int, index: int) -> dict:
        """Builds the batch dict (see the module docstring) for these entries."""
        use_latents = all(e.has_latents for e in batch)
        want_alpha = any(e.subset.alpha_mask for e in batch)
        out: dict = {
            k: []
            for k in (
                "image_keys",
                "image_paths",
                "captions",
                "flippeds",
                "is_reg",
                "custom_attributes",
                "original_sizes_hw",
                "crop_top_lefts",
                "target_sizes_hw",
            )
        }
        tensors, masks, te_list, weights = [], [], [], []
        for slot, e in enumerate(batch):
            sub = e.subset
            rng = sample_rng(self.seed, epoch, index, slot, self.stream)
            flip = sub.flip_aug and rng.random() < 0.5
            if e.te_outputs is not None or e.te_npz is not None:
                # the caption the cache was encoded from: a CLIP-L trained live beside cached T5 outputs must
                # see the same text (the same wildcard choice, no epoch dropout)
                caption = caption_for_cache(e.caption, sub.caption, canonical_path(e.path))
            else:  # token warm-up belongs to training: validation captions are whole from the start
                warm_step = step if self.is_training else math.inf
                caption = process_caption(e.caption, sub.caption, rng, epoch, warm_step, self.max_train_steps)
            if use_latents:
                lat, lat_flipped, mask = self._cached_latents(e)
                if flip:
                    lat = lat_flipped if lat_flipped is not None else torch.flip(lat, dims=[2])
                box = choose_crop(e.resized, e.bucket, None)
                tensors.append(lat)
            else:
                rgb, mask, _, box = prepare_image(
                    e.path, e.bucket, e.resized, sub.interpolation, rng if sub.random_crop else None, sub.alpha_mask
                )
                if sub.color_aug:
                    rgb = color_aug(rgb, rng)
                if flip:
                    rgb = rgb[:, ::-1]
                tensors.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0)
                mask = torch.from_numpy(mask) if mask is not None else None
            if want_alpha:
                if mask is None:
                    mask = torch.ones(e.bucket[1], e.bucket[0])
                masks.append(torch.flip(mask, dims=[1]) if flip else mask)
            te_list.append(self._cached_te(e))
            weights.append(self.config.prior_loss_weight if e.is_reg else 1.0)
            out["image_keys"].append(e.path)
            out["image_paths"].append(e.path)
            out["captions"].append(caption)
            out["flippeds"].append(flip)
            out["is_reg"].append(e.is_reg)
            out["custom_attributes"].append(dict(sub.custom_attributes))
            out["original_sizes_hw"].append((e.size[1], e.size[0]))
            out["crop_top_lefts"].append((box.top, box.left))
            out["target_sizes_hw"].append((e.bucket[1], e.bucket[0]))
        stacked = torch.stack(tensors)
        out["latents"] = stacked if use_latents else None
        out["images"] = None if use_latents else stacked
        out["alpha_masks"] = torch.stack(masks).float() if want_alpha else None
        out["text_encoder_outputs"] = collate_te_outputs(te_list) if all(t is not None for t in te_list) else None
        out["loss_weights"] = torch.tensor(weights, dtype=torch.float32)
        out["network_multipliers"] = torch.full((len(batch),), self.config.network_multiplier, dtype=torch.float32)
        for k in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
            out[k] = torch.tensor(out[k], dtype=torch.int64)
        out["bucket_reso"] = batch[0].bucket
        return out

    def _cached_latents(self, e: ImageEntry):
        if e.latents is not None:
            return e.latents, e.latents_flipped, e.alpha_mask
        from library.caches import load_latents  # caches imports this module

        return load_latents(e)

    def _cached_te(self, e: ImageEntry) -> dict[str, np.ndarray] | None:
        if e.te_outputs is not None:
            return e.te_outputs
        if e.te_npz is not None:
            from library.caches import load_te_outputs

            return load_te_outputs(e.te_npz)
        return None


def collate_te_outputs(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stacks per-caption outputs, zero-padding sequence arrays to the longest (as sd-scripts)."""
    out = {}
    for key in items[0]:
        arrs = [np.asarray(it[key]) for it in items]
        if arrs[0].ndim >= 1 and len({a.shape for a in arrs}) > 1:
            longest = max(a.shape[0] for a in arrs)
            arrs = [np.pad(a, [(0, longest - a.shape[0])] + [(0, 0)] * (a.ndim - 1)) for a in arrs]
        out[key] = torch.from_numpy(np.stack(arrs))
    return out


def collate_first(examples: list[dict]) -> dict:
    """DataLoader collate_fn for batch_size=1 over a DatasetGroup (items are already batches)."""
    return examples[0]


class DatasetGroup(torch.utils.data.Dataset):
    """Several FluxDatasets behind one index; batches of all datasets are interleaved per epoch."""

    def __init__(self, datasets: list[FluxDataset], seed: int, is_training: bool):
        self.datasets = datasets
        self.seed = seed
        self.is_training = is_training
        self._order: tuple[int, list[tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def _epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        if self._order and self._order[0] == epoch:
            return self._order[1]
        order = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]
        if len(self.datasets) > 1:  # validation too, always as epoch 1 (see FluxDataset.epoch_batches)
            random.Random(f"group:{self.seed}:{epoch}").shuffle(order)
        self._order = (epoch, order)
        return order

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Batch ``key`` of the current epoch, or ``(position in the epoch, batch index)`` (``EpochSampler``)."""
        position, index = key if isinstance(key, tuple) else (None, key)
        epoch = self.datasets[0]._counters()[0]
        d, i = self._epoch_order(epoch)[index]
        return self.datasets[d].batch_at(i, position)

    def set_accumulation(self, steps: int) -> None:
        """Micro-batches a step (--gradient_accumulation_steps), for the step of a batch at a position."""
        for d in self.datasets:
            d.accumulation = steps

    def set_current_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.epoch = epoch
            if d._shared is not None:  # persistent workers read the shared value
                d._shared[0].value = epoch

    def set_current_step(self, step: int) -> None:
        for d in self.datasets:
            d.step = step
            if d._shared is not None:
                d._shared[1].value = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        for d in self.datasets:
            d.max_train_steps = max_train_steps

    def use_shared_counters(self, epoch_value, step_value) -> None:
        """Reads epoch and step from multiprocessing.Value objects (persistent DataLoader workers)."""
        for d in self.datasets:
            d._shared = (epoch_value, step_value)

    def entries(self) -> Iterator[ImageEntry]:
        for d in self.datasets:
            yield from d.entries

    @property
    def num_train_images(self) -> int:
        return sum(e.num_repeats for e in self.entries() if not e.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def bucket_info(self) -> list[dict]:
        return [d.bucket_info() for d in self.datasets]


def _extend_reg_repeats(train: list[ImageEntry], reg: list[ImageEntry], label: str) -> None:
    """sd-scripts: reg repeats grow round-robin until reg samples >= train samples."""
    n_train = sum(e.num_repeats for e in train)
    n_reg = sum(e.num_repeats for e in reg)
    if not reg:
        return
    if n_train < n_reg:
        logger.warning(
            "%s: more regularisation images (%d) than training images (%d); some are not used", label, n_reg, n_train
        )
    base = [e.num_repeats for e in reg]
    for e in reg:
        e.num_repeats = 0
    n, first = 0, True
    while n < n_train:
        for e, b in zip(reg, base, strict=True):
            if first:
                e.num_repeats = b
                n += b
            else:
                e.num_repeats += 1
                n += 1
            if n >= n_train:
                break
        first = False
    reg[:] = [e for e in reg if e.num_repeats > 0]


def build_dataset_groups(
    configs: list[DatasetConfig], seed: int | None, validation_seed: int | None = None
) -> tuple[DatasetGroup, DatasetGroup | None]:
    """(training group, validation group or None). Scans folders and metadata; raises UserError.

    `seed` drives batch order and per-sample randomness (None: drawn once and logged). The split
    seed is each dataset's validation_seed, else `validation_seed`, else `seed`.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        logger.info("no --seed given: datasets use seed %d", seed)
    train_sets, val_sets = [], []
    for d, cfg in enumerate(configs):
        split_seed = (
            cfg.validation_seed
            if cfg.validation_seed is not None
            else (validation_seed if validation_seed is not None else seed)
        )
        train, reg, val = [], [], []
        seen: set[str] = set()
        for sub in cfg.subsets:
            ident = sub.image_dir if sub.kind == "dreambooth" else sub.metadata_file
            if ident in seen:
                logger.warning("%s: ignoring duplicate subset %s (same folder as an earlier one)", sub.label, ident)
                continue
            seen.add(ident)
            if sub.num_repeats < 1:
                logger.warning("%s: ignoring subset with num_repeats = %d", sub.describe(), sub.num_repeats)
                continue
            records: list[ImageRecord] = scan_subset(sub)
            tr, va = split_subset(records, sub, split_seed)
            (reg if sub.is_reg else train).extend(
                ImageEntry(r.path, r.caption, sub, sub.num_repeats, r.size, tags=r.tags) for r in tr
            )
            val.extend(ImageEntry(r.path, r.caption, sub, 1, r.size, tags=r.tags) for r in va)
        if reg and not train and not val:
            raise UserError(f"{cfg.where}: only regularisation images (is_reg = true); they are used beside training "
                            "images, so add a subset of training images or set is_reg = false.")  # fmt: skip
        num_reg_images = sum(e.num_repeats for e in reg)
        _extend_reg_repeats(train, reg, cfg.where)
        if not train and not reg and not val:
            raise UserError(f"{cfg.where}: no images left (all subsets were skipped); check num_repeats and image_dir.")
        if train or reg:
            train_sets.append(FluxDataset(cfg, train + reg, seed, f"train{d}", True))
            train_sets[-1].num_reg_images = num_reg_images
        if val:
            val_sets.append(FluxDataset(cfg, val, seed, f"val{d}", False))
        logger.info(
            "%s: %d training images (%d with repeats), %d regularisation, %d validation",
            cfg.label,
            len(train),
            sum(e.num_repeats for e in train),
            len(reg),
            len(val),
        )
    if not train_sets:
        raise UserError(
            "no image is left for training: validation_split holds out every image of every subset; "
            "lower it (or leave it out) in some subsets."
        )
    train_group = DatasetGroup(train_sets, seed, True)
    return train_group, (DatasetGroup(val_sets, seed, False) if val_sets else None)
