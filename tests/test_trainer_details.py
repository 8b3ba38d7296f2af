"""Details of the trainer that the broader tests leave open: run length and step counting, trigger
schedules (validation, samples, saves), the loss values that are logged, the inputs ``batch_loss`` gives
the DiT, and the optimizer / preflight helpers."""

from __future__ import annotations

import argparse
import logging
import os
import types
from argparse import Namespace

import pytest
import torch

import flux_train_network
import train_network
from library import run_start
from library.errors import UserError
from library.optimizers import get_optimizer, is_dadapt_or_prodigy, network_param_groups
from library.preflight import check_learning_rates
from library.safetensors_io import read_metadata
from tests.training_helpers import base_argv, dataset, logged_scalars

# ---- train_network helpers ---------------------------------------------------------------------


def ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_run_length_counts_whole_epochs_or_the_given_steps():
    assert run_start.run_length(ns(max_train_epochs=3, max_train_steps=1600), 7) == 21
    assert run_start.run_length(ns(max_train_epochs=None, max_train_steps=10), 7) == 10


def test_initial_epoch_is_one_based_and_initial_step_wins():
    def start(**kw):
        base = dict(initial_step=None, initial_epoch=None, max_train_steps=20, skip_until_initial_step=False,
                    resume=None)  # fmt: skip
        return run_start.initial_step(ns(**(base | kw)), 4)

    assert start() is None
    assert start(initial_epoch=1) == 0
    assert start(initial_epoch=3) == 8  # two whole epochs of 4 steps done
    assert start(initial_step=5, initial_epoch=3) == 5
    assert start(initial_step=19) == 19  # the last step of the run can still be trained
    with pytest.raises(UserError, match="outside 0..19"):
        start(initial_step=20)


def test_network_args_split_on_the_first_equals_sign_and_are_stripped():
    assert train_network.parse_network_args([" a = 1 ", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    assert train_network.parse_network_args(None) == {}
    with pytest.raises(UserError, match="expected key=value"):
        train_network.parse_network_args(["novalue"])


def test_recorded_network_args_append_the_dropout_except_with_dim_from_weights():
    record = train_network.NetworkTrainer.recorded_network_args
    assert record(ns(network_args=None, network_dropout=0.1, dim_from_weights=False)) is None
    assert record(ns(network_args=["a=1"], network_dropout=0.1, dim_from_weights=False)) == {"a": "1", "dropout": 0.1}
    assert record(ns(network_args=["dropout=0.3"], network_dropout=0.1, dim_from_weights=False)) == {"dropout": "0.3"}
    assert record(ns(network_args=["a=1"], network_dropout=0.1, dim_from_weights=True)) == {"a": "1"}


def test_batches_of_process_cover_every_batch_and_wrap_to_equal_counts():
    parts = [train_network.batches_of_process(5, i, 2) for i in range(2)]
    assert parts == [[0, 2, 4], [1, 3, 0]]
    assert train_network.batches_of_process(4, 0, 1) == [0, 1, 2, 3]


# ---- optimizers ----------------------------------------------------------------------------------


def opt_args(**kw) -> argparse.Namespace:
    base = dict(optimizer_type="", optimizer_args=None, learning_rate=1e-3, use_8bit_adam=False,
                use_lion_optimizer=False, max_grad_norm=1.0, lr_scheduler="constant", unet_lr=None,
                text_encoder_lr=None)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def test_an_older_network_interface_gets_the_first_text_encoder_rate():
    seen = []

    class Old:
        def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
            seen.append((text_encoder_lr, unet_lr, default_lr))
            return [{"params": [], "lr": 1.0}, {"params": [], "lr": 2.0}]

    class Oldest:
        def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
            seen.append((text_encoder_lr, unet_lr))
            return [{"params": []}], ["unet"]

    params, names = network_param_groups(Old(), opt_args(text_encoder_lr=[5e-5, 7e-5], unet_lr=2e-4))
    assert seen == [(5e-5, 2e-4, 1e-3)] and names == ["group0", "group1"] and len(params) == 2
    assert network_param_groups(Oldest(), opt_args(text_encoder_lr=[])) == ([{"params": []}], ["unet"])
    assert seen[-1] == (None, None)


def test_names_not_matching_the_groups_are_replaced():
    class Net:
        def prepare_optimizer_params_with_multiple_te_lrs(self, te, unet, default):
            return [{"params": []}, {"params": []}], ["only one"]

    assert network_param_groups(Net(), opt_args())[1] == ["group0", "group1"]


def test_step_size_adapting_optimizers_are_recognised():
    for name in ("DAdaptAdam", "dadaptation", "Prodigy", "prodigyplus.ProdigyPlusScheduleFree",
                 "prodigyopt.Prodigy"):  # fmt: skip
        assert is_dadapt_or_prodigy(name), name
    for name in ("AdamW", "AdamWScheduleFree", "Lion"):
        assert not is_dadapt_or_prodigy(name), name


def test_prodigy_learning_rate_warnings_read_the_rate_it_trains_at(caplog):
    params = [torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))]
    groups = [{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 1.0}]
    with caplog.at_level(logging.WARNING):
        get_optimizer(opt_args(optimizer_type="Prodigy", learning_rate=0.01), groups)
    assert "every group trains at 1.0" in caplog.text and "is low" not in caplog.text  # (the largest, not the first)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        get_optimizer(opt_args(optimizer_type="Prodigy", learning_rate=0.1), [torch.nn.Parameter(torch.zeros(2))])
    assert "learning rate 0.1 is low" in caplog.text  # sd-scripts warns at 0.1 and below


