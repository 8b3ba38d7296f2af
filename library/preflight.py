"""Checks of a run's settings that need no model, made before the models load: a typo or a value
that cannot work costs seconds, not the minutes of loading a 24 GB DiT and caching latents."""

from __future__ import annotations

import copy
import logging
import os

from library.errors import UserError
from library.run_logging import first_launched_process, quiet_loggers
from library.safetensors_io import output_folder_problem

logger = logging.getLogger(__name__)

ZERO_RATES = (
    "nothing to train: every parameter group has learning rate 0 (check --learning_rate, --unet_lr, "
    "--text_encoder_lr and network_args network_reg_lrs)"
)

# Counts with no meaning below a bound: (flag, smallest value, what it counts). An option left out
# (None) is never checked.
COUNT_BOUNDS = (
    ("gradient_accumulation_steps", 1, "batches per optimizer step"),
    ("max_train_epochs", 1, "epochs"),
    ("vae_batch_size", 1, "images per AE call"),
    ("text_encoder_batch_size", 1, "captions per text-encoder call"),
    ("t5xxl_max_token_length", 1, "T5 tokens"),
    ("max_data_loader_n_workers", 0, "DataLoader worker processes"),
    ("max_validation_steps", 1, "validation batches; leave it out to validate on every one"),
    ("validate_every_n_steps", 1, "steps between validations; leave it out to validate by epoch only"),
    ("validate_every_n_epochs", 1, "epochs between validations; leave it out to validate every epoch"),
    # 0 leaves these off, as an absent flag does; a negative count saved at odd times or pruned each save at once
    ("save_every_n_epochs", 0, "epochs between saves; 0 saves at the end only"),
    ("save_every_n_steps", 0, "steps between saves; 0 saves by epoch only"),
    ("save_n_epoch_ratio", 0, "saves over the run; 0 leaves it to --save_every_n_epochs"),
    ("save_last_n_epochs", 0, "epoch saves to keep; 0 keeps all"),
    ("save_last_n_epochs_state", 0, "epoch states to keep; 0 keeps all"),
    ("save_last_n_steps", 0, "steps whose saves are kept; 0 keeps all"),
    ("save_last_n_steps_state", 0, "steps whose states are kept; 0 keeps all"),
)


def warn_about_validation_without_images(args) -> None:
    """Validation flags in a run that holds no image out (no validation_split): they do nothing."""
    given = [f"--{flag}" for flag in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                                      "validation_seed") if getattr(args, flag, None) is not None]  # fmt: skip
    if given:
        logger.warning("%s: no image is held out for validation (validation_split is not set in the dataset config "
                       "nor as --validation_split, or rounds to no image), so there is no validation and %s",
                       ", ".join(given),
                       "it has no effect" if len(given) == 1 else "they have no effect")  # fmt: skip


def check_counts(args) -> None:
    """Refuses counts below their bound (a batch size of -1 cached nothing; 0 batches per step divided by
    zero; -1 trained on), naming the flag."""
    bounds = list(COUNT_BOUNDS)
    if getattr(args, "max_train_epochs", None) is None:
        bounds.append(("max_train_steps", 1, "optimizer steps"))
    if not getattr(args, "dim_from_weights", False):  # the file's ranks are used then
        # 0 is a rank: no module but those network_args give one (img_attn_dim=4, in_dims, network_reg_dims)
        bounds.append(("network_dim", 0, "the LoRA rank"))
    for flag, low, what in bounds:
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise UserError(f"--{flag} {value}: give {low} or more ({what})")
    max_grad_norm = getattr(args, "max_grad_norm", None)
    if max_grad_norm is not None and max_grad_norm < 0:  # clipping to a negative norm flips every gradient
        raise UserError(f"--max_grad_norm {max_grad_norm}: give 0 (no clipping) or more")


NO_TEXT_ENCODER_LORA = (
    "nothing to train: --network_train_text_encoder_only, but no text encoder gets LoRA modules in this run "
    "(Chroma has no CLIP-L; T5 trains only with --network_args train_t5xxl=True; with --dim_from_weights, "
    "the --network_weights file has no text-encoder modules)"
)


