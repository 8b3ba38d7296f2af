"""Optimizer factory with sd-scripts' names, options and Adafactor handling (spec §b.2).

``--optimizer_type`` names are case-insensitive (the guide writes ``adafactor``). Besides the
built-in names, any ``torch.optim`` class and any dotted ``package.module.Class`` path work.
Optional packages (bitsandbytes, lion-pytorch, dadaptation, prodigyopt, schedulefree,
transformers) are imported only when their optimizer is asked for; a missing one stops with
the ``pip install`` line to run.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# Built-in names (lower case) -> (package to import, attribute path, pip package).
_BNB = "bitsandbytes"
_BUILTIN: dict[str, tuple[str, str, str]] = {
    "adamw": ("torch.optim", "AdamW", "torch"),
    "adamw8bit": (_BNB, "optim.AdamW8bit", _BNB),
    "pagedadamw": (_BNB, "optim.PagedAdamW", _BNB),
    "pagedadamw8bit": (_BNB, "optim.PagedAdamW8bit", _BNB),
    "pagedadamw32bit": (_BNB, "optim.PagedAdamW32bit", _BNB),
    "lion8bit": (_BNB, "optim.Lion8bit", _BNB),
    "pagedlion8bit": (_BNB, "optim.PagedLion8bit", _BNB),
    "sgdnesterov": ("torch.optim", "SGD", "torch"),
    "sgdnesterov8bit": (_BNB, "optim.SGD8bit", _BNB),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "dadaptation": ("dadaptation", "experimental.DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": ("dadaptation", "experimental.DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadan": ("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": ("dadaptation", "experimental.DAdaptAdanIP", "dadaptation"),
    "dadaptlion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", "dadaptation"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": ("transformers", "optimization.Adafactor", "transformers"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", "schedulefree"),
}
BUILTIN_OPTIMIZERS = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit",
    "SGDNesterov", "SGDNesterov8bit", "Lion", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam",
    "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "Adafactor", "AdamWScheduleFree",
    "RAdamScheduleFree", "SGDScheduleFree",
)  # fmt: skip


def parse_kv_literals(items: list[str] | None, flag: str) -> dict[str, Any]:
    """Parse ``key=value`` items whose values are Python literals (``ast.literal_eval``).

    ``weight_decay=0.01`` → 0.01, ``betas=0.9,0.999`` → (0.9, 0.999), ``decouple=True`` → True.
    Strings need quotes: ``decay_type='linear'``. Unlike sd-scripts, the split is on the first
    ``=``, so a quoted value may itself contain ``=``.
    """
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag}: {item!r} is not of the form key=value (for example weight_decay=0.01).")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(
                f"{flag}: the value of {key!r} ({text!r}) is not a Python literal. Numbers, True/False, None and "
                f"tuples like 0.9,0.999 are written as is; quote strings, e.g. {key}='{text}'."
            ) from None
    return kwargs


def _import_attr(module: str, attr: str, pip_name: str, optimizer_type: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"--optimizer_type {optimizer_type} needs the Python package {pip_name!r}, which is not installed: "
            f"pip install {pip_name}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part) and isinstance(obj, type(importlib)):
            # subpackages such as dadaptation.experimental are not always imported by their parent
            try:
                importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                pass
        if not hasattr(obj, part):
            raise UserError(
                f"--optimizer_type {optimizer_type}: {module}.{attr} does not exist in the installed {pip_name}; "
                f"upgrade it: pip install -U {pip_name}"
            )
        obj = getattr(obj, part)
    return obj


def _resolve_class(optimizer_type: str) -> type:
    """The class for a non-built-in name: a ``torch.optim`` class (any case) or a dotted path."""
    if "." not in optimizer_type:
        by_lower = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)}
        name = by_lower.get(optimizer_type.lower())
        if name is None or not issubclass(getattr(torch.optim, name), torch.optim.Optimizer):
            raise UserError(
                f"--optimizer_type {optimizer_type!r} is not a known optimizer. Use one of "
                f"{', '.join(BUILTIN_OPTIMIZERS)}, a torch.optim class (e.g. Adam, RAdam) or a full class path "
                "such as bitsandbytes.optim.AdEMAMix8bit."
            )
        return getattr(torch.optim, name)
    module, _, cls_name = optimizer_type.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"--optimizer_type {optimizer_type}: cannot import module {module!r} ({e}). Install the package "
            "that provides it."
        ) from None
    if not hasattr(mod, cls_name):
        raise UserError(f"--optimizer_type {optimizer_type}: module {module!r} has no {cls_name!r}.")
    return getattr(mod, cls_name)


def _group_lrs(trainable_params: Any, lr: float | None) -> tuple[float | None, int]:
    """(first group's lr, number of distinct lrs) of a param list or param-group list."""
    if isinstance(trainable_params, list) and trainable_params and isinstance(trainable_params[0], dict):
        first = trainable_params[0].get("lr", lr)
        return first, len({g.get("lr", lr) for g in trainable_params})
    return lr, 1


# the D-Adaptation and Prodigy classes that raise at their first step when parameter groups have
# different learning rates other than 0 (they step with the largest); the rest read the first group's
_ONE_RATE_OPTIMIZERS = frozenset({"prodigy", "dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptlion",
                                  "dadaptsgd"})  # fmt: skip


def _one_rate(groups: list[dict], lr: float | None) -> tuple[list[dict], float]:
    """The parameter groups with every learning rate but 0 raised to the largest, and that rate."""
    rates = [g.get("lr", lr) or 0.0 for g in groups]
    top = max(rates)
    return [{**g, "lr": top if rate else 0.0} for g, rate in zip(groups, rates, strict=True)], top


def _prepare_adafactor(args, trainable_params: Any, kwargs: dict[str, Any], lr: float | None) -> float | None:
    """sd-scripts' Adafactor handling; returns the lr to pass to the optimizer.

    ``relative_step`` defaults to True, and ``warmup_init=True`` forces it. With it, Adafactor
    computes its own step size: the given lr only seeds the ``adafactor:<lr>`` scheduler that
    replaces ``--lr_scheduler``, group lrs (``--unet_lr``/``--text_encoder_lr``) are dropped and
    ``args.learning_rate`` is set to None, as sd-scripts does (its metadata shows that too).
    Without it (the guide's recipe: ``relative_step=False scale_parameter=False
    warmup_init=False``, ``--lr_scheduler constant_with_warmup``, ``--max_grad_norm 0.0``) the
    lr is used as is and departures from the recipe are warned about.
    """
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step, so relative_step is set to True")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        if lr:
            logger.warning("Adafactor with relative_step: --learning_rate %s is used as the initial lr only", lr)
        args.learning_rate = None
        if isinstance(trainable_params, list) and trainable_params and isinstance(trainable_params[0], dict):
            had_group_lr = False
            for group in trainable_params:
                had_group_lr = (group.pop("lr", None) is not None) or had_group_lr
            if had_group_lr:
                logger.warning("Adafactor with relative_step ignores --unet_lr and --text_encoder_lr")
                args.unet_lr = None
                args.text_encoder_lr = None
        if getattr(args, "lr_scheduler", "constant") != "adafactor":
            logger.info("Adafactor with relative_step: the lr scheduler is set to adafactor")
        args.lr_scheduler = f"adafactor:{lr}"
        return None
    if getattr(args, "max_grad_norm", 1.0) != 0.0:
        logger.warning("Adafactor: --max_grad_norm is not 0, so gradients are clipped; the usual recipe sets 0.0")
    if getattr(args, "lr_scheduler", "constant") != "constant_with_warmup":
        logger.warning("Adafactor: --lr_scheduler constant_with_warmup is the usual choice with relative_step=False")
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        logger.warning("Adafactor: clip_threshold=1.0 is the usual choice")
    return lr


def resolve_optimizer_type(args) -> str:
    """The effective ``--optimizer_type``, applying the legacy ``--use_8bit_adam`` / ``--use_lion_optimizer``."""
    optimizer_type = getattr(args, "optimizer_type", None) or ""
    if getattr(args, "use_8bit_adam", False):
        if getattr(args, "use_lion_optimizer", False):
            raise UserError("--use_8bit_adam and --use_lion_optimizer conflict: keep one (or use --optimizer_type).")
        if optimizer_type:
            raise UserError(
                f"--use_8bit_adam conflicts with --optimizer_type {optimizer_type}: drop --use_8bit_adam "
                "(it means --optimizer_type AdamW8bit)."
            )
        return "AdamW8bit"
    if getattr(args, "use_lion_optimizer", False):
        if optimizer_type:
            raise UserError(
                f"--use_lion_optimizer conflicts with --optimizer_type {optimizer_type}: drop --use_lion_optimizer "
                "(it means --optimizer_type Lion)."
            )
        return "Lion"
    return optimizer_type or "AdamW"


def network_param_groups(network, args) -> tuple[list, list[str]]:
    """The optimizer parameter groups and their log names, through sd-scripts' network interface:
    ``prepare_optimizer_params_with_multiple_te_lrs`` where the network has it, else the older
    ``prepare_optimizer_params`` (LyCORIS and other third-party modules), which takes one text-encoder
    learning rate, may lack the default-lr argument and may return the groups without names."""
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        result = network.prepare_optimizer_params_with_multiple_te_lrs(
            args.text_encoder_lr, args.unet_lr, args.learning_rate
        )
    else:
        te_lr = args.text_encoder_lr
        if isinstance(te_lr, (list, tuple)):
            te_lr = te_lr[0] if te_lr else None
        prepare = network.prepare_optimizer_params
        positional = [p for p in inspect.signature(prepare).parameters.values() if p.kind != p.KEYWORD_ONLY]
        if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in positional):
            result = prepare(te_lr, args.unet_lr, args.learning_rate)
        else:  # the oldest signature: (text_encoder_lr, unet_lr)
            result = prepare(te_lr, args.unet_lr)
    params, descriptions = result if isinstance(result, tuple) else (result, None)
    if not descriptions or len(descriptions) != len(params):
        descriptions = [f"group{i}" for i in range(len(params))]
    return params, descriptions


