"""Parsing of ``--network_args`` for ``networks.lora_flux`` (values arrive as strings).

Every malformed value stops with a :class:`UserError` that names the arg and says what is
expected; sd-scripts skips some of them with a warning or reads them as False.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

TYPE_DIM_KEYS = (
    "img_attn_dim",
    "txt_attn_dim",
    "img_mlp_dim",
    "txt_mlp_dim",
    "img_mod_dim",
    "txt_mod_dim",
    "single_dim",
    "single_mod_dim",
)
RANK_ARGS = (*TYPE_DIM_KEYS, "in_dims", "train_blocks", "train_double_block_indices")
RANK_ARGS += ("train_single_block_indices", "network_reg_dims", "train_t5xxl", "conv_dim", "conv_alpha")
OTHER_ARGS = ("dropout", "rank_dropout", "module_dropout", "split_qkv", "ggpo_beta", "ggpo_sigma", "verbose")
OTHER_ARGS += ("network_reg_lrs", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
KNOWN_NETWORK_ARGS = frozenset(RANK_ARGS + OTHER_ARGS)


def is_unset(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "None"))


def parse_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise UserError(f"--network_args {key}={value}: expected True or False")


def parse_int(key: str, value) -> int | None:
    if is_unset(value):
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserError(f"--network_args {key}={value}: expected a whole number (a rank; 0 disables)") from None
    if number < 0:
        raise UserError(f"--network_args {key}={value}: must not be negative")
    return number


def parse_float(key: str, value, below_one: bool = False) -> float | None:
    if is_unset(value):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise UserError(f"--network_args {key}={value}: expected a number") from None
    if number < 0 or (below_one and number >= 1):
        raise UserError(f"--network_args {key}={value}: expected a number in [0, {'1)' if below_one else 'inf)'}")
    return number


def rank_value(value: str) -> int:
    rank = int(value)
    if rank < 0:
        raise ValueError(value)
    return rank


IN_DIM_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")


def parse_in_dims(value) -> list[int]:
    """``"[a,b,c,d,e]"`` or ``"a,b,c,d,e"``: ranks for img_in, time_in, vector_in, guidance_in, txt_in.

    Every entry must be a whole number (0 disables its layer): an empty one is a typo, not a rank of 0."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = str(value).strip().removeprefix("[").removesuffix("]").split(",")
    expected = f"expected 5 ranks ({', '.join(IN_DIM_LAYERS)}), e.g. in_dims=[4,2,2,2,4]"
    if len(items) != 5:
        raise UserError(f"--network_args in_dims={value}: {expected}")
    ranks = []
    for position, (item, layer) in enumerate(zip(items, IN_DIM_LAYERS, strict=True), start=1):
        text = str(item).strip()
        try:
            rank = int(text)
        except ValueError:
            what = "is empty" if not text else f"{text!r} is not a whole number"
            raise UserError(f"--network_args in_dims={value}: entry {position} ({layer}) {what}; {expected} "
                            "(0 disables a layer)") from None  # fmt: skip
        if rank < 0:
            raise UserError(f"--network_args in_dims={value}: entry {position} ({layer}) {text} is negative: "
                            "a rank is 0 (no LoRA on that layer) or more")  # fmt: skip
        ranks.append(rank)
    return ranks


def parse_block_selection(key: str, value: str, total: int) -> list[bool]:
    """``all``, ``none`` or ``""``, or a comma list of indices and inclusive ranges (``0,2,4-7``)."""
    text = str(value).strip()
    if text == "all":
        return [True] * total
    if text in ("none", ""):
        return [False] * total
    selected = [False] * total
    for part in text.split(","):
        bounds = part.split("-")
        try:
            start, end = (int(bounds[0]), int(bounds[-1])) if len(bounds) <= 2 else (None, None)
        except ValueError:
            start = end = None
        if start is None:
            raise UserError(f"--network_args {key}={value}: {part!r} is not an index or a range like 4-7")
        if not (0 <= start <= end < total):
            raise UserError(
                f"--network_args {key}={value}: {part.strip()} is outside 0-{total - 1} "
                f"(this model has {total} blocks of that kind) or its start is after its end"
            )
        selected[start : end + 1] = [True] * (end - start + 1)
    return selected


