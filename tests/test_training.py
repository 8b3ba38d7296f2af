"""The trainer run in-process through ``flux_train_network.main(argv)``: resume exactness, learning,
config files and user errors. (Runs through ``accelerate launch`` are in test_training_launch.py.)"""

import json
import logging
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import flux_train_network
from library.safetensors_io import load_safetensors, read_metadata
from library.train_state import read_rng_states
from tests.training_helpers import base_argv, dataset


def run(argv) -> int:
    return flux_train_network.main(argv)


def test_resume_mid_epoch_gives_bitwise_identical_weights(tiny_model_files, tmp_path):
    data = dataset(tmp_path, batch_size=1)  # 6 steps per epoch: the resume point is mid-epoch
    # network dropout draws from the global random state, which the state must restore exactly
    schedule = dict(lr_scheduler="cosine", lr_warmup_steps=2, cache_latents=True, network_dropout=0.3)
    straight = str(tmp_path / "straight")
    argv = base_argv(tiny_model_files, data, straight, steps=6, save_every_n_steps=3, save_state=True, **schedule)
    assert run(argv) == 0
    state = os.path.join(straight, "lora-step00000003-state")
    assert sorted(os.listdir(state)) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "train_state.json"
    ]
    resumed = str(tmp_path / "resumed")
    assert run(base_argv(tiny_model_files, data, resumed, steps=6, resume=state, **schedule)) == 0
    a = load_safetensors(os.path.join(straight, "lora.safetensors"))
    b = load_safetensors(os.path.join(resumed, "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    at_step_3 = load_safetensors(os.path.join(straight, "lora-step00000003.safetensors"))
    assert any(not torch.equal(at_step_3[k], a[k]) for k in a)  # the last 3 steps did change the weights
    # the same state with its random states as accelerate's save_state writes them (sd-scripts' states)
    theirs = str(tmp_path / "sd-scripts-state")
    shutil.copytree(state, theirs)
    with open(os.path.join(theirs, "random_states_0.pkl"), "rb") as f:
        ours = pickle.load(f)
    torch.save({"step": 3, "random_state": ours["python"], "numpy_random_seed": ours["numpy"],
                "torch_manual_seed": ours["torch"]}, os.path.join(theirs, "random_states_0.pkl"))  # fmt: skip
    read_back = read_rng_states(os.path.join(theirs, "random_states_0.pkl"))
    assert set(read_back) == {"python", "numpy", "torch"} and torch.equal(read_back["torch"], ours["torch"])
    from_theirs = str(tmp_path / "from_theirs")
    assert run(base_argv(tiny_model_files, data, from_theirs, steps=6, resume=theirs, **schedule)) == 0
    c = load_safetensors(os.path.join(from_theirs, "lora.safetensors"))
    assert all(torch.equal(a[key], c[key]) for key in a)



def test_a_schedule_free_state_without_scheduler_bin_resumes_exactly(tiny_model_files, tmp_path, capsys):
    # sd-scripts writes no scheduler.bin with a schedule-free optimizer (accelerate saves no stand-in scheduler)
    data = dataset(tmp_path, batch_size=1)
    options = dict(optimizer_type="AdamWScheduleFree", network_train_unet_only=True)
    straight = str(tmp_path / "straight")
    assert run(base_argv(tiny_model_files, data, straight, steps=4, save_every_n_steps=2, save_state=True,
                         **options)) == 0  # fmt: skip
    state = os.path.join(straight, "lora-step00000002-state")
    os.remove(os.path.join(state, "scheduler.bin"))
    resumed = str(tmp_path / "resumed")
    assert run(base_argv(tiny_model_files, data, resumed, steps=4, resume=state, **options)) == 0
    a = load_safetensors(os.path.join(straight, "lora.safetensors"))
    b = load_safetensors(os.path.join(resumed, "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # a schedule to continue, and none saved: named, not a silent restart of the schedule
    adamw = str(tmp_path / "adamw")
    assert run(base_argv(tiny_model_files, data, adamw, steps=2, save_state_on_train_end=True, lr_scheduler="cosine",
                         network_train_unet_only=True)) == 0  # fmt: skip
    os.remove(os.path.join(adamw, "lora-state", "scheduler.bin"))
    capsys.readouterr()
    assert run(base_argv(tiny_model_files, data, str(tmp_path / "c"), steps=4, resume=os.path.join(adamw, "lora-state"),
                         lr_scheduler="cosine", network_train_unet_only=True)) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "lora-state: the state has no scheduler.bin, as sd-scripts saves it for a schedule-free optimizer" in err
    assert "Traceback" not in err


def test_a_resume_without_seed_continues_with_the_saved_runs_seed(tiny_model_files, tmp_path, caplog):
    """Without --seed each run draws one; the state records it, so the resumed run keeps the data order,
    the noise and the validation split (a new seed would hold out images the first part trained on)."""
    data = dataset(tmp_path, batch_size=1)

    def argv(out, **flags):
        args = base_argv(tiny_model_files, data, str(tmp_path / out), steps=4, cache_latents=True, **flags)
        at = args.index("--seed")
        return args[:at] + args[at + 2 :]

    assert run(argv("straight", save_every_n_steps=2, save_state=True)) == 0
    state = str(tmp_path / "straight" / "lora-step00000002-state")
    with open(os.path.join(state, "train_state.json")) as f:
        seed = json.load(f)["seed"]
    assert isinstance(seed, int)
    with caplog.at_level(logging.INFO):
        assert run(argv("resumed", resume=state)) == 0
    assert f"using the seed {seed} of the run that saved it" in caplog.text
    a = load_safetensors(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_safetensors(str(tmp_path / "resumed" / "lora.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_restores_the_fp16_loss_scale(tiny_model_files, tmp_path, monkeypatch):
    """accelerate makes a GradScaler for fp16 on a GPU; here one on the CPU, its scale doubling each step."""
    import accelerate

    from library import training_loop

    init, run_loop, scales = accelerate.Accelerator.__init__, training_loop.TrainingLoop.run, []

    def with_scaler(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)

    def recording(self, *args, **kwargs):
        scales.append(self.accelerator.scaler.get_scale())
        return run_loop(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    monkeypatch.setattr(training_loop.TrainingLoop, "run", recording)
    data = dataset(tmp_path, batch_size=1)
    out = str(tmp_path / "out")
    assert run(base_argv(tiny_model_files, data, out, steps=2, save_state_on_train_end=True, cache_latents=True)) == 0
    state = os.path.join(out, "lora-state")
    assert torch.load(os.path.join(state, "scaler.pt"), weights_only=False)["scale"] == 4096.0
    resumed = str(tmp_path / "resumed")
    assert run(base_argv(tiny_model_files, data, resumed, steps=3, resume=state, cache_latents=True)) == 0
    assert scales == [1024.0, 4096.0]


def test_resume_refuses_another_network_and_a_state_at_the_end_of_the_run(tiny_model_files, tmp_path, capsys, caplog,
                                                                         monkeypatch):
    data = dataset(tmp_path, batch_size=1)
    first = str(tmp_path / "first")
    assert run(base_argv(tiny_model_files, data, first, steps=2, save_state_on_train_end=True,
                         network_train_unet_only=True)) == 0  # fmt: skip
    state = os.path.join(first, "lora-state")
    capsys.readouterr()
    other_rank = base_argv(tiny_model_files, data, str(tmp_path / "a"), steps=4, resume=state, network_dim=8,
                           network_train_unet_only=True)  # fmt: skip
    assert run(other_rank) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"error: --resume .*lora-state: its LoRA does not fit this run's network \("
                     r"lora_unet_double_blocks_0_img_attn_proj\.lora_down\.weight \(4, 64\) \(network \(8, 64\)\);"
                     r".* and 49 more\)", err)  # fmt: skip
    other_optimizer = base_argv(tiny_model_files, data, str(tmp_path / "c"), steps=4, resume=state,
                                network_train_unet_only=True, optimizer_type="SGDNesterov")  # fmt: skip
    assert run(other_optimizer) == 1  # before the models load: the state records its optimizer
    assert ("--resume" in (err := capsys.readouterr().err) and "saved with the optimizer torch.optim.adamw.AdamW, "
            "and this run uses torch.optim.sgd.SGD" in err and "Traceback" not in err)  # fmt: skip
    # a state without that record (sd-scripts', or an older one of ours) stops at its first step, with a message
    unrecorded = str(tmp_path / "unrecorded-state")
    shutil.copytree(state, unrecorded)
    with open(os.path.join(unrecorded, "train_state.json"), "w") as f:
        json.dump({"current_epoch": 1, "current_step": 2}, f)
    assert run(base_argv(tiny_model_files, data, str(tmp_path / "d"), steps=4, resume=unrecorded,
                         network_train_unet_only=True, optimizer_type="SGDNesterov")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "its optimizer state does not fit this run's optimizer (it has no 'momentum')" in err
    assert "Traceback" not in err
    # a schedule-free optimizer reads the state when switched to train mode, before any step
    assert run(base_argv(tiny_model_files, data, str(tmp_path / "e"), steps=4, resume=unrecorded,
                         network_train_unet_only=True, optimizer_type="AdamWScheduleFree")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "its optimizer state does not fit this run's optimizer (it has no 'train_mode')" in err
    assert "Traceback" not in err
    finished = base_argv(tiny_model_files, data, str(tmp_path / "b"), steps=2, resume=state,
                         network_train_unet_only=True)  # fmt: skip
    with monkeypatch.context() as m:  # a finished state stops before the models load
        m.setattr(flux_train_network.FluxNetworkTrainer, "load_target_model", lambda *a: pytest.fail("loaded"))
        assert run(finished) == 1
    assert "the state is at step 2, and this run has 2 steps; raise --max_train_steps" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / name) for name in ("a", "b", "c"))
    # --initial_step replaces the state's step, as in sd-scripts: one more step from the state's LoRA
    again = str(tmp_path / "again")
    assert run(base_argv(tiny_model_files, data, again, steps=2, resume=state, initial_step=1, save_every_n_steps=1,
                         network_train_unet_only=True)) == 0  # fmt: skip
    assert "counting from step 1 (--initial_step / --initial_epoch), not from the state's step 2" in caplog.text
    assert sorted(os.listdir(again)) == ["lora-step00000002.safetensors", "lora.safetensors"]
    assert read_metadata(os.path.join(again, "lora.safetensors"))["ss_steps"] == "2"
    before, after = (load_safetensors(os.path.join(d, "lora.safetensors")) for d in (first, again))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def fixed_noise_loss(models, lora_path, latents, te, sigma=0.5, seed=0):
    """Velocity loss of the DiT with the LoRA merged, at one σ and one noise draw."""
    import networks.lora_flux as lora_flux
    from library.flux_utils import load_flow_model, pack_latents, prepare_img_ids, unpack_latents

    _, dit = load_flow_model(models.flux_dev, torch.float32, "cpu")
    if lora_path:
        network, weights = lora_flux.create_network_from_weights(1.0, lora_path, None, [None, None], dit,
                                                                 for_inference=True)
        network.merge_to([None, None], dit, weights, torch.float32, "cpu")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    x_t = (1 - sigma) * latents + sigma * noise
    b, _, h, w = latents.shape
    with torch.no_grad():
        out = dit(img=pack_latents(x_t), img_ids=prepare_img_ids(b, h // 2, w // 2), txt=te["t5_out"],
                  txt_ids=te["txt_ids"], timesteps=torch.full((b,), sigma), y=te["l_pooled"],
                  guidance=torch.full((b,), 1.0))
    return torch.mean((unpack_latents(out, h // 2, w // 2) - (noise - latents)) ** 2).item()


def test_lora_lowers_the_loss_on_its_training_image(tiny_model_files, tmp_path):
    data = dataset(tmp_path, batch_size=1, num_images=1)
    out = str(tmp_path / "out")
    argv = base_argv(tiny_model_files, data, out, steps=40, cache_latents_to_disk=True,
                     cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True, learning_rate="1e-2",
                     network_dim=16, network_alpha=16, model_prediction_type="raw", guidance_scale="1.0",
                     timestep_sampling="uniform")
    assert run(argv) == 0
    image = sorted(p for p in os.listdir(data.image_dir) if p.endswith(".png"))[0]
    stem = os.path.join(data.image_dir, os.path.splitext(image)[0])
    with np.load(_latent_file(stem)) as npz:
        key = next(k for k in npz.files if k.startswith("latents_"))
        latents = torch.from_numpy(npz[key]).float()[None]
    with np.load(stem + "_flux_te.npz") as npz:
        te = {k: torch.from_numpy(npz[k]).float()[None] for k in ("l_pooled", "t5_out", "txt_ids")}
    before = np.mean([fixed_noise_loss(tiny_model_files, None, latents, te, s, i) for i, s in enumerate((0.3, 0.7))])
    after = np.mean([fixed_noise_loss(tiny_model_files, os.path.join(out, "lora.safetensors"), latents, te, s, i)
                     for i, s in enumerate((0.3, 0.7))])
    # 40 steps move a tiny random DiT only part of the way (a full fine-tune of all its weights gets
    # about 20% in 40 steps, 67% in 300): a 10% drop at fixed noise is far outside run-to-run noise,
    # which is zero here (every draw is seeded).
    assert after < 0.9 * before, (before, after)


def _latent_file(stem: str) -> str:
    folder = os.path.dirname(stem)
    name = os.path.basename(stem)
    matches = [f for f in os.listdir(folder) if f.startswith(name + "_") and f.endswith("_flux.npz")]
    assert len(matches) == 1, matches
    return os.path.join(folder, matches[0])


def test_saved_file_has_training_metadata(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(tiny_model_files, data, out, steps=2, training_comment="hello", network_alpha=0.1,
                         timestep_sampling="shift", model_prediction_type="raw")) == 0
    md = read_metadata(os.path.join(out, "lora.safetensors"))
    assert md["ss_network_module"] == "networks.lora_flux"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "0.1"  # as given, not fp32's 0.10000000149...
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW"  # no "()" without --optimizer_args, as sd-scripts
    assert md["ss_base_model_version"] == "flux1"
    assert md["ss_training_comment"] == "hello"
    assert md["ss_timestep_sampling"] == "shift" and md["ss_model_prediction_type"] == "raw"
    assert md["ss_max_train_steps"] == "2" and md["ss_steps"] == "2"
    assert md["ss_seed"] == "7" and md["ss_num_train_images"] == "6"
    assert md["ss_apply_t5_attn_mask"] == "False"
    assert md["modelspec.architecture"] == "flux-1-dev/lora"
    assert "ss_network_args" not in md and "modelspec.encoder_layer" not in md  # none given, as sd-scripts
    assert md["ss_text_encoder_lr"] == "None"
    assert all(isinstance(v, str) for v in md.values())

    given = str(tmp_path / "given")
    assert run(base_argv(tiny_model_files, data, given, steps=1, network_args=["img_attn_dim=2"], clip_skip=2,
                         text_encoder_lr=[1e-4])) == 0  # fmt: skip
    md = read_metadata(os.path.join(given, "lora.safetensors"))
    assert md["ss_network_args"] == '{"img_attn_dim": "2", "dropout": null}'  # sd-scripts appends the dropout
    assert md["ss_text_encoder_lr"] == "[0.0001]" and md["modelspec.encoder_layer"] == "2"


def test_no_metadata_keeps_only_the_minimal_keys(tiny_model_files, tmp_path):
    data = dataset(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(tiny_model_files, data, out, steps=1, no_metadata=True, network_args=["img_attn_dim=2"])) == 0
    md = read_metadata(os.path.join(out, "lora.safetensors"))
    ss = {k for k in md if k.startswith("ss_")}
    assert ss == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "ss_network_args"}


@pytest.mark.parametrize(
    "drop, flags, message",
    [
        ("--output_dir", {}, "--output_dir is required"),
        ("--clip_l", {}, "--clip_l is required for FLUX.1"),
        (None, {"blocks_to_swap": 4}, "--blocks_to_swap 4 is more than this model allows"),
        (None, {"loss_type": "huber"}, "--huber_schedule snr (the default) cannot be used with --loss_type huber"),
        (None, {"full_bf16": True}, "--full_bf16 needs --mixed_precision bf16"),
        (None, {"network_args": ["img_attn_dim"]}, "--network_args 'img_attn_dim': expected key=value"),
        (None, {"learning_rate": -1e-4}, "--learning_rate -0.0001: a learning rate cannot be negative"),
        (None, {"unet_lr": -1e-4}, "--unet_lr -0.0001: a learning rate cannot be negative"),
        (None, {"text_encoder_lr": [1e-5, -0.5]}, "--text_encoder_lr -0.5: a learning rate cannot be negative"),
        (None, {"text_encoder_lr": [1e-4, 1e-5, 1e-6]}, "--text_encoder_lr takes one rate (both encoders) or two"),
        (None, {"network_args": ["network_reg_lrs=double_blocks=-1e-3"]},
         "--network_args network_reg_lrs: 'double_blocks=-1e-3' has a negative value"),
        (None, {"network_args": ["loraplus_lr_ratio=0"]},
         "--network_args loraplus_lr_ratio=0 gives the DiT's and the text encoders' lora_up"),
        (None, {"network_args": ["neuron_dropout=0.1"]}, "--network_args neuron_dropout: give it as --network_dropout"),
        (None, {"loss_type": "huber", "huber_schedule": "constant", "huber_scale": 0}, "--huber_scale must be > 0"),
        (None, {"max_validation_steps": 0}, "--max_validation_steps 0: give 1 or more"),
        (None, {"network_dropout": 1.5}, "--network_dropout 1.5: expected a number in [0, 1)"),  # named the arg
        # the model file is checked before the swap bounds read it: a missing one is named by its flag
        (None, {"blocks_to_swap": 1, "pretrained_model_name_or_path": "missing.safetensors"},
         "--pretrained_model_name_or_path missing.safetensors: "),
        (None, {"split_mode": True, "gradient_checkpointing": True, "cpu_offload_checkpointing": True},
         "--cpu_offload_checkpointing cannot be combined with --split_mode (--blocks_to_swap 18): use one of them"),
        (None, {"split_mode": True, "blocks_to_swap": 1, "gradient_checkpointing": True,
                "cpu_offload_checkpointing": True},  # the swap is the one given: its flag is named
         "--cpu_offload_checkpointing cannot be combined with --blocks_to_swap: use one of them"),
        # a plain run took the first, --dim_from_weights the second
        (None, {"network_dropout": 0.1, "network_args": ["dropout=0.3"]},
         "--network_dropout 0.1 and --network_args dropout=0.3 disagree: give one of them"),
        # a missing thumbnail was a traceback after the models had loaded
        (None, {"metadata_thumbnail": "missing.png"}, "--metadata_thumbnail missing.png: file not found"),
        # it was "error: : file not found", after the dataset scan
        (None, {"base_weights": [""]}, "--base_weights: an empty file name; give the LoRA files to merge"),
        (None, {"lr_scheduler": "cosine", "lr_scheduler_args": ["bogus=1"]},
         "--lr_scheduler cosine with --lr_scheduler_args ['bogus=1']: "),
        # -1 validated every step, 0 never by step; 0 and -1 epochs meant every epoch
        (None, {"validate_every_n_steps": -1}, "--validate_every_n_steps -1: give 1 or more (steps between"),
        (None, {"validate_every_n_steps": 0}, "--validate_every_n_steps 0: give 1 or more"),
        (None, {"validate_every_n_epochs": 0}, "--validate_every_n_epochs 0: give 1 or more (epochs between"),
    ],
)
def test_user_errors_exit_1_with_one_message(tiny_model_files, tmp_path, capsys, drop, flags, message):
    data = dataset(tmp_path)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, **flags)
    if drop:
        i = argv.index(drop)
        del argv[i : i + 2]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "lora.safetensors")


def test_validation_flags_without_held_out_images_are_warned_about(tiny_model_files, tmp_path, caplog):
    data = dataset(tmp_path)  # no validation_split
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=1, validate_every_n_steps=1,
                     max_validation_steps=2, validation_seed=3)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert run(argv) == 0
    assert ("--validate_every_n_steps, --max_validation_steps, --validation_seed: no image is held out for "
            "validation (validation_split is not set in the dataset config nor as --validation_split, or rounds to "
            "no image), so there is no validation and they have no effect") in caplog.text  # fmt: skip


def test_disk_cached_text_encoder_outputs_follow_the_t5_file_and_its_length(tiny_model_files, tmp_path):
    """The cache records what made it: another T5 file or --t5xxl_max_token_length encodes the captions again."""
    import dataclasses
    import glob

    import numpy as np

    from library.safetensors_io import save_safetensors

    data = dataset(tmp_path)

    def cached_t5(out, models=tiny_model_files, **flags):
        argv = base_argv(models, data, str(tmp_path / out), steps=1, cache_text_encoder_outputs_to_disk=True,
                         network_train_unet_only=True, **flags)  # fmt: skip
        assert run(argv) == 0
        (first, *_) = sorted(glob.glob(os.path.join(data.image_dir, "*_flux_te.npz")))
        with np.load(first) as npz:
            return npz["t5_out"].copy()

    base = cached_t5("a")
    assert base.shape[0] == 16
    assert cached_t5("b", t5xxl_max_token_length=24).shape[0] == 24
    t5 = load_safetensors(tiny_model_files.t5xxl)
    t5 = {k: v * 2 if k.endswith("DenseReluDense.wo.weight") else v for k, v in t5.items()}
    save_safetensors(t5, tmp_path / "other_t5.safetensors")
    other = cached_t5("c", dataclasses.replace(tiny_model_files, t5xxl=str(tmp_path / "other_t5.safetensors")))
    assert other.shape == base.shape and not np.array_equal(other, base)
    assert np.array_equal(cached_t5("d"), base)  # and back: the same outputs as the first run's


def test_a_lora_with_t5_modules_and_cached_text_encoder_outputs(tiny_model_files, tmp_path, capsys):
    """--dim_from_weights trains the file's T5 modules, which cannot run on cached outputs: refused before
    loading, naming the file (not a network arg never given); unet-only trains the DiT modules alone."""
    from library.flux_utils import load_flow_model
    from library.text_encoders import load_clip_l, load_t5xxl
    from networks.lora_flux import create_network

    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    encoders = [load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu"),
                load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")]  # fmt: skip
    weights = str(tmp_path / "with_t5.safetensors")
    create_network(1.0, 4, 4.0, None, encoders, dit, train_t5xxl="True").save_weights(weights, None, {})
    data = dataset(tmp_path)
    flags = dict(steps=1, network_weights=weights, dim_from_weights=True, cache_text_encoder_outputs=True)
    assert run(base_argv(tiny_model_files, data, str(tmp_path / "a"), **flags)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --network_weights {weights} has T5 modules (lora_te3_*), which --dim_from_weights " \
        "trains, and a trained T5 must run every step: drop --cache_text_encoder_outputs, or add " \
        "--network_train_unet_only to train the DiT modules alone"
    out = tmp_path / "b"
    assert run(base_argv(tiny_model_files, data, str(out), network_train_unet_only=True, **flags)) == 0
    trained = load_safetensors(str(out / "lora.safetensors"))
    assert any(k.startswith("lora_unet_") for k in trained) and not any(k.startswith("lora_te") for k in trained)


def test_chroma_without_t5_mask_is_refused(tiny_model_files, tmp_path, capsys):
    data = dataset(tmp_path)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), model_type="chroma")
    argv.remove("--apply_t5_attn_mask")
    assert run(argv) == 1
    assert "--model_type chroma needs --apply_t5_attn_mask" in capsys.readouterr().err


def _train(models, tmp_path, **flags) -> dict:
    out = str(tmp_path / "out")
    assert flux_train_network.main(base_argv(models, dataset(tmp_path), out, steps=1, **flags)) == 0
    return load_safetensors(os.path.join(out, "lora.safetensors"))


def test_network_dim_0_trains_only_the_layers_network_args_give_a_rank(tiny_model_files, tmp_path):
    # spec §g.3: type dims fall back to --network_dim, and 0 means no module: a way to train selected layers
    weights = _train(tiny_model_files, tmp_path, network_dim=0, network_args=["img_attn_dim=4"],
                     network_train_unet_only=True)  # fmt: skip
    names = {k.split(".")[0] for k in weights}
    assert names and all("_img_attn_" in n for n in names)


def test_train_t5xxl_with_network_train_unet_only_says_it_does_nothing(tiny_model_files, tmp_path, caplog):
    weights = _train(tiny_model_files, tmp_path, network_args=["train_t5xxl=True"], network_train_unet_only=True)
    assert caplog.text.count("network_args train_t5xxl=True has no effect with --network_train_unet_only") == 1
    assert not any(k.startswith("lora_te") for k in weights)

