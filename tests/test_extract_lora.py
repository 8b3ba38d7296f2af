"""networks/flux_extract_lora.py: extracting from (base, base + a rank-r LoRA) at --dim r recovers the LoRA's
weight changes, and the extracted file loads in the trainer and in inference."""

import errno
import os

import numpy as np
import pytest
import torch

import flux_train_network
from library.flux_utils import load_flow_model
from library.safetensors_io import load_safetensors, read_metadata
from networks import flux_extract_lora, flux_merge_lora
from networks.lora_flux import create_network_from_weights
from tests.test_lora_math import assert_close_to, dit_inputs
from tests.test_merge_lora import deltas, write_lora
from tests.training_helpers import base_argv, dataset

RANK = 3


@pytest.fixture(scope="module", params=["dev", "chroma"])
def tuned(request, tiny_model_files, tmp_path_factory):
    """(base file, tuned file, the LoRA merged into it, model type): tuned = base + a rank-3 LoRA."""
    folder = tmp_path_factory.mktemp(f"extract_{request.param}")
    model_type = "chroma" if request.param == "chroma" else "flux"
    base = tiny_model_files.chroma if model_type == "chroma" else tiny_model_files.flux_dev
    _, model = load_flow_model(base, torch.float32, "cpu", model_type=model_type)
    lora = write_lora(folder / "known.safetensors", model, dim=RANK, alpha=1.5, seed=5, std=0.2)
    tuned_file = folder / "tuned.safetensors"
    assert flux_merge_lora.main(["--flux_model", base, "--save_to", str(tuned_file), "--models", lora]) == 0
    return base, str(tuned_file), lora, model_type


def extract(base, tuned_file, out, *extra) -> int:
    args = ["--model_org", str(base), "--model_tuned", str(tuned_file), "--save_to", str(out), "--dim", str(RANK)]
    return flux_extract_lora.main(args + [str(e) for e in extra])


def test_extraction_at_rank_r_recovers_the_change_and_the_tuned_output(tuned, tmp_path):
    base, tuned_file, lora, model_type = tuned
    out = tmp_path / "extracted.safetensors"
    assert extract(base, tuned_file, out, "--clamp_quantile", "1.0") == 0
    extracted, known = deltas(load_safetensors(out)), deltas(load_safetensors(lora))
    assert extracted.keys() == known.keys()
    for name, delta in known.items():
        torch.testing.assert_close(extracted[name], delta, rtol=0, atol=1e-5 * delta.abs().max().item(), msg=name)

    _, model = load_flow_model(base, torch.float32, "cpu", model_type=model_type)
    _, tuned_model = load_flow_model(tuned_file, torch.float32, "cpu", model_type=model_type)
    x = dit_inputs(model.params)
    with torch.no_grad():
        base_out, tuned_out = model(**x), tuned_model(**x)
        network, weights = create_network_from_weights(1.0, str(out), None, [None, None], model, for_inference=True)
        network.apply_to([None, None], model)
        network.load_state_dict(weights)
        assert_close_to(model(**x), tuned_out, base_out)

    metadata = read_metadata(out)
    chroma = model_type == "chroma"
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_network_args"]) == ("3", "3.0", "{}")
    assert metadata["ss_base_model_version"] == ("chroma" if chroma else "flux1")
    assert metadata["modelspec.architecture"] == ("chroma/lora" if chroma else "flux-1-dev/lora")
    assert "sshs_model_hash" in metadata


def test_clamp_quantile_bounds_magnitudes(tuned, tmp_path):
    base, tuned_file, _, _ = tuned
    out = tmp_path / "clamped.safetensors"
    assert extract(base, tuned_file, out, "--clamp_quantile", "0.6", "--save_precision", "fp16", "--no_metadata") == 0
    sd = load_safetensors(out)
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.float16}
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas and {v.dtype for v in alphas.values()} == {torch.float32}  # exact at any rank (docs §17.7)
    assert not any(k.startswith("modelspec.") for k in read_metadata(out))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
    magnitudes = torch.cat([up.flatten(), down.flatten()]).abs()
    bound = magnitudes.max()
    assert (magnitudes >= bound - 1e-3 * bound).float().mean() > 0.3, "40% of the values were clamped to the bound"
    assert (up == -bound).any() or (down == -bound).any(), "negative values are clamped at minus the same bound"


