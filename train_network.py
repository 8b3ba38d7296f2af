"""Model-agnostic LoRA training: ``NetworkTrainer`` and the generic ``setup_parser()``.

The loop reads top to bottom: arguments -> datasets -> models -> caches -> network ->
optimizer -> (resume) -> steps -> saves. Model-specific work (loading, text encoding, the
loss of one batch, sampling) lives in subclass hooks; ``flux_train_network.FluxNetworkTrainer``
is the one this project ships.

Determinism: batch order is a pure function of (seed, epoch), and noise and noise levels of
(seed, step, global sample index), so a resumed run continues exactly and the result does not
depend on the number of processes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

from library.dataset_args import add_dataset_arguments
from library.errors import TrainingInterrupted, UserError
from library.network_interop import (
    OWN_NETWORK_MODULES,
    missing_network_module,
    network_module_name,
    report_loaded_weights,
)
from library.run_logging import (
    HeldRecords,
    first_launched_process,
    loggable_config,
    process_group_kwargs,
    read_tracker_config,
    record_in_log_file,
    run_logging_dir,
    setup_logging,
    tolerant_stdout,
    tracker_init_kwargs,
    tracker_names,
)
from library.run_start import check_resume_step, initial_step, run_length, seed_each_process, starting_point
from library.train_args import DEFAULT_MAX_TRAIN_STEPS, DefaultsHelpFormatter, add_train_network_arguments

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    """The generic LoRA trainer's parser (dataset, training, network, saving, logging ... groups)."""
    parser = argparse.ArgumentParser(
        description="Train a LoRA network (sd-scripts compatible command line).",
        formatter_class=DefaultsHelpFormatter,
    )
    add_dataset_arguments(parser)
    add_train_network_arguments(parser)
    return parser


@dataclass
class TargetModels:
    """What a model-specific trainer loads: the DiT, the AE and the text encoders."""

    version: str
    text_encoders: list
    ae: object
    dit: object


