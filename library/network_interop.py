"""How network modules written for sd-scripts (LyCORIS's ``lycoris.kohya``, ...) see the text encoders.

They name a module by its path in the model they are given and walk every model in the list. Two
things differ from what they were written against: transformers 5's ``CLIPTextModel`` has no
``text_model`` level, so CLIP-L's Linears would be named ``lora_te1_encoder_layers_...`` instead of
sd-scripts' ``lora_te1_text_model_encoder_layers_...`` (names every loader and this project's tools
match); and Chroma has no CLIP-L, where sd-scripts passes a dummy module rather than None. This
project's own ``networks.lora_flux`` handles both itself and gets the models as they are.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable

from torch import nn

from library.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_MODULE = "networks.lora_flux"
OWN_NETWORK_MODULES = (DEFAULT_NETWORK_MODULE,)


# sd-scripts' network modules that this project does not have: GUIs write them (kohya_ss's LoRA types "Flux1 OFT",
# "Standard", "LoRA-FA", "Kohya DyLoRA"), where "cannot import it; is it installed?" would send the user looking
# for a package that does not exist. Module name -> the model family it is for (None: FLUX's OFT).
SD_SCRIPTS_MODULES_NOT_HERE = {
    "networks.oft_flux": None,
    "networks.lora": "Stable Diffusion and SDXL",
    "networks.lora_fa": "Stable Diffusion and SDXL",
    "networks.dylora": "Stable Diffusion and SDXL",
    "networks.oft": "Stable Diffusion and SDXL",
    "networks.lora_sd3": "SD3",
    "networks.lora_lumina": "Lumina",
}


def missing_network_module(name: str, error: ImportError) -> str:
    """Why ``--network_module name`` cannot be imported, and what to give instead."""
    if name not in SD_SCRIPTS_MODULES_NOT_HERE:
        return f"--network_module {name}: cannot import it ({error}); is it installed?"
    family = SD_SCRIPTS_MODULES_NOT_HERE[name]
    if family is None:
        return (f"--network_module {name} is sd-scripts' OFT for FLUX, which this project does not train: it trains "
                "LoRAs (--network_module networks.lora_flux). LyCORIS (pip install lycoris-lora, --network_module "
                "lycoris.kohya) has OFT algorithms of its own")  # fmt: skip
    return (f"--network_module {name} is sd-scripts' network for {family}, which finds nothing to adapt in FLUX: "
            "FLUX.1 and Chroma LoRAs take --network_module networks.lora_flux (in kohya_ss, LoRA type 'Flux1')")


def network_module_name(args) -> str:
    """``--network_module``, or this project's LoRA when it is left out."""
    return getattr(args, "network_module", None) or DEFAULT_NETWORK_MODULE


class CLIPFileLayout(nn.Module):
    """CLIP-L under a ``text_model`` attribute: module paths (and LoRA names) as in CLIP-L files. It holds the
    same modules, so a LoRA hooked into them acts on the model itself."""

    def __init__(self, clip_l: nn.Module):
        super().__init__()
        self.text_model = clip_l


class NoTextEncoder(nn.Module):
    """A text encoder the model does not have (Chroma's CLIP-L, a freed T5): no modules to adapt."""


def text_encoders_for(network_module_name: str, text_encoders: list) -> list:
    """The text-encoder list as ``network_module_name`` should receive it (see the module docstring)."""
    if network_module_name in OWN_NETWORK_MODULES:
        return text_encoders
    adapted = []
    for index, encoder in enumerate(text_encoders):
        if encoder is None:
            adapted.append(NoTextEncoder())
        elif index == 0 and not hasattr(encoder, "text_model"):
            adapted.append(CLIPFileLayout(encoder))
        else:
            adapted.append(encoder)
    return adapted


def network_hook(network, name: str, text_encoders: list, dit: nn.Module) -> Callable[[], None]:
    """The network's ``on_epoch_start`` / ``on_step_start`` as sd-scripts calls them, ``(text_encoder, unet)``,
    bound to their arguments; a no-op for a network without it. A hook declaring fewer parameters gets the last
    ones (LyCORIS: ``on_epoch_start(unet)``, ``on_step_start()``), which sd-scripts' call would refuse."""
    hook = getattr(network, name, None)
    if hook is None:
        return lambda: None
    targets = (text_encoders, dit)
    try:
        parameters = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as sd-scripts does
        return lambda: hook(*targets)
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return lambda: hook(*targets)
    takes = sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    given = targets[len(targets) - min(takes, len(targets)) :]
    return lambda: hook(*given)


def report_loaded_weights(path: str | os.PathLike, info) -> None:
    """What a third-party network's ``load_weights`` left out (torch's missing/unexpected keys, when it returns
    them): a file none of whose weights fit stops the run, which would otherwise start from scratch in silence
    (a LoRA file given to a LoKr network, say); a partial fit warns."""
    if isinstance(info, dict):  # LyCORIS: {"missing keys": [...], "unexpected keys": [...]}, empty lists left out
        unexpected, missing = list(info.get("unexpected keys", [])), list(info.get("missing keys", []))
    elif hasattr(info, "unexpected_keys") and hasattr(info, "missing_keys"):  # torch's load_state_dict result
        unexpected, missing = list(info.unexpected_keys), list(info.missing_keys)
    else:
        return
    in_file = _file_keys(path)
    ignored = set(unexpected)
    # alphas are scalars any module kind has under the same name: a file of another kind "fits" by its alphas alone
    fitted = None if in_file is None else [k for k in in_file if k not in ignored and not k.endswith(".alpha")]
    if unexpected and fitted == []:
        raise UserError(f"--network_weights {path}: none of its weights belongs to this network (e.g. "
                        f"{unexpected[0]}); give a file trained with the same --network_module and "
                        "--network_args")  # fmt: skip
    if unexpected:
        logger.warning("--network_weights %s: %d weights have no module here and are ignored (e.g. %s)", path,
                       len(unexpected), unexpected[0])  # fmt: skip
    if missing:
        logger.warning("--network_weights %s: %d weights of this network are not in the file and start untrained "
                       "(e.g. %s)", path, len(missing), missing[0])  # fmt: skip


def _file_keys(path: str | os.PathLike) -> list[str] | None:
    """The weight names of a LoRA file (its header only for ``.safetensors``); None if it cannot be read so."""
    from library.safetensors_io import read_keys
    from networks.lora_flux_files import read_lora_file

    try:
        return read_keys(path) if str(path).endswith(".safetensors") else list(read_lora_file(path)[0])
    except CheckpointError:  # the module loaded it its own way; the names only sharpen the message
        return None
