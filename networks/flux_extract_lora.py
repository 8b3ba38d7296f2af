"""Extract a LoRA from the difference of two FLUX.1 / Chroma DiTs by SVD.

    python networks/flux_extract_lora.py --model_org flux1-dev.safetensors --model_tuned tuned.safetensors \\
        --save_to extracted.safetensors --dim 16

sd-scripts' arguments and algorithm (spec §i.5): for every weight of the double and single blocks
(no biases, no norms), ``delta W = tuned - org`` in fp32, ``U, S, Vh = svd(delta W)``,
``up = U[:, :r] * S[:r]``, ``down = Vh[:r]`` with ``r = min(--dim, in, out)``, both clamped to the
``--clamp_quantile`` quantile, and ``alpha = r`` (scale 1). The result is an sd-scripts LoRA that
``--network_weights``, ``flux_minimal_inference.py --lora_weights`` and other tools load.

Differences from sd-scripts, on purpose:

* The clamp bound is the quantile of the *magnitudes* of up and down, applied symmetrically, so
  ``--clamp_quantile 1.0`` clamps nothing (sd-scripts takes the quantile of the signed values and
  can cut large negative values even at 1.0); the quantile is computed without torch.quantile's
  16M-element limit.
* Weights that did not change are left out (sd-scripts writes all-zero modules for them); a
  model pair whose block weights differ in shape, or that share no block weights, is refused.
  Other tensors that differ (conditioning layers, final layer, biases, norms: changes an
  extracted LoRA cannot carry) are listed in a warning, not dropped silently. ``ss_network_dim``
  is the rank the modules have (``--dim`` beyond a layer's width gives that width).
* ``model.diffusion_model.``-prefixed checkpoints give the usual ``lora_unet_*`` names, the
  weights of ComfyUI's scaled-fp8 checkpoints are read times their ``scale_weight``, and a model
  in diffusers' layout is read as its BFL equivalent (sd-scripts finds no block weights in it).
* The ModelSpec architecture follows the model (dev, schnell or Chroma; sd-scripts always writes
  dev), ``ss_base_model_version`` is ``chroma`` for Chroma, the file carries ``sshs_*`` hashes
  like trained LoRAs, and alpha is a float32 tensor (sd-scripts writes an int64 one).
* The SVD is the reduced one (same factors, far less memory than sd-scripts' full SVD).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

if __package__ in (None, ""):  # run as `python networks/flux_extract_lora.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.checkpoint_kinds import FLUX_PREFIX  # noqa: E402
from library.comfy_fp8 import comfy_scale_keys, comfy_weight_scale_key  # noqa: E402
from library.dtypes import device_from_name  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.flux_key_mapping import diffusers_to_bfl, is_diffusers_state_dict  # noqa: E402
from library.safetensors_io import (  # noqa: E402
    SafetensorsReader,
    check_output_file,
    read_header,
    same_file,
    warn_unless_safetensors_name,
)
from library.train_args import DefaultsHelpFormatter  # noqa: E402
from networks.lora_flux_files import base_model_version  # noqa: E402

logger = logging.getLogger(__name__)

SAVE_PRECISIONS = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DIFFUSERS_BLOCK = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.\d+\.")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extract a LoRA from the difference of two FLUX.1 / Chroma models",
                                formatter_class=DefaultsHelpFormatter)
    add = p.add_argument
    add("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
        help="precision of the saved LoRA (default float)")  # fmt: skip
    add("--model_org", type=str, default=None, required=True, help="the original model (.safetensors)")
    add("--model_tuned", type=str, default=None, required=True,
        help="the tuned model: the LoRA is the difference original -> tuned (.safetensors)")  # fmt: skip
    add("--mem_eff_safe_open", action="store_true",
        help="accepted for compatibility: weights are always read one at a time")  # fmt: skip
    add("--save_to", type=str, default=None, required=True, help="the LoRA file to write (.safetensors)")
    add("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    add("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default cpu)")
    add("--clamp_quantile", type=float, default=0.99,
        help="clamp up and down to this quantile of their magnitudes, 0 < q <= 1 "
             "(default 0.99; 1.0: no clamping)")  # fmt: skip
    add("--no_metadata", action="store_true", help="no ModelSpec metadata (the minimum ss_* keys are written)")
    return p


def extraction_keys(keys: list[str]) -> list[str]:
    """sd-scripts' selection: weights of double / single blocks, no biases and nothing with ``norm``."""
    return [
        k
        for k in keys
        if ("single_block" in k or "double_block" in k)
        and ".bias" not in k
        and "norm" not in k
        and k.endswith(".weight")
    ]


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for inputs of any size."""
    flat = values.flatten().float().sort().values
    position = q * (flat.numel() - 1)
    low = int(position)
    high = min(low + 1, flat.numel() - 1)
    return flat[low] + (flat[high] - flat[low]) * (position - low)


def extract_module(delta: Tensor, dim: int, clamp_quantile: float) -> tuple[Tensor, Tensor]:
    """(up, down) of rank ``min(dim, out, in)`` approximating ``delta`` (fp32), clamped as sd-scripts."""
    out_dim, in_dim = delta.shape
    rank = min(dim, in_dim, out_dim)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    up = U[:, :rank] * S[:rank]
    down = Vh[:rank]
    if clamp_quantile < 1.0:
        bound = quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    return up, down


def _model_type(keys: list[str]) -> str:
    if any(k.startswith("distilled_guidance_layer.") for k in keys):
        return "chroma"
    return "dev" if "guidance_in.in_layer.weight" in keys else "schnell"


class DitWeights:
    """A DiT file's tensors under BFL's names (no ``model.diffusion_model.`` prefix), read as needed, in fp32.

    A BFL file is read a tensor at a time, a weight of ComfyUI's scaled fp8 times its ``scale_weight``;
    a diffusers file a block at a time, converted by :func:`diffusers_to_bfl` (q, k, v fused, the
    final modulation's halves swapped), so a model tuned in either layout extracts against the other.
    """

    def __init__(self, path: str, flag: str) -> None:
        self.path = path
        self.header, self.metadata, _ = read_header(path)
        self.reader = SafetensorsReader(path)
        self.diffusers = is_diffusers_state_dict(self.header)
        self.shapes: dict[str, list[int]] = {}
        self.source: dict[str, str] = {}  # BFL key -> its file key (BFL) or its block's key prefix (diffusers)
        self._block: tuple[str, dict[str, Tensor]] = ("", {})
        if not self.diffusers:
            scale_keys = comfy_scale_keys(self.header, self.metadata)
            for key, entry in self.header.items():
                if key not in scale_keys:
                    name = key.removeprefix(FLUX_PREFIX)
                    self.shapes[name], self.source[name] = entry["shape"], key
            return
        meta = {k: torch.empty(e["shape"], device="meta") for k, e in self.header.items()}
        for prefix, keys in self._diffusers_blocks().items():
            try:
                converted = diffusers_to_bfl({k: meta[k] for k in keys})
            except KeyError as e:
                raise UserError(f"{flag} {path}: not a diffusers FLUX.1 / Chroma transformer ({e.args[0]})") from None
            for name, tensor in converted.items():
                self.shapes[name], self.source[name] = list(tensor.shape), prefix

    def _diffusers_blocks(self) -> dict[str, list[str]]:
        blocks: dict[str, list[str]] = {}
        for key in self.header:
            m = _DIFFUSERS_BLOCK.match(key)
            blocks.setdefault(m.group(0) if m else "", []).append(key)
        return blocks

    def get(self, name: str) -> Tensor:
        if not self.diffusers:
            return read_weight(self.reader, self.source[name], self.header, self.metadata)
        prefix = self.source[name]
        if self._block[0] != prefix or not self._block[1]:
            keys = self._diffusers_blocks()[prefix]
            self._block = (prefix, diffusers_to_bfl({k: self.reader.get(k) for k in keys}))
        return self._block[1][name].float()

    def close(self) -> None:
        self.reader.close()


def svd(
    model_org: str,
    model_tuned: str,
    save_to: str,
    dim: int = 4,
    device: str | None = None,
    save_precision: str | None = None,
    clamp_quantile: float = 0.99,
    no_metadata: bool = False,
    mem_eff_safe_open: bool = False,
) -> str:
    """Extracts and saves the LoRA (sd-scripts' function name and parameters); returns ``save_to``."""
    from library.model_hashes import build_modelspec, precalculate_safetensors_hashes
    from library.safetensors_io import save_safetensors

    if dim < 1:
        raise UserError(f"--dim {dim}: the rank must be 1 or more")
    if device is not None:
        device_from_name(device, "--device")
    if not 0.0 < clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile {clamp_quantile}: expected a value in (0, 1]")
    if mem_eff_safe_open:
        logger.warning("--mem_eff_safe_open has no effect here: weights are always read one at a time")
    org = DitWeights(model_org, "--model_org")
    tuned = DitWeights(model_tuned, "--model_tuned")
    try:
        lora_sd = extract_modules(org, tuned, dim, device, clamp_quantile, SAVE_PRECISIONS[save_precision])
    finally:
        org.close(), tuned.close()
    # the rank the modules have: --dim beyond a layer's width gives that width
    rank = max(v.shape[0] for k, v in lora_sd.items() if k.endswith(".lora_down.weight"))

    model_type = _model_type(list(org.shapes))
    metadata = {
        "ss_v2": "False",
        "ss_base_model_version": base_model_version(model_type),
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps({}),
    }
    if not no_metadata:
        metadata.update(build_modelspec(model_type, title=os.path.splitext(os.path.basename(save_to))[0]))
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(lora_sd, metadata)
    os.makedirs(os.path.dirname(os.path.abspath(save_to)), exist_ok=True)
    save_safetensors(lora_sd, save_to, metadata)
    logger.info("LoRA of rank %d with %d modules saved to %s", rank, len(lora_sd) // 3, save_to)
    return save_to


def extract_modules(org: DitWeights, tuned: DitWeights, dim: int, device: str | None, clamp_quantile: float,
                    save_dtype: torch.dtype | None) -> dict[str, Tensor]:  # fmt: skip
    """The LoRA state dict of the block weights that differ between the models."""
    keys = [k for k in extraction_keys(list(org.shapes)) if len(org.shapes[k]) == 2]
    if not keys:
        raise UserError(f"--model_org {org.path}: no double_blocks / single_blocks weights: not a FLUX.1 or Chroma DiT")
    missing = [k for k in keys if k not in tuned.shapes]
    if len(missing) == len(keys):
        raise UserError(f"--model_tuned {tuned.path} shares no block weights with --model_org {org.path}")
    for key in keys:
        if key in tuned.shapes and list(org.shapes[key]) != list(tuned.shapes[key]):
            raise UserError(f"{key} has shape {org.shapes[key]} in {org.path} but {tuned.shapes[key]} in "
                            f"{tuned.path}: not the same architecture")  # fmt: skip
    if missing:
        logger.warning("%d weights of --model_org are not in --model_tuned and are skipped: %s",
                       len(missing), ", ".join(missing[:10]))  # fmt: skip
    lora_sd: dict[str, Tensor] = {}
    unchanged = []
    for key in tqdm([k for k in keys if k in tuned.shapes], desc="extracting"):
        delta = tuned.get(key) - org.get(key)
        if not delta.any():
            unchanged.append(key)
            continue
        up, down = extract_module(delta.to(device) if device else delta, dim, clamp_quantile)
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        lora_sd[f"{name}.lora_up.weight"] = up.to("cpu", save_dtype).contiguous()
        lora_sd[f"{name}.lora_down.weight"] = down.to("cpu", save_dtype).contiguous()
        # fp32 whatever --save_precision: a rank of 301 is 300.0 in bf16
        lora_sd[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    if unchanged:
        logger.info("%d weights are the same in both models and get no LoRA module", len(unchanged))
    left_out = changed_elsewhere(org, tuned, set(keys))
    if left_out:
        logger.warning("%d tensors outside the block Linear weights differ between the models and are not in the "
                       "LoRA: %s", len(left_out), ", ".join(left_out[:10]))  # fmt: skip
    if not lora_sd:
        raise UserError(f"--model_tuned {tuned.path} has the same block weights as --model_org: nothing to extract")
    return lora_sd


def read_weight(reader: SafetensorsReader, key: str, header: dict, metadata: dict | None = None) -> Tensor:
    """A tensor in fp32; a weight of a ComfyUI scaled-fp8 file times its per-tensor scale."""
    tensor = reader.get(key).float()
    scale_key = comfy_weight_scale_key(key, header, metadata) if key.endswith(".weight") else None
    if scale_key is not None:
        tensor = tensor * reader.get(scale_key).float()
    return tensor


def changed_elsewhere(org: DitWeights, tuned: DitWeights, extracted: set[str]) -> list[str]:
    """The tensors of both models, outside ``extracted``, that differ: changes the LoRA cannot carry."""
    changed = []
    for key in sorted(set(org.shapes) & set(tuned.shapes) - extracted):
        a, b = org.get(key), tuned.get(key)
        if a.shape != b.shape or not torch.equal(a, b):
            changed.append(key)
    return changed


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, extracts, and returns the exit status (1 with one ``error:`` line for user errors)."""
    args = setup_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if any(same_file(args.save_to, model) for model in (args.model_org, args.model_tuned)):
            raise UserError(f"--save_to {args.save_to} is one of the models; write the LoRA to another file")
        warn_unless_safetensors_name(args.save_to, "--save_to")
        check_output_file(args.save_to, "--save_to")
        svd(**vars(args))
        return 0
    except (UserError, OSError) as e:  # OSError: a full disk or a failed write, named by its message
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
