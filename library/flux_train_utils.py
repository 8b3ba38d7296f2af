"""FLUX / Chroma command-line group, importable by GUIs without loading torch.

``add_flux_train_arguments(parser)`` keeps sd-scripts' name, signature, dests, types and
defaults (spec §b.1). The training math these options drive is in ``library.flow_matching``;
the DiT options (text-encoder caching, ``--weighting_scheme``, ``--blocks_to_swap``) are added
by ``library.train_args.add_flux_script_arguments``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

from library.errors import UserError
from library.train_args import argument_adder

logger = logging.getLogger(__name__)


def add_flux_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the FLUX / Chroma options: model files, T5 length and mask, guidance, timestep
    sampling, prediction type, flow shift and model type."""
    add = argument_adder(parser, "FLUX / Chroma")
    add("--clip_l", type=str, help="CLIP-L text encoder .safetensors, or a diffusers FLUX.1 folder (its "
        "text_encoder/); needed for flux, ignored for chroma")
    add("--t5xxl", type=str, help="T5-XXL text encoder .safetensors (fp16, or fp8_e4m3fn), or sharded files: any "
        "shard, their .index.json, or a diffusers FLUX.1 folder (its text_encoder_2/)")
    add("--ae", type=str, help="FLUX autoencoder .safetensors (ae.safetensors; the same for Chroma)")
    add("--controlnet_model_name_or_path", type=str, default=None,
        help="ControlNet checkpoint (not used by LoRA training)")
    add("--t5xxl_max_token_length", type=int, default=None,
        help="T5-XXL token length (default: 256 for schnell, 512 for dev and Chroma)")
    add("--apply_t5_attn_mask", action="store_true",
        help="mask T5 padding in T5 and in the DiT attention (required for Chroma)")
    add("--guidance_scale", type=float, default=3.5,
        help="embedded guidance value during training (default 3.5; the guide uses 1.0 for dev, 0.0 for Chroma)")
    add("--timestep_sampling", choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"], default="sigma",
        help="noise-level sampling: sigma (default; SD3 density over the shifted schedule), uniform, "
        "sigmoid (of a normal), shift (sigmoid shifted by --discrete_flow_shift), flux_shift (shift by resolution)")
    add("--sigmoid_scale", type=float, default=1.0,
        help="scale of the normal sample before the sigmoid for sigmoid, shift and flux_shift (default 1.0)")
    add("--model_prediction_type", choices=["raw", "additive", "sigma_scaled"], default="sigma_scaled",
        help="loss space: raw (velocity; recommended), additive (noise estimate), sigma_scaled (clean-image "
        "estimate, default); all train the model to predict the flow velocity")
    add("--discrete_flow_shift", type=float, default=3.0,
        help="flow shift S for --timestep_sampling shift and for the default sigma sampling (default 3.0)")
    add("--model_type", type=str, choices=["flux", "chroma"], default="flux",
        help="architecture: flux (FLUX.1 dev/schnell, default) or chroma")  # fmt: skip


def check_model_file_args(args) -> None:
    """The model-file options a FLUX.1 or Chroma run needs (shared by the trainer and inference)."""
    if not args.t5xxl:
        raise UserError("--t5xxl is required: the T5-XXL text encoder (t5xxl_fp16.safetensors)")
    if not args.ae:
        raise UserError("--ae is required: the FLUX autoencoder (ae.safetensors)")
    if args.model_type == "chroma":
        if not args.apply_t5_attn_mask:
            raise UserError("--model_type chroma needs --apply_t5_attn_mask (Chroma attends over the T5 mask)")
        if args.clip_l:
            logger.warning("--clip_l is ignored for Chroma, which has no CLIP-L")
            args.clip_l = None
    elif not args.clip_l:
        raise UserError("--clip_l is required for FLUX.1: the CLIP-L text encoder (clip_l.safetensors)")


TRAINER_DIT_FLAG = "--pretrained_model_name_or_path"


def check_model_files(args, dit_flag: str = TRAINER_DIT_FLAG, fp8_flag: str = "--fp8_base"):
    """What each model file is, from its header alone (milliseconds, not the minutes of loading
    24 GB): a missing, truncated or foreign file, a folder where a file belongs, or a file given to
    the wrong flag stops the run here, naming the flag. The DiT goes first: a Chroma file without
    ``--model_type chroma`` is named as such before CLIP-L is asked for. Returns the DiT's
    hyper-parameters, read from its header.

    ``dit_flag`` and ``fp8_flag`` are the script's names for the DiT and for loading it as fp8: the
    messages, which name the trainer's, name these instead."""
    from library.flux_utils import check_ae_file, check_flow_model_file
    from library.text_encoders import check_clip_l_file, check_t5xxl_file

    renames = {TRAINER_DIT_FLAG: dit_flag, "--fp8_base": fp8_flag}
    dit = _check_file(dit_flag, getattr(args, dit_flag[2:]), lambda path: check_flow_model_file(path, args.model_type),
                      renames=renames)  # fmt: skip
    check_model_file_args(args)
    found = {}
    for flag, check in (("--clip_l", check_clip_l_file), ("--t5xxl", check_t5xxl_file), ("--ae", check_ae_file)):
        if getattr(args, flag[2:]):
            found[flag] = _check_file(flag, getattr(args, flag[2:]), check, folder_allowed=flag != "--ae",
                                      renames=renames)  # fmt: skip
    # an encoder of another width (CLIP-G as --clip_l, say) would fail only at the first step, after caching
    widths = (("--clip_l", "hidden_size", dit.vec_in_dim, "CLIP-L (clip_l.safetensors)"),
              ("--t5xxl", "d_model", dit.context_in_dim, "T5-XXL (t5xxl_fp16.safetensors)"))  # fmt: skip
    if "--ae" in found and dit.in_channels != 4 * found["--ae"].z_channels:  # the DiT reads 2x2 patches of latents
        raise UserError(
            f"--ae {args.ae}: makes {found['--ae'].z_channels}-channel latents, but the DiT "
            f"{getattr(args, dit_flag[2:])} takes {dit.in_channels // 4}; give the FLUX autoencoder (ae.safetensors)"
        )
    for flag, width, wanted, what in widths:
        if flag in found and wanted and getattr(found[flag], width) != wanted:
            raise UserError(
                f"{flag} {getattr(args, flag[2:])}: outputs width {getattr(found[flag], width)}, but the DiT "
                f"{getattr(args, dit_flag[2:])} takes {wanted}; give the {what} that goes with it"
            )
    return dit


def _check_file(flag: str, path: str, check, folder_allowed: bool = True, renames: dict[str, str] | None = None):
    if not folder_allowed and os.path.isdir(path):
        raise UserError(f"{flag} {path}: a folder; give the .safetensors file itself")
    try:
        return check(path)
    except UserError as e:
        message = str(e)
        for trainer_flag, own_flag in (renames or {}).items():
            message = re.sub(rf"{re.escape(trainer_flag)}\b", own_flag, message)
        raise UserError(f"{flag} {message}") from None
