"""Convert FLUX.1 / Chroma LoRA files between sd-scripts' format and ai-toolkit's / diffusers' format.

    python networks/convert_flux_lora.py --src ai-toolkit --dst sd-scripts \\
        --src_path in.safetensors --dst_path out.safetensors

(also runnable as ``python convert_flux_lora.py``). The arguments are sd-scripts' (spec §i.3):
``--src`` and ``--dst`` are ``ai-toolkit`` or ``sd-scripts``, ``diffusers`` is accepted as an alias
of ``ai-toolkit``; defaults src=ai-toolkit, dst=sd-scripts.

Every module's weight change is kept: sd-scripts' alpha / rank is folded into the ai-toolkit
weights, fused q/k/v (and linear1's MLP input) become separate modules and back (block-diagonal
``split_qkv`` files split exactly into their per-part LoRAs, which makes them smaller). Differences
from sd-scripts, on purpose:

* Any depth and width converts (sd-scripts hard-codes 19 / 38 blocks and linear1's 3072-wide
  parts); CLIP-L (``lora_te1_*``), ``in_dims`` and final-layer modules convert both ways.
  T5 modules (``lora_te3_*``) have no ai-toolkit / diffusers form: they are listed by name and
  left out (sd-scripts drops TE and in_dims keys with one line).
* Fused parts that an ai-toolkit file lacks (e.g. a LoRA on q, k, v but not ``proj_mlp``) stay zero
  instead of failing; a plain LoRA on a fused Linear comes back in its original shape.
* ``.alpha`` tensors and diffusers' ``lora_alpha`` metadata in ai-toolkit / diffusers files are honoured.
* The file's real format is checked against ``--src``; metadata is copied, with stale
  ``sshs_*`` hashes recomputed and ``ss_split_qkv_convention`` set on sd-scripts output.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python networks/convert_flux_lora.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError  # noqa: E402
from library.lora_formats import FORMAT_ALIASES, PEFT_METADATA_KEY, SD_SCRIPTS, canonical_format, convert  # noqa: E402
from library.safetensors_io import check_output_file, same_file, warn_unless_safetensors_name  # noqa: E402
from library.train_args import DefaultsHelpFormatter  # noqa: E402

logger = logging.getLogger(__name__)

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert a FLUX.1 / Chroma LoRA between formats",
                                     formatter_class=DefaultsHelpFormatter)
    choices = list(FORMAT_ALIASES)
    add = parser.add_argument
    add("--src", type=str, default="ai-toolkit", choices=choices, help="source format (default ai-toolkit)")
    add("--dst", type=str, default="sd-scripts", choices=choices, help="destination format (default sd-scripts)")
    parser.add_argument("--src_path", type=str, default=None, help="(required) source LoRA file (.safetensors)")
    parser.add_argument("--dst_path", type=str, default=None, help="(required) destination file (.safetensors)")
    return parser


def convert_file(src_path: str, dst_path: str, src: str, dst: str) -> list[str]:
    """Converts ``src_path`` to ``dst_path`` (written atomically); returns the modules left out."""
    from library.model_hashes import precalculate_safetensors_hashes
    from library.safetensors_io import save_safetensors
    from networks.lora_flux import SPLIT_QKV_CONVENTION, SPLIT_QKV_METADATA_KEY, read_lora_file

    if canonical_format(src) == canonical_format(dst):
        raise UserError(f"--src {src} and --dst {dst} are the same format: nothing to convert")
    if same_file(src_path, dst_path):
        raise UserError(f"--dst_path {dst_path} is the source file: give another name (the source is kept)")
    sd, metadata = read_lora_file(src_path)
    logger.info("converting %s (%d tensors) from %s to %s", src_path, len(sd), src, dst)
    result = convert(sd, metadata, src, dst, source=src_path)
    if not result.state_dict:
        raise UserError(f"{src_path}: none of its modules has a {dst} form ({', '.join(result.unsupported[:5])})")
    if result.unsupported:
        logger.warning(
            "%d modules or keys of %s have no %s form and are left out: %s",
            len(result.unsupported),
            src_path,
            dst,
            ", ".join(result.unsupported),
        )
    metadata = dict(metadata)
    if canonical_format(dst) == SD_SCRIPTS:
        metadata.pop(PEFT_METADATA_KEY, None)  # its alphas are in the .alpha tensors now
        if result.fused_modules:
            metadata[SPLIT_QKV_METADATA_KEY] = SPLIT_QKV_CONVENTION
    tensors = {k: v.contiguous() for k, v in result.state_dict.items()}
    if any(k in metadata for k in HASH_KEYS):
        for key in HASH_KEYS:
            metadata.pop(key, None)
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, metadata)
    os.makedirs(os.path.dirname(os.path.abspath(dst_path)), exist_ok=True)
    save_safetensors(tensors, dst_path, metadata or None)
    logger.info("saved %d tensors to %s", len(tensors), dst_path)
    return result.unsupported


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, converts, and returns the exit status (1 with one ``error:`` line for user errors)."""
    args = setup_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not args.src_path or not args.dst_path:
            raise UserError("--src_path and --dst_path are required: the LoRA to convert and where to write it")
        warn_unless_safetensors_name(args.dst_path, "--dst_path")
        check_output_file(args.dst_path, "--dst_path")
        convert_file(args.src_path, args.dst_path, args.src, args.dst)
        return 0
    except (UserError, OSError) as e:  # OSError: a full disk or a failed write, named by its message
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
