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


TEXT_ENCODER_MODULE = textwrap.dedent('''
    import torch
    from safetensors.torch import save_file
    from torch import nn

    class Walker(nn.Module):
        """Names every Linear of every model it is given by its path, as LyCORIS does."""
        def __init__(self, text_encoders, unet):
            super().__init__()
            self.names = []
            for prefix, model in zip(("lora_te1", "lora_te2"), text_encoders):
                self.names += [f"{prefix}_{n}".replace(".", "_") for n, m in model.named_modules()
                               if isinstance(m, nn.Linear)]
            self.weight = nn.Parameter(torch.zeros(1))

        def apply_to(self, text_encoders, unet, apply_text_encoder=True, apply_unet=True):
            linear = next(m for m in unet.modules() if isinstance(m, nn.Linear))  # something to train
            original = linear.forward
            linear.forward = lambda x: original(x) + self.weight * 0.0

        def set_multiplier(self, multiplier):
            pass

        def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
            return [{"params": [self.weight], "lr": default_lr}]

        def save_weights(self, file, dtype, metadata):
            save_file({name + ".w": torch.zeros(1) for name in self.names} or {"none": torch.zeros(1)}, file, metadata)

    def create_network(multiplier, network_dim, network_alpha, vae, text_encoders, unet, **kwargs):
        return Walker(text_encoders, unet)
''')


@pytest.mark.parametrize("model_type", ["flux", "chroma"])
def test_a_module_walking_the_text_encoders_gets_them_as_sd_scripts_gives_them(tiny_model_files, tmp_path,
                                                                             monkeypatch, model_type):  # fmt: skip
    """CLIP-L's Linears named as in CLIP-L files (transformers 5's CLIPTextModel has no text_model level), and a
    stand-in where the model has no CLIP-L (Chroma), as sd-scripts passes one: LyCORIS walks every encoder."""
    name = f"walker_network_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(TEXT_ENCODER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(out), model_type=model_type, steps=1)
    argv[argv.index("networks.lora_flux")] = name
    assert flux_train_network.main(argv) == 0
    names = {k.rsplit(".", 1)[0] for k in load_safetensors(os.path.join(str(out), "lora.safetensors"))}
    clip = {n for n in names if n.startswith("lora_te1_")}
    if model_type == "flux":
        assert clip and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in clip)
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in clip
    else:
        assert not clip  # no CLIP-L, and nothing to walk in its place


def test_diff_output_preservation_needs_a_network_that_can_be_switched_off(tiny_model_files, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    name = f"old_style_network_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(MODULE.replace("PREPARE_OPTIMIZER_PARAMS", OLDEST))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = dataset(tmp_path)
    toml = tmp_path / "dop.toml"
    toml.write_text(f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                    f"image_dir = '{data.image_dir}'\ncustom_attributes = {{ diff_output_preservation = true }}\n")
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, network_train_unet_only=True,
                     dataset_config=str(toml))  # fmt: skip
    argv[argv.index("networks.lora_flux")] = name
    assert flux_train_network.main(argv) == 1
    assert "diff_output_preservation needs a network that can be switched off (set_multiplier)" in \
        capsys.readouterr().err  # fmt: skip


@pytest.mark.parametrize("network_args", [["algo=lokr"], ["algo=lokr", "bypass_mode=False"]])
def test_lycoris_with_fp8_base_weights_asks_for_bypass_mode(tiny_model_files, tmp_path, capsys, network_args):
    # LyCORIS computes with the base weight itself unless in bypass mode; it turns that on for its own Fp8Linear only
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1, fp8_base=True,
                     mixed_precision="bf16", network_args=network_args)  # fmt: skip
    argv[argv.index("networks.lora_flux")] = "lycoris.kohya"
    assert flux_train_network.main(argv) == 1
    assert "with fp8 base weights needs LyCORIS's bypass mode: add bypass_mode=True to --network_args" in \
        capsys.readouterr().err  # fmt: skip


def test_fp8_base_weights_without_network_module_train_this_projects_lora(tiny_model_files, tmp_path):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1, fp8_base=True,
                     mixed_precision="bf16", network_train_unet_only=True)  # fmt: skip
    i = argv.index("--network_module")
    del argv[i : i + 2]  # left out: networks.lora_flux
    assert flux_train_network.main(argv) == 0
    assert load_safetensors(os.path.join(str(tmp_path / "out"), "lora.safetensors"))


def test_weights_that_fit_no_module_of_a_third_party_network_stop_the_run(tmp_path, caplog):
    from types import SimpleNamespace

    from library.errors import UserError
    from library.network_interop import report_loaded_weights
    from library.safetensors_io import save_safetensors

    path = str(tmp_path / "lora.safetensors")
    save_safetensors({"lora_unet_a.lora_down.weight": torch.zeros(1), "lora_unet_a.alpha": torch.zeros(1)}, path)
    nothing = SimpleNamespace(unexpected_keys=["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"],
                              missing_keys=["lora_unet_a.lokr_w1"])  # fmt: skip
    with pytest.raises(UserError, match=r"--network_weights .*lora\.safetensors: none of its weights belongs"):
        report_loaded_weights(path, nothing)
    with caplog.at_level("WARNING"):
        report_loaded_weights(path, SimpleNamespace(unexpected_keys=["lora_unet_a.alpha"], missing_keys=[]))
    assert "1 weights have no module here and are ignored (e.g. lora_unet_a.alpha)" in caplog.text
    # LyCORIS returns a dict, each list left out when empty; a .pt file counts its keys too
    lycoris = {"unexpected keys": ["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"]}
    with pytest.raises(UserError, match="none of its weights belongs"):
        report_loaded_weights(path, lycoris)
    torch.save({"lora_unet_a.alpha": torch.zeros(1)}, tmp_path / "lora.pt")
    with pytest.raises(UserError, match=r"lora\.pt: none of its weights belongs"):
        report_loaded_weights(str(tmp_path / "lora.pt"), {"unexpected keys": ["lora_unet_a.alpha"]})
    # a LoRA file given to a LoKr network: only the alphas, which every module kind has, find a place
    with pytest.raises(UserError, match="none of its weights belongs"):
        report_loaded_weights(path, {"unexpected keys": ["lora_unet_a.lora_down.weight"],
                                     "missing keys": ["lora_unet_a.lokr_w1"]})  # fmt: skip
    report_loaded_weights(path, {})  # everything fitted
    report_loaded_weights(path, None)  # a module that returns nothing
