"""Generate images with FLUX.1 (dev, schnell, pruned) or Chroma, with LoRAs applied or merged.

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \\
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a photo of a cat" \\
        --lora_weights my_lora.safetensors;0.8 --seed 1 --output_dir out

sd-scripts' command line (spec §i.2). Images come from the same Euler flow sampler as the
trainer's samples (``library.flux_sampling``): shifted schedule for dev and Chroma, linear for
schnell, CFG with a negative prompt as one [negative, positive] batch, Chroma's modulation vectors
computed per step. The initial noise comes from a CPU generator, so a seed gives the same image on
any device. Each PNG carries the prompt, seed, steps, sizes, guidance and LoRAs in text chunks.

``--interactive`` reads prompts from standard input, one per line, until an empty line or end of
input: ``--w`` width, ``--h`` height, ``--s`` steps, ``--g`` guidance, ``--l`` or ``--c`` CFG scale
(these stay set for later prompts, as in sd-scripts), ``--d`` seed (else ``--seed``, else a random one)
and ``--n`` negative prompt (``-`` for none; these apply to one prompt), ``--m`` one multiplier per
LoRA (not with ``--merge_lora_weights``).

Differences from sd-scripts, on purpose:

* Chroma defaults to guidance 0 and CFG 4.0 with an empty negative prompt (the trainer's sample
  defaults; sd-scripts uses FLUX's 3.5 / 1.0). CFG runs whenever the CFG scale is not 1, with an
  empty negative prompt if none is given (sd-scripts needs a non-empty one).
* Sizes are floored to a multiple of 16, as training samples are (sd-scripts rounds the latent up).
* fp8 ``--flux_dtype`` / ``--clip_l_dtype`` / ``--t5xxl_dtype`` store the Linear weights in fp8 and
  compute in ``--dtype`` (bf16 when ``--dtype`` itself is fp8), so fp8 also works on CPUs; an fp8
  ``--ae_dtype`` is not honoured (the AE is small and convolutional): it runs in the compute dtype.
* ai-toolkit / diffusers LoRAs load too (converted by ``library.lora_formats``).
* ``--offload`` also moves the DiT off the device while the AE decodes; no image is overwritten:
  a second image in the same second gets a ``_1`` suffix.
* ``--interactive`` lines without ``--d`` take ``--seed`` when it is given (sd-scripts draws a random seed per
  line), so a prompt can be tried again with the same noise.
* Weights in a LoRA file that no module takes (ComfyUI's bias diffs ``.diff_b``, say) are named in a
  warning and ignored (sd-scripts stops on them).
* Extra options: ``--device``, ``--tokenizer_cache_dir`` and ``--t5xxl_max_token_length``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from library.dtypes import FP8_DTYPES, device_from_name, dtype_from_name, preferred_device
from library.errors import UserError
from library.run_logging import tolerant_stdout
from library.sample_prompts import MAX_SEED
from library.train_args import DefaultsHelpFormatter

logger = logging.getLogger(__name__)

DEFAULT_WIDTH, DEFAULT_HEIGHT = 1360, 768
INTERACTIVE_HELP = (
    "Enter a prompt (empty line to exit). Options: --w <width> --h <height> --s <steps> --d <seed> "
    "--g <guidance> --l or --c <cfg scale> --n <negative prompt, - for none> "
    "--m <multipliers for LoRAs, comma separated>"
)


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with FLUX.1 or Chroma (and LoRAs)",
                                formatter_class=DefaultsHelpFormatter)
    add = p.add_argument
    add("--ckpt_path", type=str, required=True, help="FLUX.1 / Chroma DiT (.safetensors)")
    add("--model_type", type=str, default="flux", choices=["flux", "chroma"], help="flux (default) or chroma")
    add("--clip_l", type=str, default=None, help="CLIP-L text encoder (FLUX.1 only; a file or a diffusers folder)")
    add("--t5xxl", type=str, default=None, help="T5-XXL text encoder (a file, shards or a diffusers folder)")
    add("--ae", type=str, default=None, help="the autoencoder (ae.safetensors)")
    add("--apply_t5_attn_mask", action="store_true", help="mask T5 padding (required for Chroma)")
    add("--prompt", type=str, default="A photo of a cat", help="the prompt")
    add("--output_dir", type=str, default=".", help="folder for the image (named YYYYmmdd_HHMMSS.png)")
    add("--dtype", type=str, default="bfloat16", help="base dtype: bf16, fp16, fp32 or fp8 (default bfloat16)")
    add("--clip_l_dtype", type=str, default=None, help="dtype of CLIP-L (default --dtype)")
    add("--ae_dtype", type=str, default=None, help="dtype of the AE (default --dtype)")
    add("--t5xxl_dtype", type=str, default=None, help="dtype of T5-XXL (default --dtype)")
    add("--flux_dtype", type=str, default=None, help="dtype of the DiT (default --dtype)")
    add("--seed", type=int, default=None, help="random if not given")
    add("--steps", type=int, default=None, help="sampling steps (default 4 for schnell, 50 otherwise)")
    add("--guidance", type=float, default=None, help="embedded guidance (default 3.5; Chroma 0.0)")
    add("--negative_prompt", type=str, default=None, help="negative prompt (used when --cfg_scale is not 1)")
    add("--cfg_scale", type=float, default=None, help="classifier-free guidance scale (default 1.0; Chroma 4.0)")
    add("--offload", action="store_true", help="keep models on the CPU and move each to the device while it runs")
    add("--lora_weights", type=str, nargs="*", default=[], help="LoRA files, each `path;multiplier` (default 1.0)")
    add("--merge_lora_weights", action="store_true", help="merge the LoRAs into the weights instead of applying them")
    add("--width", type=int, default=DEFAULT_WIDTH, help="image width, floored to a multiple of 16; 64 or more")
    add("--height", type=int, default=DEFAULT_HEIGHT, help="image height, floored to a multiple of 16; 64 or more")
    add("--interactive", action="store_true", help="read prompts from standard input")
    add("--device", type=str, default=None, help="device to run on (default cuda, xpu or mps if any, else cpu)")
    add("--tokenizer_cache_dir", type=str, default=None, help="local copies of the tokenizers (as the trainer)")
    add("--t5xxl_max_token_length", type=int, default=None, help="T5 tokens (default 256 for schnell, 512 otherwise)")
    return p


def str_to_dtype(name: str | None, flag: str, default: torch.dtype | None = None) -> torch.dtype | None:
    if name is None:
        return default
    return dtype_from_name(name, flag)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``path;multiplier`` (multiplier optional, default 1.0). A file whose own name holds a ``;`` is that file."""
    path, sep, multiplier = spec.rpartition(";")
    if not sep or os.path.isfile(spec):
        return spec, 1.0
    try:
        return path, float(multiplier)
    except ValueError:
        raise UserError(f"--lora_weights {spec}: the multiplier after ';' must be a number") from None


