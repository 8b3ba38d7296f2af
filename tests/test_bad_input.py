"""The bad-input corpus: each case exits non-zero with one message that names the file, key or
flag at fault (and what to do), prints no traceback, and leaves ``output_dir`` as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import flux_train_network
from library.safetensors_io import save_safetensors
from tests.training_helpers import base_argv, dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Env:
    models: object
    data: object
    tmp: str
    out: str

    def argv(self, model_type: str = "flux", **flags) -> list[str]:
        return base_argv(self.models, self.data, self.out, model_type=model_type, steps=1, **flags)

    def dataset_toml(self, text: str, name: str = "dataset.toml") -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def with_dataset(self, text: str, name: str = "dataset.toml", **flags) -> list[str]:
        return self.argv(dataset_config=self.dataset_toml(text, name), **flags)

    def image_dir_toml(self, image_dir: str) -> str:
        return (f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\n"
                f"[[datasets.subsets]]\nimage_dir = '{image_dir}'\n")

    def bad_image(self, name: str, content: bytes) -> list[str]:
        folder = os.path.join(self.tmp, "bad_images")
        shutil.copytree(self.data.image_dir, folder)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
        return self.with_dataset(self.image_dir_toml(folder))

    def replace(self, argv: list[str], flag: str, value: str) -> list[str]:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv

    def drop(self, argv: list[str], flag: str) -> list[str]:
        argv = list(argv)
        i = argv.index(flag)
        del argv[i : i + 2]
        return argv

    def file(self, name: str, content: bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def fake_state(self, train_state: str, lora: dict | None = None) -> str:
        """A '-state' folder with every file --resume looks for, holding ``lora`` and ``train_state``."""
        import torch

        folder = os.path.join(self.tmp, "fake-state")
        os.makedirs(folder)
        save_safetensors(lora or {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, os.path.join(folder,
                         "model.safetensors"))  # fmt: skip
        for name in ("optimizer.bin", "scheduler.bin"):
            self.file(os.path.join(folder, name), b"")
        self.file(os.path.join(folder, "train_state.json"), train_state.encode())
        return folder

    def truncated_copy(self, path: str, name: str) -> str:
        with open(path, "rb") as f:
            content = f.read()
        return self.file(name, content[: len(content) // 2])

    def tensors(self, name: str, keys: dict[str, tuple[int, ...]]) -> str:
        """A .safetensors file of zero tensors with the given key names and shapes."""
        import torch

        path = os.path.join(self.tmp, name)
        save_safetensors({k: torch.zeros(shape) for k, shape in keys.items()}, path)
        return path

    def edited(self, source: str, name: str, drop=(), rename=None, add=None) -> str:
        """A copy of the model file ``source`` without the keys starting with ``drop``, with
        ``rename(key)`` for each key name and the tensors ``add`` added."""
        from library.safetensors_io import load_safetensors, read_metadata

        tensors = {(rename or str)(k): v for k, v in load_safetensors(source).items() if not k.startswith(tuple(drop))}
        path = os.path.join(self.tmp, name)
        save_safetensors({**tensors, **(add or {})}, path, metadata=read_metadata(source))
        return path

    def autoencoder(self, name: str, **params) -> str:
        from library.tiny_models import random_model, tiny_ae_params, write_model

        return write_model(random_model(tiny_ae_params(**params)), os.path.join(self.tmp, name))

    def text_encoder(self, name: str, umt5: bool = False, **widths) -> str:
        """A tiny CLIP-L (``hidden=``) or T5 (``d_model=``, or a UMT5 with a position bias in every block)."""
        from library.safetensors_io import load_safetensors
        from library.tiny_text_encoders import write_tiny_clip_l, write_tiny_t5

        path = os.path.join(self.tmp, name)
        (write_tiny_clip_l if "hidden" in widths else write_tiny_t5)(path, **widths)
        if umt5:
            tensors = load_safetensors(path)
            bias = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
            tensors[bias.format(1)] = tensors[bias.format(0)].clone()
            save_safetensors(tensors, path)
        return path


def cut_jpeg() -> bytes:
    """A JPEG whose header is intact but whose image data stops two thirds of the way."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) * 2 // 3]


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    expect: tuple[str, ...]


