"""Merge LoRAs into FLUX.1 / Chroma checkpoints (DiT, CLIP-L, T5-XXL), or several LoRAs into one.

    python networks/flux_merge_lora.py --flux_model flux1-dev.safetensors --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 1.0 0.5
    python networks/flux_merge_lora.py --save_to ab.safetensors --concat \\
        --models a.safetensors b.safetensors --ratios 1 1

sd-scripts' arguments and modes (spec §i.4). With ``--flux_model`` / ``--clip_l`` / ``--t5xxl`` each
LoRA module is added to the weight it names: ``W += ratio * alpha / rank * up @ down``. Without a
model the LoRAs are merged into one LoRA: summed (same ranks; an approximation when several
LoRAs touch one module) or, with ``--concat``, concatenated along the rank (exact).

Differences from sd-scripts, on purpose (spec §k.20):

* ai-toolkit / diffusers LoRAs merge in both modes, detected per file (``--diffusers`` is not
  needed), with every block mapped whatever the model's depth (sd-scripts' map stops at 18 double
  blocks and its LoRA mode fails with a KeyError, #1522).
* A ratio is applied once: in LoRA mode each LoRA's own contribution is ``ratio * delta W``
  (sd-scripts scales both up and down by the ratio, so a single LoRA comes out at ratio²). With
  ``--concat`` the result is exactly ``sum(ratio_k * delta W_k)``: each LoRA's scale is folded into
  its factors and alpha is the new rank (sd-scripts keeps the first LoRA's alpha over the larger rank).
* The merged LoRA's metadata names ``networks.lora_flux`` (sd-scripts writes ``networks.lora``),
  and its ``sshs_*`` hashes are of the tensors as saved.
* LoRA modules that match nothing are listed by name; a LoRA that matches nothing at all, a
  module whose shape does not fit, a wrong number of ``--ratios`` or an output path that is one of
  the inputs stops the run before anything is written (``--ratios`` may be left out: 1.0 each).
* Checkpoints are streamed one tensor at a time into a temporary file that is renamed at the end,
  so the peak memory is one tensor plus the LoRAs (``--mem_eff_load_save`` is always on). The
  checkpoint's own metadata is kept; the ModelSpec architecture follows the model (dev, schnell or
  Chroma; sd-scripts always writes dev).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

if __package__ in (None, ""):  # run as `python networks/flux_merge_lora.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.checkpoint_kinds import FLUX_PREFIX  # noqa: E402
from library.comfy_fp8 import is_comfy_scaled_fp8  # noqa: E402
from library.dtypes import device_from_name, dtype_from_name  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_formats import (  # noqa: E402
    LoRAWeights,
    ai_toolkit_modules,
    sd_scripts_modules,
    to_ai_toolkit,
    to_sd_scripts,
)
from library.safetensors_io import (  # noqa: E402
    SafetensorsReader,
    check_output_file,
    read_header,
    read_metadata,
    same_file,
    warn_unless_safetensors_name,
    write_safetensors_streaming,
)
from library.train_args import DefaultsHelpFormatter  # noqa: E402
from networks.lora_flux_files import (  # noqa: E402
    BASE_MODEL_VERSIONS,
    base_model_version,
    warn_if_made_for_another_model,
)

logger = logging.getLogger(__name__)

PREFIXES = {"flux": "lora_unet", "clip_l": "lora_te1", "t5xxl": "lora_te3"}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge LoRAs into FLUX.1 / Chroma models, or into one LoRA",
                                formatter_class=DefaultsHelpFormatter)
    # fmt: off
    p.add_argument("--save_precision", type=str, default=None,
                   help="precision of the saved file(s): float32, fp16, bf16, fp8 (= fp8_e4m3fn), fp8_e5m2; "
                        "default: the merge precision")
    p.add_argument("--precision", type=str, default="float", help="merge arithmetic: float, fp16, bf16")
    p.add_argument("--flux_model", type=str, default=None, help="FLUX.1 / Chroma DiT to merge into; without any model "
                   "the LoRAs are merged into one LoRA")
    p.add_argument("--clip_l", type=str, default=None, help="CLIP-L file to merge lora_te1 modules into")
    p.add_argument("--t5xxl", type=str, default=None, help="T5-XXL file to merge lora_te3 modules into")
    p.add_argument("--mem_eff_load_save", action="store_true", help="accepted for compatibility: checkpoints are "
                   "always streamed one tensor at a time")
    p.add_argument("--loading_device", type=str, default="cpu", help="device tensors are loaded to (default cpu)")
    p.add_argument("--working_device", type=str, default="cpu", help="device the merge is computed on (default cpu)")
    p.add_argument("--save_to", type=str, default=None,
                   help="output file of the merged DiT (with --flux_model), or of the merged LoRA (without models)")
    p.add_argument("--clip_l_save_to", type=str, default=None, help="output file of the merged CLIP-L")
    p.add_argument("--t5xxl_save_to", type=str, default=None, help="output file of the merged T5-XXL")
    p.add_argument("--models", type=str, nargs="*", default=None, help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    p.add_argument("--no_metadata", action="store_true", help="no ModelSpec metadata (a merged LoRA keeps the "
                   "minimum ss_* keys)")
    p.add_argument("--concat", action="store_true", help="LoRA mode: concatenate along the rank (exact; the rank "
                   "is the sum of the inputs')")
    p.add_argument("--shuffle", action="store_true", help="LoRA mode: permute the rank dimension of the result")
    p.add_argument("--diffusers", action="store_true", help="accepted for compatibility: ai-toolkit / diffusers "
                   "LoRAs are detected per file")
    # fmt: on
    return p


def str_to_dtype(name: str | None, flag: str) -> torch.dtype | None:
    if name is None:
        return None
    return dtype_from_name(name, flag)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ---- LoRAs ----------------------------------------------------------------------------------


class LoadedLoRA:
    """One ``--models`` file as sd-scripts modules, with its ratio."""

    def __init__(self, path: str, ratio: float, dtype: torch.dtype) -> None:
        from networks.lora_flux import read_lora_file

        sd, self.metadata = read_lora_file(path)
        converted = to_sd_scripts(sd, self.metadata, source=path)
        if converted.unsupported:
            logger.warning(
                "%s: %d keys are not LoRA modules this tool knows and are skipped: %s",
                path,
                len(converted.unsupported),
                ", ".join(converted.unsupported),
            )
        modules, leftover = sd_scripts_modules(converted.state_dict, path)
        if not modules:
            raise UserError(
                f"{path}: none of its {len(sd)} keys (e.g. {next(iter(sd), 'none')}) is a LoRA module this tool "
                "knows (sd-scripts' lora_unet_* / lora_te*_*, or diffusers' transformer.* / text_encoder.*)"
            )
        if leftover:
            logger.warning("%s: keys without a lora_down/lora_up pair are skipped: %s", path, ", ".join(leftover))
        self.path, self.ratio, self.format, self.dtype = path, ratio, converted.source_format, dtype
        self.modules = {k: LoRAWeights(w.down.to(dtype), w.up.to(dtype), w.alpha) for k, w in modules.items()}
        self.state_dict = converted.state_dict

    def diffusers_dit_modules(self) -> tuple[dict[str, LoRAWeights], list[str]]:
        """The DiT modules under ai-toolkit's names (``transformer.<diffusers path>``), scales folded in,
        and the DiT modules that have no diffusers counterpart."""
        converted = to_ai_toolkit(self.state_dict, self.metadata, source=self.path)
        ait = {k: v for k, v in converted.state_dict.items() if k.startswith("transformer.")}
        modules, _ = ai_toolkit_modules(ait, source=self.path)
        weights = {k: LoRAWeights(w.down.to(self.dtype), w.up.to(self.dtype), None) for k, w in modules.items()}
        return weights, [name for name in converted.unsupported if name.startswith("lora_unet")]


def load_loras(models: list[str], ratios: list[float], dtype: torch.dtype) -> list[LoadedLoRA]:
    loras = []
    for path, ratio in zip(models, ratios, strict=True):
        lora = LoadedLoRA(path, ratio, dtype)
        logger.info("%s: %s format, %d modules, ratio %g", path, lora.format, len(lora.modules), ratio)
        loras.append(lora)
    return loras


# ---- merging into checkpoints ---------------------------------------------------------------


def lora_name_map(keys: list[str], kind: str) -> dict[str, str]:
    """sd-scripts LoRA module name -> checkpoint key, for every 2-D ``.weight`` of a checkpoint."""
    names = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        if kind == "flux" and path.startswith(FLUX_PREFIX):
            path = path[len(FLUX_PREFIX) :]
        elif kind == "clip_l":
            path = path[path.index("text_model.") :] if "text_model." in path else "text_model." + path
        elif kind == "t5xxl" and "encoder." in path:
            path = path[path.index("encoder.") :]
        names[f"{PREFIXES[kind]}_{path.replace('.', '_')}"] = key
    return names


def _flag(kind: str) -> str:
    """The option that names a checkpoint of this kind."""
    return "--flux_model" if kind == "flux" else f"--{kind}"


def _model_type(keys) -> str:
    keys = [k[len(FLUX_PREFIX) :] if k.startswith(FLUX_PREFIX) else k for k in keys]
    if any(k.startswith("distilled_guidance_layer.") for k in keys):
        return "chroma"
    guidance = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")
    return "dev" if any(k in guidance for k in keys) else "schnell"


def plan_model_merges(
    targets: dict[str, str], loras: list[LoadedLoRA]
) -> dict[str, dict[str, list[tuple[LoRAWeights, float, str]]]]:
    """For each checkpoint kind, key -> [(module, ratio, label)]; checks names and shapes first."""
    read = {kind: read_header(path) for kind, path in targets.items()}
    headers, metadata = {kind: r[0] for kind, r in read.items()}, {kind: r[1] for kind, r in read.items()}
    diffusers_dit = "flux" in headers and any(k.startswith("transformer_blocks.") for k in headers["flux"])
    for kind, header in headers.items():
        # its weights count times a per-tensor scale_weight: an update added to them would be rescaled
        if is_comfy_scaled_fp8(header, metadata[kind]):
            raise UserError(
                f"{_flag(kind)} {targets[kind]}: a ComfyUI scaled-fp8 checkpoint cannot be merged into; "
                "merge into the bf16 / fp16 original, then use --save_precision fp8"
            )
    maps = {kind: lora_name_map(list(h), kind) for kind, h in headers.items()}
    plan: dict[str, dict[str, list]] = {kind: {} for kind in targets}
    if diffusers_dit:  # a diffusers-layout DiT: its modules are named as in ai-toolkit files
        maps["flux"] = {"transformer." + k[: -len(".weight")]: k for k in headers["flux"] if k.endswith(".weight")}
    for lora in loras:
        modules, unmatched = lora.modules, []
        if diffusers_dit:
            dit_modules, unmatched = lora.diffusers_dit_modules()
            modules = {k: w for k, w in modules.items() if not k.startswith("lora_unet")} | dit_modules
        total = len(modules) + len(unmatched)
        for name, w in modules.items():
            kind = next((k for k, m in maps.items() if name in m), None)
            if kind is None:
                unmatched.append(name)
                continue
            key = maps[kind][name]
            shape = tuple(headers[kind][key]["shape"])
            if (w.up.shape[0], w.down.shape[1]) != shape:
                raise UserError(
                    f"{lora.path}: module {name} changes a {w.up.shape[0]}x{w.down.shape[1]} weight, but "
                    f"{key} in {targets[kind]} is {'x'.join(map(str, shape))}: the LoRA is for another model"
                )
            plan[kind].setdefault(key, []).append((w, lora.ratio, f"{_stem(lora.path)}:{name}"))
        if len(unmatched) == total:
            given = ", ".join(f"{_flag(k)} {p}" for k, p in targets.items())
            raise UserError(
                f"{lora.path}: none of its {total} modules (e.g. {unmatched[0]}) is in {given}. "
                "Is it a LoRA for this model? Text-encoder modules need --clip_l / --t5xxl"
            )
        if unmatched:
            hint = (
                " (give --clip_l / --t5xxl to merge text-encoder modules)"
                if any(n.startswith(("lora_te1", "lora_te3")) for n in unmatched)
                else ""
            )
            logger.warning(
                "%s: %d modules match nothing in the given models and are not merged%s: %s",
                lora.path,
                len(unmatched),
                hint,
                ", ".join(sorted(unmatched)),
            )
    return plan


def stream_merge(
    src: str,
    dst: str,
    merges: dict[str, list[tuple[LoRAWeights, float, str]]],
    metadata: dict[str, str] | None,
    merge_dtype: torch.dtype,
    save_dtype: torch.dtype | None,
    loading_device: str = "cpu",
    working_device: str = "cpu",
) -> int:
    """Copies ``src`` to ``dst`` tensor by tensor, adding the planned LoRA updates; returns merged count.

    Floating tensors are cast to ``save_dtype`` (if given). ``dst`` appears only when complete.
    """
    with SafetensorsReader(src) as reader:
        layout = {}
        for key, entry in reader.header.items():
            dtype = reader.dtype(key)
            layout[key] = (entry["shape"], save_dtype if save_dtype is not None and dtype.is_floating_point else dtype)
        merged = 0

        def tensors():
            nonlocal merged
            for key in tqdm(list(reader.header), desc=f"writing {os.path.basename(dst)}", leave=False):
                tensor = reader.get(key, loading_device)
                if key in merges:
                    weight = tensor.to(working_device, merge_dtype)
                    for w, ratio, label in merges[key]:
                        up, down = w.up.to(working_device, merge_dtype), w.down.to(working_device, merge_dtype)
                        weight = weight + (up @ down) * (ratio * w.scale)
                        logger.debug("merged %s into %s", label, key)
                    tensor = weight
                    merged += 1
                yield key, tensor

        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        write_safetensors_streaming(dst, layout, tensors(), metadata)
    return merged


def merge_to_models(args, loras: list[LoadedLoRA], merge_dtype: torch.dtype, save_dtype: torch.dtype | None):
    from library.model_hashes import ARCHITECTURES, build_modelspec

    given = {"flux": args.flux_model, "clip_l": args.clip_l, "t5xxl": args.t5xxl}
    targets = {kind: path for kind, path in given.items() if path}
    outputs = {"flux": args.save_to, "clip_l": args.clip_l_save_to, "t5xxl": args.t5xxl_save_to}
    plan = plan_model_merges(targets, loras)
    if "flux" in targets:
        version = base_model_version(_model_type(read_header(targets["flux"])[0]))
        for lora in loras:
            warn_if_made_for_another_model(lora.path, "--models", version, lora.metadata)
    written = []
    for kind, src in targets.items():
        metadata = dict(read_metadata(src))
        if kind == "flux" and not args.no_metadata:
            model_type = _model_type(read_header(src)[0])
            spec = build_modelspec(
                model_type, title=_stem(outputs[kind]), merged_from=", ".join(_stem(p) for p in [src, *args.models])
            )
            spec["modelspec.architecture"] = ARCHITECTURES[model_type]  # a model, not a LoRA
            metadata.update(spec)
        count = stream_merge(
            src, outputs[kind], plan[kind], metadata, merge_dtype, save_dtype, args.loading_device, args.working_device
        )
        logger.info(
            "merged %d LoRA updates into %d weights of %s, saved to %s",
            sum(len(v) for v in plan[kind].values()),
            count,
            src,
            outputs[kind],
        )
        written.append(outputs[kind])
    return written


# ---- merging LoRAs into one LoRA ------------------------------------------------------------


def merge_lora_models(
    loras: list[LoadedLoRA], concat: bool = False, shuffle: bool = False
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, int]]:
    """One LoRA state dict from several; returns (state dict, alpha per module, rank per module).

    Sum: the first LoRA's rank and alpha. A module one LoRA changes gets sqrt(|ratio| * alpha_k / alpha_0)
    on its up and down (the ratio's sign on down): exactly ratio * delta W_k. A module several LoRAs change
    gets the best approximation of that rank to the exact sum of ratio * delta W_k (Eckart-Young, computed
    from the factors); it is exact when the sum has no higher rank (one LoRA twice, LoRAs that share their
    downs), and how much of the sum is lost otherwise is logged. Concat: each LoRA's scale
    ratio * alpha_k / rank_k is split between its up and down, alpha = the new rank, so the result is
    exactly the sum.
    """
    ups: dict[str, list[Tensor]] = {}
    downs: dict[str, list[Tensor]] = {}
    base: dict[str, tuple[float, int, str]] = {}
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}  # the weight each module changes, and who said so first
    for lora in loras:
        for name, w in lora.modules.items():
            shape = (w.up.shape[0], *w.down.shape[1:])
            first_shape, first = shapes.setdefault(name, (shape, lora.path))
            if shape != first_shape:
                raise UserError(
                    f"{lora.path}: {name} changes a {'x'.join(map(str, shape))} weight but {first} changes a "
                    f"{'x'.join(map(str, first_shape))} one: the LoRAs are for different models"
                )
            alpha = float(w.alpha) if w.alpha else float(w.rank)
            if concat:
                factor = lora.ratio * alpha / w.rank
            else:
                base_alpha, base_rank, first = base.setdefault(name, (alpha, w.rank, lora.path))
                if w.rank != base_rank:
                    raise UserError(
                        f"{lora.path}: {name} has rank {w.rank} but {first} has rank {base_rank}; "
                        "LoRAs of different ranks can only be merged with --concat"
                    )
                factor = lora.ratio * alpha / base_alpha
            magnitude = math.sqrt(abs(factor))
            ups.setdefault(name, []).append(w.up.float() * magnitude)
            downs.setdefault(name, []).append(w.down.float() * math.copysign(magnitude, factor))
    merged, alphas, ranks, lost = {}, {}, {}, {}
    for name in ups:
        up, down = torch.cat(ups[name], dim=1), torch.cat(downs[name], dim=0)
        if concat:
            alpha = float(down.shape[0])  # scale 1: the factors carry every LoRA's own scale
        else:
            alpha = base[name][0]
            if len(ups[name]) > 1:
                up, down, lost[name] = truncated_product(up, down, base[name][1])
        if shuffle:
            perm = torch.randperm(down.shape[0])
            up, down = up[:, perm], down[perm]
        merged[f"{name}.lora_down.weight"] = down.contiguous()
        merged[f"{name}.lora_up.weight"] = up.contiguous()
        merged[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        alphas[name], ranks[name] = alpha, down.shape[0]
    lossy = {name: share for name, share in lost.items() if share > 1e-6}
    if lossy:
        worst = max(lossy, key=lossy.get)
        logger.warning(
            "%d module(s) are changed by several LoRAs whose summed change has a higher rank than the first "
            "LoRA's; the merged file keeps the closest change of that rank (%s loses the most: %.1f%% of the "
            "sum's norm). --concat keeps the sum exactly, at the summed rank.",
            len(lossy), worst, 100 * lossy[worst],
        )  # fmt: skip
    return merged, alphas, ranks


def truncated_product(up: Tensor, down: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(up', down', share lost): the rank-``rank`` factors closest to up @ down in norm, and the share of its
    Frobenius norm they leave out. QR of both thin factors first, so only an R x R matrix is decomposed
    (R = up's columns): a 3072 x 21504 delta never exists."""
    q_up, r_up = torch.linalg.qr(up.flatten(1).double())
    q_down, r_down = torch.linalg.qr(down.flatten(1).double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    root = s[:rank].sqrt()
    new_up, new_down = q_up @ (u[:, :rank] * root), (root[:, None] * vh[:rank]) @ q_down.T
    missing = rank - len(root)  # a weight narrower than the rank: zero rows keep the rank, so alpha / rank holds
    new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], missing)], 1)
    new_down = torch.cat([new_down, new_down.new_zeros(missing, new_down.shape[1])])
    new_up, new_down = new_up.reshape(up.shape[0], -1, *up.shape[2:]), new_down.reshape(-1, *down.shape[1:])
    total = float(s.square().sum())
    share = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    return new_up.float(), new_down.float(), share


