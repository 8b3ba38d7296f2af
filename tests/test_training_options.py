"""Trainer options, each run in-process on the tiny models and checked by the files it writes."""

import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import flux_train_network
from library.safetensors_io import load_safetensors, read_metadata
from tests.training_helpers import base_argv, dataset, logged_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(models, tmp_path, steps=2, data_kwargs=None, **flags) -> str:
    data = dataset(tmp_path, **(data_kwargs or {}))
    out = str(tmp_path / "out")
    assert flux_train_network.main(base_argv(models, data, out, steps=steps, **flags)) == 0
    return out


def lora(out: str, name: str = "lora.safetensors") -> dict:
    return load_safetensors(os.path.join(out, name))


def test_text_encoder_lora_trains_clip_l_live_while_t5_is_cached(tiny_model_files, tmp_path, monkeypatch):
    encoders_in_training = []
    batch_loss = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, *args, **kwargs):
        encoders_in_training.append([type(e).__name__ if e is not None else None for e in ctx.models.text_encoders])
        return batch_loss(self, ctx, *args, **kwargs)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    data = dataset(tmp_path / "cached")
    out = str(tmp_path / "cached" / "out")
    argv = base_argv(tiny_model_files, data, out, steps=3, cache_text_encoder_outputs=True, text_encoder_lr=1e-2,
                     sample_at_first=True, sample_prompts=data.sample_prompts)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    weights = lora(out)
    te_up = [k for k in weights if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    unet_up = [k for k in weights if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert te_up and unet_up
    assert not any(k.startswith("lora_te3_") for k in weights)  # T5 LoRA only with train_t5xxl=True
    assert all(weights[k].abs().sum() > 0 for k in te_up)  # lora_up starts at zero: it was trained
    # T5 is freed once its outputs are cached; CLIP-L, being trained, stays
    assert encoders_in_training and all(names == ["CLIPTextModel", None] for names in encoders_in_training)
    # the sample before training (a zero LoRA) is the image that both encoders running live give
    live = str(tmp_path / "live" / "out")
    live_data = dataset(tmp_path / "live")
    assert flux_train_network.main(base_argv(tiny_model_files, live_data, live, steps=1, text_encoder_lr=1e-2,
                                             sample_at_first=True, sample_prompts=live_data.sample_prompts)) == 0
    (cached_png,), (live_png,) = (glob.glob(os.path.join(o, "sample", "lora_e000000_00_*.png")) for o in (out, live))
    assert np.array_equal(np.asarray(Image.open(cached_png)), np.asarray(Image.open(live_png)))


def test_unet_only_saves_no_text_encoder_modules(tiny_model_files, tmp_path):
    weights = lora(train(tiny_model_files, tmp_path, network_train_unet_only=True))
    assert weights and all(k.startswith("lora_unet_") for k in weights)


def test_network_weights_continue_and_dim_from_weights_reads_ranks(tiny_model_files, tmp_path):
    first = train(tiny_model_files, tmp_path / "a", network_train_unet_only=True, network_dim=6, network_alpha=3)
    start = os.path.join(first, "lora.safetensors")
    second = train(tiny_model_files, tmp_path / "b", steps=1, network_train_unet_only=True, network_weights=start,
                   dim_from_weights=True, learning_rate=1e-12)
    a, b = lora(first), lora(second)
    assert a.keys() == b.keys()
    for key in a:  # a negligible lr: the weights come back as loaded, with their rank and alpha
        assert a[key].shape == b[key].shape
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-9)
    assert read_metadata(os.path.join(second, "lora.safetensors"))["ss_network_dim"] == "6"


@pytest.mark.parametrize("made_for, version, warned", [
    ("chroma", "flux1", True), ("flux1", "chroma", True), ("chroma", "chroma", False), ("flux1", "flux1", False),
    (None, "flux1", False), ("sdxl_base_v1-0", "flux1", False),  # no version, or another family's: nothing said
])  # fmt: skip
def test_loras_of_another_base_model_are_warned_about(tmp_path, caplog, made_for, version, warned):
    from library.safetensors_io import save_safetensors
    from networks.lora_flux_files import warn_if_made_for_another_model

    path = str(tmp_path / "lora.safetensors")
    save_safetensors({"lora_unet_x.alpha": torch.tensor(1.0)}, path, {"ss_base_model_version": made_for} if made_for
                     else None)  # fmt: skip
    with caplog.at_level("WARNING"):
        warn_if_made_for_another_model(path, "--network_weights", version)
    assert caplog.messages == ([f"--network_weights {path} was trained on {made_for} (ss_base_model_version), and "
                                f"this model is {version}"] if warned else [])  # fmt: skip


def test_the_base_model_of_a_model_type_is_named_as_sd_scripts_names_it():
    from networks.lora_flux_files import base_model_version

    assert [base_model_version(t) for t in (None, "flux", "dev", "schnell", "chroma")] == ["flux1"] * 4 + ["chroma"]


def test_earlier_outputs_under_the_same_name_are_warned_about(tmp_path, caplog, monkeypatch):
    from argparse import Namespace

    from library.preflight import warn_about_earlier_outputs

    for name in ("lora.safetensors", "lora-step00000006.safetensors", "other.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "lora-state").mkdir()
    args = Namespace(output_dir=str(tmp_path), output_name="lora", resume=None)
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level("WARNING"):
        warn_about_earlier_outputs(args)
        warn_about_earlier_outputs(Namespace(output_dir=str(tmp_path), output_name="new", resume=None))
        warn_about_earlier_outputs(Namespace(**{**vars(args), "resume": "lora-state"}))
        monkeypatch.setenv("RANK", "1")  # the second of two launched processes leaves it to the first
        warn_about_earlier_outputs(args)
    assert caplog.messages == [
        f"--output_dir {tmp_path} already holds 3 file(s) of an earlier run named lora (e.g. lora-state, "
        "lora-step00000006.safetensors, lora.safetensors); this run replaces those it writes again and leaves "
        "the others"
    ]


def test_base_weights_are_merged_before_training(tiny_model_files, tmp_path, caplog):
    from library.safetensors_io import load_safetensors, read_metadata, save_safetensors

    first = train(tiny_model_files, tmp_path / "a", network_train_unet_only=True, learning_rate=5e-2)
    base = os.path.join(first, "lora.safetensors")
    # labelled as a Chroma LoRA: its module names fit FLUX.1, and it was merged without a word
    save_safetensors(load_safetensors(base), base, {**read_metadata(base), "ss_base_model_version": "chroma"})
    with caplog.at_level("WARNING"):
        with_base = train(tiny_model_files, tmp_path / "b", steps=1, network_train_unet_only=True, network_weights=base,
                          base_weights=[base], base_weights_multiplier=[1.0], learning_rate=1e-3)
    for flag in ("--base_weights", "--network_weights"):
        assert f"{flag} {base} was trained on chroma (ss_base_model_version), and this model is flux1" in (
            caplog.messages)
    without = train(tiny_model_files, tmp_path / "c", steps=1, network_train_unet_only=True, learning_rate=1e-3)
    a, b = lora(with_base), lora(without)
    # same seed and data: only the merged base can make the first step's gradients differ
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_all_learning_rates_zero_is_refused(tiny_model_files, tmp_path, capsys):
    data = dataset(tmp_path)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), learning_rate=0.0, network_train_unet_only=True)
    assert flux_train_network.main(argv) == 1
    assert "nothing to train" in capsys.readouterr().err


