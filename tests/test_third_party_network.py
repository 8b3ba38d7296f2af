"""A network module written to sd-scripts' older interface, as LyCORIS's ``lycoris.kohya`` is: it finds
its targets by the blocks' class names, gives its parameter groups through
``prepare_optimizer_params(text_encoder_lr, unet_lr)`` without names, and writes its own file. The
trainer drives it like its own network. (LyCORIS itself, 4.1.3, trained LoRA, LoKr and LoHa
through this path when installed by hand; it is not a dependency of this project.)"""

import os
import textwrap

import pytest
import torch

import flux_train_network
from library.safetensors_io import load_safetensors
from tests.test_training_launch import scalar_tags
from tests.training_helpers import base_argv, dataset

MODULE = textwrap.dedent('''
    import torch
    from safetensors.torch import save_file
    from torch import nn

    class Adapter(nn.Module):
        def __init__(self, linear, dim):
            super().__init__()
            self.down = nn.Linear(linear.in_features, dim, bias=False)
            self.up = nn.Linear(dim, linear.out_features, bias=False)
            nn.init.zeros_(self.up.weight)
            self.org_forward = linear.forward
            linear.forward = self.forward

        def forward(self, x):
            return self.org_forward(x) + self.up(self.down(x))

    class OldStyleNetwork(nn.Module):
        def __init__(self, unet, dim):
            super().__init__()
            self.dim = dim
            self.targets = {
                f"lora_unet_{name}_{child_name}".replace(".", "_"): child
                for name, module in unet.named_modules()
                if type(module).__name__ in ("DoubleStreamBlock", "SingleStreamBlock")
                for child_name, child in module.named_modules()
                if isinstance(child, nn.Linear)
            }

        def apply_to(self, text_encoders, unet, apply_text_encoder=True, apply_unet=True):
            self.adapters = nn.ModuleDict({name: Adapter(linear, self.dim) for name, linear in self.targets.items()})

        PREPARE_OPTIMIZER_PARAMS

        def save_weights(self, file, dtype, metadata):
            save_file({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in self.state_dict().items()},
                      file, metadata)

    def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
        return OldStyleNetwork(unet, network_dim or 4)
''')


OLDEST = """def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
            return [{"params": list(self.adapters.parameters()), "lr": unet_lr}]"""
NAMED = """def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
            return [{"params": list(self.adapters.parameters()), "lr": unet_lr or default_lr}], ["unet"]"""


@pytest.mark.parametrize("prepare, logged", [(OLDEST, "lr/group0"), (NAMED, "lr/unet")], ids=["two_args", "named"])
def test_an_older_interface_network_trains_and_saves(tiny_model_files, tmp_path, monkeypatch, prepare, logged):
    name = f"old_style_network_{tmp_path.name}"  # a module name of its own: imports are cached per name
    (tmp_path / f"{name}.py").write_text(MODULE.replace("PREPARE_OPTIMIZER_PARAMS", prepare))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = dataset(tmp_path)
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, data, str(out), steps=2, network_train_unet_only=True, unet_lr=1e-3,
                     logging_dir=str(tmp_path / "logs"))  # fmt: skip
    argv[argv.index("networks.lora_flux")] = name
    assert flux_train_network.main(argv) == 0
    weights = load_safetensors(os.path.join(str(out), "lora.safetensors"))
    # 2 double blocks of 10 Linears and 2 single blocks of 3, a down and an up weight each
    assert len(weights) == 2 * (2 * 10 + 2 * 3)
    ups = [k for k in weights if k.endswith("up.weight")]
    assert any(weights[k].abs().sum() > 0 for k in ups)  # trained: the up weights start at zero
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert logged in scalar_tags(str(tmp_path / "logs"))  # unnamed groups are logged by position