def parse_regex_pairs(key: str, value, cast) -> list[tuple[str, float]]:
    """``"pattern=value,pattern2=value2"`` (split on ``,``, then on the first ``=``)."""
    pairs = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise UserError(f"--network_args {key}: {part!r} is not pattern=value (patterns cannot contain ',')")
        pattern, raw = (s.strip() for s in part.split("=", 1))
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"--network_args {key}: {pattern!r} is not a valid regular expression ({e})") from None
        try:
            number = cast(raw)
        except ValueError:
            raise UserError(f"--network_args {key}: {part!r} has a bad value {raw!r}") from None
        if number < 0:  # a negative rank, or a learning rate that would train uphill
            raise UserError(f"--network_args {key}: {part!r} has a negative value")
        pairs.append((pattern, number))
    return pairs


def last_match(pairs: Sequence[tuple[re.Pattern, object]], name: str) -> tuple[int, object] | None:
    """(index, value) of the last pattern that matches ``name``: the guide's rule."""
    found = None
    for i, (pattern, value) in enumerate(pairs):
        if pattern.search(name):
            found = (i, value)
    return found


def check_known_args(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - KNOWN_NETWORK_ARGS)
    if unknown:
        raise UserError(
            f"unknown network arg(s) {', '.join(unknown)} for networks.lora_flux; known: "
            + ", ".join(sorted(KNOWN_NETWORK_ARGS))
        )


LORAPLUS_PARTS = {"DiT": "the DiT's", "text encoders": "the text encoders'"}  # part: its possessive


def loraplus_ratios(kwargs: dict) -> tuple[float | None, float | None, float | None]:
    """(general, DiT, text encoders) LoRA+ ratios. Ratios that give every part's lora_up learning rate 0
    stop here; a part that ends at 0 while another does not is checked once the parts with modules are known
    (:func:`refuse_zero_loraplus`, when the optimizer groups are made)."""
    keys = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    ratios = tuple(parse_float(k, kwargs.get(k)) for k in keys)
    if len(zero_loraplus_parts(ratios, LORAPLUS_PARTS)) == len(LORAPLUS_PARTS):
        refuse_zero_loraplus(ratios, LORAPLUS_PARTS)
    return ratios


def zero_loraplus_parts(ratios, parts) -> list[str]:
    """The parts among ``parts`` whose lora_up learning rate LoRA+ sets to 0: a part's ratio of 0 (or none)
    falls back to the general one (sd-scripts' ``or``), which may be 0."""
    general, unet, text_encoder = ratios
    ends_at = {"DiT": unet or general, "text encoders": text_encoder or general}
    return [part for part in parts if ends_at[part] == 0]


def refuse_zero_loraplus(ratios, parts) -> None:
    """Stops when LoRA+ gives the lora_up (which starts at zero) of one of ``parts`` (the parts that have
    modules) learning rate 0: that part of the LoRA would never change."""
    zero = zero_loraplus_parts(ratios, parts)
    if zero:
        owners = " and ".join(LORAPLUS_PARTS[part] for part in zero)
        raise UserError(f"--network_args loraplus_lr_ratio=0 gives {owners} lora_up learning rate 0, so the "
                        "LoRA would not change: leave it out for no LoRA+, or give a ratio above 0 (e.g. 16)")


def ggpo_args(kwargs: dict) -> tuple[float | None, float | None]:
    sigma = parse_float("ggpo_sigma", kwargs.get("ggpo_sigma"))
    beta = parse_float("ggpo_beta", kwargs.get("ggpo_beta"))
    if (sigma is None) != (beta is None):
        raise UserError("--network_args ggpo_sigma and ggpo_beta go together: give both (e.g. 0.03 and 0.01)")
    return sigma, beta