def test_base_weights_multiplier_count_must_match(tiny_model_files, tmp_path, capsys):
    data = dataset(tmp_path)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), base_weights=["a.safetensors", "b.safetensors"],
                     base_weights_multiplier=[1.0])
    assert flux_train_network.main(argv) == 1
    assert "--base_weights_multiplier has 1 values for 2 --base_weights files" in capsys.readouterr().err


def test_epoch_saves_keep_only_the_last_n(tiny_model_files, tmp_path):
    out = train(tiny_model_files, tmp_path, steps=1, max_train_epochs=4, save_every_n_epochs=1, save_last_n_epochs=2,
                save_state=True, network_train_unet_only=True)
    assert sorted(os.listdir(out)) == [
        "lora-000002-state", "lora-000002.safetensors", "lora-000003-state", "lora-000003.safetensors",
        "lora-state", "lora.safetensors",
    ]  # fmt: skip


def test_step_saves_are_named_by_step_and_the_last_step_prunes_too(tiny_model_files, tmp_path):
    out = train(tiny_model_files, tmp_path, steps=6, save_every_n_steps=2, save_last_n_steps=2,
                network_train_unet_only=True)  # fmt: skip
    # as sd-scripts: a step save at the last step too, which removes step 2 (older than 2 steps before step 4)
    assert sorted(os.listdir(out)) == [
        "lora-step00000004.safetensors", "lora-step00000006.safetensors", "lora.safetensors"
    ]  # fmt: skip
    assert read_metadata(os.path.join(out, "lora-step00000006.safetensors"))["ss_steps"] == "6"


