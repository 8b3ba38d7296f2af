"""The LoRA network for FLUX.1 and Chroma: ``--network_module networks.lora_flux``.

Module names, file layout and the module-level API are sd-scripts' (spec §g), so files load
in ComfyUI, diffusers and sd-scripts-style tools, and trainers written for sd-scripts' network
modules drive this one. Differences from sd-scripts, on purpose (docs/flux_train_network.md):

* ``network_reg_dims`` / ``network_reg_lrs``: the **last** matching pattern wins, as the guide
  says (sd-scripts takes the first). An invalid pattern, a malformed pair, an unknown network
  arg or a bad value stops with a message naming it (sd-scripts skips some with a warning).
* Boolean args accept ``True``/``true``/``1``/``yes`` and ``False``/``false``/``0``/``no``; anything
  else is an error (sd-scripts reads everything but the exact string ``True`` as False).
* Block indices are checked against the loaded model's real depth (pruned models have fewer).
* ``split_qkv`` works (sd-scripts crashes, #2220) and its files carry alpha x number of chunks,
  so plain loaders apply the trained strength (sd-scripts' apply 1/3 or 1/4 of it, §k.7); the
  convention is recorded under ``ss_split_qkv_convention``. Max-norm regularisation and GGPO
  work on split modules too (§k.15, §k.17).
* GGPO scales the update's norm by alpha/rank (sd-scripts computes and drops it, §k.15), and adds no
  perturbation at multiplier 0 (differential output preservation's base-model pass; sd-scripts adds it).
* A module's scale always follows the alpha it holds, including after ``load_weights`` (§k.16).
* ``create_network_from_weights`` honours the learning-rate, dropout and GGPO args and
  ``split_qkv``; args that choose ranks are reported as having no effect there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from library.errors import CheckpointError, UserError
from library.lora_formats import checked_lora_pair, refuse_unsupported_kinds
from networks.lora_flux_args import (  # noqa: F401  (validate_network_args is part of the module API)
    RANK_ARGS,
    TYPE_DIM_KEYS,
    check_known_args,
    dropout_args,
    ggpo_args,
    is_unset,
    last_match,
    loraplus_ratios,
    network_options,
    parse_block_selection,
    parse_bool,
    parse_in_dims,
    parse_int,
    parse_regex_pairs,
    rank_value,
    refuse_zero_loraplus,
    validate_network_args,
)
from networks.lora_flux_files import (  # noqa: F401  (re-exported: tools import them from here)
    SPLIT_QKV_CONVENTION,
    SPLIT_QKV_METADATA_KEY,
    check_weights_fit,
    nothing_fits_message,
    read_lora_file,
    read_lora_file_as_sd_scripts,
    write_lora_file,
)
from networks.lora_flux_params import param_groups, text_encoder_lrs
from networks.lora_flux_targets import (
    RankRules,
    check_block_selection,
    compile_patterns,
    dit_targets,
    is_split_target,
    split_dims,
    split_parts,
    text_encoder_targets,
    warn_type_dims_without_layers,
)
from networks.lora_modules import LoRAInfModule, LoRAModule

logger = logging.getLogger(__name__)

NUM_DOUBLE_BLOCKS = 19  # FLUX.1's depth; the real bounds are read from the model given
NUM_SINGLE_BLOCKS = 38


# ---- entry points ------------------------------------------------------------------------


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    ae,
    text_encoders,
    flux: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs,
) -> LoRANetwork:
    """A new LoRA network for ``flux`` (and CLIP-L / T5 when given) from ``--network_args`` values.

    ``text_encoders`` is ``[clip_l, t5]``; either may be None (Chroma has no CLIP-L). ``ae`` is unused.
    """
    n_double, n_single = len(getattr(flux, "double_blocks", ())), len(getattr(flux, "single_blocks", ()))
    options = network_options(kwargs, neuron_dropout, n_double, n_single)
    network = LoRANetwork(
        text_encoders,
        flux,
        multiplier=multiplier,
        lora_dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        **options,
    )
    if any(r is not None for r in loraplus_ratios(kwargs)):
        network.set_loraplus_lr_ratio(*loraplus_ratios(kwargs))
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    ae,
    text_encoders,
    flux: nn.Module,
    weights_sd: dict[str, Tensor] | None = None,
    for_inference: bool = False,
    **kwargs,
) -> tuple[LoRANetwork, dict[str, Tensor]]:
    """A network shaped like a LoRA file: ranks and alphas per module, in_dims and T5 modules as found.

    Weights are not loaded (call ``load_weights`` or ``merge_to``). Returns ``(network, weights_sd)``.
    A ``weights_sd`` given instead of the file is taken as :func:`read_lora_file_as_sd_scripts` returns it.
    """
    check_known_args(kwargs)
    if weights_sd is None:
        weights_sd, _ = read_lora_file_as_sd_scripts(file)
    refuse_unsupported_kinds(weights_sd, str(file))
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            modules_alpha[name] = value
        elif rest == "lora_down.weight":
            modules_dim[name] = value.shape[0]
            if f"{name}.lora_up.weight" in weights_sd:
                checked_lora_pair(value, weights_sd[f"{name}.lora_up.weight"], name, str(file))
    if not modules_dim:
        raise CheckpointError(f"{file}: no lora_down weights: not a LoRA in sd-scripts' format")

    ignored = sorted(k for k in kwargs if k in RANK_ARGS and not is_unset(kwargs[k]))
    if ignored:
        logger.warning(f"network args {', '.join(ignored)} have no effect: the ranks come from {file}")
    split_qkv = parse_bool("split_qkv", kwargs.get("split_qkv", False)) and not for_inference
    if split_qkv:
        for name in [n for n in modules_dim if is_split_target(n)]:
            chunks = split_parts(name)
            if modules_dim[name] % chunks:
                raise UserError(f"{file}: {name} has rank {modules_dim[name]}, not a split_qkv LoRA of {chunks} parts")
            modules_dim[name] //= chunks
            if name in modules_alpha:
                modules_alpha[name] = torch.as_tensor(modules_alpha[name]).float() / chunks
    dropout, rank_dropout, module_dropout = (None, None, None) if for_inference else dropout_args(kwargs, None)
    ggpo_sigma, ggpo_beta = (None, None) if for_inference else ggpo_args(kwargs)
    reg_lrs = None
    if not is_unset(kwargs.get("network_reg_lrs")):
        reg_lrs = parse_regex_pairs("network_reg_lrs", kwargs["network_reg_lrs"], float)

    network = LoRANetwork(
        text_encoders,
        flux,
        multiplier=multiplier,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
        module_class=LoRAInfModule if for_inference else LoRAModule,
        dropout=dropout,
        rank_dropout=rank_dropout,
        module_dropout=module_dropout,
        split_qkv=split_qkv,
        train_t5xxl=any(n.startswith(LoRANetwork.LORA_PREFIX_TEXT_ENCODER_T5) for n in modules_dim),
        ggpo_beta=ggpo_beta,
        ggpo_sigma=ggpo_sigma,
        reg_lrs=reg_lrs,
        verbose=parse_bool("verbose", kwargs.get("verbose", False)),
    )
    created = {lora.lora_name for lora in network.all_loras()}
    unmatched = sorted(set(modules_dim) - created)
    if len(unmatched) == len(modules_dim):
        raise UserError(
            f"{file}: none of its {len(modules_dim)} LoRA modules (e.g. {unmatched[0]}) exists in the models given; "
            "is it a FLUX/Chroma LoRA in sd-scripts' format, for this model (and its text encoders)?"
        )
    check_weights_fit(file, weights_sd, network, "The LoRA was made for a model of other widths")
    if unmatched:
        logger.warning(f"{file}: {len(unmatched)} LoRA modules have no target and are ignored, e.g. {unmatched[:3]}")
    if any(r is not None for r in loraplus_ratios(kwargs)):
        network.set_loraplus_lr_ratio(*loraplus_ratios(kwargs))
    return network, weights_sd


def detect_model_type(flux: nn.Module | None) -> str | None:
    """``dev``, ``schnell`` or ``chroma`` (for ModelSpec), from the model's structure."""
    if flux is None:
        return None
    if hasattr(flux, "distilled_guidance_layer"):
        return "chroma"
    params = getattr(flux, "params", None)
    guidance = getattr(params, "guidance_embed", None)
    if guidance is None:
        guidance = getattr(flux, "guidance_in", None) is not None
    return "dev" if guidance else "schnell"