def trainable_param_groups(network, args, train_unet: bool, train_text_encoder: bool) -> tuple[list, list[str]]:
    """:func:`network_param_groups`, refused when they would train nothing: neither part trains, the network
    has no LoRA module, or every group's learning rate is 0."""
    from library.preflight import NO_TEXT_ENCODER_LORA, ZERO_RATES

    params, descriptions = network_param_groups(network, args)
    if not (train_unet or train_text_encoder):  # (both --*_only flags were refused before loading)
        raise UserError(NO_TEXT_ENCODER_LORA)  # known only from the network: a third-party module, --dim_from_weights
    if not any(p.requires_grad for p in network.parameters()):
        raise UserError(f"nothing to train: the network has no LoRA module (--network_dim {args.network_dim}, "
                        "and no network_args give a layer a rank)")  # fmt: skip
    if not any(group["params"] if isinstance(group, dict) else True for group in params):
        raise UserError(ZERO_RATES)  # network_reg_lrs of 0 for every module, say
    return params, descriptions


def freeze_parameters_left_out(network, optimizer) -> None:
    """Stops the network's parameters that the optimizer does not hold (a learning rate of 0 leaves a group
    out) from taking gradients: no optimizer would clear them, so they would grow every step inside the gradient
    clipping's norm (shrinking the trained parameters' steps) and the averaging across processes. Called after
    the network's ``prepare_grad_etc``, which (ours, LyCORIS') makes every parameter trainable again."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    left_out = [p for p in network.parameters() if p.requires_grad and id(p) not in held]
    for p in left_out:
        p.requires_grad_(False)
    if left_out:
        logger.info("%d network parameters are in no optimizer group (learning rate 0): they take no gradients",
                    len(left_out))  # fmt: skip


def optimizer_arg_names(args) -> list[str]:
    """The hyper-parameters ``--optimizer_args`` sets, in the order given."""
    return list(parse_kv_literals(getattr(args, "optimizer_args", None), "--optimizer_args"))


def get_optimizer(args, trainable_params: Any) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer named by ``args.optimizer_type`` for ``trainable_params``.

    Returns ``(name, args_str, optimizer)``: ``name`` is ``module.Class`` and ``args_str`` the
    parsed ``--optimizer_args`` as ``k=v,k=v`` (both go into ``ss_optimizer``). Like
    sd-scripts, Adafactor with ``relative_step`` rewrites ``args.lr_scheduler`` (and clears
    ``args.learning_rate``); optimizers with train/eval modes (schedule-free ones) are returned in train mode.
    """
    optimizer_type = resolve_optimizer_type(args)
    key = optimizer_type.lower()

    kwargs = parse_kv_literals(getattr(args, "optimizer_args", None), "--optimizer_args")
    lr = getattr(args, "learning_rate", None)

    if key.startswith("dadapt") or key == "prodigy":
        actual_lr, lr_count = _group_lrs(trainable_params, lr)
        if lr_count > 1 and key in _ONE_RATE_OPTIMIZERS:
            trainable_params, actual_lr = _one_rate(trainable_params, lr)
            logger.warning("%s takes one learning rate for all parameter groups (or 0, which leaves a group "
                           "untrained), and stops at its first step otherwise: every group trains at %s, and the "
                           "other rates (--unet_lr / --text_encoder_lr, LoRA+ ratios, network_reg_lrs) are not used",
                           optimizer_type, actual_lr)  # fmt: skip
        elif lr_count > 1:
            logger.warning("D-Adaptation/Prodigy with several learning rates: only the first (%s) matters", actual_lr)
        if actual_lr is not None and actual_lr <= 0.1:
            logger.warning(
                "learning rate %s is low for D-Adaptation/Prodigy, which expect about 1.0 (--learning_rate 1.0)",
                actual_lr,
            )

    if key in _BUILTIN:
        module, attr, pip_name = _BUILTIN[key]
        optimizer_class = _import_attr(module, attr, pip_name, optimizer_type)
        if key in ("sgdnesterov", "sgdnesterov8bit"):
            if "momentum" not in kwargs:
                logger.info("SGD with Nesterov needs momentum: using momentum=0.9")
                kwargs["momentum"] = 0.9
            kwargs.setdefault("nesterov", True)
        if key == "adafactor":
            lr = _prepare_adafactor(args, trainable_params, kwargs, lr)
    else:
        optimizer_class = _resolve_class(optimizer_type)

    logger.info("use %s.%s | %s", optimizer_class.__module__, optimizer_class.__name__, kwargs)
    try:
        optimizer = optimizer_class(trainable_params, lr=lr, **kwargs)
    except (TypeError, ValueError, IndexError, KeyError) as e:  # an unknown argument, or a value the class refuses
        raise UserError(f"--optimizer_args {kwargs} do not fit {optimizer_class.__name__}: {e}") from None

    if has_train_and_eval_modes(optimizer):
        optimizer.train()  # (schedule-free optimizers must be in train mode to step)

    name = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    # nesterov is implied by the SGDNesterov names; sd-scripts does not list it
    shown = {k: v for k, v in kwargs.items() if not (k == "nesterov" and key.startswith("sgdnesterov"))}
    args_str = ",".join(f"{k}={v}" for k, v in shown.items())
    return name, args_str, optimizer


