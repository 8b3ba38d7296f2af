"""LoRA modules: one low-rank update on one ``nn.Linear``, in sd-scripts' layout and math.

A module does not replace the Linear it adapts: ``apply_to`` swaps the Linear's ``forward``
for its own, so the base model keeps its structure, its state dict and its key names, and
block swapping or fp8 Linear subclasses keep working underneath.

``y = org(x) + multiplier * (alpha / rank) * up(down(x))`` (spec §g.2).

Split modules (``split_dims``, the ``split_qkv`` network arg) train one LoRA per chunk of a
fused projection (q, k, v and, in single blocks, the MLP input). Their state dict is always the
standard fused form (down = concatenated downs, up = block-diagonal, alpha x number of chunks)
so that every plain loader applies exactly the trained strength; loading converts back.
sd-scripts keeps alpha unchanged there, so plain loaders apply its files at 1/3 or 1/4 of the
trained strength (spec §k.7); ``read_lora_file`` reads such files into this form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.dtypes import autocast_dtype, autocast_off
from library.errors import UserError
from library.fp8 import dequantize_weight, fp8_linear_forward, fp8_matmul_plus


def resolve_alpha(alpha: float | Tensor | None, rank: int) -> float:
    """sd-scripts' rule: an alpha of None or 0 means alpha = rank (scale 1)."""
    if isinstance(alpha, Tensor):
        alpha = alpha.detach().float().item()  # bf16 tensors do not convert to numbers directly
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def split_fused(
    down: Tensor, up: Tensor, split_dims: list[int], name: str = "LoRA module"
) -> tuple[list[Tensor], list[Tensor]]:
    """Splits a fused (down, up) pair whose up is block-diagonal into per-chunk pairs."""
    n = len(split_dims)
    if down.shape[0] % n or up.shape[0] != sum(split_dims):
        raise UserError(
            f"{name}: rank {down.shape[0]} and output {up.shape[0]} cannot be split into {n} chunks "
            f"of {split_dims}; load it without split_qkv=True"
        )
    rank = down.shape[0] // n
    downs = list(down.split(rank, dim=0))
    ups, row = [], 0
    for i, out in enumerate(split_dims):
        rows = up[row : row + out]
        off_diagonal = torch.cat([rows[:, : i * rank], rows[:, (i + 1) * rank :]], dim=1)
        if off_diagonal.count_nonzero():
            raise UserError(
                f"{name} is a plain LoRA (its lora_up is not block-diagonal), so it cannot be continued "
                "as separate q/k/v LoRAs: remove split_qkv=True from --network_args"
            )
        ups.append(rows[:, i * rank : (i + 1) * rank])
        row += out
    return downs, ups


def _matmul_plus(linear: nn.Linear, x: Tensor, addend: Tensor) -> Tensor:
    """x Wᵀ + addend for a plain Linear, the addend (shaped as the output) added by the matmul itself."""
    flat = torch.addmm(addend.reshape(-1, addend.shape[-1]), x.reshape(-1, x.shape[-1]), linear.weight.t())
    return flat.view(addend.shape)


# the base forwards a LoRA can stand in for, and how each computes x Wᵀ + addend
_MATMUL_PLUS = {nn.Linear.forward: _matmul_plus, fp8_linear_forward: fp8_matmul_plus}