# ---- fp8 storage ----------------------------------------------------------------------------


def _fp8_linear_forward(module: nn.Linear, compute_dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), module.weight.to(compute_dtype), bias)


def compute_fp8_linears_in(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Makes every Linear with fp8 weights upcast them per call to ``compute_dtype``; returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype in FP8_DTYPES:
            module.forward = partial(_fp8_linear_forward, module, compute_dtype)
            count += 1
    return count


def store_block_linears_in_fp8(dit: nn.Module, fp8_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Stores the Linear weights of the double and single blocks in fp8 (the bulk of the DiT).

    e4m3fn goes through the trainer's fp8 path (``library.fp8``); e5m2 is stored the same way here."""
    if fp8_dtype == torch.float8_e4m3fn:
        from library.fp8 import block_linears, quantize_dit_

        quantize_dit_(dit, compute_dtype)
        return sum(1 for _ in block_linears(dit))
    for block in [*dit.double_blocks, *dit.single_blocks]:
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.to(fp8_dtype)
    return compute_fp8_linears_in(dit, compute_dtype)


# ---- the pipeline ---------------------------------------------------------------------------


@dataclass
class LoadedLoRA:
    name: str
    multiplier: float
    network: nn.Module | None  # None once merged


@dataclass
class Pipeline:
    """Loaded models and settings; :meth:`generate` makes one image."""

    args: argparse.Namespace
    device: torch.device
    compute_dtype: torch.dtype
    dit: nn.Module
    ae: nn.Module
    text_encoders: list
    is_schnell: bool
    tokenize_strategy: object
    encoding_strategy: object
    loras: list[LoadedLoRA] = field(default_factory=list)

    @contextlib.contextmanager
    def on_device(self, *models) -> Iterator[None]:
        """With ``--offload``, the models visit the device and go back to the CPU."""
        models = [m for m in models if m is not None]
        if self.args.offload:
            for m in models:
                m.to(self.device)
        try:
            yield
        finally:
            if self.args.offload:
                for m in models:
                    m.to("cpu")

    def generate(self, settings):
        """One image for ``settings`` (a ``SampleSettings``)."""
        from library.flux_sampling import decode_image, encode_texts, generate_latents, make_encode_prompts

        texts = [settings.negative_prompt, settings.prompt] if settings.use_cfg else [settings.prompt]
        if settings.negative_prompt and not settings.use_cfg:
            logger.warning("the negative prompt has no effect with a CFG scale of 1 (--cfg_scale / --l)")
        with self.on_device(*self.text_encoders):
            encode = make_encode_prompts(self.tokenize_strategy, self.encoding_strategy, self.text_encoders)
            conditions = encode_texts(texts, encode)
        chroma = self.args.model_type == "chroma"
        with self.on_device(self.dit):
            latents = generate_latents(
                self.dit,
                settings,
                conditions[settings.prompt],
                conditions[settings.negative_prompt] if settings.use_cfg else None,
                shift=not self.is_schnell,
                apply_t5_attn_mask=self.args.apply_t5_attn_mask or chroma,
                device=self.device,
                dtype=self.compute_dtype,
                progress=True,
            )
        return decode_image(self.ae, latents, self.device)

    def save(self, image, settings) -> str:
        from library.flux_sampling import png_text_chunks, save_png

        os.makedirs(self.args.output_dir, exist_ok=True)
        stem = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        path, n = os.path.join(self.args.output_dir, f"{stem}.png"), 0
        while os.path.exists(path):
            n += 1
            path = os.path.join(self.args.output_dir, f"{stem}_{n}.png")
        extra = {
            "checkpoint": os.path.basename(self.args.ckpt_path),
            "lora_merged": str(bool(self.args.merge_lora_weights and self.loras)),
        }
        text = png_text_chunks(
            settings,
            model_type=self.args.model_type,
            is_schnell=self.is_schnell,
            loras=[(lora.name, lora.multiplier) for lora in self.loras],
            extra=extra,
        )
        save_png(image, path, text)
        logger.info("saved %s", path)
        return path

    def set_multipliers(self, multipliers: list[float]) -> None:
        if len(multipliers) != len(self.loras):
            raise UserError(f"--m: {len(multipliers)} multipliers given for {len(self.loras)} LoRAs")
        if any(lora.network is None for lora in self.loras):
            raise UserError("--m: the LoRAs were merged (--merge_lora_weights), their multipliers cannot change")
        for lora, m in zip(self.loras, multipliers, strict=True):
            lora.network.set_multiplier(m)
            lora.multiplier = m


def check_args(args):
    """Stops on what can be checked before loading; returns the DiT's hyper-parameters, read from its header."""
    from library.flux_sampling import MIN_SAMPLE_SIZE
    from library.flux_train_utils import check_model_files
    from library.safetensors_io import output_folder_problem
    from networks.lora_flux_files import check_lora_file

    dit_params = check_model_files(args, "--ckpt_path", fp8_flag="--flux_dtype fp8")
    if args.seed is not None:
        _seed(str(args.seed), f"--seed {args.seed}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: at least 1 step is needed")
    if args.t5xxl_max_token_length is not None and args.t5xxl_max_token_length < 1:
        raise UserError(f"--t5xxl_max_token_length {args.t5xxl_max_token_length}: give 1 or more (T5 tokens)")
    if min(args.width, args.height) < MIN_SAMPLE_SIZE:
        raise UserError(
            f"--width {args.width} / --height {args.height}: the image must be at least {MIN_SAMPLE_SIZE} pixels a side"
        )
    for flag in ("cfg_scale", "guidance"):  # inf or nan made a black image
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{flag} {value}: give a finite number")
    problem = output_folder_problem(args.output_dir)
    if problem:  # found now, not after the models loaded and the image was made
        raise UserError(f"--output_dir {args.output_dir}: {problem}; choose another folder")
    for path, _ in (parse_lora_spec(s) for s in args.lora_weights):
        check_lora_file(path, "--lora_weights")
    check_loras_fit(args, dit_params)
    return dit_params


def check_loras_fit(args, dit_params) -> None:
    """Each LoRA against the models as their files describe them, built on the meta device (no weight is read):
    a LoRA for another model or of a wrong shape stops in seconds, not after the models have loaded."""
    from library.network_rehearsal import models_on_meta
    from library.run_logging import quiet_loggers

    if not args.lora_weights:
        return
    dit, text_encoders = models_on_meta(args, dit_params)
    for path, multiplier in (parse_lora_spec(s) for s in args.lora_weights):
        try:
            with quiet_loggers("networks.lora_flux"):  # its warnings come when the LoRA is loaded
                lora_network(path, multiplier, dit, text_encoders)
        except UserError as e:
            raise UserError(f"--lora_weights {e}") from None


def load_pipeline(args) -> Pipeline:
    """Loads every model (checking the files first) and applies or merges the LoRAs."""
    from library.flux_utils import load_ae, load_flow_model
    from library.fp8 import store_linears_in_fp8
    from library.text_encoders import FluxTextEncodingStrategy, load_clip_l, load_t5xxl
    from library.tokenizers_flux import FluxTokenizeStrategy
    from networks.lora_flux_files import TEXT_ENCODER_KEYS, lora_files_have_modules

    dit_params = check_args(args)
    # the tokenizers now, before the models: an offline machine without them stops in seconds, not minutes
    schnell_file = args.model_type == "flux" and not dit_params.guidance_embed
    max_length = args.t5xxl_max_token_length or (256 if schnell_file else 512)
    tokenize_strategy = FluxTokenizeStrategy(max_length, args.tokenizer_cache_dir, use_clip_l=args.model_type == "flux")
    dtype = str_to_dtype(args.dtype, "--dtype")
    compute = torch.bfloat16 if dtype in FP8_DTYPES else dtype
    clip_dtype = str_to_dtype(args.clip_l_dtype, "--clip_l_dtype", dtype)
    if args.model_type == "chroma" and args.clip_l_dtype is not None:
        logger.warning("--clip_l_dtype %s is ignored for Chroma, which has no CLIP-L", args.clip_l_dtype)
    t5_dtype = str_to_dtype(args.t5xxl_dtype, "--t5xxl_dtype", dtype)
    ae_dtype = str_to_dtype(args.ae_dtype, "--ae_dtype", dtype)
    flux_dtype = str_to_dtype(args.flux_dtype, "--flux_dtype", dtype)
    if ae_dtype in FP8_DTYPES:
        logger.warning("--ae_dtype %s: the autoencoder runs in %s (fp8 is not used for it)", ae_dtype, compute)
        ae_dtype = compute
    device = device_from_name(args.device or preferred_device(), "--device")
    loading_device = "cpu" if args.offload else device
    specs = [parse_lora_spec(s) for s in args.lora_weights]
    fp8_dit = flux_dtype in FP8_DTYPES
    dit_compute = compute if fp8_dit else flux_dtype  # sampling runs in the DiT's own dtype, as in sd-scripts
    clip_text = f", CLIP-L {clip_dtype}" if args.model_type == "flux" else ""
    logger.info("dtypes: DiT %s%s, T5 %s, AE %s; the DiT computes in %s on %s", flux_dtype, clip_text,
                t5_dtype, ae_dtype, dit_compute, device)  # fmt: skip

    # an fp8 DiT is loaded on the CPU and only then moved to the device; its block Linears are stored in e4m3fn as
    # they are read (never the whole file in the compute dtype), unless a merged LoRA or e5m2 needs them wide first
    narrow_on_load = flux_dtype == torch.float8_e4m3fn and not args.merge_lora_weights
    is_schnell, dit = load_flow_model(args.ckpt_path, compute if fp8_dit else flux_dtype,
                                      "cpu" if fp8_dit else loading_device, model_type=args.model_type,
                                      fp8_block_linears=narrow_on_load)  # fmt: skip
    dit.requires_grad_(False).eval()
    # a LoRA merged into an fp8 encoder goes into its wide weights (on the CPU), which are then stored in fp8
    merge_first = args.merge_lora_weights and lora_files_have_modules([p for p, _ in specs], TEXT_ENCODER_KEYS)
    te_dtypes = {"clip_l": clip_dtype, "t5xxl": t5_dtype}
    wide_first = {name: merge_first and d in FP8_DTYPES for name, d in te_dtypes.items()}
    te_load = {name: (compute, "cpu") if wide_first[name] else (d, loading_device) for name, d in te_dtypes.items()}
    clip_l = None
    if args.clip_l:
        clip_l = load_clip_l(args.clip_l, *te_load["clip_l"], compute_dtype=compute).requires_grad_(False)
    t5xxl = load_t5xxl(args.t5xxl, *te_load["t5xxl"], compute_dtype=compute).requires_grad_(False)
    ae = load_ae(args.ae, ae_dtype, loading_device).requires_grad_(False).eval()
    text_encoders = [clip_l, t5xxl]

    pipeline = Pipeline(args, device, dit_compute, dit, ae, text_encoders, is_schnell, tokenize_strategy,
                        FluxTextEncodingStrategy(args.apply_t5_attn_mask))  # fmt: skip
    if args.merge_lora_weights:  # merged into the compute-dtype weights, before any fp8 cast
        pipeline.loras = load_loras(specs, dit, text_encoders, merge=True, device=device, dtype=compute)
    for encoder, name in ((clip_l, "clip_l"), (t5xxl, "t5xxl")):
        if encoder is not None and wide_first[name]:
            store_linears_in_fp8(encoder, te_dtypes[name]).to(loading_device)
        if encoder is not None:
            compute_fp8_linears_in(encoder, compute)
    if fp8_dit:
        count = store_block_linears_in_fp8(dit, flux_dtype, compute)
        logger.info("DiT: %d block Linear weights stored in %s, computed in %s", count, flux_dtype, compute)
        dit.to(loading_device)
    if not args.merge_lora_weights:
        pipeline.loras = load_loras(specs, dit, text_encoders, merge=False, device=device, dtype=dit_compute)
    return pipeline


def lora_network(path: str, multiplier: float, dit, text_encoders, read=None):
    """The LoRA network the file ``path`` (or its ``read`` ``(state_dict, metadata)``) makes for the models, and
    its weights in sd-scripts' names; modules this tool cannot apply are named and skipped."""
    from library.lora_formats import to_sd_scripts
    from networks.lora_flux import create_network_from_weights, read_lora_file

    sd, metadata = read or read_lora_file(path)
    converted = to_sd_scripts(sd, metadata, source=path)
    if converted.unsupported and read is not None:  # said once, when loading (not again when checking)
        logger.warning("%s: %d modules this tool cannot apply are skipped: %s", path, len(converted.unsupported),
                       ", ".join(converted.unsupported))  # fmt: skip
    return create_network_from_weights(
        multiplier, path, None, text_encoders, dit, weights_sd=converted.state_dict, for_inference=True
    )


def load_loras(specs, dit, text_encoders, *, merge: bool, device, dtype) -> list[LoadedLoRA]:
    """Each ``(path, multiplier)`` as a LoRA network applied to (or merged into) the models."""
    from networks.lora_flux import detect_model_type, read_lora_file
    from networks.lora_flux_files import base_model_version, warn_if_made_for_another_model

    loaded = []
    for path, multiplier in specs:
        sd, metadata = read_lora_file(path)
        warn_if_made_for_another_model(path, "--lora_weights", base_model_version(detect_model_type(dit)), metadata)
        network, weights = lora_network(path, multiplier, dit, text_encoders, (sd, metadata))
        unused = sorted(weights.keys() - network.state_dict().keys())  # e.g. bias diffs (.diff_b) no module takes
        if unused:
            logger.warning("%s: %d weights have no module here and are ignored: %s", path, len(unused),
                           ", ".join(unused))  # fmt: skip
        name = os.path.splitext(os.path.basename(path))[0]
        if merge:
            network.merge_to(text_encoders, dit, weights, device=device)
            loaded.append(LoadedLoRA(name, multiplier, None))
            logger.info("merged %s (multiplier %g)", path, multiplier)
            continue
        network.apply_to(text_encoders, dit)
        info = network.load_state_dict(weights, strict=False)
        missing = [k for k in info.missing_keys if not k.endswith(".alpha")]  # no alpha: alpha = rank, scale 1
        if missing:
            raise UserError(f"{path}: incomplete LoRA, missing {', '.join(missing[:3])}")
        network.to(device, dtype).eval()
        loaded.append(LoadedLoRA(name, multiplier, network))
        logger.info("applied %s (multiplier %g)", path, multiplier)
    return loaded


# ---- prompts --------------------------------------------------------------------------------


def default_settings(args, is_schnell: bool):
    """The ``SampleSettings`` of the command line (a random seed unless ``--seed``)."""
    from library.flux_sampling import CHROMA_DEFAULT_CFG, CHROMA_DEFAULT_GUIDANCE, SampleSettings, random_seed

    chroma = args.model_type == "chroma"
    guidance = args.guidance if args.guidance is not None else (CHROMA_DEFAULT_GUIDANCE if chroma else 3.5)
    cfg = args.cfg_scale if args.cfg_scale is not None else (CHROMA_DEFAULT_CFG if chroma else 1.0)
    return SampleSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt or "",
        width=args.width,
        height=args.height,
        steps=args.steps or (4 if is_schnell else 50),
        seed=args.seed if args.seed is not None else random_seed(),
        guidance=guidance,
        cfg_scale=cfg,
    )


def _seed(text: str, where: str) -> int:
    """A seed as torch.Generator.manual_seed takes it: a whole number from -2**63 to 2**64 - 1."""
    try:
        seed = int(text)
    except ValueError:
        seed = None
    if seed is None or not -(2**63) <= seed < MAX_SEED:
        raise UserError(f"{where}: a seed is a whole number from -2**63 to 2**64 - 1")
    return seed


def parse_interactive_line(line: str) -> tuple[dict, list[float] | None]:
    """(sd-scripts prompt dict, LoRA multipliers or None) of one interactive line."""
    from library.sample_prompts import line_to_prompt_dict

    if line.startswith("--"):  # options only: an empty prompt, as in sd-scripts (which splits at every "--")
        line = " " + line
    segments = line.split(" --")
    kept, multipliers, seed = [segments[0]], None, None
    for segment in segments[1:]:
        letter, _, value = segment.strip().partition(" ")
        if letter.lower() == "d":  # any seed --seed takes (sd-scripts: int()), not only the prompt files' 0 or more
            seed = _seed(value.strip(), f"--d {value.strip()}".rstrip())
        elif letter.lower() == "m":
            try:
                multipliers = [float(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise UserError(f"--m {value}: expected comma-separated numbers, one per LoRA") from None
        elif letter.lower() == "c":
            kept.append(f"l {value}")
        else:
            kept.append(segment)
    prompt = line_to_prompt_dict(" --".join(kept), where="interactive prompt")
    if seed is not None:
        prompt["seed"] = seed
    if prompt.get("negative_prompt") == "-":
        prompt["negative_prompt"] = ""
    return prompt, multipliers


def interactive(pipeline: Pipeline, base, stdin=None, seed: int | None = None) -> list[str]:
    """Generates an image per line of ``stdin`` until an empty line or its end; returns the paths. A line
    without ``--d`` takes ``seed`` (``--seed``), else a random one."""
    from library.flux_sampling import random_seed

    stdin = stdin or sys.stdin
    sticky = replace(base)
    written = []
    while True:
        print(INTERACTIVE_HELP, flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            return written
        try:
            prompt, multipliers = parse_interactive_line(line.strip())
            if multipliers is not None:
                pipeline.set_multipliers(multipliers)
            updates = {
                "width": prompt.get("width"),
                "height": prompt.get("height"),
                "steps": prompt.get("sample_steps"),
                "guidance": prompt.get("guidance_scale"),
                "cfg_scale": prompt.get("scale"),
            }
            sticky = replace(sticky, **{k: v for k, v in updates.items() if v is not None})
            settings = replace(
                sticky,
                prompt=prompt["prompt"],
                negative_prompt=prompt.get("negative_prompt", base.negative_prompt),
                seed=prompt["seed"] if prompt.get("seed") is not None else seed if seed is not None else random_seed(),
            )
            written.append(pipeline.save(pipeline.generate(settings), settings))
            print(written[-1], flush=True)
        except UserError as e:
            print(f"error: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, generates, and returns the exit status (1 with one ``error:`` line for user errors)."""
    tolerant_stdout()
    args = setup_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        pipeline = load_pipeline(args)
        settings = default_settings(args, pipeline.is_schnell)
        if args.interactive:
            interactive(pipeline, settings, seed=args.seed)
        else:
            logger.info("prompt %r, seed %d, %d steps", settings.prompt, settings.seed, settings.steps)
            print(pipeline.save(pipeline.generate(settings), settings))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