def is_schedulefree_optimizer(optimizer: Any, args=None) -> bool:
    """True for schedule-free optimizers, which schedule their own learning rate: by name, as
    sd-scripts decides (an ``--optimizer_type`` ending in ScheduleFree), or by the class's name
    (``prodigyplus.ProdigyPlusScheduleFree`` given as a class path). Having ``train``/``eval``
    modes is not enough: an EMA optimizer (``pytorch_optimizer.SPlus``) has them and takes a schedule."""
    name = (getattr(args, "optimizer_type", None) or "").lower() if args is not None else ""
    inner = _innermost(optimizer)
    return name.endswith("schedulefree") or "schedulefree" in type(inner).__name__.lower()


def has_train_and_eval_modes(optimizer: Any) -> bool:
    """Whether the optimizer must be switched to eval mode for sampling, validation and saving, and
    back to train mode to step: schedule-free optimizers, and others with ``train``/``eval`` methods
    (SPlus evaluates on its averaged weights)."""
    inner = _innermost(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def _innermost(optimizer: Any) -> Any:
    """The optimizer inside accelerate's (and DeepSpeed's) wrappers, which define train/eval for every
    optimizer and forward them when the wrapped one has them."""
    for _ in range(4):
        if type(optimizer).__module__.split(".")[0] not in ("accelerate", "deepspeed"):
            break
        optimizer = getattr(optimizer, "optimizer", optimizer)
    return optimizer


def get_optimizer_train_eval_fn(optimizer: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(train_fn, eval_fn)`` switching the optimizer's mode (:func:`has_train_and_eval_modes`);
    no-ops for others.

    ``eval_fn`` keeps a copy of the train-mode weights, which ``train_fn`` puts back after switching:
    a schedule-free optimizer computes them back from the eval weights, which rounds, so a save,
    sample or validation changed the run by a rounding (the weights of a resumed run, and on several
    processes those of the main process, which alone samples and validates, drifted from the others')."""
    if not has_train_and_eval_modes(optimizer):
        return (lambda: None), (lambda: None)
    kept: list[torch.Tensor] = []

    def eval_fn() -> None:
        if not kept:  # (a second eval_fn before train_fn must not keep the eval weights)
            kept.extend(p.detach().clone() for group in optimizer.param_groups for p in group["params"])
        optimizer.eval()

    def train_fn() -> None:
        optimizer.train()
        if kept:
            with torch.no_grad():
                params = [p for group in optimizer.param_groups for p in group["params"]]
                for p, weights in zip(params, kept, strict=True):
                    p.copy_(weights)
            kept.clear()

    return train_fn, eval_fn


def is_dadapt_or_prodigy(optimizer_type: str) -> bool:
    """Whether the optimizer adapts its own step size (the trainer also logs ``lr/d*lr``)."""
    key = optimizer_type.lower()
    return key.startswith("dadapt") or key.startswith("prodigy") or key.endswith(".prodigy")