def check_learning_rates(args, text_encoders_with_lora: list[int] | None = None) -> None:
    """Refuses a negative learning rate, and a run in which every part that trains has learning rate 0
    (the network leaves such parameter groups out, so there would be nothing to train).

    ``text_encoders_with_lora``: the positions in ``--text_encoder_lr`` (one rate for all, or one
    each) of the text encoders that get LoRA modules, where the model knows them; None counts
    every rate given."""
    rates = [("--learning_rate", args.learning_rate), ("--unet_lr", args.unet_lr)]
    rates += [("--text_encoder_lr", rate) for rate in args.text_encoder_lr or []]
    for flag, rate in rates:
        if rate is not None and rate < 0:  # torch checks only the first group's: the others would train uphill
            raise UserError(f"{flag} {rate}: a learning rate cannot be negative")
    unet_only, te_only = args.network_train_unet_only, args.network_train_text_encoder_only
    if unet_only and te_only:
        raise UserError("nothing to train: --network_train_unet_only and --network_train_text_encoder_only exclude "
                        "each other")  # fmt: skip
    if te_only and text_encoders_with_lora == []:
        raise UserError(NO_TEXT_ENCODER_LORA)
    unet_rate = args.unet_lr if args.unet_lr is not None else args.learning_rate
    te_rates = list(args.text_encoder_lr or []) or [args.learning_rate]
    if text_encoders_with_lora is not None:
        te_rates = [te_rates[min(i, len(te_rates) - 1)] for i in text_encoders_with_lora]
    trained = ([] if te_only else [unet_rate]) + ([] if unet_only else te_rates)
    if all(rate == 0 for rate in trained):
        raise UserError(ZERO_RATES)


TEXT_ENCODERS = ("CLIP-L", "T5")  # the order of --text_encoder_lr's two rates


def warn_about_unused_text_encoder_rates(args, text_encoders_with_lora: list[int] | None, network_kwargs: dict) -> None:
    """Text-encoder learning rates that no LoRA module takes (Chroma has no CLIP-L; T5 has modules only with
    ``train_t5xxl=True``): the run trains as if they were not given, and their metadata says otherwise.
    ``text_encoders_with_lora`` as for :func:`check_learning_rates`; None says nothing."""
    if text_encoders_with_lora is None or args.network_train_unet_only:  # the latter is warned about already
        return
    rates = args.text_encoder_lr or []
    # CLIP-L lacks modules only in Chroma, which has none; T5 has them only when asked for
    why = {0: "Chroma has no CLIP-L", 1: "T5 gets LoRA modules only with --network_args train_t5xxl=True"}
    if not text_encoders_with_lora:
        unused = [f"--text_encoder_lr {' '.join(map(str, rates))}"] if rates else []
        ratio = network_kwargs.get("loraplus_text_encoder_lr_ratio")
        unused += [f"--network_args loraplus_text_encoder_lr_ratio={ratio}"] if ratio is not None else []
        for setting in unused:
            logger.warning("%s is not used: no text encoder gets LoRA modules in this run (%s)", setting,
                           " and ".join(why.values()))  # fmt: skip
        return
    for i in range(len(rates) if len(rates) > 1 else 0):
        if i not in text_encoders_with_lora:
            logger.warning("--text_encoder_lr %s: the %s rate (%s) is not used: %s", " ".join(map(str, rates)),
                           ("first", "second")[i], TEXT_ENCODERS[i], why[i])  # fmt: skip