def save_merged_lora(args, loras: list[LoadedLoRA], save_dtype: torch.dtype | None) -> str:
    from library.model_hashes import build_modelspec, precalculate_safetensors_hashes
    from library.safetensors_io import save_safetensors

    sd, alphas, ranks = merge_lora_models(loras, args.concat, args.shuffle)
    if save_dtype is not None:  # alphas stay fp32: bf16 would store a concatenated alpha of 257 as 256
        sd = {k: v if k.endswith(".alpha") else v.to(save_dtype) for k, v in sd.items()}
    first = loras[0].metadata
    base_version = first.get("ss_base_model_version") or base_model_version(None)
    versions = {lora.path: lora.metadata.get("ss_base_model_version") for lora in loras}
    if len({v for v in versions.values() if v in BASE_MODEL_VERSIONS}) > 1:
        logger.warning("--models were trained on different base models (%s): their merge is recorded as %s",
                       ", ".join(f"{p}: {v}" for p, v in versions.items() if v), base_version)  # fmt: skip
    same = lambda values: str(next(iter(values))) if len(set(values)) == 1 else "Dynamic"  # noqa: E731
    metadata = {
        "ss_v2": "False",
        "ss_base_model_version": base_version,
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": same(ranks.values()),
        "ss_network_alpha": same(alphas.values()),
        "ss_network_args": "{}",
    }
    if not args.no_metadata:
        architecture = first.get("modelspec.architecture", "")
        model_type = (
            "chroma"
            if base_version == "chroma" or architecture.startswith("chroma")
            else ("schnell" if "schnell" in architecture else "dev")
        )
        metadata.update(
            build_modelspec(
                model_type, title=_stem(args.save_to), merged_from=", ".join(_stem(lora.path) for lora in loras)
            )
        )
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(sd, metadata)
    os.makedirs(os.path.dirname(os.path.abspath(args.save_to)), exist_ok=True)
    save_safetensors(sd, args.save_to, metadata)
    logger.info(
        "merged %d LoRAs (%d modules, %s) into %s",
        len(loras),
        len(ranks),
        "concatenated" if args.concat else "summed",
        args.save_to,
    )
    return args.save_to


