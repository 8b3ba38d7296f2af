"""Saved LoRA files: round trips, metadata strings, reproducible hashes, atomic writes."""

import hashlib
import json
import os

import pytest
import safetensors.torch
import torch

from library.errors import CheckpointError
from library.model_hashes import build_modelspec, calculate_sha256, model_hash, precalculate_safetensors_hashes
from library.safetensors_io import load_safetensors, read_metadata
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import create_network
from tests.test_lora_math import randomize_lora


@pytest.fixture(scope="module")
def flux():
    return random_model(tiny_flux_params())


def trained(model, dim=4, alpha=2, seed=1, **kwargs):
    network = create_network(1.0, dim, alpha, None, [None, None], model, **kwargs)
    randomize_lora(network, seed)
    return network


def data_section(path) -> bytes:
    raw = open(path, "rb").read()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_save_and_load_round_trip(flux, tmp_path, suffix):
    network = trained(flux, in_dims="[2,2,2,2,2]")
    file = tmp_path / f"lora{suffix}"
    network.save_weights(str(file), None, {"ss_network_dim": "4"})
    again = create_network(1.0, 4, 1, None, [None, None], flux, in_dims="[2,2,2,2,2]")
    info = again.load_weights(str(file))
    assert not info.missing_keys and not info.unexpected_keys
    expected = network.state_dict()
    assert again.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())
    if suffix != ".safetensors":
        assert set(torch.load(file, weights_only=True)) == set(expected)  # a plain state dict, no metadata
    umask = os.umask(0o022)
    try:
        network.save_weights(str(file), None, None)
        assert os.stat(file).st_mode & 0o777 == 0o644  # readable by others, as the umask allows
    finally:
        os.umask(umask)


@pytest.mark.parametrize("name, content", [("junk.pt", b"not a pickle"), ("missing.ckpt", None)])
def test_unreadable_or_missing_lora_files_are_named(flux, tmp_path, name, content):
    file = tmp_path / name
    if content is not None:
        file.write_bytes(content)
    network = create_network(1.0, 4, 1, None, [None, None], flux)
    with pytest.raises(CheckpointError, match=name):
        network.load_weights(str(file))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_precision_casts_every_tensor_alpha_included(flux, tmp_path, dtype):
    network = trained(flux)
    file = tmp_path / "half.safetensors"
    network.save_weights(file, dtype, None)
    weights = load_safetensors(file)
    assert {v.dtype for v in weights.values()} == {dtype}
    assert weights["lora_unet_single_blocks_0_linear2.alpha"].item() == 2.0
    torch.testing.assert_close(
        weights["lora_unet_single_blocks_0_linear2.lora_up.weight"],
        network.lora_unet_single_blocks_0_linear2.lora_up.weight.detach().to(dtype),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "params, architecture, implementation",
    [
        (tiny_flux_params(guidance_embed=True), "flux-1-dev/lora", "https://github.com/black-forest-labs/flux"),
        (tiny_flux_params(guidance_embed=False), "flux-1-schnell/lora", "https://github.com/black-forest-labs/flux"),
        (tiny_chroma_params(), "chroma/lora", "https://huggingface.co/lodestones/Chroma"),
    ],
    ids=["dev", "schnell", "chroma"],
)
def test_metadata_is_kept_verbatim_with_modelspec_and_hashes_added(tmp_path, params, architecture, implementation):
    network = trained(random_model(params))
    given = {"ss_network_dim": "4", "ss_network_args": json.dumps({"img_attn_dim": "2"}), "ss_epoch": 3, "ss_v2": False}
    file = tmp_path / "my_flux_lora-000003.safetensors"
    network.save_weights(file, None, given)
    metadata = read_metadata(file)
    assert given == {"ss_network_dim": "4", "ss_network_args": '{"img_attn_dim": "2"}', "ss_epoch": 3, "ss_v2": False}
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_args"] == '{"img_attn_dim": "2"}'
    assert metadata["ss_epoch"] == "3" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.implementation"] == implementation
    assert metadata["modelspec.title"] == "my_flux_lora-000003"
    assert metadata["modelspec.resolution"] == "1024x1024"
    assert metadata["modelspec.implementation_version"].startswith("flux-lora-trainer/")
    assert "modelspec.prediction_type" not in metadata
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8