def rehearse_optimizer_and_schedule(args, max_train_steps: int) -> str:
    """Builds the optimizer and the lr schedule once, on one stand-in parameter: an unknown
    ``--optimizer_type``, a missing package, ``--optimizer_args`` that do not fit the class, or a
    schedule that cannot run (an unknown name, a warmup longer than the run, ...) stops here, with
    the message the real build would give after loading. Returns the optimizer's class path
    (as :func:`library.train_state.optimizer_class_path` records it)."""
    import torch

    from library.lr_schedulers import get_scheduler_fix
    from library.optimizers import get_optimizer
    from library.train_state import optimizer_class_path

    trial = copy.copy(args)  # Adafactor rewrites the learning rate and the scheduler in the arguments it gets
    trial.max_train_steps = max_train_steps
    with quiet_loggers("library.optimizers", "library.lr_schedulers"):  # the real build says it
        # 2-D, as every LoRA weight is (Muon takes matrices only); a custom scheduler's arguments may be per
        # parameter group, which only the real optimizer has: its class is checked, not built
        _, _, optimizer = get_optimizer(trial, [torch.nn.Parameter(torch.zeros(1, 1))])
        get_scheduler_fix(trial, optimizer, 1, build_custom=False)
    return optimizer_class_path(optimizer)


UNSUPPORTED_DISTRIBUTIONS = ("DEEPSPEED", "FSDP", "MEGATRON_LM")  # accelerate's DistributedType values


def refuse_unsupported_distribution(distributed_type=None, environ=None) -> None:
    """DeepSpeed, FSDP (or Megatron-LM) set in ``accelerate config``: the trainer averages gradients itself and
    keeps whole models on each process, so none can work (``--deepspeed`` is refused with the other flags).
    ``accelerate launch`` passes the choice in ``ACCELERATE_USE_*`` variables, which are checked before the
    Accelerator is made (it asks for DeepSpeed to be installed first); ``distributed_type`` is the made one's."""
    environ = os.environ if environ is None else environ
    chosen = [name for name in UNSUPPORTED_DISTRIBUTIONS
              if str(environ.get(f"ACCELERATE_USE_{name}", "")).lower() in ("1", "true", "yes")]  # fmt: skip
    if distributed_type is not None:
        chosen.append(getattr(distributed_type, "value", str(distributed_type)).upper())
    for name in chosen:
        if name in UNSUPPORTED_DISTRIBUTIONS:
            raise UserError(f"accelerate is configured for {name}, which this trainer does not support; run "
                            "`accelerate config` again and choose multi-GPU (DDP) or a single GPU")  # fmt: skip


def check_output_folder(args) -> None:
    """--output_dir (with any folder in --output_name) must be a folder this run can write in, or
    one it can create: found now, not at the first save after hours of training."""
    folder = os.path.abspath(os.path.join(args.output_dir, os.path.dirname(args.output_name or "")))
    where = f"--output_dir {args.output_dir}"
    if folder != os.path.abspath(args.output_dir):
        where += f" with --output_name {args.output_name}"
    problem = output_folder_problem(folder)
    if problem:
        raise UserError(f"{where}: {problem}; choose another --output_dir")

def warn_about_earlier_outputs(args) -> None:
    """Files of an earlier run under the same --output_name: this run replaces those it writes
    again and leaves the others beside its own, which is easy to misread afterwards."""
    name = args.output_name
    if args.resume or not name or not os.path.isdir(args.output_dir):  # resuming continues that run on purpose
        return
    if not first_launched_process():  # the first one says it
        return
    earlier = sorted(f for f in os.listdir(args.output_dir)
                     if f in (f"{name}.safetensors", f"{name}.pt", f"{name}.ckpt") or f.startswith(f"{name}-"))
    if earlier:
        logger.warning("--output_dir %s already holds %d file(s) of an earlier run named %s (e.g. %s); this run "
                       "replaces those it writes again and leaves the others", args.output_dir, len(earlier),
                       name, ", ".join(earlier[:3]))  # fmt: skip


def check_dynamo_backend(backend: str) -> None:
    """--torch_compile's backend must be one this torch has (sd-scripts' list names some it does not, or that
    need a package: tensorrt, onnxrt, ...): found now, not after the models are loaded."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(None):  # every registered one, debug ones included
        raise UserError(f"--torch_compile needs a --dynamo_backend this torch has, not {backend!r}: one of "
                        f"{', '.join(torch._dynamo.list_backends())} (inductor, the default, is the usual "
                        "one)")  # fmt: skip
