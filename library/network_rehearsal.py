"""The LoRA network built once before the models load, on the models as their files describe them.

The network is made after the models have loaded and the caches are built, minutes into a run. What only the
network shows (a --network_weights file that does not fit, network args that leave nothing to train, learning
rates of 0 for every module) would stop the run there. Built first on the meta device, every model and LoRA
tensor a shape without memory, the same build stops the run in seconds; the file's weights are read (a LoRA is
small) and checked, then dropped."""

from __future__ import annotations

import warnings

import torch

from library.network_interop import OWN_NETWORK_MODULES, network_module_name, text_encoders_for
from library.run_logging import quiet_loggers

# what the build logs is said once, when the real network is built
_BUILD_LOGGERS = ("networks", "library.network_interop", "library.optimizers", "train_network")


def models_on_meta(args, dit_params) -> tuple[object, list]:
    """(DiT, [CLIP-L or None, T5]) on the meta device, as ``dit_params`` and the text encoders' file headers
    describe them: what a network can be built on without reading a weight."""
    from library.flux_utils import dit_on_meta
    from library.text_encoders import clip_l_on_meta, t5xxl_on_meta

    return dit_on_meta(dit_params), [clip_l_on_meta(args.clip_l) if args.clip_l else None, t5xxl_on_meta(args.t5xxl)]


def rehearse_network(trainer, args, dit_params) -> None:
    """Builds the network as ``trainer`` will (``build_network``), and its parameter groups, on
    :func:`models_on_meta`. This project's own network module only: a third-party one may not build on the meta
    device."""
    from library.optimizers import trainable_param_groups

    module_name = network_module_name(args)
    if module_name not in OWN_NETWORK_MODULES:
        return
    dit, encoders = models_on_meta(args, dit_params)
    train_unet, train_text_encoder = not args.network_train_text_encoder_only, not args.network_train_unet_only
    with torch.device("meta"), quiet_loggers(*_BUILD_LOGGERS), warnings.catch_warnings():
        # loading the file's tensors into meta parameters checks their names and shapes and copies nothing
        warnings.filterwarnings("ignore", message=r".*meta parameter.*")
        network, train_text_encoder, _ = trainer.build_network(
            args, None, text_encoders_for(module_name, encoders), dit, train_text_encoder, train_unet
        )
        trainable_param_groups(network, args, train_unet, train_text_encoder)