@pytest.mark.parametrize("tuned", ["dev"], indirect=True)
def test_changes_outside_the_block_weights_are_named_and_the_recorded_rank_is_the_files(tuned, tmp_path, caplog):
    from library.safetensors_io import save_safetensors

    base, tuned_file, _, _ = tuned
    with caplog.at_level("WARNING"):
        assert extract(base, tuned_file, tmp_path / "plain.safetensors") == 0
    assert not [r for r in caplog.records if "outside the block" in r.getMessage()]

    weights = load_safetensors(tuned_file)
    weights["img_in.weight"] = weights["img_in.weight"] + 0.01
    weights["final_layer.linear.bias"] = weights["final_layer.linear.bias"] * 2
    weights["double_blocks.0.img_attn.norm.query_norm.scale"] += 1
    also_elsewhere = str(tmp_path / "tuned_elsewhere.safetensors")
    save_safetensors(weights, also_elsewhere)
    out = tmp_path / "wide_dim.safetensors"
    with caplog.at_level("WARNING"):
        assert extract(base, also_elsewhere, out, "--dim", "100") == 0  # the tiny model is 64 wide
    (record,) = [r for r in caplog.records if "outside the block" in r.getMessage()]
    assert record.getMessage().endswith(
        "3 tensors outside the block Linear weights differ between the models and are not in the LoRA: "
        "double_blocks.0.img_attn.norm.query_norm.scale, final_layer.linear.bias, img_in.weight"
    )
    sd, metadata = load_safetensors(out), read_metadata(out)
    assert max(v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")) == 64
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("64", "64.0")


def test_a_schnell_model_gives_a_schnell_lora(tiny_model_files, tmp_path):
    from library.safetensors_io import save_safetensors

    weights = load_safetensors(tiny_model_files.flux_schnell)
    key = "double_blocks.0.img_attn.proj.weight"
    rows, columns = weights[key].shape
    weights[key] = weights[key] + 1e-2 * torch.outer(torch.linspace(-1, 1, rows), torch.linspace(1, 2, columns))
    save_safetensors(weights, tmp_path / "schnell_tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    assert extract(tiny_model_files.flux_schnell, tmp_path / "schnell_tuned.safetensors", out) == 0
    assert list(deltas(load_safetensors(out))) == ["lora_unet_double_blocks_0_img_attn_proj"]
    metadata = read_metadata(out)
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert metadata["ss_base_model_version"] == "flux1"


def test_models_in_diffusers_layout_extract_as_their_bfl_files(tuned, tmp_path):
    from library.flux_key_mapping import bfl_to_diffusers
    from library.safetensors_io import save_safetensors

    base, tuned_file, _, _ = tuned
    as_diffusers = {}
    for name, path in (("base", base), ("tuned", tuned_file)):
        as_diffusers[name] = str(tmp_path / f"{name}_diffusers.safetensors")
        save_safetensors(bfl_to_diffusers(load_safetensors(path)), as_diffusers[name])
    assert extract(base, tuned_file, tmp_path / "bfl.safetensors") == 0
    expected = load_safetensors(tmp_path / "bfl.safetensors")
    for org, tuned_model in ((as_diffusers["base"], as_diffusers["tuned"]), (base, as_diffusers["tuned"])):
        out = tmp_path / "from_diffusers.safetensors"
        assert extract(org, tuned_model, out) == 0
        got = load_safetensors(out)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key].abs(), value.abs(), rtol=1e-4, atol=1e-6, msg=key)  # SVD signs