def test_a_run_without_save_state_leaves_the_states_in_its_folder_alone(tiny_model_files, tmp_path):
    # a first run saves states; a second resumes from one in the same folder without --save_state, keeping its
    # last 2 step saves: it prunes LoRA files, never the states it (or the user) may resume from again
    first = train(tiny_model_files, tmp_path, steps=4, save_every_n_steps=2, save_state=True,
                  network_train_unet_only=True)  # fmt: skip
    states = sorted(n for n in os.listdir(first) if n.endswith("-state"))
    assert states == ["lora-state", "lora-step00000002-state", "lora-step00000004-state"]
    argv = base_argv(tiny_model_files, dataset(tmp_path), first, steps=8, save_every_n_steps=2, save_last_n_steps=2,
                     network_train_unet_only=True, resume=os.path.join(first, "lora-step00000002-state"))  # fmt: skip
    assert flux_train_network.main(argv) == 0
    assert sorted(n for n in os.listdir(first) if n.endswith("-state")) == states
    assert sorted(n for n in os.listdir(first) if n.startswith("lora-step")) == [
        "lora-step00000002-state", "lora-step00000004-state", "lora-step00000006.safetensors",
        "lora-step00000008.safetensors",
    ]  # fmt: skip


def test_accumulation_checkpointing_clipping_workers_and_bf16_run(tiny_model_files, tmp_path, monkeypatch):
    from library import flow_matching
    from library.flux_models import Flux

    inputs, forward, sigmas, draw = [], Flux.forward, [], flow_matching.sample_noise_and_sigmas

    def recording(self, *args, **kwargs):
        inputs.append((kwargs["timesteps"], kwargs["guidance"]))
        return forward(self, *args, **kwargs)

    def drawing(*args, **kwargs):
        noise = draw(*args, **kwargs)
        sigmas.append(noise.sigmas)
        return noise

    monkeypatch.setattr(Flux, "forward", recording)
    monkeypatch.setattr(flow_matching, "sample_noise_and_sigmas", drawing)
    out = train(tiny_model_files, tmp_path, steps=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
                max_grad_norm=0.5, max_data_loader_n_workers=1, persistent_data_loader_workers=True,
                mixed_precision="bf16", network_train_unet_only=True, save_precision="bf16", guidance_scale=3.5)
    weights = lora(out)
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    # as sd-scripts (spec §d.5, §d.9): t = 1000·σ rounded to bf16 and divided by 1000 in bf16, the guidance in
    # fp32, so that 1000·3.5 is 3500, not 3504
    assert inputs and all(t.dtype == torch.bfloat16 and g.dtype == torch.float32 for t, g in inputs)
    assert len(sigmas) == len(inputs)
    for (t, _), sigma in zip(inputs, sigmas, strict=True):
        assert torch.equal(t, (sigma * 1000).to(torch.bfloat16) / 1000)
    rounded_once = [torch.equal(t, sigma.to(torch.bfloat16)) for (t, _), sigma in zip(inputs, sigmas, strict=True)]
    assert not all(rounded_once)  # (σ in bf16 differs for some of these draws: the check can tell them apart)
    assert all(bool((g == 3.5).all()) for _, g in inputs)
    assert read_metadata(os.path.join(out, "lora.safetensors"))["ss_gradient_accumulation_steps"] == "2"