# ---- preflight -----------------------------------------------------------------------------------


def lr_args(**kw) -> argparse.Namespace:
    base = dict(learning_rate=1e-4, unet_lr=None, text_encoder_lr=None, network_train_unet_only=False,
                network_train_text_encoder_only=False)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def test_learning_rate_checks_count_only_the_parts_that_train():
    check_learning_rates(lr_args(learning_rate=0.0, unet_lr=1e-4))  # the DiT trains
    check_learning_rates(lr_args(learning_rate=0.0, text_encoder_lr=[1e-4]))  # the text encoders train
    check_learning_rates(lr_args(unet_lr=0.0))  # the text encoders train at --learning_rate
    # the text encoders alone, and only T5's (second) rate is non-zero: it trains
    check_learning_rates(lr_args(network_train_text_encoder_only=True, text_encoder_lr=[0.0, 1e-4]), [0, 1])
    with pytest.raises(UserError, match="nothing to train"):  # CLIP-L only, at 0
        check_learning_rates(lr_args(network_train_text_encoder_only=True, text_encoder_lr=[0.0, 1e-4]), [0])
    with pytest.raises(UserError, match="nothing to train"):  # T5 only, whose rate is the single one given: 0
        check_learning_rates(lr_args(network_train_text_encoder_only=True, text_encoder_lr=[0.0]), [1])
    with pytest.raises(UserError, match="nothing to train"):  # the DiT's 0 counts though the encoders' is not
        check_learning_rates(lr_args(network_train_unet_only=True, unet_lr=0.0, text_encoder_lr=[1e-4]))
    with pytest.raises(UserError, match="--unet_lr -1e-05: a learning rate cannot be negative"):
        check_learning_rates(lr_args(unet_lr=-1e-5))


# ---- batch_loss with a stand-in DiT --------------------------------------------------------------


class RecordingDiT:
    """Records what batch_loss gives the DiT and predicts a velocity of zero."""

    def __init__(self, guidance_embed: bool):
        self.params = types.SimpleNamespace(guidance_embed=guidance_embed)
        self.calls, self.network, self.multipliers = [], None, []

    def __call__(self, **kw):
        self.calls.append(kw)
        if self.network is not None:
            self.multipliers.append(self.network.multiplier)
        return torch.zeros(kw["img"].shape, dtype=torch.float32)


def loss_setup(models, tmp_path, model_type="flux", weight_dtype=torch.float32, **flags):
    trainer = flux_train_network.FluxNetworkTrainer()
    data = dataset(tmp_path)
    args = trainer.parser.parse_args(base_argv(models, data, str(tmp_path / "out"), model_type=model_type, **flags))
    trainer.check_args(args)
    dit = RecordingDiT(guidance_embed=model_type == "flux")
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu",
                                                                                                  enabled=False))
    ctx = types.SimpleNamespace(args=args, accelerator=accelerator, weight_dtype=weight_dtype, seed=args.seed,
                                models=types.SimpleNamespace(dit=dit), network=None, train_text_encoder=False)
    return trainer, ctx, dit


