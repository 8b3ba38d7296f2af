"""Text encoders from a diffusers FLUX.1 download: T5 in shards (``text_encoder_2/model-0000N-of-00002``,
with its ``model.safetensors.index.json``) and CLIP-L in ``text_encoder/model.safetensors``, named by a
shard, the index, the subfolder or the model's own folder; a training run from such a folder alone."""

import json
import os
import shutil

import pytest
import torch

import flux_train_network
from library.cache_files import file_fingerprint
from library.errors import CheckpointError
from library.flux_key_mapping import bfl_to_diffusers
from library.safetensors_io import load_safetensors, save_safetensors
from library.text_encoders import clip_l_files, load_clip_l, load_t5xxl, t5xxl_files
from tests.training_helpers import base_argv, dataset

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def diffusers_folder(tiny_model_files, tmp_path_factory):
    """A diffusers-layout FLUX.1-dev folder: the transformer, CLIP-L and the T5 split after its first block."""
    root = str(tmp_path_factory.mktemp("FLUX.1-dev"))
    for sub in ("transformer", "text_encoder", "text_encoder_2"):
        os.makedirs(os.path.join(root, sub))
    dit = load_safetensors(tiny_model_files.flux_dev)
    save_safetensors(bfl_to_diffusers(dit), os.path.join(root, "transformer", "diffusion_pytorch_model.safetensors"))
    shutil.copy(tiny_model_files.clip_l, os.path.join(root, "text_encoder", "model.safetensors"))
    t5 = load_safetensors(tiny_model_files.t5xxl)
    first = {k: v for k, v in t5.items() if k == "shared.weight" or k.startswith("encoder.block.0.")}
    second = {k: v for k, v in t5.items() if k not in first}
    weight_map = {}
    for name, part in zip(SHARDS, (first, second), strict=True):
        save_safetensors(part, os.path.join(root, "text_encoder_2", name))
        weight_map |= dict.fromkeys(part, name)
    with open(os.path.join(root, "text_encoder_2", "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return root


def _named(root: str, way: str) -> str:
    return {
        "first shard": os.path.join(root, "text_encoder_2", SHARDS[0]),
        "second shard": os.path.join(root, "text_encoder_2", SHARDS[1]),
        "index": os.path.join(root, "text_encoder_2", "model.safetensors.index.json"),
        "subfolder": os.path.join(root, "text_encoder_2"),
        "model folder": root,
    }[way]


@pytest.mark.parametrize("way", ["first shard", "second shard", "index", "subfolder", "model folder"])
def test_a_sharded_t5_loads_whole_however_it_is_named(tiny_model_files, diffusers_folder, way):
    single = load_t5xxl(tiny_model_files.t5xxl, torch.float32, "cpu")
    sharded = load_t5xxl(_named(diffusers_folder, way), torch.float32, "cpu")
    assert t5xxl_files(_named(diffusers_folder, way)) == [
        os.path.join(diffusers_folder, "text_encoder_2", name) for name in SHARDS
    ]
    assert sharded.config.num_layers == single.config.num_layers == 2
    expected = single.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in sharded.state_dict().items())
    tokens = torch.tensor([[5, 9, 14, 1, 0, 0]])
    assert torch.equal(sharded(tokens).last_hidden_state, single(tokens).last_hidden_state)


@pytest.mark.parametrize("sub", ["text_encoder", ""])
def test_clip_l_loads_from_the_diffusers_folder(tiny_model_files, diffusers_folder, sub):
    path = os.path.join(diffusers_folder, sub) if sub else diffusers_folder
    assert clip_l_files(path) == [os.path.join(diffusers_folder, "text_encoder", "model.safetensors")]
    loaded = load_clip_l(path, torch.float32, "cpu").state_dict()
    expected = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_missing_shard_is_named(diffusers_folder, tmp_path):
    partial = tmp_path / "text_encoder_2"
    partial.mkdir()
    shutil.copy(os.path.join(diffusers_folder, "text_encoder_2", SHARDS[0]), partial / SHARDS[0])
    with pytest.raises(CheckpointError, match=f"1 of 2 shards are missing: {SHARDS[1]}; download or copy them too"):
        load_t5xxl(str(partial / SHARDS[0]), torch.float32, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: a folder without model\.safetensors or its shards \(nor a "
                                              r"text_encoder_2/ holding them\)"):
        load_t5xxl(str(tmp_path / "empty"), torch.float32, "cpu")


def test_the_text_cache_record_covers_every_shard_and_keeps_a_single_files_entry(tiny_model_files, diffusers_folder):
    """A replaced shard re-encodes the captions; a single file's entry is what it was before shards were read,
    so caches made then stay valid."""
    from types import SimpleNamespace

    trainer = flux_train_network.FluxNetworkTrainer()
    trainer.t5_max_length = 512

    def record(t5xxl: str, clip_l: str) -> dict:
        args = SimpleNamespace(t5xxl=t5xxl, clip_l=clip_l, model_type="flux", fp8_base=False, fp8_base_unet=False,
                               mixed_precision="bf16")  # fmt: skip
        return trainer.text_cache_fingerprint(SimpleNamespace(args=args, text_encoder_base_weights=None))

    single = record(tiny_model_files.t5xxl, tiny_model_files.clip_l)
    st = os.stat(tiny_model_files.t5xxl)
    assert single["t5xxl"] == f"t5xxl.safetensors:{st.st_size}:{st.st_mtime_ns}"
    shards = [os.path.join(diffusers_folder, "text_encoder_2", name) for name in SHARDS]
    sharded = record(diffusers_folder, diffusers_folder)
    assert sharded["t5xxl"] == f"{file_fingerprint(shards[0])}|{file_fingerprint(shards[1])}"
    assert sharded["clip_l"] == file_fingerprint(os.path.join(diffusers_folder, "text_encoder", "model.safetensors"))
    os.utime(shards[1], ns=(st.st_atime_ns, os.stat(shards[1]).st_mtime_ns + 10**9))
    assert record(diffusers_folder, diffusers_folder)["t5xxl"] != sharded["t5xxl"]


def test_a_run_trains_from_the_diffusers_folder_alone(tiny_model_files, diffusers_folder, tmp_path):
    """The DiT, CLIP-L and the sharded T5 all given as the model's folder (the autoencoder as its file) train
    the same LoRA as the single files."""
    data = dataset(tmp_path, batch_size=2)
    outputs = {}
    for name, folder in (("files", None), ("folder", diffusers_folder)):
        out = str(tmp_path / name)
        argv = base_argv(tiny_model_files, data, out, steps=2)
        if folder:
            for flag in ("--pretrained_model_name_or_path", "--clip_l", "--t5xxl"):
                argv[argv.index(flag) + 1] = folder
        assert flux_train_network.main(argv) == 0
        outputs[name] = load_safetensors(os.path.join(out, "lora.safetensors"))
    assert outputs["files"].keys() == outputs["folder"].keys()
    for key, tensor in outputs["files"].items():
        torch.testing.assert_close(outputs["folder"][key], tensor, rtol=0, atol=1e-6, msg=key)


def test_a_sharded_fp8_t5_is_known_as_plain_fp8_from_its_headers(tiny_model_files, tmp_path):
    """--fp8_base keeps a plain fp8 T5 in fp8 as stored: told from the shards' headers, not the first file's."""
    from library.fp8 import T5_LINEAR_WEIGHTS, t5_file_is_plain_fp8

    t5 = load_safetensors(tiny_model_files.t5xxl)
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.endswith(T5_LINEAR_WEIGHTS) else v for k, v in t5.items()}
    first = {k: v for k, v in fp8.items() if k == "shared.weight"}  # no Linear weight in the first shard
    save_safetensors(first, str(tmp_path / SHARDS[0]))
    save_safetensors({k: v for k, v in fp8.items() if k not in first}, str(tmp_path / SHARDS[1]))
    assert t5_file_is_plain_fp8(str(tmp_path)) and t5_file_is_plain_fp8(str(tmp_path / SHARDS[0]))
    save_safetensors({k: v for k, v in t5.items() if k not in first}, str(tmp_path / SHARDS[1]))  # fp16/32 again
    assert not t5_file_is_plain_fp8(str(tmp_path))


def test_a_folder_of_other_files_named_model_is_no_checkpoint_and_two_checkpoints_are_named(tiny_model_files,
                                                                                          tmp_path):  # fmt: skip
    """Only diffusers' names make a folder's checkpoint: a user's model_clip_l.safetensors and
    model_t5xxl_fp16.safetensors are not one model in two files, and a folder holding two checkpoints (a full and
    an fp16 variant) stops naming both, where their tensors used to be read together."""
    shutil.copy(tiny_model_files.clip_l, tmp_path / "model_clip_l.safetensors")
    shutil.copy(tiny_model_files.t5xxl, tmp_path / "model_t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match="a folder without model.safetensors or its shards"):
        t5xxl_files(str(tmp_path))
    shutil.copy(tiny_model_files.t5xxl, tmp_path / "model.safetensors")
    assert t5xxl_files(str(tmp_path)) == [str(tmp_path / "model.safetensors")]
    shutil.copy(tiny_model_files.t5xxl, tmp_path / "model.fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoints \(model.fp16.safetensors, model.safetensors\); "
                                              "give the file of one"):
        load_t5xxl(str(tmp_path), torch.float32, "cpu")
    # a whole file beside its shards: two checkpoints too (all three files were read, the last one's tensors kept)
    os.remove(tmp_path / "model.fp16.safetensors")
    save_safetensors(load_safetensors(tiny_model_files.t5xxl), str(tmp_path / "model-00001-of-00001.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoints \(model-00001-of-00001.safetensors, "
                                              r"model.safetensors\); give the file of one"):
        t5xxl_files(str(tmp_path))