def test_plain_python_and_help_work_without_accelerate_launch():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "flux_train_network.py"), "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    assert "--pretrained_model_name_or_path" in result.stdout and "--blocks_to_swap" in result.stdout
    result = subprocess.run([sys.executable, os.path.join(ROOT, "flux_train_network.py"), "--output_dir", "x"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --pretrained_model_name_or_path is required: the FLUX.1 or Chroma .safetensors file"
    )


def test_debug_dataset_prints_batches_and_trains_nothing(tiny_model_files, tmp_path, capsys):
    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    assert flux_train_network.main(base_argv(tiny_model_files, data, out, debug_dataset=True)) == 0
    printed = capsys.readouterr().out
    assert printed.count("batch ") >= 3 and "a red circle on a blue background" in printed
    assert not os.path.exists(out)


def test_debug_dataset_shows_token_warm_up_given_as_a_fraction_of_the_run(tiny_model_files, tmp_path, capsys):
    from types import SimpleNamespace

    from tests.dataset_helpers import make_folder, write_toml

    make_folder(tmp_path / "img", {"a.png": (64, 64)}, {"a.png": "t1, t2, t3, t4"})
    toml = write_toml(tmp_path / "d.toml", f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                      f'image_dir = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n'
                      "token_warmup_min = 1\ntoken_warmup_step = 0.5\n")  # fmt: skip
    argv = base_argv(tiny_model_files, SimpleNamespace(dataset_toml=toml), str(tmp_path / "out"), steps=4,
                     debug_dataset=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "a.png" in x]
    assert line.endswith("a.png: t1")  # step 0 of a 2-step warm-up (half of 4 steps): one tag


def test_initial_step_with_skip_trains_only_the_remaining_steps(tiny_model_files, tmp_path, caplog):
    out = train(tiny_model_files, tmp_path, steps=5, data_kwargs={"batch_size": 1}, initial_step=3,
                skip_until_initial_step=True, network_train_unet_only=True, save_every_n_steps=1)
    # steps 4 and 5 ran, each saved (and step 5 as the final file too)
    assert sorted(os.listdir(out)) == [
        "lora-step00000004.safetensors", "lora-step00000005.safetensors", "lora.safetensors"
    ]  # fmt: skip
    assert read_metadata(os.path.join(out, "lora.safetensors"))["ss_steps"] == "5"


def test_noise_indices_stay_unique_in_a_step_with_short_batches(tiny_model_files, tmp_path, monkeypatch):
    # batches of 4 over buckets of fewer images: short batches beside full ones, two to a step
    seen = []
    batch_loss = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, batch, step, sample_indices, fixed_sigma=None):
        seen.append((step, list(sample_indices)))
        return batch_loss(self, ctx, batch, step, sample_indices, fixed_sigma)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    train(tiny_model_files, tmp_path, steps=4, data_kwargs={"batch_size": 4, "num_repeats": 2},
          gradient_accumulation_steps=2, network_train_unet_only=True)
    assert any(len(indices) < 4 for _, indices in seen)  # the case this is about did occur
    for step in {s for s, _ in seen}:
        indices = [i for s, batch in seen if s == step for i in batch]
        assert len(indices) == len(set(indices)), (step, seen)

