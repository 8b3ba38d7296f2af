"""Optimizer parameter groups of the LoRA network (spec §g.8): text-encoder learning rates,
regex learning rates (``network_reg_lrs``) and LoRA+ groups, with sd-scripts' logged descriptions."""

from __future__ import annotations

import logging

from networks.lora_flux_args import last_match

logger = logging.getLogger(__name__)


def text_encoder_lrs(text_encoder_lr, default_lr) -> list:
    """``--text_encoder_lr``: None or [] (both use ``default_lr``), one value (both), or [CLIP-L, T5]."""
    if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and not text_encoder_lr):
        return [default_lr, default_lr]
    if isinstance(text_encoder_lr, (int, float)):
        return [float(text_encoder_lr)] * 2
    if len(text_encoder_lr) == 1:
        return [text_encoder_lr[0]] * 2
    return list(text_encoder_lr)


def param_groups(loras, lr, plus_ratio, reg_lrs) -> tuple[list[dict], list[str]]:
    """Optimizer groups of ``loras``: one per regex learning rate that matches (the last match wins),
    then the default, each split in lora_up ("plus", LoRA+) and the rest; groups at lr 0 are left out."""
    groups: dict[int | None, dict[str, list]] = {}
    for lora in loras:
        match = last_match(reg_lrs, lora.lora_name) if reg_lrs else None
        group = groups.setdefault(None if match is None else match[0], {"lora": [], "plus": []})
        for name, param in lora.named_parameters():
            group["plus" if plus_ratio is not None and "lora_up" in name else "lora"].append(param)
    params, descriptions = [], []
    for index in sorted(i for i in groups if i is not None) + ([None] if None in groups else []):
        base_lr = lr if index is None else reg_lrs[index][1]
        for kind in ("lora", "plus"):
            if not groups[index][kind]:
                continue
            group_lr = None if base_lr is None else base_lr * (plus_ratio if kind == "plus" else 1)
            label = " ".join(
                filter(None, ["" if index is None else f"reg_lr_{index}", "plus" if kind == "plus" else ""])
            )
            if not group_lr:
                logger.info(f"learning rate {group_lr} for LoRA group {label or 'default'}: it is not trained")
                continue
            params.append({"params": groups[index][kind], "lr": group_lr})
            descriptions.append(label)
    return params, descriptions