def a_batch(b=1, h=8, w=4, **extra):
    g = torch.Generator().manual_seed(3)
    cached = {"l_pooled": torch.randn(b, 8, generator=g), "t5_out": torch.randn(b, 5, 8, generator=g),
              "txt_ids": torch.zeros(b, 5, 3), "t5_attn_mask": torch.ones(b, 5, dtype=torch.long)}  # fmt: skip
    batch = {"latents": torch.randn(b, 16, h, w, generator=g), "captions": ["x"] * b, "text_encoder_outputs": cached,
             "image_paths": [f"{i}.png" for i in range(b)]}  # fmt: skip
    return batch | extra


def test_the_dit_gets_row_major_image_ids_and_fp32_guidance(tiny_model_files, tmp_path):
    trainer, ctx, dit = loss_setup(tiny_model_files, tmp_path, weight_dtype=torch.bfloat16, guidance_scale=2.5)
    trainer.batch_loss(ctx, a_batch(b=2, h=8, w=4), 0, [0, 1])
    (call,) = dit.calls
    assert call["img"].shape == (2, 8, 64) and call["img"].dtype == torch.bfloat16
    ids = call["img_ids"]
    assert ids.dtype == torch.float32 and ids.shape == (2, 8, 3)
    tokens = torch.arange(8)
    assert torch.equal(ids[1, :, 1], (tokens // 2).float()) and torch.equal(ids[1, :, 2], (tokens % 2).float())
    assert call["guidance"].dtype == torch.float32 and call["guidance"].tolist() == [2.5, 2.5]
    assert call["txt_attention_mask"] is None  # no --apply_t5_attn_mask


def test_chroma_passes_guidance_to_its_approximator(tiny_model_files, tmp_path):
    trainer, ctx, dit = loss_setup(tiny_model_files, tmp_path, model_type="chroma")
    trainer.batch_loss(ctx, a_batch(), 0, [0])
    assert dit.calls[0]["guidance"].tolist() == [0.0] and dit.calls[0]["txt_attention_mask"] is not None


def test_schnell_gets_no_guidance(tiny_model_files, tmp_path):
    trainer, ctx, dit = loss_setup(tiny_model_files, tmp_path, model_type="schnell")
    dit.params.guidance_embed = False
    trainer.batch_loss(ctx, a_batch(), 0, [0])
    assert dit.calls[0]["guidance"] is None


def validation_input(models, tmp_path, sigma=0.4, **flags):
    trainer, ctx, dit = loss_setup(models, tmp_path, **flags)
    trainer.batch_loss(ctx, a_batch(), 0, [11], fixed_sigma=sigma)
    trainer.batch_loss(ctx, a_batch(), 0, [11])
    return [c["img"] for c in dit.calls], dit.calls[0]["timesteps"]


def test_validation_noise_follows_validation_seed_and_has_no_input_perturbation(tiny_model_files, tmp_path):
    (plain_val, plain_train), timesteps = validation_input(tiny_model_files, tmp_path / "a")
    assert timesteps.tolist() == [pytest.approx(0.4)]
    (same_val, _), _ = validation_input(tiny_model_files, tmp_path / "b", validation_seed=7)  # = --seed
    (other_val, other_train), _ = validation_input(tiny_model_files, tmp_path / "c", validation_seed=8)
    assert torch.equal(same_val, plain_val) and not torch.equal(other_val, plain_val)
    assert torch.equal(other_train, plain_train)  # the training noise follows --seed only
    (gamma_val, gamma_train), _ = validation_input(tiny_model_files, tmp_path / "d", ip_noise_gamma=0.5)
    assert torch.equal(gamma_val, plain_val) and not torch.equal(gamma_train, plain_train)


def test_alpha_masks_weight_the_loss_at_latent_size_by_area(tiny_model_files, tmp_path):
    trainer, ctx, dit = loss_setup(tiny_model_files, tmp_path)
    batch = a_batch(h=4, w=4)
    plain = trainer.batch_loss(ctx, batch, 0, [0])
    # a one-pixel checkerboard at image size: every 8x8 latent cell is half covered
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float()[None]
    masked = trainer.batch_loss(ctx, batch | {"alpha_masks": checker}, 0, [0])
    assert torch.equal(dit.calls[0]["img"], dit.calls[1]["img"])
    assert masked.item() == pytest.approx(0.5 * plain.item(), rel=1e-5)
    half = ((torch.arange(32)[None, :] < 16).float()[None].expand(1, 32, 32))  # the left half of the image
    left = trainer.batch_loss(ctx, batch | {"alpha_masks": half}, 0, [0])
    # the prediction is 0, so the loss is the mean of the target's square: the halves add up to the whole
    right = trainer.batch_loss(ctx, batch | {"alpha_masks": 1 - half}, 0, [0])
    assert (left + right).item() == pytest.approx(plain.item(), rel=1e-5) and left.item() != right.item()


def test_a_dataset_network_multiplier_is_set_for_its_batches_and_put_back():
    from library.training_loop import dataset_multiplier

    events = []

    class Net:
        def set_multiplier(self, m):
            events.append(m)

    for multipliers in (torch.tensor([0.5, 0.5]), torch.tensor([1.0]), None):
        with dataset_multiplier(Net(), {"network_multipliers": multipliers}):
            events.append("inside")
    assert events == [0.5, "inside", 1.0, "inside", "inside"]


# ---- training runs -------------------------------------------------------------------------------


def _train_at_multiplier(models, tmp_path, multiplier: float, **flags) -> dict:
    from library.safetensors_io import load_safetensors

    data = dataset(tmp_path)
    with open(data.dataset_toml, encoding="utf-8") as f:
        config = f.read().replace("batch_size = 2\n", f"batch_size = 2\nnetwork_multiplier = {multiplier}\n")
    with open(data.dataset_toml, "w", encoding="utf-8") as f:
        f.write(config)
    out = str(tmp_path / "out")
    argv = base_argv(models, data, out, steps=2, learning_rate=1e-2, optimizer_args=["weight_decay=0"], **flags)
    assert flux_train_network.main(argv) == 0
    return load_safetensors(os.path.join(out, "lora.safetensors"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_dataset_network_multiplier_of_0_holds_the_whole_lora_back(tiny_model_files, tmp_path, checkpointing):
    """The multiplier is the whole network's during its batches (CLIP-L's LoRA, trained live, was encoded at 1.0),
    and through their backward (checkpointed blocks ran again at 1.0: a CheckpointError, or gradients)."""
    weights = _train_at_multiplier(tiny_model_files, tmp_path, 0.0, gradient_checkpointing=checkpointing)
    ups = {k: v for k, v in weights.items() if k.endswith("lora_up.weight")}
    assert any(k.startswith("lora_te1_") for k in ups) and any(k.startswith("lora_unet_") for k in ups)
    assert all(not v.any() for v in ups.values())  # lora_up starts at zero, and no gradient reached any


def test_a_dataset_network_multiplier_trains_the_same_with_gradient_checkpointing(tiny_model_files, tmp_path):
    plain = _train_at_multiplier(tiny_model_files, tmp_path / "plain", 0.5)
    checkpointed = _train_at_multiplier(tiny_model_files, tmp_path / "checkpointed", 0.5, gradient_checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for key, value in plain.items():  # (the backward ran at 1.0: up to twice the update)
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def record_batch_losses(monkeypatch):
    """Each batch_loss call: (step, fixed sigma, image paths, weighted per-sample losses)."""
    calls = []
    original = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, batch, step, sample_indices, fixed_sigma=None):
        losses = original(self, ctx, batch, step, sample_indices, fixed_sigma=fixed_sigma)
        weighted = (losses.detach().float() * batch["loss_weights"].to(losses.device)).tolist()
        calls.append((step, fixed_sigma, list(batch["image_paths"]), weighted))
        return losses

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    return calls


def test_logged_losses_schedules_and_epoch_saves_of_a_run(tiny_model_files, tmp_path, monkeypatch):
    """3 training images of batch 1 with accumulation 2: epochs of 2 steps, the second a single batch.
    5 steps are 3 epochs, the last one cut short."""
    calls = record_batch_losses(monkeypatch)
    samples = []
    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "sample_images",
                        lambda self, ctx, epoch, step: samples.append((epoch, step)))
    data = dataset(tmp_path, batch_size=1, validation_split=0.5)
    out, logs = str(tmp_path / "out"), tmp_path / "logs"
    argv = base_argv(tiny_model_files, data, out, steps=5, gradient_accumulation_steps=2, cache_latents=True,
                     network_train_unet_only=True, log_with="tensorboard", logging_dir=str(logs),
                     validate_every_n_steps=3, validate_every_n_epochs=2, max_validation_steps=2,
                     save_n_epoch_ratio=2, sample_prompts=data.sample_prompts, sample_every_n_epochs=2,
                     sample_at_first=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    scalars = logged_scalars(logs)
    train = [c for c in calls if c[1] is None]
    assert [c[0] for c in train] == [0, 0, 1, 2, 2, 3, 4, 4]  # steps 2 and 4 end an epoch on its odd batch
    current = scalars["loss/current"]
    assert sorted(current) == [1, 2, 3, 4, 5]
    for step in range(5):
        micro = [sum(c[3]) / len(c[3]) for c in train if c[0] == step]
        assert current[step + 1] == pytest.approx(sum(micro) / len(micro), rel=1e-5), step
    epoch_average = scalars["loss/epoch_average"]
    assert sorted(epoch_average) == [2, 4, 5]
    for last, steps in ((2, [1, 2]), (4, [3, 4]), (5, [5])):
        assert epoch_average[last] == pytest.approx(sum(current[s] for s in steps) / len(steps), rel=1e-5)
    # validation: every 3rd step and every 2nd epoch (its end is step 4), over 2 of the 3 batches
    assert sorted(scalars["loss/validation/step_average"]) == [3]
    assert sorted(scalars["loss/validation/epoch_average"]) == [4]
    validations = [c for c in calls if c[1] is not None]
    assert len(validations) == 2 * 2 * 4  # 2 passes of 2 batches at 4 noise levels
    first = [loss for c in validations[:8] for loss in c[3]]
    assert scalars["loss/validation/step_average"][3] == pytest.approx(sum(first) / len(first), rel=1e-5)
    divergence = scalars["loss/validation/epoch_divergence"][4]
    assert divergence == pytest.approx(scalars["loss/validation/epoch_average"][4] - scalars["loss/average"][4],
                                       rel=1e-4, abs=1e-6)  # fmt: skip
    assert samples == [(0, 0), (2, 4)]
    # --save_n_epoch_ratio 2 of 3 epochs: every floor(3 / 2) = 1 epoch; the last epoch is the final file
    assert sorted(os.listdir(out)) == ["lora-000001.safetensors", "lora-000002.safetensors", "lora.safetensors"]
    final = read_metadata(os.path.join(out, "lora.safetensors"))
    assert (final["ss_steps"], final["ss_epoch"]) == ("5", "3")
    second = read_metadata(os.path.join(out, "lora-000002.safetensors"))
    assert (second["ss_steps"], second["ss_epoch"]) == ("4", "2")


def test_skipping_to_an_initial_step_trains_what_the_full_run_trained_from_there(tiny_model_files, tmp_path,
                                                                                  monkeypatch):
    """With accumulation, the skipped batches are the steps times the accumulation: the run from step 4
    trains the same micro-batches, at the same steps, as the full run did from there."""
    data = dataset(tmp_path, batch_size=1)
    runs = []
    for name, flags in (("full", {}), ("skip", {"initial_step": 4, "skip_until_initial_step": True})):
        calls = record_batch_losses(monkeypatch)
        argv = base_argv(tiny_model_files, data, str(tmp_path / name), steps=6, gradient_accumulation_steps=2,
                         cache_latents=True, network_train_unet_only=True, save_every_n_steps=5, **flags)
        assert flux_train_network.main(argv) == 0
        runs.append([(c[0], c[2]) for c in calls])
    full, skipped = runs
    assert [s for s, _ in full] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert skipped == [c for c in full if c[0] >= 4]
    assert sorted(os.listdir(tmp_path / "skip")) == ["lora-step00000005.safetensors", "lora.safetensors"]


def test_sample_at_first_samples_a_run_that_starts_later_named_by_its_step(tiny_model_files, tmp_path):
    """sd-scripts samples before the loop on resumed runs too; here --sample_at_first did nothing once the run
    started past step 0. The set is named by the step the LoRA is at (sd-scripts names it e000000)."""
    data = dataset(tmp_path, batch_size=1)
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, data, str(out), steps=3, initial_step=2, network_train_unet_only=True,
                     sample_at_first=True, sample_prompts=data.sample_prompts)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    (name,) = os.listdir(out / "sample")
    assert name.startswith("lora_000002_00_") and name.endswith("_42.png")  # the prompt sets --d 42


def test_the_trainer_warns_about_a_timestep_option_its_sampling_never_reads(tiny_model_files, tmp_path, caplog):
    trainer = flux_train_network.FluxNetworkTrainer()
    args = trainer.parser.parse_args(base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"),
                                               sigmoid_scale=2.0))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer.check_args(args)  # the default sigma sampling draws from the density: the scale is not read
    assert caplog.text.count("--sigmoid_scale 2.0 has no effect with --timestep_sampling sigma") == 1


def _check_args(models, tmp_path, **flags):
    trainer = flux_train_network.FluxNetworkTrainer()
    trainer.check_args(trainer.parser.parse_args(base_argv(models, dataset(tmp_path), str(tmp_path / "out"),
                                                           **flags)))  # fmt: skip


def test_split_mode_beyond_the_model_depth_says_split_mode_set_the_swap(tiny_model_files, tmp_path):
    with pytest.raises(UserError) as raised:
        _check_args(tiny_model_files, tmp_path, split_mode=True)
    message = str(raised.value)
    assert "--blocks_to_swap 18 is more than this model allows" in message
    assert message.endswith("(set by --split_mode)")


def test_split_mode_with_torch_compile_names_split_mode(tiny_model_files, tmp_path):
    with pytest.raises(UserError, match=r"^--torch_compile with --split_mode \(--blocks_to_swap 18\) needs "
                                        r"--gradient_checkpointing: "):  # fmt: skip
        _check_args(tiny_model_files, tmp_path, split_mode=True, torch_compile=True)


def test_a_data_url_thumbnail_is_not_looked_for_as_a_file(tiny_model_files, tmp_path):
    trainer = flux_train_network.FluxNetworkTrainer()
    thumbnail = "data:image/png;base64,iVBORw0KGgo="
    args = trainer.parser.parse_args(base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"),
                                               metadata_thumbnail=thumbnail))  # fmt: skip
    trainer.check_inputs_before_loading(args)  # a missing file would stop here
    with pytest.raises(UserError, match="^--metadata_thumbnail missing.png: file not found$"):
        trainer.check_inputs_before_loading(Namespace(**(vars(args) | {"metadata_thumbnail": "missing.png"})))


def test_t5_modules_with_cached_outputs_stop_before_the_models_load(tiny_model_files, tmp_path, capsys, monkeypatch):
    from library.flux_utils import load_flow_model
    from library.text_encoders import load_clip_l, load_t5xxl
    from networks.lora_flux import create_network

    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    encoders = [load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu"),
                load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")]  # fmt: skip
    weights = str(tmp_path / "with_t5.safetensors")
    create_network(1.0, 4, 4.0, None, encoders, dit, train_t5xxl="True").save_weights(weights, None, {})
    loaded = []
    original = flux_train_network.FluxNetworkTrainer.load_target_model
    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model",
                        lambda self, *a, **k: loaded.append(1) or original(self, *a, **k))  # fmt: skip
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), steps=1, network_weights=weights,
                     dim_from_weights=True, cache_text_encoder_outputs=True)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert "has T5 modules (lora_te3_*), which --dim_from_weights trains" in capsys.readouterr().err
    assert loaded == []
