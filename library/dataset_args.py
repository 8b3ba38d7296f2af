"""Command-line options for datasets and caches, with sd-scripts' names, types and defaults.

Import-light on purpose (no torch): GUIs and `--help` import parsers.

`add_dataset_arguments(parser)` adds:
  --dataset_config, --train_data_dir, --reg_data_dir, --in_json, --dataset_repeats,
  --prior_loss_weight, --resolution, --enable_bucket, --min_bucket_reso, --max_bucket_reso,
  --bucket_reso_steps, --bucket_no_upscale, --caption_extension, --caption_separator,
  --shuffle_caption, --keep_tokens, --keep_tokens_separator, --secondary_separator,
  --enable_wildcard, --caption_prefix, --caption_suffix, --color_aug, --flip_aug,
  --face_crop_aug_range, --random_crop, --caption_dropout_rate, --caption_dropout_every_n_epochs,
  --caption_tag_dropout_rate, --token_warmup_min, --token_warmup_step, --resize_interpolation,
  --alpha_mask, --validation_split, --validation_seed, --cache_info, --dataset_class,
  --debug_dataset, --cache_latents, --cache_latents_to_disk, --vae_batch_size,
  --cache_text_encoder_outputs, --cache_text_encoder_outputs_to_disk, --text_encoder_batch_size,
  --skip_cache_check.
`--train_batch_size` and `--seed` belong to the trainer's parser; the dataset code reads them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.errors import UserError

INTERPOLATION_CHOICES = ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"]


def parse_resolution(value: str | int | tuple | list | None, where: str = "--resolution") -> tuple[int, int] | None:
    """ "W,H" or "S" (or an int, or a pair) to (W, H)."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f'{where}: {value!r} is not a resolution; give "W,H" (e.g. "1024,768") or one size "S".')
    return parts[0], parts[1]


class _SkippingGroup:
    def __init__(self, parser: argparse.ArgumentParser, title: str):
        self.parser = parser
        self.group = parser.add_argument_group(title)

    def add_argument(self, *names: str, **kwargs) -> None:
        if any(n in self.parser._option_string_actions for n in names):
            return
        self.group.add_argument(*names, **kwargs)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the dataset, caption, augmentation, validation-split and cache options.

    An option string the parser already has is skipped, so this composes with other adders that
    share a flag (e.g. --validation_split, --dataset_config) in either order.
    """
    g = _SkippingGroup(parser, "dataset")
    g.add_argument("--dataset_config", type=Path, default=None, help="dataset config file (.toml or .json)")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of <N>_<class tokens> image folders")
    g.add_argument("--reg_data_dir", type=str, default=None, help="folder of regularisation image folders")
    g.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata file (.json/.jsonl)")
    g.add_argument("--dataset_repeats", type=int, default=1, help="repeats for the fine-tuning dataset")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    g.add_argument("--resolution", type=str, default=None, help='training resolution "W,H" or "S"')
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="minimum bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="maximum bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side step (multiple of 16)")
    g.add_argument("--bucket_no_upscale", action="store_true", help="make buckets without upscaling images")
    g.add_argument("--caption_extension", type=str, default=".caption", help="caption file extension")
    g.add_argument("--caption_extention", type=str, default=None,
                   help="--caption_extension under sd-scripts' old spelling, kept for old scripts")  # fmt: skip
    g.add_argument("--caption_separator", type=str, default=",", help="separator between caption tags")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle tags (not with TE caching)")
    g.add_argument("--keep_tokens", type=int, default=0, help="keep the first N tags in place")
    g.add_argument("--keep_tokens_separator", type=str, default="", help="separator ending the fixed part")
    g.add_argument("--secondary_separator", type=str, default=None, help="separator inside one tag")
    g.add_argument("--enable_wildcard", action="store_true", help="{a|b} choices and multi-line captions")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--color_aug", action="store_true", help="hue/gamma augmentation (no latent caching)")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    g.add_argument("--face_crop_aug_range", type=str, default=None, help="not supported by this trainer")
    g.add_argument("--random_crop", action="store_true", help="random crop window (no latent caching)")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of an empty caption")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0, help="empty captions every N epochs")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping a tag")
    g.add_argument("--token_warmup_min", type=int, default=1, help="tags at step 0 of token warm-up")
    g.add_argument("--token_warmup_step", type=float, default=0, help="steps (or fraction) of token warm-up")
    g.add_argument(
        "--resize_interpolation",
        type=str,
        default=None,
        choices=INTERPOLATION_CHOICES,
        help="resize filter (default bicubic); same setting as the TOML key interpolation_type",
    )
    g.add_argument("--alpha_mask", action="store_true", help="use the alpha channel as loss mask")
    g.add_argument("--validation_split", type=float, default=0.0, help="fraction of images held out (0-1)")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation split and noise (default --seed)")
    g.add_argument("--cache_info", action="store_true",
                   help="keep image sizes in each folder's metadata_cache.json (images and captions are still read "
                   "each run)")  # fmt: skip
    g.add_argument("--dataset_class", type=str, default=None, help="not supported by this trainer")
    g.add_argument("--debug_dataset", action="store_true", help="print batches instead of training")

    c = _SkippingGroup(parser, "caches")
    c.add_argument("--cache_latents", action="store_true", help="encode images once and keep latents in RAM")
    c.add_argument("--cache_latents_to_disk", action="store_true", help="... and keep them in *_flux.npz files")
    c.add_argument("--vae_batch_size", type=int, default=1, help="images per AE call while caching")
    c.add_argument("--cache_text_encoder_outputs", action="store_true", help="encode captions once")
    c.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true", help="... into *_flux_te.npz files")
    c.add_argument(
        "--text_encoder_batch_size", type=int, default=None, help="captions per call when caching (default: batch size)"
    )
    c.add_argument("--skip_cache_check", action="store_true", help="trust existing cache files without checking")
