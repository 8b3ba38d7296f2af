"""What the training loop does with the network beyond its forward: the hooks sd-scripts calls on it
(``on_epoch_start`` each epoch, ``on_step_start`` each micro-batch), and the parameters that a learning rate of 0
leaves out of the optimizer, which must take no gradients."""

import logging
import sys
import textwrap

import pytest
from torch import nn

import flux_train_network
from library.network_interop import network_hook
from library.training_loop import TrainingLoop
from tests.test_third_party_network import MODULE, NAMED
from tests.training_helpers import base_argv, dataset


class Recorder:
    def __init__(self):
        self.calls = []


def test_a_hook_gets_sd_scripts_arguments_or_the_last_ones_it_declares():
    text_encoders, dit = ["clip", "t5"], nn.Linear(1, 1)

    class SdScripts(Recorder):  # sd-scripts' own networks
        def on_epoch_start(self, text_encoder, unet):
            self.calls.append(("epoch", text_encoder, unet))

        def on_step_start(self, text_encoder, unet):
            self.calls.append(("step", text_encoder, unet))

    class Lycoris(Recorder):
        def on_epoch_start(self, unet):
            self.calls.append(("epoch", unet))

        def on_step_start(self):
            self.calls.append(("step",))

    class Variadic(Recorder):
        def on_step_start(self, *args):
            self.calls.append(("step", *args))

    networks = SdScripts(), Lycoris(), Variadic()
    for network in networks:
        for name in ("on_epoch_start", "on_step_start"):
            network_hook(network, name, text_encoders, dit)()  # Variadic has no on_epoch_start: nothing to call
    assert [n.calls for n in networks] == [
        [("epoch", text_encoders, dit), ("step", text_encoders, dit)],
        [("epoch", dit), ("step",)],
        [("step", text_encoders, dit)],
    ]


HOOKED = MODULE.replace("PREPARE_OPTIMIZER_PARAMS", NAMED + textwrap.indent(textwrap.dedent('''

    def on_epoch_start(self, text_encoder, unet):
        CALLS.append(("epoch", len(text_encoder), type(unet).__name__, self.training))

    def on_step_start(self):
        CALLS.append(("step",))
'''), "    ")) + "\nCALLS = []\n"


def test_the_loop_calls_the_hooks_each_epoch_and_each_micro_batch(tiny_model_files, tmp_path, monkeypatch):
    """A network written for sd-scripts may do its work there (a mask or a direction changed each step): it was
    never called. 2 epochs of 2 images, batch 1, accumulating 2 micro-batches: 2 steps."""
    name = f"hooked_network_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(HOOKED)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = dataset(tmp_path, batch_size=1, num_images=2)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=2, network_train_unet_only=True,
                     gradient_accumulation_steps=2)  # fmt: skip
    argv[argv.index("networks.lora_flux")] = name
    assert flux_train_network.main(argv) == 0
    epoch = ("epoch", 2, "Flux", True)  # (CLIP-L, T5), the DiT, and the network in training mode
    assert sys.modules[name].CALLS == [epoch, ("step",), ("step",), epoch, ("step",), ("step",)]


@pytest.fixture
def gradients_at_each_step(monkeypatch):
    """At each optimizer step: (network parameters holding a gradient, those the optimizer holds)."""
    step, seen = TrainingLoop._optimizer_step, []

    def recording(self):
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        with_grad = {id(p) for p in self.network.parameters() if p.grad is not None}
        seen.append((with_grad, held, sum(1 for _ in self.network.parameters())))
        return step(self)

    monkeypatch.setattr(TrainingLoop, "_optimizer_step", recording)
    return seen


def test_parameters_at_learning_rate_0_take_no_gradients(tiny_model_files, tmp_path, gradients_at_each_step,
                                                         caplog):  # fmt: skip
    """--text_encoder_lr 0 leaves CLIP-L's LoRA out of the optimizer: its gradients were summed step after step,
    never cleared, and counted in --max_grad_norm's clipping of the DiT's."""
    data = dataset(tmp_path, batch_size=1, num_images=2)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=3, text_encoder_lr=0, max_grad_norm=1e-3)
    with caplog.at_level(logging.INFO, logger="library.optimizers"):
        assert flux_train_network.main(argv) == 0
    assert len(gradients_at_each_step) == 3
    for with_grad, held, count in gradients_at_each_step:
        assert with_grad == held  # every trained parameter has its gradient, and nothing else has one
        assert len(held) < count  # CLIP-L's LoRA is there, outside the optimizer
    left_out = count - len(held)
    assert f"{left_out} network parameters are in no optimizer group (learning rate 0): they take no gradients" \
        in caplog.text  # fmt: skip


def test_a_network_without_parameters_left_out_keeps_them_all_trainable(tiny_model_files, tmp_path,
                                                                        gradients_at_each_step, caplog):  # fmt: skip
    data = dataset(tmp_path, batch_size=1, num_images=2)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, text_encoder_lr=1e-4)
    with caplog.at_level(logging.INFO, logger="library.optimizers"):
        assert flux_train_network.main(argv) == 0
    (with_grad, held, count), = gradients_at_each_step
    assert len(held) == count and len(with_grad) == count
    assert "in no optimizer group" not in caplog.text


@pytest.mark.parametrize("module, says", [
    ("networks.oft_flux", "--network_module networks.oft_flux is sd-scripts' OFT for FLUX, which this project does "
                          "not train: it trains LoRAs (--network_module networks.lora_flux)"),
    ("networks.lora", "--network_module networks.lora is sd-scripts' network for Stable Diffusion and SDXL, "
                      "which finds nothing to adapt in FLUX: FLUX.1 and Chroma LoRAs take --network_module "
                      "networks.lora_flux"),
    ("no_such_network_xyz", "--network_module no_such_network_xyz: cannot import it (No module named "
                            "'no_such_network_xyz'); is it installed?"),
])  # fmt: skip
def test_a_network_module_that_cannot_be_imported_is_named_with_what_to_use(tiny_model_files, tmp_path, capsys,
                                                                           module, says):  # fmt: skip
    """kohya_ss writes networks.oft_flux for its "Flux1 OFT" type and networks.lora for "Standard": no package to
    install would help, as the message used to suggest."""
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1)
    argv[argv.index("networks.lora_flux")] = module
    assert flux_train_network.main(argv) == 1
    err = capsys.readouterr().err
    assert says in err
    assert ("is it installed" in err) == (module == "no_such_network_xyz")
    assert not (tmp_path / "out").exists()  # stopped before any work