def test_modelspec_given_by_the_trainer_wins(flux, tmp_path):
    file = tmp_path / "lora.safetensors"
    spec = build_modelspec("dev", title="My LoRA", resolution=(768, 512), author="me", timestamp=0)
    trained(flux).save_weights(file, None, spec)
    metadata = read_metadata(file)
    assert {k: metadata[k] for k in spec} == spec
    assert metadata["modelspec.resolution"] == "768x512" and metadata["modelspec.author"] == "me"


def test_model_hash_is_the_sha256_of_the_tensor_data_and_reproducible(flux, tmp_path):
    network = trained(flux, dim=64)  # over 1 MiB, so the legacy hash reads real bytes
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    network.save_weights(a, None, {"ss_seed": "42"})
    network.save_weights(b, None, {"ss_seed": "42", "modelspec.title": "renamed"})
    meta_a, meta_b = read_metadata(a), read_metadata(b)
    assert os.path.getsize(a) > 0x110000
    assert meta_a["sshs_model_hash"] == hashlib.sha256(data_section(a)).hexdigest()
    # only ss_* keys enter the hashes: a new title keeps the file's identity
    assert (meta_a["sshs_model_hash"], meta_a["sshs_legacy_hash"]) == (
        meta_b["sshs_model_hash"],
        meta_b["sshs_legacy_hash"],
    )
    # the legacy hash covers the header written with the ss_* keys only, as sd-scripts computes it
    weights = load_safetensors(a)
    serialized = safetensors.torch.save(weights, {"ss_seed": "42"})
    assert meta_a["sshs_legacy_hash"] == hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]
    c = tmp_path / "c.safetensors"
    network.save_weights(c, None, {"ss_seed": "4242"})  # a longer header shifts the bytes at 1 MiB
    meta_c = read_metadata(c)
    assert meta_c["sshs_model_hash"] == meta_a["sshs_model_hash"]
    assert meta_c["sshs_legacy_hash"] != meta_a["sshs_legacy_hash"]
    with torch.no_grad():
        network.lora_unet_double_blocks_0_img_mlp_0.lora_up.weight[0, 0] += 1
    network.save_weights(c, None, {"ss_seed": "42"})
    assert read_metadata(c)["sshs_model_hash"] != meta_a["sshs_model_hash"]


