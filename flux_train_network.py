"""Train a LoRA for FLUX.1 (dev, schnell, pruned) or Chroma.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \\
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \\
        --dataset_config dataset.toml --network_module networks.lora_flux --output_dir out ...

``FluxNetworkTrainer`` overrides only what is FLUX/Chroma-specific in ``NetworkTrainer``:
loading the models, text encoding and its cache, the flow-matching loss of a batch, and sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys

import train_network
from library.errors import UserError
from library.flux_train_utils import add_flux_train_arguments, check_model_files
from library.train_args import add_flux_script_arguments, review_compat_flags

logger = logging.getLogger(__name__)

DOP_ATTRIBUTE = "diff_output_preservation"  # a subset's custom_attributes key (spec §d.7)


def setup_parser() -> argparse.ArgumentParser:
    """``train_network.setup_parser()`` plus the DiT and FLUX groups and the deprecated ``--split_mode``."""
    parser = train_network.setup_parser()
    parser.description = "Train a LoRA for FLUX.1 or Chroma (sd-scripts compatible command line)."
    add_flux_script_arguments(parser)
    add_flux_train_arguments(parser)
    return parser


# measured in bench/RESULTS.md (GPU, 2026-11-27); eager, selective checkpointing hands every
# operator to a Python dispatch mode, which costs more host time than the skipped attention saves
KEEP_ATTENTION_EAGER = (
    "--gradient_checkpointing_keep_attention without --torch_compile is slower on a GPU, not faster: "
    "outside the compiler, selective checkpointing passes every operator through Python (on an H100, "
    "1.43 s a step against 0.90 s with plain checkpointing). Add --torch_compile or drop it"
)


TRAIN_T5XXL_WITH_CACHE = ("network_args train_t5xxl=True cannot be used with --cache_text_encoder_outputs: a trained "
                          "T5 must run every step. Drop one of them.")
T5_WEIGHTS_WITH_CACHE = ("--network_weights {file} has T5 modules (lora_te3_*), which --dim_from_weights trains, and a "
                         "trained T5 must run every step: drop --cache_text_encoder_outputs, or add "
                         "--network_train_unet_only to train the DiT modules alone")


class FluxNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self, parser: argparse.ArgumentParser | None = None):
        self.parser = parser or setup_parser()
        self.is_schnell = False
        self.dit_params = None  # the DiT's hyper-parameters, read from its header by check_args
        self.sample_conditions = None  # sample prompts encoded before the text encoders were freed
        self.fp8_after_merge = {"dit": False, "text_encoders": False}  # stored in fp8 once --base_weights merged
        self.uses_dop = self.uses_network_multiplier = False  # set from the dataset by prepare_before_loading
        self.t5_max_length = None  # chosen by prepare_before_loading
        self.tokenize_strategy = self.encoding_strategy = None  # made by prepare_before_loading / prepare_text_encoding
        self.flow_config = self.validation_config = None  # made by check_args

    # ---- checks before any work ------------------------------------------------------------------
    def check_args(self, args) -> None:
        if not args.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required: the FLUX.1 or Chroma .safetensors file")
        if not args.output_dir:
            raise UserError("--output_dir is required: where to write the LoRA")
        for message in review_compat_flags(args, self.parser):
            logger.warning(message)
        if args.split_mode:
            args.swap_from_split_mode = args.blocks_to_swap is None  # for messages that name the flag
            if args.blocks_to_swap is None:
                args.blocks_to_swap = 18
            logger.warning("--split_mode is deprecated: using --blocks_to_swap %d instead", args.blocks_to_swap)
        from library.fp8 import check_fp8_args
        from library.offloading import check_offload_args

        # schnell (no guidance embedder) is known from the header: its T5 length is chosen before loading;
        # the files first, so that a missing or damaged one is named by its flag
        self.dit_params = dit_params = check_model_files(args)
        check_fp8_args(args)
        check_offload_args(args)
        if args.torch_compile:
            from library.preflight import check_dynamo_backend

            check_dynamo_backend(args.dynamo_backend)
        self.is_schnell = args.model_type == "flux" and not dit_params.guidance_embed
        if args.model_type == "chroma":
            if args.guidance_scale != 0.0:
                logger.warning("Chroma is not guidance-distilled and the guide requires --guidance_scale 0.0 for "
                               "it; %s is passed to its approximator as given", args.guidance_scale)
        from library.network_interop import network_module_name
        from networks.lora_flux_args import parse_bool

        network_args = train_network.parse_network_args(args.network_args)
        train_t5xxl = parse_bool("train_t5xxl", network_args.get("train_t5xxl"))
        module_name = network_module_name(args)
        if (args.fp8_base or args.fp8_base_unet) and module_name.split(".")[0] == "lycoris" and \
                not parse_bool("bypass_mode", network_args.get("bypass_mode")):  # fmt: skip
            # LyCORIS computes with the base weight itself unless in bypass mode, and fp8 cannot be computed
            # with; it turns bypass mode on for its own Fp8Linear class only, while these fp8 layers stay nn.Linear
            raise UserError(f"--network_module {module_name} with fp8 base weights needs LyCORIS's bypass "
                            "mode: add bypass_mode=True to --network_args")  # fmt: skip
        if args.cache_text_encoder_outputs and train_t5xxl:
            raise UserError(TRAIN_T5XXL_WITH_CACHE)  # now, not after the models are loaded and the cache built
        if args.cache_text_encoder_outputs and self._weights_train_t5(args):
            raise UserError(T5_WEIGHTS_WITH_CACHE.format(file=args.network_weights))
        if train_t5xxl and args.network_train_unet_only:
            logger.warning("network_args train_t5xxl=True has no effect with --network_train_unet_only, which trains "
                           "no text-encoder LoRA: drop one of them")  # fmt: skip
        if args.text_encoder_lr and len(args.text_encoder_lr) > 2:
            raise UserError(f"--text_encoder_lr takes one rate (both encoders) or two (CLIP-L, then T5), not "
                            f"{len(args.text_encoder_lr)}")  # fmt: skip
        from library.flow_matching import FlowMatchingConfig

        self.flow_config = FlowMatchingConfig.from_args(args)  # validates the math options
        for message in self.flow_config.unused_options():
            logger.warning(message)
        self.validation_config = dataclasses.replace(self.flow_config, ip_noise_gamma=None)

    def text_encoders_with_lora(self, args) -> list[int] | None:
        """CLIP-L (FLUX.1 only) always, T5 with ``train_t5xxl=True``; None for third-party network modules and
        with --dim_from_weights (the file's modules decide)."""
        from library.network_interop import OWN_NETWORK_MODULES, network_module_name
        from networks.lora_flux_args import parse_bool

        if network_module_name(args) not in OWN_NETWORK_MODULES or args.dim_from_weights:  # the module or file decides
            return None
        train_t5xxl = parse_bool("train_t5xxl", train_network.parse_network_args(args.network_args).get("train_t5xxl"))
        return ([0] if args.model_type == "flux" else []) + ([1] if train_t5xxl else [])

    # ---- models ----------------------------------------------------------------------------------
    def load_target_model(self, args, accelerator, weight_dtype) -> train_network.TargetModels:
        import torch

        from library.flux_utils import load_ae, load_flow_model
        from library.fp8 import FP8, dit_load_dtype, quantize_dit_, t5_file_is_plain_fp8
        from library.text_encoders import load_clip_l, load_t5xxl
        from networks.lora_flux_files import DIT_KEYS, TEXT_ENCODER_KEYS, base_model_version, lora_file_keys

        dit_fp8 = args.fp8_base or args.fp8_base_unet
        if dit_fp8 and weight_dtype == torch.float32:  # fp16 on a CPU (resolve_dtypes warned)
            raise UserError(f"{'--fp8_base' if args.fp8_base else '--fp8_base_unet'} computes in the mixed "
                            "precision, and on a CPU --mixed_precision fp16 computes in fp32: use bf16")  # fmt: skip
        te_fp8 = args.fp8_base and not args.fp8_base_unet
        # base weights merge into the wide weights, which are then stored in fp8: Q(W + dW), not Q(Q(W) + dW),
        # which rounds away most of a LoRA whose change is a few percent of the weight
        base_keys = lora_file_keys(args.base_weights or [])  # read once (a .pt file is loaded whole)
        self.fp8_after_merge = {"dit": dit_fp8 and any(k.startswith(DIT_KEYS) for k in base_keys),
                                "text_encoders": te_fp8 and any(k.startswith(TEXT_ENCODER_KEYS) for k in base_keys)}
        te_dtype = FP8 if te_fp8 and not self.fp8_after_merge["text_encoders"] else weight_dtype
        t5_dtype = te_dtype
        if te_dtype == weight_dtype != torch.float32 and not any(k.startswith("lora_te3") for k in base_keys) \
                and t5_file_is_plain_fp8(args.t5xxl):
            t5_dtype = None  # an fp8 file stays fp8 (half the memory; autocast widens it to the same outputs)
        path = args.pretrained_model_name_or_path
        quantize_now = dit_fp8 and not self.fp8_after_merge["dit"]
        dit_dtype = dit_load_dtype(path, weight_dtype) if quantize_now else weight_dtype
        # block weights are stored in fp8 (with their per-row scales for --fp8_scaled) as each is read
        _, dit = load_flow_model(path, dit_dtype, "cpu", model_type=args.model_type,
                                 fp8_block_linears=quantize_now, fp8_scaled=args.fp8_scaled)
        if quantize_now:
            quantize_dit_(dit, weight_dtype, scaled=args.fp8_scaled)
        clip_l = None
        if args.model_type == "flux":
            clip_l = load_clip_l(args.clip_l, te_dtype, "cpu", compute_dtype=weight_dtype)
        t5xxl = load_t5xxl(args.t5xxl, t5_dtype, "cpu", compute_dtype=weight_dtype)
        ae = load_ae(args.ae, torch.float32 if args.no_half_vae else weight_dtype, "cpu")
        for model in (dit, clip_l, t5xxl, ae):
            if model is not None:
                model.requires_grad_(False).eval()
        dit.cpu_offload_checkpointing = args.cpu_offload_checkpointing  # used once checkpointing is enabled
        version = base_model_version(args.model_type)
        return train_network.TargetModels(version, [clip_l, t5xxl], ae, dit)  # all on the CPU (place_models)

    def merge_base_weights(self, ctx, network_module) -> None:
        super().merge_base_weights(ctx, network_module)
        from library.fp8 import quantize_dit_, store_linears_in_fp8

        if self.fp8_after_merge["dit"]:
            quantize_dit_(ctx.models.dit, ctx.weight_dtype, scaled=ctx.args.fp8_scaled)
        if self.fp8_after_merge["text_encoders"]:
            for encoder in ctx.models.text_encoders:
                if encoder is not None:
                    store_linears_in_fp8(encoder)

    def merged_weights_dtype(self, ctx):
        # fp8 base weights stay fp8 (merge_to keeps each weight's own dtype when given None)
        return None if ctx.args.fp8_base or ctx.args.fp8_base_unet else ctx.weight_dtype

    def place_models(self, ctx) -> None:
        args, device, models = ctx.args, ctx.accelerator.device, ctx.models
        if args.blocks_to_swap:
            double, single = models.dit.enable_block_swap(args.blocks_to_swap, device)
            logger.info("block swap: %d double and %d single blocks move between the CPU and %s",
                        double, single, device)  # fmt: skip
        models.dit.move_to_device_except_swap_blocks(device)
        if not args.cache_latents:  # it encodes every batch; otherwise it comes to the GPU only to decode samples
            models.ae.to(device)

    def prepare_before_loading(self, args, train_group, val_group) -> None:
        from library.tokenizers_flux import FluxTokenizeStrategy

        self.t5_max_length = args.t5xxl_max_token_length or (256 if self.is_schnell else 512)
        subsets = [s for group in (train_group, val_group) if group is not None for d in group.datasets
                   for s in d.config.subsets]  # fmt: skip
        self.uses_dop = any(s.custom_attributes.get(DOP_ATTRIBUTE) for s in subsets)
        self.uses_network_multiplier = any(d.config.network_multiplier != 1.0 for d in train_group.datasets)
        # the tokenizers now, before the models: an offline machine without them stops in seconds
        self.tokenize_strategy = FluxTokenizeStrategy(self.t5_max_length, args.tokenizer_cache_dir,
                                                      use_clip_l=args.model_type == "flux")  # fmt: skip

    @staticmethod
    def _named_nan_to_zero(latents, batch: dict):
        """sd-scripts zeroes NaN latents without naming the image: name it, then do the same (to inf too)."""
        import torch

        from library.caches import non_finite

        if torch.isfinite(latents).all():
            return latents
        finite = torch.isfinite(latents).flatten(1).all(1).tolist()
        broken = [path for path, ok in zip(batch["image_paths"], finite, strict=True) if not ok]
        logger.warning("%s in the latents of %s (its latent cache, or the AE in this precision: try --no_half_vae); "
                       "trained on as zeros", non_finite(latents), ", ".join(broken))  # fmt: skip
        return torch.nan_to_num(latents, nan=0.0, posinf=0.0, neginf=0.0)

    def sai_model_type(self, ctx) -> str:
        if ctx.models.version == "chroma":
            return "chroma"
        return "schnell" if self.is_schnell else "dev"

    # ---- caches and text encoding ----------------------------------------------------------------
    def cache_latents(self, ctx, groups) -> None:
        from library.cache_files import file_fingerprint
        from library.caches import LatentCacher, check_disk_caches_complete
        from library.flux_ae import PosteriorMeanEncoder

        args, accelerator = ctx.args, ctx.accelerator
        cacher = LatentCacher(PosteriorMeanEncoder(ctx.models.ae), file_fingerprint(args.ae) + ":mean",
                              args.cache_latents_to_disk,
                              args.vae_batch_size or 1, args.skip_cache_check, accelerator.process_index,
                              accelerator.num_processes)
        ctx.models.ae.to(accelerator.device)
        with __import__("torch").no_grad():
            cacher.cache(groups)
        ctx.models.ae.to("cpu")  # training reads the cache; samples take the AE to the GPU to decode
        release_gpu_memory()
        accelerator.wait_for_everyone()
        if args.cache_latents_to_disk and accelerator.num_processes > 1:  # the files the other processes wrote
            check_disk_caches_complete(groups, latents=True)

    def prepare_text_encoding(self, ctx, groups) -> None:
        import torch

        from library.text_encoders import FluxTextEncodingStrategy

        args = ctx.args
        self.encoding_strategy = FluxTextEncodingStrategy(args.apply_t5_attn_mask)
        if not args.cache_text_encoder_outputs:
            move_text_encoders(ctx.models.text_encoders, ctx.accelerator.device)  # they encode every batch
            return
        from library.caches import TextEncoderCacher, check_disk_caches_complete

        encode = functools.partial(self.encode_captions_to_numpy, ctx)
        cacher = TextEncoderCacher(encode, self.text_cache_fingerprint(ctx), args.apply_t5_attn_mask,
                                   args.cache_text_encoder_outputs_to_disk, args.text_encoder_batch_size,
                                   args.skip_cache_check, ctx.accelerator.process_index, ctx.accelerator.num_processes)
        with torch.no_grad():
            cacher.cache(groups)
        ctx.accelerator.wait_for_everyone()
        if args.cache_text_encoder_outputs_to_disk and ctx.accelerator.num_processes > 1:
            check_disk_caches_complete(groups, latents=False, te=True)
        if ctx.sample_prompts:
            # the text encoders may be freed once the network exists: encode the sample prompts now
            from library.flux_sampling import encode_texts, texts_to_encode

            with torch.no_grad():
                texts = texts_to_encode(ctx.sample_prompts, args.model_type)
                self.sample_conditions = encode_texts(texts, lambda t: self.encode_captions(ctx, t))
        move_text_encoders(ctx.models.text_encoders, "cpu")  # the GPU is the DiT's now (a trained CLIP-L returns)

    def text_cache_fingerprint(self, ctx) -> dict:
        """What text-encoder outputs depend on beyond the caption and the mask, recorded in their cache files."""
        from library.cache_files import file_fingerprint
        from library.text_encoders import clip_l_files, t5xxl_files

        args = ctx.args
        fingerprint = {  # a single file's entry as before sharded files were read, so that its caches stay valid
            "t5xxl": file_fingerprint(t5xxl_files(args.t5xxl)),
            "clip_l": file_fingerprint(clip_l_files(args.clip_l)) if args.clip_l else None,
            "t5xxl_max_token_length": self.t5_max_length,
            "model_type": args.model_type,
        }
        # these keys only when needed, so that other runs' caches stay valid
        if ctx.text_encoder_base_weights:
            fingerprint["base_weights"] = ctx.text_encoder_base_weights
        if args.fp8_base and not args.fp8_base_unet:  # encoders stored in fp8 give outputs of their own
            fingerprint["encoders_in_fp8"] = True
        if args.mixed_precision == "fp16":  # T5 overflows in fp16 (clamped, so finite): not to be reused in bf16
            fingerprint["encoded_in_fp16"] = True
        if args.model_type == "flux":  # captions cleaned for CLIP-L as its own tokenizer does (earlier caches: not)
            fingerprint["clip_l_text"] = "ftfy"
        return fingerprint

    def encode_captions(self, ctx, captions: list[str]) -> list:
        move_text_encoders(ctx.models.text_encoders, ctx.accelerator.device)  # cached runs move them only to encode
        tokens = self.tokenize_strategy.tokenize(captions)
        with ctx.accelerator.autocast():
            return self.encoding_strategy.encode_tokens(self.tokenize_strategy, ctx.models.text_encoders, tokens)

    def live_clip_cached_t5(self, ctx, texts: list[str]) -> list:
        """Sample prompts' text inputs while CLIP-L trains on cached T5 outputs: CLIP-L's pooled output
        with its LoRA as it is now, T5's from before training (T5 itself is freed by then)."""
        from library.flux_sampling import TextConditions

        cached = TextConditions.cat([self.sample_conditions[t] for t in texts])
        l_pooled = self.clip_l_pooled(ctx, texts)
        return [l_pooled.to(cached.t5_out.device), cached.t5_out, cached.txt_ids, cached.t5_attn_mask]

    def clip_l_pooled(self, ctx, texts: list[str]):
        """CLIP-L's pooled output for ``texts``, with its LoRA (T5 is not run)."""
        tokens = self.tokenize_strategy.tokenize(texts)
        with ctx.accelerator.autocast():
            return self.encoding_strategy.encode_tokens(self.tokenize_strategy, ctx.models.text_encoders[:1], tokens)[0]

    def encode_captions_to_numpy(self, ctx, captions: list[str]) -> list[dict]:
        import torch

        l_pooled, t5_out, txt_ids, t5_mask = self.encode_captions(ctx, captions)
        arrays = {"l_pooled": l_pooled, "t5_out": t5_out, "txt_ids": txt_ids, "t5_attn_mask": t5_mask}
        # numpy has no bf16: those become fp32; fp16 outputs stay fp16 (half the file, as sd-scripts keeps them)
        arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for k, v in arrays.items()}
        return [{k: v[i] for k, v in arrays.items()} for i in range(len(captions))]

    def network_targets(self, ctx):
        from library.network_interop import network_module_name, text_encoders_for

        return text_encoders_for(network_module_name(ctx.args), ctx.models.text_encoders), ctx.models.dit

    @staticmethod
    def _weights_train_t5(args) -> bool:
        """--dim_from_weights shapes the network from --network_weights: its T5 modules train unless unet-only."""
        from networks.lora_flux_files import lora_files_have_modules

        return bool(args.dim_from_weights and args.network_weights and not args.network_train_unet_only
                    and lora_files_have_modules([args.network_weights], "lora_te3"))  # fmt: skip

    def rehearse_network(self, args) -> None:
        from library.network_rehearsal import rehearse_network

        rehearse_network(self, args, self.dit_params)

    def after_network_created(self, args, network) -> None:
        if getattr(network, "train_t5xxl", False) and args.cache_text_encoder_outputs and \
                not args.network_train_unet_only:  # fmt: skip  (a .pt file's modules are known only now)
            raise UserError(T5_WEIGHTS_WITH_CACHE.format(file=args.network_weights) if args.dim_from_weights
                            else TRAIN_T5XXL_WITH_CACHE)  # fmt: skip
        if not hasattr(network, "set_multiplier"):  # the oldest network interface
            if self.uses_dop:
                raise UserError(f"custom_attributes diff_output_preservation needs a network that can be "
                                f"switched off (set_multiplier); --network_module {args.network_module} has "
                                "none")  # fmt: skip
            if self.uses_network_multiplier:
                logger.warning("the dataset's network_multiplier is not applied: --network_module %s has no "
                               "set_multiplier", args.network_module)  # fmt: skip

    def prepare_for_training(self, ctx, network) -> None:
        args = ctx.args
        dit = ctx.models.dit
        if args.gradient_checkpointing:
            dit.enable_gradient_checkpointing(keep_attention=args.gradient_checkpointing_keep_attention)
            if args.gradient_checkpointing_keep_attention:
                logger.info("gradient checkpointing keeps each block's attention output: the recompute skips attention")
                if not args.torch_compile:
                    logger.warning(KEEP_ATTENTION_EAGER)
            for encoder in trained_text_encoders(ctx.models.text_encoders, network):
                checkpoint_text_encoder(encoder)
        dit.train(args.gradient_checkpointing)  # checkpointing only runs in train mode; no dropout in the DiT
        from library import flux_attention

        flux_attention.use_cudnn_attention(args.cudnn_attention)  # before compiling: traced blocks keep their kernels
        if args.cudnn_attention:
            logger.info("attention uses cuDNN's fused kernel first where the GPU has it (--cudnn_attention)")
        if args.torch_compile:  # the block call, checkpointing included; the blocks themselves stay as they are
            dit.compile_blocks(args.dynamo_backend)
            logger.info("compiling the calls of %d DiT blocks with torch.compile (backend %s, dynamic shapes)",
                        len(dit.double_blocks) + len(dit.single_blocks), args.dynamo_backend)
        if args.cache_text_encoder_outputs:
            # T5 never runs again: training reads its cached outputs, and the sample prompts were encoded
            # before; CLIP-L stays while its LoRA trains
            clip_l = ctx.models.text_encoders[0] if ctx.train_text_encoder else None
            ctx.models.text_encoders = [clip_l, None]
            move_text_encoders(ctx.models.text_encoders, ctx.accelerator.device)

    def text_conditions(self, ctx, batch: dict):
        """(l_pooled, t5_out, txt_ids, t5_mask) for a batch: from the cache, or encoded now."""
        device, dtype = ctx.accelerator.device, ctx.weight_dtype
        cached = batch.get("text_encoder_outputs")
        if cached is None:
            outs = self.encode_captions(ctx, batch["captions"])
        elif ctx.train_text_encoder:  # CLIP-L trained live, T5 from the cache (T5 is not run)
            outs = [self.clip_l_pooled(ctx, batch["captions"]), cached["t5_out"], cached["txt_ids"],
                    cached["t5_attn_mask"]]  # fmt: skip
        else:
            outs = [cached["l_pooled"], cached["t5_out"], cached["txt_ids"], cached["t5_attn_mask"]]
        l_pooled, t5_out, txt_ids, t5_mask = outs
        # (batch tensors are in pinned memory on a GPU machine: the copies need not wait for the GPU); the mask
        # stays on the host, where the DiT decides how much T5 padding to cut without waiting for the device
        return tuple(t.to(device, dtype, non_blocking=True) for t in (l_pooled, t5_out, txt_ids)) + (t5_mask.cpu(),)

    # ---- the loss of one batch -------------------------------------------------------------------
    def batch_loss(self, ctx, batch, step, sample_indices, fixed_sigma=None):
        import torch
        import torch.nn.functional as F

        from library.flow_matching import (
            NUM_TRAIN_TIMESTEPS,
            TRAIN_STREAM,
            VALIDATION_STREAM,
            noisy_input,
            per_sample_loss,
            per_sample_seeds,
            sample_noise_and_sigmas,
        )
        from library.flux_utils import pack_latents, prepare_img_ids, unpack_latents

        args, device, dtype = ctx.args, ctx.accelerator.device, ctx.weight_dtype
        models = ctx.models
        if batch["latents"] is not None:  # (checked for NaN on the CPU: no wait for the GPU)
            latents = self._named_nan_to_zero(batch["latents"], batch).to(device, torch.float32, non_blocking=True)
        else:
            with torch.no_grad():
                images = batch["images"].to(device, models.ae.dtype, non_blocking=True)
                chunks = [models.ae.encode(c, sample=False) for c in images.split(args.vae_batch_size or len(images))]
            latents = self._named_nan_to_zero(torch.cat(chunks).float(), batch)
        validation = fixed_sigma is not None
        if validation:  # fixed noise levels, fixed noise, and no input perturbation
            seed = args.validation_seed if args.validation_seed is not None else ctx.seed
            config, stream = self.validation_config, VALIDATION_STREAM
        else:
            seed, config, stream = ctx.seed, self.flow_config, TRAIN_STREAM
        seeds = per_sample_seeds(seed, step, sample_indices, stream=stream)
        noise = sample_noise_and_sigmas(config, latents.shape[1:], seeds, fixed_sigma=fixed_sigma, device=device)
        x_t = noisy_input(latents, noise)

        b, _, h, w = latents.shape
        guidance = torch.full((b,), float(args.guidance_scale), device=device)  # fp32, as sd-scripts: 1000·g exact
        use_guidance = models.dit.params.guidance_embed or args.model_type == "chroma"
        img_ids = prepare_img_ids(b, h // 2, w // 2).to(device)  # fp32, as the sampler: bf16 holds whole numbers to 256
        # as sd-scripts (spec §d.9): t = 1000·σ rounded to the weights' dtype, divided by 1000 in that dtype (the
        # DiT multiplies by 1000 again), so in bf16 the model embeds the t sd-scripts' LoRAs were trained on
        timesteps = noise.timesteps.to(dtype) / NUM_TRAIN_TIMESTEPS

        def velocity(rows, conditions):
            pooled, txt, ids, txt_mask = conditions
            packed = models.dit(
                img=pack_latents(x_t[rows].to(dtype)), img_ids=img_ids[rows], txt=txt[rows], txt_ids=ids[rows],
                timesteps=timesteps[rows], y=pooled[rows],
                guidance=guidance[rows] if use_guidance else None,
                txt_attention_mask=txt_mask[rows] if args.apply_t5_attn_mask else None,
            )  # fmt: skip
            return unpack_latents(packed.float(), h // 2, w // 2)

        # (the dataset's network_multiplier is set around this call and its backward: TrainingLoop)
        conditions = self.text_conditions(ctx, batch)
        prediction = velocity(slice(None), conditions)
        target = self.preservation_target(ctx, batch, velocity, latents, noise, conditions)
        mask = None
        if batch.get("alpha_masks") is not None:
            mask = F.interpolate(batch["alpha_masks"].to(device, non_blocking=True)[:, None], size=(h, w), mode="area")
        return per_sample_loss(prediction, latents, noise, config, target=target, mask=mask)

    def preservation_target(self, ctx, batch, velocity, latents, noise, conditions):
        """Differential output preservation (spec §d.7): samples whose subset sets
        ``custom_attributes = { diff_output_preservation = true }`` learn the base model's own output
        (the LoRA switched off) instead of the data, so the LoRA leaves what they show unchanged."""
        import torch

        from library.flow_matching import flow_velocity

        rows = [i for i, attrs in enumerate(batch.get("custom_attributes") or []) if attrs.get(DOP_ATTRIBUTE)]
        if not rows or ctx.network is None:
            return None
        network = ctx.network
        previous = getattr(network, "multiplier", 1.0)
        network.set_multiplier(0.0)
        try:
            with torch.no_grad():
                if ctx.train_text_encoder:  # the base model's text conditions too: a trained encoder LoRA is off
                    conditions = self.text_conditions(ctx, batch)
                base = velocity(rows, conditions)
        finally:
            network.set_multiplier(previous)
        target = flow_velocity(latents, noise.noise.to(latents.device))
        target[rows] = base
        return target

    # ---- samples ---------------------------------------------------------------------------------
    def sample_images(self, ctx, epoch, step) -> None:
        from library.training_samples import sample_images, wandb_sample_logger

        args, accelerator = ctx.args, ctx.accelerator
        if self.sample_conditions is not None and not ctx.train_text_encoder:
            text = {"conditions": self.sample_conditions}
        elif self.sample_conditions is not None:  # CLIP-L trains on cached T5 outputs
            text = {"encode_prompts": lambda texts: self.live_clip_cached_t5(ctx, texts)}
        else:
            text = {"encode_prompts": lambda texts: self.encode_captions(ctx, texts)}
        sample_images(
            ctx.models.dit, ctx.models.ae, ctx.sample_prompts, output_dir=args.output_dir,
            output_name=args.output_name, epoch=epoch, steps=step, model_type=args.model_type,
            is_schnell=self.is_schnell, apply_t5_attn_mask=args.apply_t5_attn_mask, device=accelerator.device,
            dtype=ctx.weight_dtype, eval_modules=[ctx.network], autocast=accelerator.autocast,
            # the LoRA being trained, by the name of its final file
            loras=[(args.output_name or "last", getattr(ctx.network, "multiplier", 1.0))],
            on_image=wandb_sample_logger(accelerator), **text,
        )


def move_text_encoders(text_encoders: list, device) -> None:
    """Moves the (present) text encoders to ``device`` unless they are there: a cheap check per call
    (accelerate's "cuda" is where parameters on "cuda:0" are). Leaving a GPU hands its memory back."""
    import torch

    device = torch.device(device)
    moved = False
    for encoder in text_encoders:
        if encoder is None:
            continue
        at = next(encoder.parameters()).device
        if at.type != device.type or (device.index is not None and at.index != device.index):
            encoder.to(device)
            moved = True
    if moved and device.type == "cpu":
        release_gpu_memory()


def release_gpu_memory() -> None:
    """Returns the CUDA caching allocator's free blocks, so the DiT that comes next finds one unfragmented pool."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trained_text_encoders(text_encoders: list, network) -> list:
    """The text encoders the network has LoRA modules in (CLIP-L: ``lora_te1_``, T5: ``lora_te3_``)."""
    names = [lora.lora_name for lora in network.all_loras()] if hasattr(network, "all_loras") else []
    return [encoder for encoder, prefix in zip(text_encoders, ("lora_te1_", "lora_te3_"), strict=True)
            if encoder is not None and any(n.startswith(prefix) for n in names)]  # fmt: skip


def checkpoint_text_encoder(encoder) -> None:
    """Gradient checkpointing in a trained text encoder. transformers checkpoints only in train mode,
    so the encoder goes to train mode with its dropout off (the Dropout modules, and the attention
    dropout rate its attention layers read in train mode): the base is frozen, and T5's config has
    10% dropout that sd-scripts' ``.train()`` would turn on."""
    from torch import nn

    # transformers 5 renamed it (the old name warns, and goes in 6)
    enable = getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)
    enable()
    encoder.train()
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for rate in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, rate, None), float):
                setattr(module, rate, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = setup_parser()
    return train_network.main(argv, parser, FluxNetworkTrainer(parser))


if __name__ == "__main__":
    sys.exit(main())