# ---- entry point ----------------------------------------------------------------------------


def check_args(args) -> tuple[torch.dtype, torch.dtype | None]:
    merge_dtype = str_to_dtype(args.precision, "--precision")
    if merge_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"--precision {args.precision}: the merge arithmetic needs float, fp16 or bf16")
    save_dtype = str_to_dtype(args.save_precision, "--save_precision") or merge_dtype
    if not args.models:
        raise UserError("--models: give the LoRA file(s) to merge")
    for flag in ("loading_device", "working_device"):
        device_from_name(getattr(args, flag), f"--{flag}")
    if args.ratios is None or len(args.ratios) == 0:
        args.ratios = [1.0] * len(args.models)
    elif len(args.ratios) != len(args.models):
        raise UserError(f"--ratios: {len(args.ratios)} given for {len(args.models)} --models; give one per LoRA")
    for flag in ("mem_eff_load_save", "diffusers"):
        if getattr(args, flag):
            logger.warning(
                "--%s has no effect here: %s",
                flag,
                "checkpoints are always streamed"
                if flag == "mem_eff_load_save"
                else "ai-toolkit / diffusers LoRAs are detected per file",
            )
    pairs = (("flux_model", "save_to"), ("clip_l", "clip_l_save_to"), ("t5xxl", "t5xxl_save_to"))
    for model_flag, save_flag in pairs:
        if getattr(args, model_flag) and not getattr(args, save_flag):
            raise UserError(f"--{model_flag} needs --{save_flag}: where to write the merged model")
        if getattr(args, save_flag) and not getattr(args, model_flag) and model_flag != "flux_model":
            raise UserError(f"--{save_flag} needs --{model_flag}: the model to merge into")
    if not args.save_to and not args.clip_l_save_to and not args.t5xxl_save_to:
        raise UserError("--save_to is required: the merged model or LoRA file")
    for flag in ("save_to", "clip_l_save_to", "t5xxl_save_to"):
        if getattr(args, flag):
            warn_unless_safetensors_name(getattr(args, flag), f"--{flag}")
    if not (args.flux_model or args.clip_l or args.t5xxl) and not args.save_to:
        raise UserError("--save_to is required: where to write the merged LoRA")
    if args.save_to and not args.flux_model and (args.clip_l or args.t5xxl):
        raise UserError("--save_to is the merged DiT's file: give --flux_model too, or leave --save_to out")
    inputs = [p for p in [*args.models, args.flux_model, args.clip_l, args.t5xxl] if p]
    outputs: dict[str, str] = {}  # path -> flag
    for flag in ("save_to", "clip_l_save_to", "t5xxl_save_to"):
        path = getattr(args, flag)
        if not path:
            continue
        if any(same_file(path, p) for p in inputs):
            raise UserError(f"--{flag} {path} is one of the input files; write the result to another file")
        earlier = next((other for other in outputs if same_file(path, other)), None)
        if earlier is not None:
            raise UserError(f"--{flag} {path} is also --{outputs[earlier]}; give each result its own file")
        outputs[path] = flag
        check_output_file(path, f"--{flag}")
    if (args.concat or args.shuffle) and (args.flux_model or args.clip_l or args.t5xxl):
        logger.warning("--concat / --shuffle only apply when LoRAs are merged into one LoRA (no --flux_model)")
    return merge_dtype, save_dtype


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, merges, and returns the exit status (1 with one ``error:`` line for user errors)."""
    args = setup_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        merge_dtype, save_dtype = check_args(args)
        if args.flux_model is None and args.clip_l is None and args.t5xxl is None:
            loras = load_loras(args.models, args.ratios, torch.float32)
            save_merged_lora(args, loras, save_dtype)
        else:
            loras = load_loras(args.models, args.ratios, merge_dtype)
            merge_to_models(args, loras, merge_dtype, save_dtype)
        return 0
    except (UserError, OSError) as e:  # OSError: a full disk or a failed write, named by its message
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