def dropout_args(kwargs: dict, neuron_dropout) -> tuple[float | None, float | None, float | None]:
    """(neuron, rank, module) dropout. The neuron one is ``--network_dropout`` (``neuron_dropout``) or
    ``--network_args dropout=`` (sd-scripts' trainer passes the first as the second too): two different
    values stop, so that every way of making the network trains with the same one."""
    neuron = parse_float("dropout", kwargs.get("dropout"), below_one=True)
    if neuron_dropout is not None:
        if not 0 <= neuron_dropout < 1:
            raise UserError(f"--network_dropout {neuron_dropout}: expected a number in [0, 1)")
        if neuron is not None and neuron != neuron_dropout:
            raise UserError(f"--network_dropout {neuron_dropout} and --network_args dropout={kwargs['dropout']} "
                            "disagree: give one of them")  # fmt: skip
        neuron = float(neuron_dropout)
    return (
        neuron,
        parse_float("rank_dropout", kwargs.get("rank_dropout"), below_one=True),
        parse_float("module_dropout", kwargs.get("module_dropout"), below_one=True),
    )


def validate_network_args(neuron_dropout: float | None = None, **kwargs) -> None:
    """Checks ``--network_args`` before any model is loaded (block bounds wait for the model)."""
    network_options(kwargs, neuron_dropout, None, None)


def network_options(kwargs: dict, neuron_dropout, n_double: int | None, n_single: int | None) -> dict:
    """``LoRANetwork`` keyword arguments from ``--network_args`` (raises UserError on a bad one)."""
    check_known_args(kwargs)
    conv_dim = parse_int("conv_dim", kwargs.get("conv_dim"))  # parsed all the same: a typo is a mistake
    conv_alpha = parse_float("conv_alpha", kwargs.get("conv_alpha"))
    if conv_dim is not None or conv_alpha is not None:
        if n_double is not None:  # warn once, when the network is built
            logger.warning("network args conv_dim / conv_alpha have no effect: FLUX and Chroma have no convolutions")
    type_dims = [parse_int(k, kwargs.get(k)) for k in TYPE_DIM_KEYS]
    in_dims = None if is_unset(kwargs.get("in_dims")) else parse_in_dims(kwargs["in_dims"])
    unbounded = 1 << 20  # before the model is loaded only the syntax can be checked
    double_indices = kwargs.get("train_double_block_indices")
    single_indices = kwargs.get("train_single_block_indices")
    if double_indices is not None:
        double_indices = parse_block_selection(
            "train_double_block_indices", double_indices, unbounded if n_double is None else n_double
        )
    if single_indices is not None:
        single_indices = parse_block_selection(
            "train_single_block_indices", single_indices, unbounded if n_single is None else n_single
        )
    train_blocks = "all" if is_unset(kwargs.get("train_blocks")) else str(kwargs["train_blocks"]).strip()
    if train_blocks not in ("all", "double", "single"):
        raise UserError(f"--network_args train_blocks={train_blocks}: expected all, double or single")
    dropout, rank_dropout, module_dropout = dropout_args(kwargs, neuron_dropout)
    ggpo_sigma, ggpo_beta = ggpo_args(kwargs)
    reg_dims = reg_lrs = None
    if not is_unset(kwargs.get("network_reg_dims")):
        reg_dims = parse_regex_pairs("network_reg_dims", kwargs["network_reg_dims"], rank_value)
    if not is_unset(kwargs.get("network_reg_lrs")):
        reg_lrs = parse_regex_pairs("network_reg_lrs", kwargs["network_reg_lrs"], float)
    loraplus_ratios(kwargs)
    return dict(
        dropout=dropout,
        rank_dropout=rank_dropout,
        module_dropout=module_dropout,
        train_blocks=train_blocks,
        split_qkv=parse_bool("split_qkv", kwargs.get("split_qkv", False)),
        train_t5xxl=parse_bool("train_t5xxl", kwargs.get("train_t5xxl", False)),
        type_dims=None if all(d is None for d in type_dims) else type_dims,
        in_dims=in_dims,
        train_double_block_indices=double_indices,
        train_single_block_indices=single_indices,
        reg_dims=reg_dims,
        ggpo_beta=ggpo_beta,
        ggpo_sigma=ggpo_sigma,
        reg_lrs=reg_lrs,
        verbose=parse_bool("verbose", kwargs.get("verbose", False)),
    )