def test_training_samples_reach_the_trackers_image_logger(tiny_model_files, tmp_path, monkeypatch):
    # wandb is not installed here: the trainer's hook is checked with a stand-in for wandb's logger
    import library.training_samples as training_samples

    seen = []
    monkeypatch.setattr(training_samples, "wandb_sample_logger",
                        lambda accelerator: lambda prompt, image, path: seen.append((prompt.index, image.size, path)))
    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=1, sample_at_first=True, sample_prompts=data.sample_prompts,
                     network_train_unet_only=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    assert [(index, size) for index, size, _ in seen] == [(0, (64, 64))]
    assert os.path.isfile(seen[0][2])

def test_initial_step_without_skip_trains_every_batch_of_the_later_epochs(tiny_model_files, tmp_path, monkeypatch):
    from library.datasets import DatasetGroup

    seen = []
    set_epoch, batch_loss = DatasetGroup.set_current_epoch, flux_train_network.FluxNetworkTrainer.batch_loss
    monkeypatch.setattr(DatasetGroup, "set_current_epoch",
                        lambda self, epoch: seen.append(epoch) or set_epoch(self, epoch))  # fmt: skip
    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss",
                        lambda self, ctx, batch, *a, **k: seen.append(batch["image_paths"]) or batch_loss(
                            self, ctx, batch, *a, **k))  # fmt: skip
    data = dataset(tmp_path, batch_size=2)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=100, max_train_epochs=3, initial_step=2,
                     network_train_unet_only=True)  # fmt: skip
    assert flux_train_network.main(argv) == 0
    epochs = [i for i, x in enumerate(seen) if isinstance(x, int)]
    assert [seen[i] for i in epochs] == [1, 2, 3]
    images = lambda start, stop: sorted(p for batch in seen[start + 1 : stop] for p in batch)  # noqa: E731
    everything = sorted(os.path.join(data.image_dir, f) for f in os.listdir(data.image_dir) if f.endswith(".png"))
    # counting starts at step 2, but each epoch, the first included, trains on all its batches
    assert images(epochs[0], epochs[1]) == everything and images(epochs[1], epochs[2]) == everything

def test_loss_average_is_a_moving_average_over_an_epoch_of_steps(tiny_model_files, tmp_path):
    logs = tmp_path / "logs"
    train(tiny_model_files, tmp_path, steps=9, data_kwargs={"batch_size": 2}, network_train_unet_only=True,
          logging_dir=str(logs))  # fmt: skip
    scalars = logged_scalars(logs)
    current, average = scalars["loss/current"], scalars["loss/average"]
    losses = [current[step] for step in sorted(current)]
    per_epoch = 4  # six images in buckets of one, two and three: batches of 1, 2, 2 and 1
    assert len(losses) == 9
    for i, step in enumerate(sorted(average)):
        window = losses[max(0, i + 1 - per_epoch) : i + 1]  # as sd-scripts: not reset at each epoch
        assert average[step] == pytest.approx(sum(window) / len(window), rel=1e-5), step