class _SharedInput(torch.autograd.Function):
    """x -> (x, x·Dᵀ): the base Linear reads the first output, the LoRA's down projection is the second.

    Read by both, x would get two gradients from autograd, the base's and the LoRA's (g·D, as
    large as x), added in a pass of their own. This node receives both and returns
    base + g·D from one matmul that takes the base's gradient as its addend: two passes over an
    x-sized tensor fewer for every adapted Linear (``bench/bench_traffic.py`` counts them).
    ``dtype`` is the one the LoRA computes in; autocast is off inside, as it is in any backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, down: Tensor, dtype: torch.dtype):
        down_cast = down.to(dtype)  # kept for backward: casting again there would be one more kernel
        ctx.save_for_backward(x, down_cast)
        ctx.dtype, ctx.down_dtype = dtype, down.dtype
        with autocast_off(x.device.type):
            lx = F.linear(x.to(dtype), down_cast)
        return x, lx

    @staticmethod
    def backward(ctx, grad_x: Tensor | None, grad_lx: Tensor | None):
        x, down = ctx.saved_tensors
        if grad_lx is None:  # the update went unused
            return grad_x, None, None
        rows = grad_lx.reshape(-1, grad_lx.shape[-1]).to(ctx.dtype)
        grad_input = grad_down = None
        if ctx.needs_input_grad[0]:
            if grad_x is None:  # the base's output went unused
                flat = rows @ down
            else:
                # in the wider dtype of the two: the base's gradient is never rounded to the LoRA's
                dtype = torch.promote_types(grad_x.dtype, ctx.dtype)
                flat = torch.addmm(grad_x.reshape(rows.shape[0], -1).to(dtype), rows.to(dtype), down.to(dtype))
            grad_input = flat.view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_down = (rows.t() @ x.reshape(rows.shape[0], -1).to(ctx.dtype)).to(ctx.down_dtype)
        return grad_input, grad_down, None


class LoRAModule(nn.Module):
    """A LoRA on one Linear; ``split_dims`` makes it one LoRA per output chunk (split_qkv)."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | Tensor | None = 1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        split_dims: list[int] | None = None,
        ggpo_beta: float | None = None,
        ggpo_sigma: float | None = None,
    ):
        super().__init__()
        if not isinstance(org_module, nn.Linear):
            raise TypeError(f"{lora_name}: LoRA needs an nn.Linear, got {type(org_module).__name__}")
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        in_dim, out_dim = org_module.in_features, org_module.out_features
        self.split_dims = list(split_dims) if split_dims else None
        if self.split_dims is None:
            self.lora_down = nn.Linear(in_dim, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, out_dim, bias=False)
        else:
            if sum(self.split_dims) != out_dim:
                raise ValueError(f"{lora_name}: split dims {self.split_dims} do not add up to {out_dim}")
            self.lora_down = nn.ModuleList(nn.Linear(in_dim, self.lora_dim, bias=False) for _ in self.split_dims)
            self.lora_up = nn.ModuleList(nn.Linear(self.lora_dim, d, bias=False) for d in self.split_dims)
        for down, up in self.pairs():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)

        alpha = resolve_alpha(alpha, self.lora_dim)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))  # saved as a 0-dim tensor

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        # A list hides the base Linear from this module's parameters and state dict.
        self.org_module_ref = [org_module]
        self.org_forward = None

        self.ggpo_sigma = ggpo_sigma
        self.ggpo_beta = ggpo_beta
        self.combined_weight_norms: Tensor | None = None
        self.grad_norms: Tensor | None = None
        self.weight_norms: Tensor | None = None
        if ggpo_sigma is not None and ggpo_beta is not None:
            self.perturbation_norm_factor = 1.0 / math.sqrt(out_dim)
            self.initialize_norm_cache(org_module.weight, org_module._buffers.get("weight_scale"))

        if self.split_dims is not None:
            self.register_state_dict_post_hook(_fuse_split_state)
            self.register_load_state_dict_pre_hook(_split_fused_state)
        self.register_load_state_dict_post_hook(_refresh_scale)

    @property
    def org_module(self) -> nn.Module:
        return self.org_module_ref[0]

    @property
    def device(self) -> torch.device:
        return self.alpha.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def pairs(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """(down, up) Linears: one pair, or one per chunk for split modules."""
        if self.split_dims is None:
            return [(self.lora_down, self.lora_up)]
        return list(zip(self.lora_down, self.lora_up, strict=True))

    def apply_to(self) -> None:
        """Routes the base Linear's calls through this module."""
        if self.org_forward is not None:
            raise RuntimeError(f"{self.lora_name} is already applied")
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def forward(self, x: Tensor) -> Tensor:
        # multiplier 0 (DOP's base-model pass) gives exactly the base output: no update and no GGPO
        # perturbation (sd-scripts adds the perturbation whatever the multiplier; docs §17.4)
        if not self.enabled or self.multiplier == 0:
            return self.org_forward(x)
        drop_module = self.training and self.module_dropout
        if drop_module and not torch.compiler.is_compiling() and torch.rand(1).item() < self.module_dropout:
            return self.org_forward(x)

        downs = [down.weight for down, _ in self.pairs()]
        down = downs[0] if len(downs) == 1 else torch.cat(downs)
        # autocast's dtype; without autocast, the LoRA weights' (x is cast to them, as sd-scripts does)
        autocast = autocast_dtype(x.device.type)
        dtype = autocast or down.dtype
        if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            x, lx = _SharedInput.apply(x, down, dtype)
        else:  # (compiled, the plain form: the compiler fuses the gradient sum with its neighbours)
            lx = F.linear(x.to(dtype), down.to(dtype))

        keep = None
        if drop_module and torch.compiler.is_compiling():  # a Python branch on a random draw would break the graph
            keep = (torch.rand((), device=lx.device) >= self.module_dropout).to(lx.dtype)
            lx = lx * keep
        scale = self.scale
        if self.training and self.rank_dropout:
            scale = scale / (1.0 - self.rank_dropout)  # keeps the expected update while ranks drop out
        strength = self.multiplier * scale
        perturbed = self.training and self.combined_weight_norms is not None and self.grad_norms is not None
        if self.split_dims is None and self.lora_up.bias is None:
            lx = self._regularize(lx)
            matmul = None if perturbed else self._base_matmul(x, lx, autocast is not None)
            if matmul is not None:
                return self._base_with_update(matmul, x, lx, strength)
            out = self._add_update(self.org_forward(x), lx, strength)
        else:
            org = self.org_forward(x)
            lxs = lx.split(self.lora_dim, dim=-1)
            outs = [up(self._regularize(part)) for part, (_, up) in zip(lxs, self.pairs(), strict=True)]
            delta = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            out = org + (delta * strength).to(org.dtype)
        if perturbed:  # (not for a dropped module, as eager)
            perturbation = self._ggpo_perturbation(x).to(out.dtype)
            out = out + (perturbation if keep is None else perturbation * keep.to(out.dtype))
        return out

    def _base_matmul(
        self, x: Tensor, lx: Tensor, autocasting: bool
    ) -> Callable[[nn.Linear, Tensor, Tensor], Tensor] | None:
        """``(linear, x, addend) -> x Wᵀ + addend`` for the base, when its forward is one this module
        can stand in for (a plain or an fp8 Linear, not wrapped by other code) and computes in the
        update's dtype (always, under autocast); None otherwise."""
        forward = getattr(self.org_forward, "__func__", None)
        matmul = _MATMUL_PLUS.get(forward)
        if matmul is None or autocasting:
            return matmul
        same_dtype = x.dtype == lx.dtype and (forward is fp8_linear_forward or self.org_module.weight.dtype == x.dtype)
        return matmul if same_dtype else None

    def _base_with_update(self, matmul, x: Tensor, lx: Tensor, strength: float) -> Tensor:
        """x Wᵀ + b + strength · lx Uᵀ with the small product first, as the base matmul's addend:
        the base output is written once, where adding the update to it afterwards reads and writes
        it again. The bias rides in the small product; the strength in the small up weight."""
        bias = self.org_module.bias
        rows = lx.reshape(-1, lx.shape[-1])
        up = (self.lora_up.weight * strength).t()
        update = rows @ up if bias is None else torch.addmm(bias, rows, up)
        return matmul(self.org_module, x, update.view(*x.shape[:-1], update.shape[-1]))

    def _add_update(self, org: Tensor, lx: Tensor, strength: float) -> Tensor:
        """org + strength · lx Uᵀ as one matmul with org as its addend, for a base output that
        :meth:`_base_with_update` cannot compute itself. The strength goes into the
        small up weight (out × rank), so the activation-sized product is neither scaled nor added
        in passes of its own, forward or backward. (Accumulating into org in place would save the
        copy of org that addmm makes, but measured on the CPU it costs more copies than it saves.)"""
        up = self.lora_up.weight * strength
        dtype = autocast_dtype(org.device.type) or torch.promote_types(org.dtype, lx.dtype)
        flat = torch.addmm(org.reshape(-1, org.shape[-1]).to(dtype), lx.reshape(-1, lx.shape[-1]).to(dtype),
                           up.t().to(dtype))  # fmt: skip
        return flat.view(*org.shape).to(org.dtype)

    def _regularize(self, lx: Tensor) -> Tensor:
        if not self.training:
            return lx
        if self.dropout:
            lx = nn.functional.dropout(lx, p=self.dropout)
        if self.rank_dropout:
            # one keep-mask per sample and rank, shared by all tokens of the sample
            mask = torch.rand((lx.shape[0], self.lora_dim), device=lx.device) > self.rank_dropout
            lx = lx * mask.view(lx.shape[0], *([1] * (lx.ndim - 2)), self.lora_dim).to(lx.dtype)
        return lx

    # ---- the update as a weight ---------------------------------------------------------

    def delta_weight(self) -> Tensor:
        """``scale * up @ down`` in fp32, shape of the base weight (without the multiplier)."""
        parts = [up.weight.float() @ down.weight.float() for down, up in self.pairs()]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)) * self.scale

    def get_weight(self, multiplier: float | None = None) -> Tensor:
        return (self.multiplier if multiplier is None else multiplier) * self.delta_weight()

    def fused_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(down, up, alpha) of the one standard LoRA that applies exactly this module's update."""
        if self.split_dims is None:
            return self.lora_down.weight, self.lora_up.weight, self.alpha
        down = torch.cat([d.weight for d in self.lora_down], dim=0)
        up = torch.block_diag(*[u.weight for u in self.lora_up])
        # rank becomes n*r, so alpha must become n*alpha for alpha/rank to stay the trained scale
        return down, up, self.alpha * len(self.split_dims)

    @torch.no_grad()
    def merge_to(self, sd: dict[str, Tensor] | None = None, dtype: torch.dtype | None = None, device=None) -> None:
        """Adds ``multiplier * scale * up @ down`` to the base weight (computed in fp32 on ``device``).

        ``sd`` holds this module's fused ``lora_down.weight`` / ``lora_up.weight`` / ``alpha``
        (as in a file); without it the module's own weights are merged.
        """
        weight = self.org_module.weight
        compute_device = device if device is not None else weight.device
        if sd is None:
            delta = self.delta_weight().to(compute_device)
        else:
            down = sd["lora_down.weight"].to(compute_device, torch.float32)
            up = sd["lora_up.weight"].to(compute_device, torch.float32)
            delta = (up @ down) * (resolve_alpha(sd.get("alpha"), down.shape[0]) / down.shape[0])
        row_scale = self.org_module._buffers.get("weight_scale")  # --fp8_scaled: the weight is W / scale
        wide = dequantize_weight(weight.to(compute_device), None if row_scale is None else row_scale.to(compute_device),
                                 torch.float32)  # fmt: skip
        merged = wide + self.multiplier * delta
        if row_scale is not None:  # the merged rows get scales of their own
            from library.fp8 import quantize_weight

            quantized, new_scale = quantize_weight(merged, scaled=True)
            self.org_module.weight.data = quantized.to(weight.device)
            self.org_module.weight_scale = new_scale.to(row_scale.device, row_scale.dtype)
            return
        self.org_module.weight.data = merged.to(weight.device, dtype or weight.dtype)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device=None) -> tuple[Tensor, Tensor]:
        """Scales up and down so that ``||scale * up @ down||_F <= max_norm``; returns (scaled, norm after) as
        0-d tensors on the device, so that a network's modules need no host round trip each."""
        norm = self.delta_weight().to(device if device is not None else self.device).norm()
        ratio = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))  # x·1 is exact: no branch
        for down, up in self.pairs():  # both factors take sqrt(ratio): their product takes ratio
            factor = ratio.sqrt()
            down.weight.mul_(factor.to(down.weight.device, down.weight.dtype))
            up.weight.mul_(factor.to(up.weight.device, up.weight.dtype))
        return norm > max_norm, norm * ratio

    # ---- GGPO (LoRA-GGPO: gradient-guided perturbation), spec §g.9 with §k.15 fixed -------

    @torch.no_grad()
    def initialize_norm_cache(self, org_weight: Tensor, row_scale: Tensor | None = None) -> None:
        """Mean row norm of the base weight, estimated from up to 1000 random rows (none for a module on a meta
        model, as the trainer builds one before loading: there is no weight to measure, and it never trains).
        ``row_scale``: the per-row scales of a scaled-fp8 weight, which stores W / scale; the rows measured are W's."""
        if org_weight.is_meta:
            self.org_weight_norm_estimate = None
            return
        rows = torch.randperm(org_weight.shape[0])[:1000].to(org_weight.device)
        scales = None if row_scale is None else row_scale[rows.to(row_scale.device)].to(org_weight.device)
        weight_rows = dequantize_weight(org_weight[rows], scales, torch.float32)
        self.org_weight_norm_estimate = weight_rows.norm(dim=1).mean().item()

    @torch.no_grad()
    def update_norms(self) -> None:
        """Row norms of the scaled update and of base + update (sd-scripts drops the scale here)."""
        if self.ggpo_sigma is None or self.ggpo_beta is None or not self.training:
            return
        delta = self.delta_weight()
        self.weight_norms = delta.norm(dim=1, keepdim=True)
        self.combined_weight_norms = torch.sqrt(self.org_weight_norm_estimate**2 + (delta**2).sum(1, keepdim=True))

    @torch.no_grad()
    def update_grad_norms(self) -> None:
        """Row norms of the gradient the update receives: ``scale * (U dD + dU D)``."""
        if self.ggpo_sigma is None or self.ggpo_beta is None or not self.training:
            return
        parts = []
        for down, up in self.pairs():
            if down.weight.grad is None or up.weight.grad is None:
                return
            parts.append(up.weight.float() @ down.weight.grad.float() + up.weight.grad.float() @ down.weight.float())
        grad = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)) * self.scale
        self.grad_norms = grad.norm(dim=1, keepdim=True)

    def _ggpo_perturbation(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            row_scale = self.ggpo_sigma * self.combined_weight_norms + self.ggpo_beta * self.grad_norms**2
            out_dim, in_dim = self.org_module.weight.shape
            perturbation = torch.randn(out_dim, in_dim, dtype=x.dtype, device=x.device)
            perturbation.mul_((row_scale * self.perturbation_norm_factor).to(x.device, x.dtype))
        return x @ perturbation.T


class LoRAInfModule(LoRAModule):
    """A LoRA for inference: no dropout, can be merged, disabled, or pre-computed into the base weight."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | Tensor | None = 1,
        **kwargs,
    ):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, split_dims=kwargs.get("split_dims"))
        self.network = None

    def set_network(self, network) -> None:
        self.network = network


# ---- state dict hooks ---------------------------------------------------------------------


def _split_keys(module: LoRAModule, prefix: str) -> list[str]:
    n = len(module.split_dims)
    return [f"{prefix}lora_down.{i}.weight" for i in range(n)] + [f"{prefix}lora_up.{i}.weight" for i in range(n)]


def _fuse_split_state(module: LoRAModule, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: replaces per-chunk tensors with the standard fused LoRA."""
    for key in _split_keys(module, prefix):
        state_dict.pop(key, None)
    down, up, alpha = module.fused_weights()
    state_dict[f"{prefix}lora_down.weight"] = down.detach()
    state_dict[f"{prefix}lora_up.weight"] = up.detach()
    state_dict[f"{prefix}alpha"] = alpha.detach()


def _split_fused_state(module: LoRAModule, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: turns a fused LoRA in ``state_dict`` back into per-chunk tensors."""
    down_key, up_key, alpha_key = f"{prefix}lora_down.weight", f"{prefix}lora_up.weight", f"{prefix}alpha"
    if down_key not in state_dict or up_key not in state_dict:
        return
    downs, ups = split_fused(state_dict.pop(down_key), state_dict.pop(up_key), module.split_dims, module.lora_name)
    for i, (down, up) in enumerate(zip(downs, ups, strict=True)):
        state_dict[f"{prefix}lora_down.{i}.weight"] = down
        state_dict[f"{prefix}lora_up.{i}.weight"] = up
    if alpha_key in state_dict:
        state_dict[alpha_key] = state_dict[alpha_key] / len(module.split_dims)


def _refresh_scale(module: LoRAModule, incompatible_keys) -> None:
    """The scale follows the alpha actually loaded (sd-scripts keeps the command line's, spec §k.16)."""
    if module.alpha.device.type != "meta":
        module.scale = resolve_alpha(module.alpha, module.lora_dim) / module.lora_dim