@pytest.mark.parametrize("metadata", [{"ss_seed": "1", "modelspec.title": "x"}, {"modelspec.title": "x"}, {}])
def test_legacy_hash_is_of_the_file_sd_scripts_would_write_with_or_without_ss_keys(metadata):
    """sd-scripts hashes save(tensors, {only the ss_ keys}): an empty table still writes "__metadata__":{},
    which moves the 64 KiB window at 1 MiB (merged, converted or extracted files have no ss_ keys)."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {f"lora_unet_x{i}.lora_down.weight": torch.randn(64, 1024, generator=g).bfloat16() for i in range(12)}
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert len(blob) > 0x110000
    expected = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert precalculate_safetensors_hashes(tensors, metadata)[1] == expected


def test_hash_functions_on_known_bytes(tmp_path):
    model_sha, legacy = precalculate_safetensors_hashes({"a": torch.zeros(2)}, {"modelspec.title": "x"})
    assert model_sha == hashlib.sha256(bytes(8)).hexdigest()  # two fp32 zeros
    assert legacy == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"  # nothing at 1 MiB in a tiny file
    file = tmp_path / "blob.bin"
    blob = bytes(range(256)) * 5000
    file.write_bytes(blob)
    assert calculate_sha256(file) == hashlib.sha256(blob).hexdigest()
    assert model_hash(file) == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert model_hash(tmp_path / "missing") == "NOFILE"


def test_modelspec_builder_options(tmp_path):
    thumbnail = tmp_path / "thumb.png"
    thumbnail.write_bytes(b"\x89PNG fake")
    spec = build_modelspec(
        "chroma",
        timestamp=1_700_000_000,
        resolution="512,768",
        thumbnail=str(thumbnail),
        timesteps=(0, 500),
        clip_skip=2,
    )
    assert spec["modelspec.architecture"] == "chroma/lora"
    assert spec["modelspec.title"] == "LoRA@1700000000"
    assert spec["modelspec.resolution"] == "512x768"
    assert spec["modelspec.thumbnail"].startswith("data:image/png;base64,")
    assert spec["modelspec.timestep_range"] == "0,500" and spec["modelspec.encoder_layer"] == "2"
    assert all(isinstance(v, str) for v in spec.values())
    with pytest.raises(ValueError, match="model_type"):
        build_modelspec("sdxl")


def crash_midway(real_writer):
    """A writer that leaves half a file behind and then dies, as a killed process or full disk would."""

    def writer(obj, path, *args, **kwargs):
        real_writer(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("disk full")

    return writer


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_crash_mid_save_never_leaves_a_partial_file_under_the_final_name(flux, tmp_path, monkeypatch, suffix):
    file = tmp_path / f"lora{suffix}"
    first, second = trained(flux, seed=1), trained(flux, seed=2)
    first.save_weights(file, None, None)
    good = file.read_bytes()
    if suffix == ".safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", crash_midway(safetensors.torch.save_file))
    else:
        import networks.lora_flux_files

        writer = networks.lora_flux_files.write_torch_file
        monkeypatch.setattr(networks.lora_flux_files, "write_torch_file", crash_midway(writer))
    with pytest.raises(OSError, match="disk full"):
        second.save_weights(file, None, None)
    with pytest.raises(OSError, match="disk full"):
        second.save_weights(tmp_path / f"new{suffix}", None, None)
    monkeypatch.undo()
    assert file.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]
    again = create_network(1.0, 4, 2, None, [None, None], flux)
    again.load_weights(file)
    assert torch.equal(
        again.lora_unet_single_blocks_1_linear1.lora_up.weight, first.lora_unet_single_blocks_1_linear1.lora_up.weight
    )


def test_a_file_without_alphas_loads_at_scale_1_whichever_way_it_is_loaded(flux, tmp_path, caplog):
    """Every loader reads a module without alpha at scale 1 (alpha = rank); --network_alpha 1 must not make it 1/4,
    and the modules are loaded, not 'untrained'."""
    import logging

    from networks.lora_flux import create_network_from_weights

    weights = {k: v for k, v in trained(flux, dim=4, alpha=1).state_dict().items() if not k.endswith(".alpha")}
    path = str(tmp_path / "no_alpha.safetensors")
    safetensors.torch.save_file(weights, path)
    network = create_network(1.0, 4, 1.0, None, [None, None], flux)  # alpha 1: scale 1/4 unless the file says
    with caplog.at_level(logging.INFO):
        network.load_weights(path)
    assert {lora.scale for lora in network.all_loras()} == {1.0}
    assert "not in the file" not in caplog.text and "modules have no alpha: alpha = rank (scale 1)" in caplog.text
    from_file, _ = create_network_from_weights(1.0, path, None, [None, None], flux)
    assert {lora.scale for lora in from_file.all_loras()} == {1.0}
    assert all(torch.equal(network.state_dict()[k], v) for k, v in weights.items())


def test_the_trainer_reads_a_lora_in_another_tools_format_as_the_sd_scripts_file(tmp_path):
    """--base_weights and --network_weights (with --dim_from_weights) read through the same network code: an
    ai-toolkit / diffusers file stopped there as "not a LoRA in sd-scripts' format"."""
    import copy

    from library.lora_formats import to_ai_toolkit
    from library.safetensors_io import load_safetensors, save_safetensors
    from networks.lora_flux import create_network_from_weights
    from tests.test_merge_lora import write_lora

    model = random_model(tiny_flux_params(), seed=2)
    ours = write_lora(tmp_path / "ours.safetensors", model, alpha=2.0)
    theirs = str(tmp_path / "theirs.safetensors")
    save_safetensors(to_ai_toolkit(load_safetensors(ours)).state_dict, theirs)
    merged = []
    for file in (ours, theirs):
        target = copy.deepcopy(model)
        network, weights = create_network_from_weights(1.0, file, None, [None, None], target, for_inference=True)
        network.merge_to([None, None], target, weights)
        merged.append(target.state_dict())
        info = network.load_weights(file)  # as --network_weights with --dim_from_weights
        assert not info.missing_keys and not info.unexpected_keys
    assert merged[0].keys() == merged[1].keys()
    assert any(not torch.equal(value, model.state_dict()[key]) for key, value in merged[0].items())
    for key, value in merged[0].items():
        torch.testing.assert_close(merged[1][key], value, rtol=1e-5, atol=1e-6, msg=key)