# ---- the network -------------------------------------------------------------------------


class LoRANetwork(nn.Module):
    """LoRA modules on the DiT's double/single blocks (and conditioning layers), CLIP-L and T5."""

    FLUX_TARGET_REPLACE_MODULE_DOUBLE = ["DoubleStreamBlock"]
    FLUX_TARGET_REPLACE_MODULE_SINGLE = ["SingleStreamBlock"]
    TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention"]
    TEXT_ENCODER_TARGET_REPLACE_MODULE += ["T5DenseGatedActDense"]
    LORA_PREFIX_FLUX = "lora_unet"  # ComfyUI's name for the DiT part
    LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1"
    LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"

    def __init__(
        self,
        text_encoders,
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        module_class: type[LoRAModule] = LoRAModule,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, Tensor | float] | None = None,
        train_blocks: str | None = None,
        split_qkv: bool = False,
        train_t5xxl: bool = False,
        type_dims: list[int | None] | None = None,
        in_dims: list[int] | None = None,
        train_double_block_indices: list[bool] | None = None,
        train_single_block_indices: list[bool] | None = None,
        reg_dims: dict[str, int] | Sequence[tuple[str, int]] | None = None,
        ggpo_beta: float | None = None,
        ggpo_sigma: float | None = None,
        reg_lrs: dict[str, float] | Sequence[tuple[str, float]] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        del conv_lora_dim, conv_alpha  # accepted for sd-scripts' signature: there is nothing to convolve
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.train_blocks = train_blocks or "all"
        self.split_qkv = split_qkv
        self.train_t5xxl = train_t5xxl
        self.type_dims = type_dims
        self.in_dims = in_dims
        self.train_double_block_indices = train_double_block_indices
        self.train_single_block_indices = train_single_block_indices
        self.reg_dims = compile_patterns(reg_dims, "network_reg_dims")
        self.reg_lrs = compile_patterns(reg_lrs, "network_reg_lrs")
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.model_type = detect_model_type(unet)
        self.rank_rules = RankRules(
            lora_dim, alpha, self.reg_dims, type_dims, in_dims, train_double_block_indices,
            train_single_block_indices, modules_dim, modules_alpha or {},
        )  # fmt: skip
        self._module_kwargs = {
            "dropout": dropout,
            "rank_dropout": rank_dropout,
            "module_dropout": module_dropout,
            "ggpo_beta": ggpo_beta,
            "ggpo_sigma": ggpo_sigma,
        }
        self._module_class = module_class
        check_block_selection(unet, train_double_block_indices, train_single_block_indices)
        if modules_dim is None:
            logger.info(f"create LoRA network: rank {lora_dim}, alpha {alpha}, train_blocks {self.train_blocks}")
        if ggpo_sigma is not None and ggpo_beta is not None:
            logger.info(f"LoRA-GGPO: sigma {ggpo_sigma}, beta {ggpo_beta}")

        if not isinstance(text_encoders, (list, tuple)):
            text_encoders = [text_encoders]
        skipped: list[str] = []
        self.text_encoder_loras: list[LoRAModule] = []
        for index, text_encoder in enumerate(list(text_encoders)[:2]):
            if text_encoder is None:
                continue
            if index == 1 and not train_t5xxl:
                continue
            prefix = self.LORA_PREFIX_TEXT_ENCODER_CLIP if index == 0 else self.LORA_PREFIX_TEXT_ENCODER_T5
            targets = text_encoder_targets(text_encoder, prefix, self.TEXT_ENCODER_TARGET_REPLACE_MODULE, index == 0)
            self.text_encoder_loras += self._create(((name, linear, "te") for name, linear in targets), skipped)
        if train_t5xxl and (len(text_encoders) < 2 or text_encoders[1] is None):
            logger.warning("train_t5xxl=True but no T5 text encoder was given: no T5 LoRA is created")
        from_file = modules_dim is not None  # a file decides which modules exist
        kinds = {"all": ("double", "single"), "double": ("double",), "single": ("single",)}[self.train_blocks]
        block_classes = {
            "double": self.FLUX_TARGET_REPLACE_MODULE_DOUBLE,
            "single": self.FLUX_TARGET_REPLACE_MODULE_SINGLE,
        }
        targets = dit_targets(unet, self.LORA_PREFIX_FLUX, block_classes, ("double", "single") if from_file else kinds,
                              in_dims, all_in_layers=from_file)  # fmt: skip
        if type_dims is not None and not from_file:
            warn_type_dims_without_layers(unet, type_dims)
        self.unet_loras: list[LoRAModule] = self._create(targets, skipped)
        logger.info(
            f"LoRA modules: {len(self.unet_loras)} on the DiT, {len(self.text_encoder_loras)} on the text encoders"
        )

        names = set()
        for lora in self.all_loras():
            if lora.lora_name in names:
                raise ValueError(f"duplicated LoRA name: {lora.lora_name}")
            names.add(lora.lora_name)
            self.add_module(lora.lora_name, lora)
        for arg, patterns in (("network_reg_dims", None if from_file else self.reg_dims),
                              ("network_reg_lrs", self.reg_lrs)):  # fmt: skip
            for pattern, value in patterns or []:  # a typo would train something else than asked, in silence
                if not any(pattern.search(name) for name in names | set(skipped)):
                    logger.warning(f"--network_args {arg}: the pattern {pattern.pattern!r} (= {value}) matches no "
                                   "module of this network; verbose=True lists the module names")
        if verbose:
            for lora in self.all_loras():
                split = f" split {lora.split_dims}" if lora.split_dims else ""
                logger.info(f"\t{lora.lora_name:60} rank {lora.lora_dim}, alpha {float(lora.alpha):g}{split}")
            if skipped:
                logger.info(f"{len(skipped)} modules skipped (rank 0): {', '.join(skipped)}")

    # ---- construction -------------------------------------------------------------------

    def _create(self, targets, skipped: list[str]) -> list[LoRAModule]:
        loras = []
        for name, linear, kind in targets:
            dim, alpha = self.rank_rules.rank(name, kind)
            if not dim:
                if self.rank_rules.modules_dim is None:
                    skipped.append(name)
                continue
            chunks = split_dims(name, linear) if self.split_qkv else None
            loras.append(
                self._module_class(name, linear, self.multiplier, dim, alpha, split_dims=chunks, **self._module_kwargs)
            )
        return loras

    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # ---- sd-scripts' network interface ----------------------------------------------------

    def apply_to(self, text_encoders, flux, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Routes the adapted Linears through their LoRAs; parts not applied are dropped from the network."""
        del text_encoders, flux  # the targets were bound when the network was built
        for flag, attribute in ((apply_text_encoder, "text_encoder_loras"), (apply_unet, "unet_loras")):
            if not flag:
                for lora in getattr(self, attribute):
                    delattr(self, lora.lora_name)
                setattr(self, attribute, [])
        logger.info(f"enable LoRA: {len(self.text_encoder_loras)} text encoder, {len(self.unet_loras)} DiT modules")
        for lora in self.all_loras():
            lora.apply_to()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for lora in self.all_loras():
            lora.enabled = is_enabled

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        pass  # the base model checkpoints; LoRA activations are tiny

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self, text_encoder, unet) -> None:
        pass

    def get_trainable_params(self):
        return self.parameters()

    def load_weights(self, file: str | os.PathLike):
        """Loads a LoRA file into this network (split_qkv modules re-split); returns missing/unexpected keys."""
        weights_sd, _ = read_lora_file_as_sd_scripts(file)
        check_weights_fit(
            file, weights_sd, self, "Give the file's rank as --network_dim / network_args, or add --dim_from_weights"
        )
        # a module saved without alpha has scale 1, as every loader (and create_network_from_weights) reads it
        suffix = ".lora_down.weight"
        downs = {k.removesuffix(suffix): v for k, v in weights_sd.items() if k.endswith(suffix)}
        without_alpha = [name for name in downs if f"{name}.alpha" not in weights_sd and name in self._modules]
        if without_alpha:
            rank_alphas = {f"{n}.alpha": torch.tensor(float(downs[n].shape[0]), device="cpu") for n in without_alpha}
            weights_sd = weights_sd | rank_alphas
            logger.info(f"{file}: {len(without_alpha)} modules have no alpha: alpha = rank (scale 1), as saved")
        info = self.load_state_dict(weights_sd, strict=False)
        if weights_sd and len(info.unexpected_keys) == len(weights_sd):
            raise UserError(nothing_fits_message(file, list(weights_sd), bool(self.unet_loras),
                                                 bool(self.text_encoder_loras)))  # fmt: skip
        if info.unexpected_keys:
            logger.warning(f"{file}: {len(info.unexpected_keys)} weights have no module here and are ignored")
        missing = {k.split(".")[0] for k in info.missing_keys}
        if missing:
            logger.warning(f"{file}: {len(missing)} modules of this network are not in the file and start untrained")
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """Writes the network to ``.safetensors`` (metadata + modelspec + hashes) or ``.pt`` / ``.ckpt``, atomically."""
        state_dict = {
            k: v.detach().to("cpu", dtype if dtype is not None else v.dtype) for k, v in self.state_dict().items()
        }
        split = any(lora.split_dims for lora in self.all_loras())
        write_lora_file(state_dict, file, metadata, self.model_type, split)

    def merge_to(self, text_encoders, flux, weights_sd: dict[str, Tensor], dtype=None, device=None) -> None:
        """Adds the file's updates to the base weights of the parts (DiT, text encoders) it has keys for."""
        del text_encoders, flux
        te_prefixes = (self.LORA_PREFIX_TEXT_ENCODER_CLIP, self.LORA_PREFIX_TEXT_ENCODER_T5)
        loras = self.text_encoder_loras if any(k.startswith(te_prefixes) for k in weights_sd) else []
        loras = loras + (self.unet_loras if any(k.startswith(self.LORA_PREFIX_FLUX) for k in weights_sd) else [])
        for lora in loras:
            prefix = lora.lora_name + "."
            sd = {k[len(prefix) :]: v for k, v in weights_sd.items() if k.startswith(prefix)}
            if sd:
                lora.merge_to(sd, dtype, device)
        logger.info(f"merged {len(loras)} LoRA modules into the base weights")

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        logger.info(
            f"LoRA+ ratio: DiT {loraplus_unet_lr_ratio or loraplus_lr_ratio}, "
            f"text encoders {loraplus_text_encoder_lr_ratio or loraplus_lr_ratio}"
        )

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """Parameter groups and their logged descriptions (spec §g.8).

        ``text_encoder_lr``: None or [] (both use ``default_lr``), one value (both), or [CLIP-L, T5].
        Groups whose learning rate is 0 or None are left out: those LoRAs are not trained.
        """
        text_encoder_lr = text_encoder_lrs(text_encoder_lr, default_lr)
        ratios = (self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio)
        refuse_zero_loraplus(ratios, [part for part, loras in (("DiT", self.unet_loras),
                                                               ("text encoders", self.text_encoder_loras)) if loras])
        self.requires_grad_(True)
        all_params, descriptions = [], []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for prefix, lr, label in (
            (self.LORA_PREFIX_TEXT_ENCODER_CLIP, text_encoder_lr[0], "textencoder 1 "),
            (self.LORA_PREFIX_TEXT_ENCODER_T5, text_encoder_lr[1], "textencoder 2 "),
        ):
            loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix)]
            if loras:
                params, descs = param_groups(loras, lr, te_ratio, self.reg_lrs)
                all_params += params
                descriptions += [label + (" " + d if d else "") for d in descs]
        if self.unet_loras:
            lr = unet_lr if unet_lr is not None else default_lr
            params, descs = param_groups(
                self.unet_loras, lr, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, self.reg_lrs
            )
            all_params += params
            descriptions += ["unet" + (" " + d if d else "") for d in descs]
        return all_params, descriptions

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """sd-scripts' older single-LR entry point."""
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """Scales every module whose update norm exceeds ``max_norm_value``; (keys scaled, mean norm, max norm)."""
        results = [lora.apply_max_norm(max_norm_value, device) for lora in self.all_loras()]
        if not results:
            return 0, 0.0, 0.0
        scaled, norms = (torch.stack([r[i].float().to(device) for r in results]) for i in (0, 1))
        keys_scaled, mean_norm, max_norm = torch.stack((scaled.sum(), norms.mean(), norms.max())).tolist()  # one read
        return int(keys_scaled), mean_norm, max_norm

    # ---- GGPO -------------------------------------------------------------------------------

    @property
    def uses_ggpo(self) -> bool:
        return self._module_kwargs["ggpo_sigma"] is not None and self._module_kwargs["ggpo_beta"] is not None

    def update_norms(self) -> None:
        if self.uses_ggpo:  # the trainer calls these every step: no loop over every module without GGPO
            for lora in self.all_loras():
                lora.update_norms()

    def update_grad_norms(self) -> None:
        if self.uses_ggpo:
            for lora in self.all_loras():
                lora.update_grad_norms()

    def _mean_norms(self, attribute: str) -> Tensor | None:
        if not self.uses_ggpo:
            return None
        values = [
            getattr(lora, attribute).mean(dim=0) for lora in self.all_loras() if getattr(lora, attribute) is not None
        ]
        return torch.stack(values) if values else None

    def grad_norms(self) -> Tensor | None:
        return self._mean_norms("grad_norms")

    def weight_norms(self) -> Tensor | None:
        return self._mean_norms("weight_norms")

    def combined_weight_norms(self) -> Tensor | None:
        return self._mean_norms("combined_weight_norms")

    # ---- inference helpers (sd-scripts' restorable merge) ----------------------------------

    def backup_weights(self) -> None:
        for lora in self.all_loras():
            org = lora.org_module
            if not hasattr(org, "_lora_org_weight"):
                org._lora_org_weight = org.weight.detach().clone()
                scale = org._buffers.get("weight_scale")  # (--fp8_scaled: the merge gives the rows new scales)
                org._lora_org_scale = None if scale is None else scale.clone()
                org._lora_restored = True

    def restore_weights(self) -> None:
        for lora in self.all_loras():
            org = lora.org_module
            if not getattr(org, "_lora_restored", True):
                org.weight.data = org._lora_org_weight.clone()
                if org._lora_org_scale is not None:
                    org.weight_scale = org._lora_org_scale.clone()
                org._lora_restored = True
            lora.enabled = True

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Adds each update to its base weight and disables the LoRA path (undo with restore_weights);
        an fp8 base (plain or row-scaled) gets the update in fp32 and is quantized again, as merge_to does."""
        for lora in self.all_loras():
            lora.merge_to()
            lora.org_module._lora_restored = False
            lora.enabled = False