def test_output_name_with_a_folder_writes_into_it(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    out = tmp_path / "out"
    argv = base_argv(tiny_model_files, data, str(out), steps=1, output_name="run1/lora", save_state_on_train_end=True,
                     sample_at_first=True, sample_prompts=data.sample_prompts, network_train_unet_only=True)
    assert flux_train_network.main(argv) == 0
    assert sorted(os.listdir(out / "run1")) == ["lora-state", "lora.safetensors"]
    assert len(glob.glob(str(out / "sample" / "**" / "*.png"), recursive=True)) == 1


def test_an_output_folder_that_cannot_be_written_stops_the_run_before_loading(tmp_path, monkeypatch):
    from argparse import Namespace

    from library.errors import UserError
    from library.preflight import check_output_folder

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only disk answers (root is not refused)
    expected = r"--output_dir .*out with --output_name a/lora: cannot write in .* \(no permission, or a read-only disk"
    with pytest.raises(UserError, match=expected):
        check_output_folder(Namespace(output_dir=str(tmp_path / "out"), output_name="a/lora"))

def test_flags_without_effect_warn_once_each_and_the_log_file_gets_everything(tiny_model_files, tmp_path, caplog):
    log_file = tmp_path / "train.log"
    train(tiny_model_files, tmp_path, steps=1, highvram=True, xformers=True, network_train_unet_only=True,
          console_log_file=str(log_file))
    assert caplog.text.count("--highvram has no effect") == 1
    assert caplog.text.count("--xformers has no effect") == 1
    assert "--xformers has no effect" in log_file.read_text()
    # counts in words that agree with them ("1 steps, 1 epochs of 3 steps, 1 process(es)" before)
    (start,) = [line for line in log_file.read_text().splitlines() if "start training" in line]
    assert re.fullmatch(r"INFO \S+: start training: 1 step in 1 epoch of \d+ steps, 1 process", start), start


def test_chroma_trains_a_t5_lora_with_train_t5xxl(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, model_type="chroma", steps=2, network_args=["train_t5xxl=True"],
                     text_encoder_lr=1e-2)
    assert flux_train_network.main(argv) == 0
    weights = lora(out)
    t5_up = [k for k in weights if k.startswith("lora_te3_") and k.endswith("lora_up.weight")]
    assert t5_up and all(weights[k].abs().sum() > 0 for k in t5_up)
    assert not any(k.startswith("lora_te1_") for k in weights)  # Chroma has no CLIP-L


def test_trained_text_encoders_are_checkpointed_without_dropout(tiny_model_files, tmp_path, monkeypatch):
    # transformers checkpoints only in train mode, where T5's config would also turn dropout on
    seen, calls = [], []
    batch_loss = flux_train_network.FluxNetworkTrainer.batch_loss

    def recording(self, ctx, *args, **kwargs):
        t5 = ctx.models.text_encoders[1]
        if not seen:
            seen.append((t5.training, {m.p for m in t5.modules() if isinstance(m, torch.nn.Dropout)}))
            for layer in (m for m in t5.modules() if getattr(m, "gradient_checkpointing", False)):
                run = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, _run=run, **k: calls.append(1) or _run(*a, **k)
        return batch_loss(self, ctx, *args, **kwargs)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    flags = dict(model_type="chroma", steps=2, network_args=["train_t5xxl=True"], text_encoder_lr=1e-2)
    checkpointed = train(tiny_model_files, tmp_path / "gc", gradient_checkpointing=True, **flags)
    assert seen == [(True, {0.0})] and calls  # the T5 layers ran through the checkpoint
    plain = train(tiny_model_files, tmp_path / "plain", **flags)
    a, b = lora(checkpointed), lora(plain)
    assert a.keys() == b.keys() and any(k.startswith("lora_te3_") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


def test_base_weights_reach_the_cached_text_encoder_outputs(tiny_model_files, tmp_path):
    # a base LoRA on CLIP-L only: the DiT LoRA must train against the merged encoder with or without the cache
    from library.flux_utils import load_flow_model
    from library.safetensors_io import save_safetensors
    from library.text_encoders import load_clip_l
    from networks.lora_flux import create_network
    from tests.test_lora_math import randomize_lora

    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    network = create_network(1.0, 4, 4, None, [clip, None], dit)
    randomize_lora(network, std=0.5)
    base = tmp_path / "clip_base.safetensors"
    save_safetensors({k: v for k, v in network.state_dict().items() if k.startswith("lora_te1_")}, base)
    flags = dict(steps=2, network_train_unet_only=True)
    cached = lora(train(tiny_model_files, tmp_path / "cached", base_weights=[str(base)],
                        cache_text_encoder_outputs=True, **flags))  # fmt: skip
    live = lora(train(tiny_model_files, tmp_path / "live", base_weights=[str(base)], **flags))
    without = lora(train(tiny_model_files, tmp_path / "without", **flags))
    for key in cached:
        torch.testing.assert_close(cached[key], live[key], rtol=1e-5, atol=1e-7, msg=key)
    assert any(not torch.allclose(cached[k], without[k], rtol=1e-4, atol=1e-6) for k in cached)



def test_disk_cached_text_encoder_outputs_are_remade_when_the_merged_base_weights_change(tiny_model_files, tmp_path):
    from library.flux_utils import load_flow_model
    from library.safetensors_io import save_safetensors
    from library.text_encoders import load_clip_l
    from networks.lora_flux import create_network
    from tests.test_lora_math import randomize_lora

    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    network = create_network(1.0, 4, 4, None, [clip, None], dit)
    randomize_lora(network, std=0.5)
    clip_base, dit_base = tmp_path / "clip_base.safetensors", tmp_path / "dit_base.safetensors"
    save_safetensors({k: v for k, v in network.state_dict().items() if k.startswith("lora_te1_")}, clip_base)
    save_safetensors({k: v for k, v in network.state_dict().items() if k.startswith("lora_unet_")}, dit_base)
    data = dataset(tmp_path)

    def run(name, **flags):
        out = str(tmp_path / name)
        argv = base_argv(tiny_model_files, data, out, steps=2, network_train_unet_only=True, **flags)
        assert flux_train_network.main(argv) == 0
        return lora(out)

    def te_files():
        return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(data.image_dir, "*_flux_te.npz"))}

    run("with_clip_base", base_weights=[str(clip_base)], cache_text_encoder_outputs_to_disk=True)
    made_with_base = te_files()
    assert made_with_base
    after = run("without", cache_text_encoder_outputs_to_disk=True)  # the files hold the merged CLIP-L's outputs
    remade = te_files()
    assert remade.keys() == made_with_base.keys() and all(remade[p] != made_with_base[p] for p in remade)
    live = run("live")
    for key in live:
        torch.testing.assert_close(after[key], live[key], rtol=1e-5, atol=1e-7, msg=key)
    run("dit_base", base_weights=[str(dit_base)], cache_text_encoder_outputs_to_disk=True)
    assert te_files() == remade  # a base LoRA of the DiT only leaves the text encoders' outputs alone