def test_comfy_scaled_fp8_weights_are_read_times_their_scales(tuned, tmp_path):
    """A ComfyUI scaled-fp8 base: its real weights are fp8 x scale_weight, and only the weight that changed
    gets a module, with the change the dequantized base and the tuned model differ by."""
    from library.safetensors_io import save_safetensors

    base, _, _, _ = tuned
    weights = load_safetensors(base)
    changed = "double_blocks.0.img_attn.proj.weight"
    scaled, dequantized = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, dict(weights)
    for key in flux_extract_lora.extraction_keys(list(weights)):
        scale = weights[key].abs().max() / 448
        scaled[key] = (weights[key] / scale).to(torch.float8_e4m3fn)
        scaled[key.removesuffix("weight") + "scale_weight"] = scale
        dequantized[key] = scaled[key].float() * scale
    scaled.update({k: v for k, v in weights.items() if k not in scaled})
    rows, columns = weights[changed].shape
    change = torch.outer(torch.linspace(-1, 1, rows), torch.linspace(1, 2, columns))
    dequantized[changed] = dequantized[changed] + 1e-3 * change
    save_safetensors(scaled, tmp_path / "base_fp8.safetensors")
    save_safetensors(dequantized, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    assert extract(tmp_path / "base_fp8.safetensors", tmp_path / "tuned.safetensors", out, "--clamp_quantile", "1") == 0
    (name,) = deltas(load_safetensors(out))
    assert name == "lora_unet_double_blocks_0_img_attn_proj"
    torch.testing.assert_close(deltas(load_safetensors(out))[name].float(), 1e-3 * change, rtol=0, atol=1e-7)


def test_quantile_matches_torch_and_full_quantile_clamps_nothing():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1001, generator=g) ** 3
    for q in (0.0, 0.37, 0.99, 1.0):
        torch.testing.assert_close(flux_extract_lora.quantile(values, q), torch.quantile(values, q))
    # factors with a lopsided tail on one side: the signed 1.0-quantile of sd-scripts can clip one side
    u = torch.tensor([[6.0, 0.5], [-40.0, 1.0], [1.0, -2.0], [0.5, 0.5]])
    v = torch.tensor([[1.0, -0.5, 0.25, 2.0, 0.1], [0.3, 0.2, -1.0, 0.5, 3.0]])
    delta = u @ v
    up, down = flux_extract_lora.extract_module(delta, 2, 1.0)
    torch.testing.assert_close(up @ down, delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tuned", ["dev"], indirect=True)  # one trainer run is enough
def test_extracted_lora_loads_in_the_trainer(tiny_model_files, tuned, tmp_path):
    base, tuned_file, _, _ = tuned
    out = tmp_path / "extracted.safetensors"
    assert extract(base, tuned_file, out) == 0
    output_dir = str(tmp_path / "train")
    argv = base_argv(tiny_model_files, dataset(tmp_path), output_dir, steps=1, network_weights=str(out),
                     dim_from_weights=True, learning_rate="1e-12")  # fmt: skip
    assert flux_train_network.main(argv) == 0
    trained, extracted = load_safetensors(os.path.join(output_dir, "lora.safetensors")), load_safetensors(out)
    assert trained.keys() == extracted.keys()
    for key, value in extracted.items():
        torch.testing.assert_close(trained[key].float(), value.float(), rtol=0, atol=1e-9, msg=key)


@pytest.mark.parametrize("tuned", ["dev"], indirect=True)  # Chroma is covered at the DiT level above
def test_extracted_lora_in_inference_gives_the_tuned_image(tiny_model_files, tuned, tmp_path):
    from tests.test_inference_script import generate

    base, tuned_file, _, model_type = tuned
    out = tmp_path / "extracted.safetensors"
    assert extract(base, tuned_file, out, "--clamp_quantile", "1.0") == 0
    models = tiny_model_files
    key = "chroma" if model_type == "chroma" else "flux_dev"
    with_lora, _ = generate(models, tmp_path, "lora", "--seed", 1, "--lora_weights", out, model_type=model_type)
    tuned_models = type(models)(**{**models.__dict__, key: tuned_file})
    tuned_image, _ = generate(tuned_models, tmp_path, "tuned", "--seed", 1, model_type=model_type)
    base_image, _ = generate(models, tmp_path, "base", "--seed", 1, model_type=model_type)
    assert np.abs(with_lora - tuned_image).max() <= 1
    assert np.abs(base_image - tuned_image).max() > 5, "the change is visible"


@pytest.mark.parametrize(
    "case, message",
    [
        ("dim", "--dim 0: the rank must be 1 or more"),
        ("same", "has the same block weights as --model_org: nothing to extract"),
        ("other_width", "not the same architecture"),
        ("overwrite", "is one of the models"),
        ("not_flux", "no double_blocks / single_blocks weights"),
        ("device", "--device gpu0: not a device name (e.g. cpu, cuda, cuda:1)"),
        ("save_to_folder", "adir: is a folder; give a file name"),  # before the extraction, not after it
        ("clamp_quantile", "--clamp_quantile 0.0: expected a value in (0, 1]"),
    ],
)
def test_user_errors(tiny_model_files, tuned, tmp_path, capsys, case, message):
    from library.tiny_models import random_model, tiny_flux_params, write_model

    base, tuned_file, _, _ = tuned
    out = tmp_path / "out.safetensors"
    args = {"dim": (base, tuned_file, out, "--dim", "0"), "same": (base, base, out)}.get(case)
    if case == "other_width":
        wide = write_model(random_model(tiny_flux_params(hidden_size=96, num_heads=6)), str(tmp_path / "w.safetensors"))
        args = (base, wide, out)
    elif case == "overwrite":
        args = (base, tuned_file, tuned_file)
    elif case == "not_flux":
        args = (tiny_model_files.ae, tuned_file, out)
    elif case == "device":
        args = (base, tuned_file, out, "--device", "gpu0")
    elif case == "save_to_folder":
        (tmp_path / "adir").mkdir()
        args = (base, tuned_file, tmp_path / "adir")
    elif case == "clamp_quantile":
        args = (base, tuned_file, out, "--clamp_quantile", "0")
    assert extract(*args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not out.exists()


def test_an_extraction_that_fails_to_write_is_one_error_line(tiny_model_files, tmp_path, capsys, monkeypatch):
    import library.safetensors_io
    from library.safetensors_io import load_safetensors, save_safetensors
    from networks import flux_extract_lora

    weights = load_safetensors(tiny_model_files.flux_dev)
    key = next(k for k in weights if k.startswith("double_blocks.0.") and k.endswith("qkv.weight"))
    tuned = str(tmp_path / "tuned.safetensors")
    save_safetensors(weights | {key: weights[key] + 0.1 * torch.ones_like(weights[key])}, tuned)
    out = tmp_path / "lora.safetensors"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(library.safetensors_io, "save_safetensors", full_disk)
    argv = ["--model_org", tiny_model_files.flux_dev, "--model_tuned", tuned, "--save_to", str(out), "--dim", "2"]
    assert flux_extract_lora.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: [Errno 28] No space left on device: '{out}'"
    assert not out.exists()


@pytest.mark.parametrize("layout", ["bfl", "diffusers", "diffusers_original"])
@pytest.mark.parametrize("model_type", ["flux", "chroma"])
def test_dim_1_recovers_rank_1_changes_and_names_the_model_of_either_file_in_diffusers_layout(
    tiny_model_files, tmp_path, model_type, layout
):
    """A rank-1 change and a constant shift (rank 1 too) come back at --dim 1; with the tuned model or the original
    in diffusers' layout, the LoRA is still recorded as one for the FLUX dev / Chroma model it is."""
    from library.flux_key_mapping import bfl_to_diffusers
    from library.safetensors_io import save_safetensors

    base_file = tiny_model_files.chroma if model_type == "chroma" else tiny_model_files.flux_dev
    base = load_safetensors(base_file)
    g = torch.Generator().manual_seed(1)
    linear1, qkv = "single_blocks.0.linear1.weight", "double_blocks.1.txt_attn.qkv.weight"
    (rows, columns) = base[linear1].shape
    tuned = dict(base)
    tuned[linear1] = base[linear1] + torch.randn(rows, 1, generator=g) @ torch.randn(1, columns, generator=g) * 0.01
    tuned[qkv] = base[qkv] + 0.001
    tuned_file = tmp_path / "tuned.safetensors"
    save_safetensors(bfl_to_diffusers(tuned) if layout == "diffusers" else tuned, tuned_file)
    original_file = base_file
    if layout == "diffusers_original":
        original_file = tmp_path / "original_diffusers.safetensors"
        save_safetensors(bfl_to_diffusers(base), original_file)
    out = tmp_path / "extracted.safetensors"
    assert extract(original_file, tuned_file, out, "--dim", 1, "--clamp_quantile", "1.0") == 0

    sd = load_safetensors(out)
    names = ["lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_single_blocks_0_linear1"]
    assert sorted(sd) == sorted(f"{n}.{p}" for n in names for p in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert all(sd[f"{n}.lora_down.weight"].shape[0] == 1 for n in names)
    extracted = deltas(sd)
    # changes of up to 1e-3 and 0.1: the fp32 rounding of the tuned weights (not rank 1) and the SVD's are left
    for name, key, atol in zip(names, (qkv, linear1), (1e-7, 1e-6), strict=True):
        torch.testing.assert_close(extracted[name], (tuned[key] - base[key]).double(), rtol=0, atol=atol, msg=name)
    metadata = read_metadata(out)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("1", "1.0")
    chroma = model_type == "chroma"
    assert metadata["ss_base_model_version"] == ("chroma" if chroma else "flux1")
    assert metadata["modelspec.architecture"] == ("chroma/lora" if chroma else "flux-1-dev/lora")