@dataclass
class RunContext:
    """State shared by the hooks during one run."""

    args: argparse.Namespace
    accelerator: object
    weight_dtype: object
    models: TargetModels
    network: object = None
    seed: int = 0
    train_text_encoder: bool = False
    train_unet: bool = True
    sample_prompts: list | None = None
    # --base_weights files merged into a text encoder (file identity, multiplier): they change its outputs
    text_encoder_base_weights: list = field(default_factory=list)


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``--network_args k=v ...`` -> dict (split on the first '=', values stay strings)."""
    kwargs = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--network_args {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if key.strip() == "neuron_dropout":  # the trainer passes --network_dropout to the network under this name
            raise UserError("--network_args neuron_dropout: give it as --network_dropout (or network_args dropout=...)")
        kwargs[key.strip()] = value.strip()
    return kwargs


def batches_of_process(num_batches: int, process_index: int, num_processes: int) -> list[int]:
    """This process's batches of an epoch: every num_processes-th, wrapping around so that every
    process runs the same number of steps (an uneven split would leave one waiting in all-reduce)."""
    per_process = math.ceil(num_batches / num_processes)
    return [(process_index + k * num_processes) % num_batches for k in range(per_process)]


def resolve_dtypes(args, device_type: str):
    import torch

    names = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    weight_dtype = names[args.mixed_precision]
    if weight_dtype == torch.float16 and device_type == "cpu":
        logger.warning("--mixed_precision fp16 on CPU computes in fp32 (CPU autocast has no fp16); use bf16 or no")
        weight_dtype = torch.float32
    save_dtype = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.save_precision
    ]
    return weight_dtype, save_dtype


class NetworkTrainer:
    """The training loop; subclasses fill in the model-specific hooks below."""

    # ---- hooks -----------------------------------------------------------------------------
    def check_args(self, args) -> None:
        """Stops on option combinations that cannot work; called before any long work."""

    def load_target_model(self, args, accelerator, weight_dtype) -> TargetModels:
        raise NotImplementedError

    def cache_latents(self, ctx: RunContext, groups) -> None:
        raise NotImplementedError

    def prepare_text_encoding(self, ctx: RunContext, groups) -> None:
        """Tokenizers, text-encoder output caches and anything sampling will need."""
        raise NotImplementedError

    def place_models(self, ctx: RunContext) -> None:
        """Moves the models to where they train, once the caches are made: until then the DiT waits on
        the CPU, so the text encoders and the AE have the GPU to themselves while caching."""
        raise NotImplementedError

    def batch_loss(self, ctx: RunContext, batch: dict, step: int, sample_indices: list[int], fixed_sigma=None):
        """Per-sample losses (B,) of one batch."""
        raise NotImplementedError

    def sample_images(self, ctx: RunContext, epoch: int | None, step: int) -> None:
        """Sample images if the prompts file asks for them (no-op by default)."""

    def network_targets(self, ctx: RunContext) -> tuple[list, object]:
        """(text encoders, DiT) as the network module receives them."""
        return ctx.models.text_encoders, ctx.models.dit

    def text_encoders_with_lora(self, args) -> list[int] | None:
        """The positions in ``--text_encoder_lr`` of the text encoders that get LoRA modules when the
        text encoders train, or None where that is known only once the network exists."""
        return None

    def sai_model_type(self, ctx: RunContext) -> str:
        """The model kind for ``modelspec.architecture`` (``dev``, ``schnell``, ``chroma``)."""
        raise NotImplementedError

    # ---- the run ---------------------------------------------------------------------------
    def train(self, args) -> str | None:
        """Trains and returns the path of the final LoRA file (None on the processes that did not write it)."""
        self.training_started_at = time.time()  # ss_training_started_at: before loading and caching, as sd-scripts
        import torch
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list, set_seed

        from library.dataset_config import check_caching, load_dataset_configs
        from library.datasets import build_dataset_groups
        from library.preflight import warn_about_validation_without_images

        args.cache_latents = args.cache_latents or args.cache_latents_to_disk
        args.cache_text_encoder_outputs = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
        self.check_args(args)
        self.warn_about_flags_without_effect(args)
        self.check_inputs_before_loading(args)
        # main(argv) may run several times in one process (GUIs, tests): let each run choose its precision
        from accelerate.state import AcceleratorState

        from library.preflight import refuse_unsupported_distribution

        refuse_unsupported_distribution()  # before the Accelerator, which would ask for DeepSpeed to be installed
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=tracker_names(args),
            project_dir=run_logging_dir(args),
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=process_group_kwargs(args),
        )
        refuse_unsupported_distribution(accelerator.distributed_type)
        if args.seed is None:  # one seed for all processes: the same LoRA initialisation, data order and split
            seed = [random.randint(0, 2**32 - 1)]
            args.seed = broadcast_object_list(seed)[0] if accelerator.num_processes > 1 else seed[0]
        set_seed(args.seed)
        weight_dtype, save_dtype = resolve_dtypes(args, accelerator.device.type)
        if args.full_fp16 and getattr(accelerator, "scaler", None) is not None:
            from library.dtypes import allow_fp16_gradients

            allow_fp16_gradients(accelerator.scaler)

        configs = load_dataset_configs(args)
        check_caching(configs, args)
        train_group, val_group = build_dataset_groups(configs, args.seed, args.validation_seed)
        if val_group is None:
            warn_about_validation_without_images(args)
        groups = [g for g in (train_group, val_group) if g is not None]
        if len(train_group) == 0:
            raise UserError("the dataset has no images to train on; check image_dir / --train_data_dir")
        process_batches = batches_of_process(len(train_group), accelerator.process_index, accelerator.num_processes)
        steps_per_epoch = math.ceil(len(process_batches) / args.gradient_accumulation_steps)
        if args.debug_dataset:
            self.debug_dataset(args, train_group, steps_per_epoch)
            return ""
        from library.cache_files import check_cache_folders_writable, images_to_decode
        from library.images import verify_images

        entries = [e for group in groups for e in group.entries()]
        verify_images(images_to_decode(entries, args.cache_latents_to_disk))
        check_cache_folders_writable(entries, args.cache_latents_to_disk, args.cache_text_encoder_outputs_to_disk)
        self.prepare_before_loading(args, train_group, val_group)
        from library.preflight import rehearse_optimizer_and_schedule

        args.max_train_steps = run_length(args, steps_per_epoch)
        optimizer_class = rehearse_optimizer_and_schedule(args, args.max_train_steps)
        self.rehearse_network(args)
        given_step = initial_step(args, steps_per_epoch)
        if args.resume:
            from library.train_state import check_state_optimizer

            check_state_optimizer(args.resume, optimizer_class)
            check_resume_step(args, given_step, steps_per_epoch)
        sampling_prompts = self.load_sample_prompts(args)

        models = self.load_target_model(args, accelerator, weight_dtype)
        ctx = RunContext(args, accelerator, weight_dtype, models, seed=args.seed, sample_prompts=sampling_prompts)
        if args.cache_latents:
            self.cache_latents(ctx, groups)
        ctx.train_unet = not args.network_train_text_encoder_only
        ctx.train_text_encoder = not args.network_train_unet_only  # narrowed once the network exists
        self.merge_base_weights(ctx, self.network_module)  # before the text encoders' outputs are cached
        self.prepare_text_encoding(ctx, groups)
        self.place_models(ctx)

        network = self.create_network(ctx)
        ctx.network = network
        from library.optimizers import (
            freeze_parameters_left_out,
            get_optimizer,
            get_optimizer_train_eval_fn,
            trainable_param_groups,
        )

        params, lr_descriptions = trainable_param_groups(network, args, ctx.train_unet, ctx.train_text_encoder)
        from library.lr_schedulers import get_scheduler_fix

        optimizer_name, optimizer_args, optimizer = get_optimizer(args, params)
        optimizer_train, optimizer_eval = get_optimizer_train_eval_fn(optimizer)

        num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        if args.save_n_epoch_ratio:
            args.save_every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
        train_group.set_max_train_steps(args.max_train_steps)
        lr_scheduler = get_scheduler_fix(args, optimizer, 1)

        if args.full_bf16 or args.full_fp16:
            network.to(weight_dtype)
        optimizer = accelerator.prepare(optimizer)
        network.to(accelerator.device)
        if hasattr(network, "prepare_grad_etc"):
            network.prepare_grad_etc(*self.network_targets(ctx))
        freeze_parameters_left_out(network, optimizer)

        seed_each_process(args.seed, accelerator.process_index, accelerator.num_processes)  # a resume restores it
        first_step, skip_data = starting_point(args, given_step, network, optimizer, lr_scheduler, accelerator)

        metadata = self.training_metadata(ctx, train_group, val_group, optimizer_name, optimizer_args, num_epochs,
                                          len(process_batches))
        if accelerator.is_main_process and tracker_names(args):
            init_kwargs = tracker_init_kwargs(args)
            config = loggable_config(args) if args.log_config else None  # {} made TensorBoard write empty hparams
            accelerator.init_trackers(args.log_tracker_name or "network_train", config=config,
                                      init_kwargs=init_kwargs)

        from library.training_loop import TrainingLoop

        loop = TrainingLoop(self, ctx, train_group, val_group, optimizer, lr_scheduler, lr_descriptions,
                            optimizer_train, optimizer_eval, process_batches, steps_per_epoch, num_epochs,
                            metadata, save_dtype)
        final_path = loop.run(first_step, skip_data)
        accelerator.end_training()
        return final_path if accelerator.is_main_process else None  # the process that wrote it reports it

    # ---- pieces of the run -------------------------------------------------------------------
    def warn_about_flags_without_effect(self, args) -> None:
        """Settings whose effect is narrower than their name suggests (the flags that do nothing at
        all are ``IGNORED_FOR_FLUX``, warned about with the other compatibility flags)."""
        if args.masked_loss and not args.alpha_mask:
            logger.warning("--masked_loss: masks come from each image's alpha channel (--alpha_mask or alpha_mask = "
                           "true in the dataset config); conditioning-image masks are not supported")
        if args.max_train_epochs is not None and args.max_train_steps != DEFAULT_MAX_TRAIN_STEPS:
            logger.warning("--max_train_epochs %d sets the run's length: --max_train_steps %s is not used",
                           args.max_train_epochs, args.max_train_steps)  # fmt: skip
        if args.network_train_unet_only and args.text_encoder_lr:
            logger.warning("--text_encoder_lr is not used: --network_train_unet_only trains no text-encoder LoRA")
        if args.network_train_text_encoder_only and args.unet_lr is not None:
            logger.warning("--unet_lr is not used: --network_train_text_encoder_only trains no DiT LoRA")

    def debug_dataset(self, args, train_group, steps_per_epoch: int) -> None:
        """--debug_dataset: prints the first epoch's batches (files, captions, buckets) and trains nothing."""
        # the run's length, for token warm-up given as a fraction of it
        train_group.set_max_train_steps(run_length(args, steps_per_epoch))
        train_group.set_current_epoch(1)
        for index in range(len(train_group)):
            batch = train_group[index]
            print(f"batch {index}: bucket {batch['bucket_reso'][0]}x{batch['bucket_reso'][1]}")
            for path, caption, flipped in zip(batch["image_paths"], batch["captions"], batch["flippeds"], strict=True):
                print(f"  {path}{' (flipped)' if flipped else ''}: {caption}")

    def check_inputs_before_loading(self, args) -> None:
        """Everything that can be checked without the models, so a typo stops the run in seconds."""
        from library.preflight import (
            check_counts,
            check_learning_rates,
            check_output_folder,
            warn_about_earlier_outputs,
            warn_about_unused_text_encoder_rates,
        )

        check_counts(args)
        if args.full_bf16 and args.mixed_precision != "bf16":
            raise UserError("--full_bf16 needs --mixed_precision bf16")
        if args.full_fp16 and args.mixed_precision != "fp16":
            raise UserError("--full_fp16 needs --mixed_precision fp16")
        text_encoders_with_lora = self.text_encoders_with_lora(args)
        check_learning_rates(args, text_encoders_with_lora)
        warn_about_unused_text_encoder_rates(args, text_encoders_with_lora, parse_network_args(args.network_args))
        if tracker_names(args):
            read_tracker_config(args)
        self.network_module = self.import_network_module(args)
        validate = getattr(self.network_module, "validate_network_args", None)
        if validate is not None:
            validate(neuron_dropout=args.network_dropout, **parse_network_args(args.network_args))
        if args.resume:
            from library.train_state import check_state_dir, resume_seed

            check_state_dir(args.resume)
            args.seed = resume_seed(args.resume, args.seed)
            if args.network_weights:
                logger.warning("--network_weights %s: its weights are replaced by those of the --resume state%s",
                               args.network_weights, " (its ranks still shape the network: --dim_from_weights)"
                               if args.dim_from_weights else "; leave it out")  # fmt: skip
        if args.base_weights and args.base_weights_multiplier is not None:
            if len(args.base_weights_multiplier) != len(args.base_weights):
                raise UserError(
                    f"--base_weights_multiplier has {len(args.base_weights_multiplier)} values for "
                    f"{len(args.base_weights)} --base_weights files; give one per file"
                )
        if args.base_weights and not all(args.base_weights):
            raise UserError("--base_weights: an empty file name; give the LoRA files to merge, or leave the option out")
        thumbnail = args.metadata_thumbnail if not (args.metadata_thumbnail or "").startswith("data:") else None
        for flag, paths in (("--network_weights", [args.network_weights]), ("--base_weights", args.base_weights),
                            ("--metadata_thumbnail", [thumbnail])):  # fmt: skip
            for path in paths or []:
                if path and not os.path.isfile(path):
                    raise UserError(f"{flag} {path}: file not found")
        check_output_folder(args)
        warn_about_earlier_outputs(args)
        if first_launched_process():  # the first one cleans up
            from library.train_state import remove_abandoned_temporaries

            cleaned = remove_abandoned_temporaries(args.output_dir, args.output_name)
            if cleaned:
                logger.info("cleaned up after an interrupted run in %s (half-written saves removed, a state "
                            "it was replacing put back): %s", args.output_dir, ", ".join(cleaned))  # fmt: skip

    @staticmethod
    def import_network_module(args):
        name = network_module_name(args)
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise UserError(missing_network_module(name, e)) from None

    def prepare_before_loading(self, args, train_group, val_group) -> None:
        """Model-specific settings that depend on the dataset, and anything cheap to load before the models
        (a missing tokenizer stops the run in seconds)."""

    def load_sample_prompts(self, args):
        """Reads --sample_prompts at start, so a missing file stops the run before any work."""
        from library.sample_prompts import prepare_sample_prompts

        return prepare_sample_prompts(args)

    def rehearse_network(self, args) -> None:
        """Builds the network once before the models load, where the trainer can do that without them (the
        FLUX trainer does, on the meta device), so that what only the network shows stops the run now."""

    def create_network(self, ctx: RunContext):
        from networks.lora_flux_files import warn_if_made_for_another_model

        args = ctx.args
        text_encoders, dit = self.network_targets(ctx)
        network, ctx.train_text_encoder, loaded = self.build_network(
            args, ctx.models.ae, text_encoders, dit, ctx.train_text_encoder, ctx.train_unet
        )
        if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
            logger.warning("--scale_weight_norms: the network module has no max-norm support; ignored")
            args.scale_weight_norms = None
        if args.network_weights:
            if network_module_name(args) not in OWN_NETWORK_MODULES:  # ours reports what it left out itself
                report_loaded_weights(args.network_weights, loaded)
            logger.info("loaded --network_weights %s", args.network_weights)
            warn_if_made_for_another_model(args.network_weights, "--network_weights", ctx.models.version)
        self.prepare_for_training(ctx, network)
        return network

    def build_network(self, args, ae, text_encoders, dit, train_text_encoder: bool, train_unet: bool):
        """The network that --network_module, --network_dim / --network_alpha, --network_args and
        --network_weights make for these models, applied to them, the file's weights loaded. Returns it, whether
        a text encoder trains (not without text-encoder modules) and what ``load_weights`` returned."""
        net_kwargs = parse_network_args(args.network_args)
        if args.network_dropout is not None:
            net_kwargs.setdefault("dropout", args.network_dropout)
        if args.dim_from_weights:
            if not args.network_weights:
                raise UserError("--dim_from_weights needs --network_weights")
            network, _ = self.network_module.create_network_from_weights(
                1.0, args.network_weights, ae, text_encoders, dit, **net_kwargs
            )
        else:
            network = self.network_module.create_network(
                1.0, args.network_dim, args.network_alpha, ae, text_encoders, dit,
                neuron_dropout=args.network_dropout, **net_kwargs,
            )
        if network is None:
            raise UserError(f"--network_module {args.network_module} created no network")
        self.after_network_created(args, network)
        if hasattr(network, "prepare_network"):
            network.prepare_network(args)
        if hasattr(network, "all_loras"):  # e.g. Chroma trains a text encoder only with train_t5xxl=True
            has_text_encoder_modules = any(lora.lora_name.startswith("lora_te") for lora in network.all_loras())
            train_text_encoder = train_text_encoder and has_text_encoder_modules
        network.apply_to(text_encoders, dit, train_text_encoder, train_unet)
        loaded = network.load_weights(args.network_weights) if args.network_weights else None
        return network, train_text_encoder, loaded

    def after_network_created(self, args, network) -> None:
        """Model-specific checks of the created network (e.g. T5 LoRA vs. cached outputs)."""

    def prepare_for_training(self, ctx: RunContext, network) -> None:
        """Freezes the base, enables gradient checkpointing, sets train/eval modes."""

    def merge_base_weights(self, ctx: RunContext, network_module) -> None:
        args = ctx.args
        if not args.base_weights:
            return
        from library.cache_files import file_fingerprint
        from networks.lora_flux_files import warn_if_made_for_another_model

        multipliers = args.base_weights_multiplier or [1.0] * len(args.base_weights)
        text_encoders, dit = self.network_targets(ctx)
        for path, multiplier in zip(args.base_weights, multipliers, strict=True):
            module, weights_sd = network_module.create_network_from_weights(
                multiplier, path, ctx.models.ae, text_encoders, dit, for_inference=True
            )
            module.merge_to(text_encoders, dit, weights_sd, self.merged_weights_dtype(ctx), ctx.accelerator.device)
            logger.info("merged --base_weights %s at %s", path, multiplier)
            warn_if_made_for_another_model(path, "--base_weights", ctx.models.version)
            if any(k.startswith("lora_te") for k in weights_sd):  # sd-scripts' prefix of text-encoder modules
                ctx.text_encoder_base_weights.append([file_fingerprint(path), multiplier])

    def merged_weights_dtype(self, ctx: RunContext):
        """The dtype --base_weights merges leave the base weights in; None keeps each weight's own."""
        return ctx.weight_dtype

    def training_metadata(self, ctx, train_group, val_group, optimizer_name, optimizer_args, num_epochs,
                          batches_per_epoch: int) -> dict[str, str]:
        from library.model_hashes import model_hash, sha256_in_background
        from library.train_metadata import (
            build_training_metadata,
            dataset_metadata,
            modelspec_from_args,
            network_rank_and_alpha,
        )

        args, network = ctx.args, ctx.network
        run = dict(
            training_started_at=getattr(self, "training_started_at", None) or time.time(),
            num_train_images=train_group.num_train_images,
            num_validation_images=sum(1 for _ in val_group.entries()) if val_group else 0,
            num_reg_images=train_group.num_reg_images,
            # sd-scripts records len(train_dataloader) after accelerate's split: one process's batches
            num_batches_per_epoch=batches_per_epoch,
            num_epochs=num_epochs,
            max_train_steps=args.max_train_steps,
            optimizer=optimizer_name + (f"({optimizer_args})" if optimizer_args else ""),  # as sd-scripts
            base_model_version=ctx.models.version,
            **network_rank_and_alpha(network, args),
            network_args=self.recorded_network_args(args),
            text_encoder_lr=args.text_encoder_lr,  # the list as given ("[0.0001]"), as sd-scripts records it
            model_file=args.pretrained_model_name_or_path,
            batch_size_per_device=max(d.config.batch_size for d in train_group.datasets),
            total_batch_size=max(d.config.batch_size for d in train_group.datasets)
            * ctx.accelerator.num_processes * args.gradient_accumulation_steps,
            num_processes=ctx.accelerator.num_processes,
            dataset_keys=dataset_metadata(train_group.datasets, args.dataset_config is not None, args),
        )
        model_file = args.pretrained_model_name_or_path
        if os.path.isfile(model_file) and ctx.accelerator.is_main_process and not args.no_metadata:
            run["sd_model_hash"] = model_hash(model_file)
            run["new_sd_model_hash"] = sha256_in_background(model_file)
        metadata = build_training_metadata(args, run)
        metadata.update(modelspec_from_args(args, self.sai_model_type(ctx)))  # --metadata_*, the rest by the network
        return metadata

    @staticmethod
    def recorded_network_args(args) -> dict | None:
        """``ss_network_args`` as sd-scripts records it: only for a run given --network_args, with the dropout it
        passes to create_network appended unless given (not with --dim_from_weights, which passes none)."""
        if not args.network_args:
            return None
        kwargs = parse_network_args(args.network_args)
        if not args.dim_from_weights:
            kwargs.setdefault("dropout", args.network_dropout)
        return kwargs


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
         trainer: NetworkTrainer | None = None) -> int:
    """Parses, trains, and returns the exit status; user errors print one message, no traceback."""
    from library.config_file import parse_args_with_config

    parser = parser or setup_parser()
    tolerant_stdout()
    try:
        with HeldRecords() as config_warnings:  # logged where the arguments say, once they are read
            args = parse_args_with_config(parser, argv)
        try:
            setup_logging(args)
        finally:  # to the console at least, should the log file be unwritable
            config_warnings.replay()
        if trainer is None:  # the hooks that load and run a model are a subclass's
            raise UserError("train_network.py holds the generic loop and trains no model by itself: run "
                            "flux_train_network.py with the same arguments")  # fmt: skip
        path = trainer.train(args)
        if path:
            print(f"saved the LoRA to {path}")
            record_in_log_file(f"saved the LoRA to {path}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        record_in_log_file(f"error: {e}", logging.ERROR)
        return 1
    except TrainingInterrupted as e:
        if first_launched_process():  # every process stopped at the same step: one says what was saved
            print(str(e), file=sys.stderr)
            record_in_log_file(str(e), logging.WARNING)
        return e.exit_code
    except KeyboardInterrupt:  # outside the training steps, which stop at a step boundary themselves
        message = ("interrupted while loading, caching, sampling or saving: every file written so far is complete "
                   "(each is written under a temporary name), and cache files already made are reused by the next run")
        print(message, file=sys.stderr)
        record_in_log_file(message, logging.WARNING)
        return 130


if __name__ == "__main__":
    sys.exit(main())