def test_differential_output_preservation_keeps_the_lora_at_zero_on_preserved_images(tiny_model_files, tmp_path):
    """A preserved sample's target is the base model's output with the LoRA off; a fresh LoRA
    (lora_up = 0) already outputs exactly that, so its loss and gradients are zero and it stays zero."""
    data = dataset(tmp_path)
    with open(data.dataset_toml, "a", encoding="utf-8") as f:
        f.write("  custom_attributes = { diff_output_preservation = true }\n")
    out = str(tmp_path / "out")
    assert flux_train_network.main(base_argv(tiny_model_files, data, out, steps=2, network_train_unet_only=True)) == 0
    preserved = lora(out)
    assert all(preserved[k].abs().sum() == 0 for k in preserved if k.endswith("lora_up.weight"))
    plain = train(tiny_model_files, tmp_path / "plain", steps=2, network_train_unet_only=True)
    assert any(lora(plain)[k].abs().sum() > 0 for k in preserved if k.endswith("lora_up.weight"))



def test_differential_output_preservation_holds_a_trained_text_encoder_lora_back_too(tiny_model_files, tmp_path):
    """The base model's output means the encoder without its LoRA as well: a CLIP-L LoRA that changes the
    preserved captions' conditions gets a loss (and is trained back), not a target made from its own outputs."""
    from library.flux_utils import load_flow_model
    from library.safetensors_io import save_safetensors
    from library.text_encoders import load_clip_l
    from networks.lora_flux import create_network
    from tests.test_lora_math import randomize_lora

    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    network = create_network(1.0, 4, 4, None, [clip, None], dit)
    randomize_lora(network, std=0.5)
    weights = {k: (torch.zeros_like(v) if k.startswith("lora_unet") and k.endswith("lora_up.weight") else v)
               for k, v in network.state_dict().items()}  # fmt: skip
    start = str(tmp_path / "clip_lora.safetensors")
    save_safetensors(weights, start)
    data = dataset(tmp_path)
    with open(data.dataset_toml, "a", encoding="utf-8") as f:
        f.write("  custom_attributes = { diff_output_preservation = true }\n")
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=1, network_weights=start, optimizer_args=["weight_decay=0"])
    assert flux_train_network.main(argv) == 0
    trained = lora(out)
    moved = [k for k in weights if k.startswith("lora_te1") and not torch.equal(trained[k], weights[k])]
    assert moved  # with the encoder's own LoRA outputs as the target its loss was 0 and nothing moved


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "--torch_compile with --blocks_to_swap needs --gradient_checkpointing: without it, each compiled block "
             "keeps its weights for its backward"),
        ({"gradient_checkpointing": True, "gradient_checkpointing_keep_attention": True},
         "--gradient_checkpointing_keep_attention cannot be combined with --torch_compile and --blocks_to_swap"),
    ],
    ids=["no_checkpointing", "keep_attention"],
)  # fmt: skip
def test_torch_compile_with_block_swap_is_refused_where_graphs_would_keep_the_weights(
    tiny_model_files, tmp_path, capsys, flags, message
):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), torch_compile=True,
                     blocks_to_swap=1, **flags)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert message in capsys.readouterr().err