GOOD_SUBSET = "[[datasets.subsets]]\nimage_dir = '{images}'\n"

CASES = [
    Case("toml syntax error", lambda e: e.with_dataset("[general\nresolution = 64\n"),
         ("dataset.toml", "cannot parse it", "line 1")),
    Case("unknown key", lambda e: e.with_dataset(
        "[general]\nresolutoin = 64\n[[datasets]]\n" + GOOD_SUBSET.format(images=e.data.image_dir)),
         ("resolutoin", "dataset.toml")),
    Case("key at the wrong level", lambda e: e.with_dataset(
        "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nbatch_size = 2\n"
        f"image_dir = '{e.data.image_dir}'\n"),
         ("datasets[0].subsets[0].batch_size", "[[datasets]]")),
    Case("wrong value type", lambda e: e.with_dataset(
        "[[datasets]]\nresolution = 64\nbatch_size = 'two'\n" + GOOD_SUBSET.format(images=e.data.image_dir)),
         ("datasets[0].batch_size", "integer")),
    Case("missing image_dir", lambda e: e.with_dataset(e.image_dir_toml(os.path.join(e.tmp, "nowhere"))),
         ("nowhere",)),
    Case("empty image_dir", lambda e: (os.makedirs(os.path.join(e.tmp, "empty"), exist_ok=True),
                                       e.with_dataset(e.image_dir_toml(os.path.join(e.tmp, "empty"))))[1],
         ("empty",)),
    Case("image_dir that is a file", lambda e: e.with_dataset(e.image_dir_toml(e.file("plain.txt", b"x"))),
         ("plain.txt",)),
    Case("truncated image", lambda e: e.bad_image(
        "zz_truncated.png", open(os.path.join(e.data.image_dir, sorted(os.listdir(e.data.image_dir))[0]), "rb")
        .read()[:200]), ("zz_truncated.png",)),
    Case("zero-byte image", lambda e: e.bad_image("zz_empty.png", b""), ("zz_empty.png",)),
    Case("JPEG cut after its header", lambda e: e.bad_image("zz_cut.jpg", cut_jpeg()), ("zz_cut.jpg", "decode")),
    Case("text file named .jpg", lambda e: e.bad_image("zz_text.jpg", b"this is not a picture"), ("zz_text.jpg",)),
    Case("non-UTF-8 caption", lambda e: e.bad_image("00_red_circle.txt", "caf\xe9 au lait".encode("latin-1")),
         ("00_red_circle.txt", "UTF-8")),
    Case("dataset config missing", lambda e: e.argv(dataset_config=os.path.join(e.tmp, "missing.toml")),
         ("missing.toml",)),
    Case("dataset config with a wrong extension", lambda e: e.argv(dataset_config=e.file("data.yaml", b"a: 1")),
         ("data.yaml",)),
    Case("missing model file", lambda e: e.replace(e.argv(), "--pretrained_model_name_or_path",
                                                   os.path.join(e.tmp, "flux1-dev.safetensors")),
         ("flux1-dev.safetensors", "not found")),
    Case("truncated model file", lambda e: e.replace(e.argv(), "--pretrained_model_name_or_path",
                                                     e.truncated_copy(e.models.flux_dev, "cut.safetensors")),
         ("cut.safetensors", "truncated")),
    Case("Chroma file as --model_type flux", lambda e: e.replace(e.argv(), "--pretrained_model_name_or_path",
                                                                 e.models.chroma),
         ("chroma.safetensors", "--model_type chroma")),
    Case("FLUX file as --model_type chroma", lambda e: e.replace(e.argv("chroma"), "--pretrained_model_name_or_path",
                                                                 e.models.flux_dev),
         ("flux1-dev.safetensors", "--model_type flux")),
    Case("T5 file given as --ae", lambda e: e.replace(e.argv(), "--ae", e.models.t5xxl),
         ("t5xxl.safetensors", "--t5xxl")),
    Case("truncated T5 file", lambda e: e.replace(e.argv(), "--t5xxl",
                                                  e.truncated_copy(e.models.t5xxl, "t5cut.safetensors")),
         ("t5cut.safetensors",)),
    Case("missing --clip_l for FLUX.1", lambda e: e.drop(e.argv(), "--clip_l"), ("--clip_l",)),
    Case("UMT5 (Wan's) given as --t5xxl", lambda e: e.replace(e.argv(), "--t5xxl", e.text_encoder("umt5.safetensors",
                                                                                                 umt5=True)),
         ("--t5xxl", "umt5.safetensors", "UMT5")),
    Case("a wider CLIP (CLIP-G) given as --clip_l",
         lambda e: e.replace(e.argv(), "--clip_l", e.text_encoder("clip_g.safetensors", hidden=48)),
         ("--clip_l", "clip_g.safetensors", "outputs width 48", "CLIP-L")),
    Case("a T5 of another width given as --t5xxl",
         lambda e: e.replace(e.argv(), "--t5xxl", e.text_encoder("t5_small.safetensors", d_model=48)),
         ("--t5xxl", "t5_small.safetensors", "outputs width 48", "T5-XXL")),
    Case("a diffusers VAE given as --ae", lambda e: e.replace(e.argv(), "--ae", e.tensors("vae.safetensors", {
        "encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3),
        "encoder.down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)})),
         ("--ae", "vae.safetensors", "diffusers' layout", "ae.safetensors")),
    Case("an SD VAE given as --ae", lambda e: e.replace(e.argv(), "--ae", e.edited(
        e.autoencoder("sd_vae.safetensors", z_channels=4), "sd_vae.safetensors",
        add={"quant_conv.weight": __import__("torch").zeros(8, 8, 1, 1)})),
         ("--ae", "sd_vae.safetensors", "Stable Diffusion VAE", "ae.safetensors")),
    Case("an autoencoder of other latents than the DiT's given as --ae",
         lambda e: e.replace(e.argv(), "--ae", e.autoencoder("ae4.safetensors", z_channels=4)),
         ("--ae", "ae4.safetensors", "makes 4-channel latents", "takes 16")),
    Case("an autoencoder file without one tensor", lambda e: e.replace(e.argv(), "--ae", e.edited(
        e.models.ae, "ae_cut.safetensors", drop=["decoder.norm_out.weight"])),
         ("--ae", "ae_cut.safetensors", "incomplete checkpoint", "decoder.norm_out.weight")),
    Case("an autoencoder saved under a key prefix", lambda e: e.replace(e.argv(), "--ae", e.edited(
        e.models.ae, "ae_prefixed.safetensors", rename=lambda k: "autoencoder." + k)),  # whole checkpoints' load
         ("--ae", "ae_prefixed.safetensors", "keys begin with 'autoencoder.'", "without that prefix")),
    Case("a CLIP-L file without its final norm", lambda e: e.replace(e.argv(), "--clip_l", e.edited(
        e.models.clip_l, "clip_cut.safetensors", drop=["text_model.final_layer_norm."])),
         ("--clip_l", "clip_cut.safetensors", "incomplete checkpoint", "text_model.final_layer_norm.weight")),
    Case("the second of two T5 shards given as --t5xxl", lambda e: e.replace(e.argv(), "--t5xxl", e.edited(
        e.models.t5xxl, "model-00002-of-00002.safetensors", drop=["shared.", "encoder.block.0."])),
         ("--t5xxl", "model-00002-of-00002", "1 of 2 shards are missing: model-00001-of-00002.safetensors")),
    Case("a diffusers-layout LoRA given as the DiT", lambda e: e.replace(
        e.argv(), "--pretrained_model_name_or_path", e.tensors("peft_lora.safetensors", {
            "transformer_blocks.0.attn.to_q.lora_A.weight": (4, 32),
            "transformer_blocks.0.attn.to_q.lora_B.weight": (32, 4)})),
         ("peft_lora.safetensors", "a LoRA file")),
    Case("a DiT file without most of its tensors", lambda e: e.replace(
        e.argv(), "--pretrained_model_name_or_path", e.tensors("partial.safetensors", {
            "img_in.weight": (32, 64), "double_blocks.0.img_attn.norm.query_norm.scale": (16,)})),
         ("partial.safetensors", "incomplete DiT checkpoint", "double_blocks.0.img_mlp.0.weight")),
    Case("another diffusers transformer given as the DiT", lambda e: e.replace(
        e.argv(), "--pretrained_model_name_or_path", e.tensors("sd3.safetensors", {
            "pos_embed.proj.weight": (32, 16, 2, 2), "transformer_blocks.0.ff.net.2.weight": (32, 64)})),
         ("sd3.safetensors", "not FLUX.1 or Chroma")),
    Case("a folder without T5 files given as --t5xxl", lambda e: e.replace(e.argv(), "--t5xxl", e.tmp),
         ("--t5xxl", "a folder without model.safetensors or its shards (nor a text_encoder_2/ holding them)")),
    Case("a folder given as --ae", lambda e: e.replace(e.argv(), "--ae", e.tmp),
         ("--ae", "a folder; give the .safetensors file itself")),
    Case("--ae file missing", lambda e: e.replace(e.argv(), "--ae", os.path.join(e.tmp, "nope.safetensors")),
         ("--ae ", "nope.safetensors")),
    Case("Chroma file without --model_type chroma nor --clip_l",
         lambda e: e.drop(e.replace(e.argv(), "--pretrained_model_name_or_path", e.models.chroma), "--clip_l"),
         ("--pretrained_model_name_or_path", "is a Chroma model: add --model_type chroma")),
    Case("Chroma without --apply_t5_attn_mask",
         lambda e: [a for a in e.argv("chroma") if a != "--apply_t5_attn_mask"], ("--apply_t5_attn_mask",)),
    Case("--full_bf16 without bf16", lambda e: e.argv(full_bf16=True), ("--full_bf16", "--mixed_precision bf16")),
    Case("--cache_latents with color_aug", lambda e: e.with_dataset(
        "[[datasets]]\nresolution = 64\n" + GOOD_SUBSET.format(images=e.data.image_dir) + "color_aug = true\n",
        cache_latents=True), ("--cache_latents", "color_aug")),
    Case("text-encoder cache with shuffle_caption", lambda e: e.with_dataset(
        "[[datasets]]\nresolution = 64\n" + GOOD_SUBSET.format(images=e.data.image_dir) + "shuffle_caption = true\n",
        cache_text_encoder_outputs=True), ("--cache_text_encoder_outputs", "shuffle_caption")),
    Case("huber loss with the snr schedule", lambda e: e.argv(loss_type="huber"), ("--huber_schedule",)),
    Case("--weighted_captions", lambda e: e.argv(weighted_captions=True), ("--weighted_captions",)),
    Case("legacy --use_8bit_adam with --optimizer_type", lambda e: e.argv(use_8bit_adam=True, optimizer_type="Lion"),
         ("--use_8bit_adam",)),
    Case("unknown optimizer", lambda e: e.argv(optimizer_type="AdamWW"), ("AdamWW",)),
    Case("constant schedule with warmup", lambda e: e.argv(lr_warmup_steps=5), ("--lr_warmup_steps",)),
    Case("--network_train_unet_only with --network_train_text_encoder_only",
         lambda e: e.argv(network_train_unet_only=True, network_train_text_encoder_only=True),
         ("nothing to train", "exclude each other")),
    Case("Chroma text encoder only without train_t5xxl",
         lambda e: e.argv("chroma", apply_t5_attn_mask=True, network_train_text_encoder_only=True),
         ("nothing to train", "train_t5xxl=True")),
    Case("--output_dir that is a file", lambda e: e.replace(e.argv(), "--output_dir", e.file("out.txt", b"x")),
         ("--output_dir", "out.txt is a file, not a folder")),
    Case("--output_dir under a file", lambda e: e.replace(e.argv(), "--output_dir",
                                                          os.path.join(e.file("notadir", b"x"), "out")),
         ("--output_dir", "notadir is a file, not a folder")),
    Case("network_args typo", lambda e: e.argv(network_args=["img_atn_dim=4"]), ("img_atn_dim",)),
    Case("network_args bad regex", lambda e: e.argv(network_args=["network_reg_dims=double_blocks_(=8"]),
         ("network_reg_dims", "regular expression")),
    Case("network module that does not exist", lambda e: e.replace(e.argv(), "--network_module", "networks.lora_flx"),
         ("--network_module", "networks.lora_flx")),
    Case("--network_weights missing", lambda e: e.argv(network_weights=os.path.join(e.tmp, "gone.safetensors")),
         ("--network_weights", "gone.safetensors")),
    Case("--resume from a missing folder", lambda e: e.argv(resume=os.path.join(e.tmp, "no-state")),
         ("--resume", "no-state")),
    Case("--resume from a folder that is not a state", lambda e: e.argv(resume=e.data.image_dir),
         ("--resume", "not a training state")),
    Case("--resume from a state with a damaged train_state.json",
         lambda e: e.argv(resume=e.fake_state('{"current_ep')), ("--resume", "train_state.json is damaged")),
    Case("--resume from a state of another network",
         lambda e: e.argv(resume=e.fake_state('{"current_epoch": 1, "current_step": 0}')),
         ("--resume", "its LoRA does not fit this run's network", "lora_unet_x.lora_down.weight not in this")),
    Case("sample prompts file missing", lambda e: e.argv(sample_prompts=os.path.join(e.tmp, "prompts.txt"),
                                                         sample_every_n_steps=1), ("prompts.txt",)),
    Case("--gradient_accumulation_steps 0", lambda e: e.argv(gradient_accumulation_steps=0),
         ("--gradient_accumulation_steps 0", "give 1 or more")),
    Case("a negative --network_dim", lambda e: e.argv(network_dim=-4), ("--network_dim -4", "the LoRA rank")),
    Case("--network_dim 0 without ranks in network_args", lambda e: e.argv(network_dim=0, network_train_unet_only=True),
         ("nothing to train: the network has no LoRA module (--network_dim 0",)),
    Case("a negative --vae_batch_size", lambda e: e.argv(vae_batch_size=-1), ("--vae_batch_size -1",)),
    Case("a negative --text_encoder_batch_size", lambda e: e.argv(text_encoder_batch_size=-1,
                                                                  cache_text_encoder_outputs=True),
         ("--text_encoder_batch_size -1",)),
    Case("a negative --t5xxl_max_token_length", lambda e: e.argv(t5xxl_max_token_length=-4),
         ("--t5xxl_max_token_length -4",)),
    Case("a negative --max_grad_norm", lambda e: e.argv(max_grad_norm=-1.0), ("--max_grad_norm -1.0",)),
    Case("--max_train_steps 0", lambda e: e.argv(max_train_steps=0), ("--max_train_steps 0",)),
    Case("a --log_tracker_config that is not TOML", lambda e: e.argv(
        logging_dir=os.path.join(e.tmp, "logs"), log_tracker_config=e.file("tracker.toml", b"[wandb\nname=")),
         ("--log_tracker_config", "tracker.toml", "not valid TOML")),
    Case("--torch_compile with --dynamo_backend no", lambda e: e.argv(torch_compile=True, dynamo_backend="no"),
         ("--torch_compile needs a --dynamo_backend this torch has, not 'no'", "inductor")),
    Case("--torch_compile with sd-scripts' misspelt tensort", lambda e: e.argv(torch_compile=True,
                                                                                dynamo_backend="tensort"),
         ("--torch_compile needs a --dynamo_backend this torch has, not 'tensort'",)),
    Case("--config_file missing", lambda e: e.argv(config_file=os.path.join(e.tmp, "run.toml")), ("run.toml",)),
    Case("--log_with wandb without wandb", lambda e: e.argv(log_with="wandb"), ("wandb",)),
]


@pytest.fixture
def env(tiny_model_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_safetensors({"w": __import__("torch").ones(2)}, out / "previous.safetensors")
    return Env(tiny_model_files, dataset(tmp_path), str(tmp_path), str(out))


def output_dir_snapshot(out: str) -> dict[str, bytes]:
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


def test_the_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_stops_with_one_clear_message(env, case, capsys):
    before = output_dir_snapshot(env.out)
    argv = case.argv(env)
    assert flux_train_network.main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in case.expect:
        assert fragment in errors[0], (fragment, errors[0])
    assert output_dir_snapshot(env.out) == before


def test_a_wrong_file_after_the_dit_is_found_before_any_model_loads(env, capsys, monkeypatch):
    import library.flux_utils

    loaded = []
    monkeypatch.setattr(library.flux_utils, "load_flow_model", lambda *a, **k: loaded.append(a))
    assert flux_train_network.main(env.replace(env.argv(), "--ae", env.models.t5xxl)) == 1
    assert loaded == []  # the file check needs headers only: the 24 GB DiT is not read first
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: --ae {env.models.t5xxl}: expected the FLUX autoencoder")


@pytest.mark.parametrize("flags, message", [
    (dict(optimizer_type="NoSuchOpt"), "--optimizer_type 'NoSuchOpt' is not a known optimizer"),
    (dict(optimizer_args=["weight_decay"]), "--optimizer_args: 'weight_decay' is not of the form key=value"),
    (dict(lr_scheduler="cosine_typo"), "--lr_scheduler 'cosine_typo' is not one of"),
    (dict(lr_scheduler="linear", lr_warmup_steps=100), "--lr_warmup_steps 100 is longer than the whole run"),
    (dict(lr_scheduler="cosine_with_min_lr"), "needs --lr_scheduler_min_lr_ratio"),
    (dict(learning_rate=0.0), "nothing to train: every parameter group has learning rate 0"),
    (dict(network_train_unet_only=True, network_train_text_encoder_only=True), "exclude each other"),
], ids=["optimizer", "optimizer_args", "scheduler", "warmup", "min_lr", "lr 0", "unet and te only"])
def test_optimizer_and_schedule_errors_come_before_any_model_loads(env, capsys, monkeypatch, flags,
                                                                            message):  # fmt: skip
    import library.flux_utils

    loaded = []
    monkeypatch.setattr(library.flux_utils, "load_flow_model", lambda *a, **k: loaded.append(a))
    assert flux_train_network.main(env.argv(**flags)) == 1
    assert loaded == []  # not after minutes of loading and caching
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert message in error


def test_train_t5xxl_with_cached_text_encoder_outputs_is_refused_before_any_model_loads(env, capsys, monkeypatch):
    import library.flux_utils

    loaded = []
    monkeypatch.setattr(library.flux_utils, "load_flow_model", lambda *a, **k: loaded.append(a))
    argv = env.argv("chroma", apply_t5_attn_mask=True, network_args=["train_t5xxl=True"],
                    cache_text_encoder_outputs=True)  # fmt: skip
    assert flux_train_network.main(argv) == 1
    assert loaded == []
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "train_t5xxl=True cannot be used with --cache_text_encoder_outputs" in error


def test_ctrl_c_while_loading_is_a_message_not_a_traceback(env, capsys, monkeypatch):
    import library.flux_utils

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(library.flux_utils, "load_flow_model", interrupted)
    assert flux_train_network.main(env.argv()) == 130
    err = capsys.readouterr().err
    assert "interrupted while loading, caching, sampling or saving" in err and "Traceback" not in err


LAUNCHED = ["unknown key", "truncated model file", "T5 file given as --ae", "network_args typo",
            "--resume from a missing folder"]


@pytest.mark.slow
def test_bad_input_through_accelerate_launch(env):
    """A handful of the cases as real ``accelerate launch`` runs, the way users and GUIs start them."""
    env_vars = dict(os.environ, PYTHONPATH=ROOT)
    for case in (c for c in CASES if c.name in LAUNCHED):
        before = output_dir_snapshot(env.out)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1",
            "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
            os.path.join(ROOT, "flux_train_network.py"), *case.argv(env),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env_vars, timeout=300)
        assert result.returncode != 0, case.name
        assert "Traceback" not in result.stderr, (case.name, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and all(f in errors[0] for f in case.expect), (case.name, result.stderr[-2000:])
        assert output_dir_snapshot(env.out) == before


def test_deepspeed_chosen_in_accelerate_config_is_one_message(env, capsys, monkeypatch):
    # accelerate launch sets this from `accelerate config`; the Accelerator itself would demand DeepSpeed first
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert flux_train_network.main(env.argv()) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (error,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "accelerate is configured for DEEPSPEED, which this trainer does not support" in error


def test_the_generic_trainer_alone_points_to_the_flux_one(tmp_path, capsys):
    """train_network.py is the loop without a model: run directly, it stops at once (it used to read and
    check the dataset and rehearse the optimizer, then end in a NotImplementedError traceback)."""
    import train_network

    assert train_network.main(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 1
    assert "run flux_train_network.py with the same arguments" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