def test_torch_compile_per_block_trains_the_same_lora(tiny_model_files, tmp_path):
    plain = lora(train(tiny_model_files, tmp_path / "a", steps=2, network_train_unet_only=True))
    compiled = lora(train(tiny_model_files, tmp_path / "b", steps=2, network_train_unet_only=True,
                          torch_compile=True, dynamo_backend="eager"))
    # Compiled blocks rotate q and k in real arithmetic instead of one complex multiply: the same
    # values to 1 ulp (tests/test_compiled_blocks.py). Adam's normalised steps carry that into
    # the weights as absolute differences near 1e-7, against updates of about lr = 1e-3 per step.
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=1e-5, atol=1e-6)


def test_samples_without_an_output_name_name_the_lora_as_its_final_file(tiny_model_files, tmp_path):
    import json

    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=1, sample_prompts=data.sample_prompts, sample_at_first=True,
                     network_train_unet_only=True)  # fmt: skip
    at = argv.index("--output_name")
    del argv[at : at + 2]
    assert flux_train_network.main(argv) == 0
    assert os.path.isfile(os.path.join(out, "last.safetensors"))
    (first, *_) = sorted(glob.glob(os.path.join(out, "sample", "*.png")))
    with Image.open(first) as image:
        assert [lora["name"] for lora in json.loads(image.text["loras"])] == ["last"]


def test_token_warm_up_follows_the_step_whatever_the_data_loader_workers(tiny_model_files, tmp_path, monkeypatch):
    """Workers fetch batches ahead of the loop: each batch's warm-up step comes from its place in the epoch,
    not from a counter the loop sets later, so workers give the captions that no workers give."""
    data = dataset(tmp_path, batch_size=1)
    for caption_file in glob.glob(os.path.join(data.image_dir, "*.txt")):
        with open(caption_file, "w", encoding="utf-8") as f:
            f.write("t1, t2, t3, t4, t5, t6")
    with open(data.dataset_toml, "a", encoding="utf-8") as f:
        f.write("  token_warmup_step = 6\n")
    batch_loss, seen = flux_train_network.FluxNetworkTrainer.batch_loss, []

    def recording(self, ctx, batch, step, *args, **kwargs):
        seen.append((step, batch["captions"][0].count(",") + 1))
        return batch_loss(self, ctx, batch, step, *args, **kwargs)

    monkeypatch.setattr(flux_train_network.FluxNetworkTrainer, "batch_loss", recording)
    runs = []
    for workers in (0, 2):
        seen.clear()
        argv = base_argv(tiny_model_files, data, str(tmp_path / f"w{workers}"), steps=8, network_train_unet_only=True,
                         gradient_accumulation_steps=2, max_data_loader_n_workers=workers)  # fmt: skip
        assert flux_train_network.main(argv) == 0
        runs.append(list(seen))
    assert runs[0] == runs[1]
    assert [tags for _, tags in runs[0]][::2] == [1, 1, 2, 3, 4, 5, 6, 6]  # grows with the step, one tag a step
