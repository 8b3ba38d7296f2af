"""Edges a mutation round over the safetensors reader and writer, image loading, the FLUX autoencoder, the
BFL <-> diffusers key mapping, the model loaders and Chroma found untested: each test fails on one or more
hand-made changes of that code that the rest of the suite let pass."""

from __future__ import annotations

import json
import logging
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.errors import CheckpointError, UserError
from library.safetensors_io import (
    SafetensorsReader,
    checkpoint_files,
    load_safetensors,
    load_sharded,
    read_header,
    read_headers,
    save_safetensors,
    warn_unless_safetensors_name,
    write_safetensors_streaming,
)


def _raw_file(path, header, data: bytes = b"") -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def _f32(shape, begin):
    n = 4 * int(np.prod(shape))
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


# ---- reading headers ----


def test_a_folder_or_a_stub_of_a_file_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match=r": a folder; give a single \.safetensors file$"):
        read_header(tmp_path)
    (tmp_path / "stub.safetensors").write_bytes(bytes(7))
    with pytest.raises(CheckpointError, match=r"stub\.safetensors: not a \.safetensors file \(7 bytes, too short"):
        read_header(tmp_path / "stub.safetensors")


def test_a_header_length_past_the_end_of_the_file_is_a_bad_header_length(tmp_path):
    header = json.dumps({"w": _f32([1], 0)}).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) + 4) + header)  # four bytes longer than what follows
    with pytest.raises(CheckpointError, match=r"f\.safetensors: not a \.safetensors file, or a damaged one \(bad head"):
        read_header(path)


def test_a_file_without_tensors_whose_header_fills_it_is_read(tmp_path):
    save_file({}, str(tmp_path / "empty.safetensors"), metadata={"k": "v"})
    assert read_header(tmp_path / "empty.safetensors")[:2] == ({}, {"k": "v"})
    _raw_file(tmp_path / "null.safetensors", {"__metadata__": None})
    assert read_header(tmp_path / "null.safetensors")[:2] == ({}, {})


@pytest.mark.parametrize("header, why", [
    (b'{"w": "\xff"}', "unreadable header"),
    (b"[1, 2]", "header is not a table"),
])
def test_a_header_that_is_not_a_json_table_is_named(tmp_path, header, why):
    path = _raw_file(tmp_path / "f.safetensors", header)
    with pytest.raises(CheckpointError, match=rf"f\.safetensors: not a \.safetensors file \({why}"):
        read_header(path)


def test_the_furthest_tensor_not_the_last_listed_decides_whether_a_file_is_truncated(tmp_path):
    header = {"far": _f32([4], 8), "near": _f32([2], 0)}
    path = _raw_file(tmp_path / "f.safetensors", header, bytes(16))  # 8 of the 24 bytes are missing
    with pytest.raises(CheckpointError, match=r"file is truncated \(\d+ bytes, the header needs \d+\)"):
        read_header(path)


def test_an_empty_tensor_is_read(tmp_path):
    save_file({"e": torch.zeros(0, 3), "w": torch.ones(2)}, str(tmp_path / "f.safetensors"))
    loaded = load_safetensors(tmp_path / "f.safetensors")
    assert loaded["e"].shape == (0, 3) and torch.equal(loaded["w"], torch.ones(2))


def test_a_file_cut_short_after_its_header_was_read_names_the_tensor(tmp_path):
    save_file({"w": torch.arange(8.0)}, str(tmp_path / "f.safetensors"))
    with SafetensorsReader(tmp_path / "f.safetensors") as reader:
        os.truncate(tmp_path / "f.safetensors", os.path.getsize(tmp_path / "f.safetensors") - 4)
        with pytest.raises(CheckpointError, match=r"f\.safetensors: file is truncated while reading 'w'"):
            reader.get("w")


def test_load_casts_floats_only_and_reads_only_the_keys_asked_for(tmp_path):
    save_file({"w": torch.randn(3), "step": torch.tensor([7], dtype=torch.int64)}, str(tmp_path / "f.safetensors"))
    loaded = load_safetensors(tmp_path / "f.safetensors", dtype=torch.bfloat16)
    assert loaded["w"].dtype == torch.bfloat16 and loaded["step"].dtype == torch.int64
    assert list(load_safetensors(tmp_path / "f.safetensors", keys=["step"])) == ["step"]
    meta = load_safetensors(tmp_path / "f.safetensors", device="meta")
    assert {t.device.type for t in meta.values()} == {"meta"}


def test_sharded_loading_reads_only_the_keys_asked_for_and_merges_metadata(tmp_path):
    save_file({"a": torch.ones(1), "b": torch.ones(2)}, str(tmp_path / "1.safetensors"), metadata={"x": "1"})
    save_file({"c": torch.ones(3)}, str(tmp_path / "2.safetensors"), metadata={"y": "2"})
    files = [str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors")]
    assert sorted(load_sharded(files, ["a", "c"])) == ["a", "c"]
    entries, metadata = read_headers(files)
    assert sorted(entries) == ["a", "b", "c"] and metadata == {"x": "1", "y": "2"}


# ---- finding a checkpoint's files ----


def _touch_checkpoint(path):
    save_file({"w": torch.ones(1)}, str(path))
    return str(path)


def test_an_index_lists_each_shard_once_and_a_weight_map_that_is_no_table_is_named(tmp_path):
    for i in (1, 2):
        _touch_checkpoint(tmp_path / f"m-0000{i}-of-00002.safetensors")
    index = tmp_path / "m.safetensors.index.json"
    one, two = "m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"
    shards = {"a": one, "b": two, "c": one}
    index.write_text(json.dumps({"weight_map": shards}))
    assert checkpoint_files(str(index)) == [str(tmp_path / f"m-0000{i}-of-00002.safetensors") for i in (1, 2)]
    index.write_text(json.dumps({"weight_map": ["m-00001-of-00002.safetensors"]}))
    with pytest.raises(CheckpointError, match=r"index\.json: not a safetensors index \(no readable weight_map"):
        checkpoint_files(str(index))


def test_a_diffusers_folder_missing_its_last_shard_names_it(tmp_path):
    for i in (1, 2):
        _touch_checkpoint(tmp_path / f"diffusion_pytorch_model-0000{i}-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"1 of 3 shards are missing: diffusion_pytorch_model-00003-of-00003"):
        checkpoint_files(str(tmp_path))


def test_a_diffusers_folder_with_one_variant_or_two_checkpoints(tmp_path):
    (tmp_path / "transformer").mkdir()
    one = _touch_checkpoint(tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
    _touch_checkpoint(tmp_path / "transformer" / "diffusion_pytorch_model_t5xxl.safetensors")  # not diffusers'
    assert checkpoint_files(str(tmp_path)) == [one]
    assert checkpoint_files(str(tmp_path / "transformer")) == [one]  # the subfolder itself given
    _touch_checkpoint(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer: holds 2 checkpoints \(diffusion_pytorch_model"):
        checkpoint_files(str(tmp_path))


# ---- writing ----


def test_streaming_writes_several_tensors_and_metadata_that_the_package_reads(tmp_path):
    tensors = {"a": torch.randn(2, 3), "i": torch.arange(5, dtype=torch.int16), "e": torch.zeros(0),
               "b": torch.randn(7).to(torch.bfloat16)}  # fmt: skip
    layout = {k: (list(v.shape), v.dtype) for k, v in tensors.items()}
    path = tmp_path / "out.safetensors"
    write_safetensors_streaming(path, layout, iter(tensors.items()), metadata={"n": 1})
    theirs = load_file(str(path))
    assert theirs.keys() == tensors.keys() and all(torch.equal(theirs[k], v) for k, v in tensors.items())
    assert read_header(path)[1] == {"n": "1"}
    for n in range(1, 9):  # every length of header modulo 8: padded with spaces to a multiple of 8
        write_safetensors_streaming(path, {"k" * n: ([1], torch.float32)}, [("k" * n, torch.ones(1))])
        start = read_header(path)[2]
        raw = path.read_bytes()[8:start]
        assert start % 8 == 0 and raw.rstrip(b" ").endswith(b"}") and len(raw) - len(raw.rstrip(b" ")) < 8, n
        assert torch.equal(load_file(str(path))["k" * n], torch.ones(1))


def test_a_streaming_write_that_fails_leaves_no_temporary_file(tmp_path):
    def broken():
        yield "a", torch.ones(2)
        raise RuntimeError("source gone")

    with pytest.raises(RuntimeError, match="source gone"):
        write_safetensors_streaming(tmp_path / "o.safetensors", {"a": ([2], torch.float32), "b": ([2], torch.float32)},
                                    broken())  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_a_save_reads_back_non_contiguous_tensors_over_a_stale_temporary_folder_with_the_umask_mode(tmp_path):
    path = tmp_path / "lora.safetensors"
    (tmp_path / f".lora.safetensors.tmp-{os.getpid()}").mkdir()  # left by a save that was killed
    weight = torch.arange(6.0).reshape(2, 3).t()
    mask = os.umask(0o022)
    try:
        save_safetensors({"w": weight}, path)
    finally:
        os.umask(mask)
    assert torch.equal(load_file(str(path))["w"], weight)
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == ["lora.safetensors"]


def test_a_full_disk_in_the_safetensors_writer_is_an_oserror_with_its_errno(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        save_safetensors({"w": torch.ones(1)}, tmp_path / "x.safetensors")
    assert e.value.errno == 28 and os.listdir(tmp_path) == []


def test_on_windows_a_rename_refused_ten_times_is_the_error_and_a_folder_is_no_output_file(tmp_path, monkeypatch):
    from library import safetensors_io

    calls = []

    def busy(src, dst):
        calls.append(dst)
        raise PermissionError(13, "Access is denied")

    monkeypatch.setattr(safetensors_io.os, "replace", busy)
    monkeypatch.setattr(safetensors_io.time, "sleep", lambda s: None)
    monkeypatch.setattr(safetensors_io.sys, "platform", "win32")
    with pytest.raises(PermissionError):
        safetensors_io.save_safetensors({"w": torch.ones(1)}, tmp_path / "lora.safetensors")
    assert len(calls) == 10 and os.listdir(tmp_path) == []
    with pytest.raises(UserError, match=r"^--save_to .*: is a folder; give a file name, e\.g\. .*out\.safetensors$"):
        safetensors_io.check_output_file(tmp_path, "--save_to")


def test_only_names_not_ending_in_safetensors_whatever_their_case_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="library.safetensors_io"):
        warn_unless_safetensors_name("OUT.SAFETENSORS", "--save_to")
        assert caplog.records == []
        warn_unless_safetensors_name("out.ckpt", "--save_to")
    assert "--save_to out.ckpt: the file is written in safetensors format" in caplog.text


# ---- images ----


def test_folders_named_like_images_are_neither_listed_nor_skipped(tmp_path):
    from library.images import list_images

    (tmp_path / "a.png").mkdir()
    (tmp_path / "b.Png").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "c.png")
    assert list_images(str(tmp_path)) == ([str(tmp_path / "c.png")], [])


def test_exif_orientation_8_turns_an_image_and_1_does_not(tmp_path):
    from library.images import is_turned_by_exif

    for orientation, turned in ((1, False), (2, True), (8, True)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (6, 4)).save(tmp_path / f"{orientation}.jpg", exif=exif.tobytes())
        assert is_turned_by_exif(str(tmp_path / f"{orientation}.jpg")) is turned, orientation


def test_a_header_with_a_zero_height_is_refused(monkeypatch):
    from library import images

    monkeypatch.setattr(images, "_size_and_orientation", lambda path: (4, 0, 1))
    with pytest.raises(UserError, match=r"^x\.png: image has size 4x0; fix or remove the file\.$"):
        images.read_image_size("x.png")


def test_one_bad_image_is_the_whole_message():
    from library.images import stop_for_bad_images

    with pytest.raises(UserError) as e:
        stop_for_bad_images(["a.png: broken"])
    assert str(e.value) == "a.png: broken"
    stop_for_bad_images([])


def test_32_bit_integer_and_float_images_become_8_bit_by_their_range_with_rounding(tmp_path):
    from library.images import load_image

    def grey(img, name):
        img.save(tmp_path / name)
        return load_image(str(tmp_path / name))[0][0, :, 0].tolist()

    assert grey(Image.fromarray(np.array([[0, 1, 128, 255]], np.int32)), "i8.tiff") == [0, 1, 128, 255]
    assert grey(Image.fromarray(np.array([[0, 257, 32768, 65535]], np.int32)), "i16.tiff") == [0, 1, 128, 255]
    assert grey(Image.fromarray(np.array([[0, 1, 128, 255]], np.uint16)), "u16.png") == [0, 0, 0, 1]
    assert grey(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F"), "f.tiff") == [0, 128, 255]
    assert grey(Image.fromarray(np.array([[0.0, 10.6, 2.0]], np.float32), "F"), "c.tiff") == [0, 11, 2]


def test_an_rgb_colour_key_becomes_an_alpha_mask(tmp_path):
    from library.images import load_image

    rgb = Image.new("RGB", (2, 1), (10, 20, 30))
    rgb.putpixel((1, 0), (1, 2, 3))
    rgb.save(tmp_path / "key.png", transparency=(1, 2, 3))
    arr, alpha = load_image(str(tmp_path / "key.png"))
    assert alpha.tolist() == [[255, 0]] and arr[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("mode", ["PA", "RGBa"])
def test_premultiplied_and_palette_alpha_modes_keep_their_alpha(monkeypatch, mode):
    from library import images

    source = Image.new("RGBA", (2, 1), (200, 100, 50, 128)) if mode != "PA" else Image.new("PA", (2, 1), (0, 128))
    opened = source.convert(mode) if mode != "PA" else source
    assert opened.mode == mode
    monkeypatch.setattr(images.Image, "open", lambda path: opened)
    assert images.load_image("x.png")[1].tolist() == [[128, 128]]


def test_resize_reads_height_then_width_and_choose_crop_refuses_a_too_short_image():
    from library.images import choose_crop, resize

    tall = np.zeros((5, 3, 3), np.uint8)  # H 5, W 3
    assert resize(tall, (5, 3), "area").shape == (3, 5, 3)
    assert resize(tall, (3, 5), "area") is tall
    with pytest.raises(ValueError, match=r"resized size \(10, 5\) is smaller than bucket \(8, 8\)"):
        choose_crop((10, 5), (8, 8), None)


def test_a_random_crop_draws_nothing_for_a_side_without_excess():
    import random

    from library.images import choose_crop

    for seed in range(5):
        box = choose_crop((8, 12), (8, 8), random.Random(seed))
        assert (box.left, box.top) == (0, random.Random(seed).randint(0, 4))


def test_interpolation_aliases_are_canonical_and_linked_folders_share_a_canonical_path(tmp_path):
    from library.images import canonical_interpolation, canonical_path

    assert [canonical_interpolation(n) for n in ("linear", "cubic", "box", "lanczos")] == [
        "bilinear", "bicubic", "area", "lanczos"]  # fmt: skip
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert canonical_path(str(tmp_path / "link" / "a.png")) == canonical_path(str(tmp_path / "real" / "a.png"))


# ---- the autoencoder ----


@pytest.fixture(scope="module")
def tiny_ae():
    from library.tiny_models import random_model, tiny_ae_params

    return random_model(tiny_ae_params(), seed=3).eval()


def test_encode_samples_the_posterior_with_its_standard_deviation_and_the_cache_takes_its_mean(tiny_ae):
    from library.flux_ae import PosteriorMeanEncoder

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, logvar = tiny_ae.encoder(x).chunk(2, dim=1)
        logvar = logvar + 1.0  # a wider posterior than the random weights give, so the noise shows
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
        tiny_ae.encoder.conv_out.bias[16:] += 1.0
        try:
            torch.manual_seed(5)
            sampled = tiny_ae.encode(x)
            cached = PosteriorMeanEncoder(tiny_ae).encode(x)
            mean_only = tiny_ae.encode(x, sample=False)
        finally:
            tiny_ae.encoder.conv_out.bias[16:] -= 1.0
    torch.testing.assert_close(sampled, 0.3611 * (mean + torch.exp(0.5 * logvar) * noise - 0.1159), rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, 0.3611 * (mean - 0.1159), rtol=0, atol=1e-6)
    assert torch.equal(cached, mean_only)
    assert PosteriorMeanEncoder(tiny_ae).dtype == torch.float32 and PosteriorMeanEncoder(tiny_ae).device.type == "cpu"


def test_ae_widths_and_depths_are_read_from_the_shapes():
    from library.flux_ae import AutoEncoder, AutoEncoderParams, infer_ae_params

    p = AutoEncoderParams(in_channels=1, ch=32, out_ch=2, ch_mult=[1, 2, 3], num_res_blocks=3, z_channels=4)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoEncoder(p).state_dict().items()}
        assert AutoEncoder(p).to(torch.bfloat16).dtype == torch.bfloat16
    got = infer_ae_params(shapes)
    assert (got.in_channels, got.ch, got.out_ch, got.ch_mult, got.num_res_blocks, got.z_channels) == (
        1, 32, 2, [1, 2, 3], 3, 4)  # fmt: skip
    narrow = dict(shapes, **{"encoder.conv_in.weight": (48, 1, 3, 3)})
    for level, mult in enumerate([1, 2, 3]):
        narrow[f"encoder.down.{level}.block.0.conv1.weight"] = (48 * mult, 48, 3, 3)
    with pytest.raises(ValueError, match=r"AE widths \[48, 96, 144\] must be multiples of 32"):
        infer_ae_params(narrow)


# ---- BFL <-> diffusers keys ----


def test_an_incomplete_fused_projection_is_named_and_split_pieces_own_their_memory():
    from library.flux_key_mapping import bfl_to_diffusers, diffusers_to_bfl
    from library.tiny_models import random_model, tiny_flux_params

    bfl = random_model(tiny_flux_params(True, depth=1, depth_single=1), seed=2).state_dict()
    diffusers = bfl_to_diffusers(bfl)
    qkv = bfl["double_blocks.0.img_attn.qkv.weight"]
    q = diffusers["transformer_blocks.0.attn.to_q.weight"]
    assert q.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
    del diffusers["transformer_blocks.0.attn.to_v.weight"]
    with pytest.raises(KeyError, match=r"incomplete fused projection double_blocks\.0\.img_attn\.qkv: missing "
                                       r"\['transformer_blocks\.0\.attn\.to_v\.weight'\]"):  # fmt: skip
        diffusers_to_bfl(diffusers)


def test_a_dit_without_qkv_biases_maps_both_ways():
    from library.flux_key_mapping import bfl_to_diffusers, diffusers_to_bfl
    from library.tiny_models import random_model, tiny_flux_params

    bfl = random_model(tiny_flux_params(True, depth=1, depth_single=1, qkv_bias=False), seed=2).state_dict()
    diffusers = bfl_to_diffusers(bfl)
    assert "transformer_blocks.0.attn.to_q.bias" not in diffusers
    back = diffusers_to_bfl(diffusers)
    assert back.keys() == bfl.keys() and all(torch.equal(back[k], bfl[k]) for k in bfl)


def test_a_shard_of_diffusers_single_blocks_is_in_diffusers_layout():
    from library.flux_key_mapping import is_diffusers_state_dict

    assert is_diffusers_state_dict(["single_transformer_blocks.3.proj_out.weight"])
    assert is_diffusers_state_dict(["x_embedder.weight"])
    assert not is_diffusers_state_dict(["single_blocks.3.linear2.weight", "img_in.weight"])


def test_color_aug_draws_as_sd_scripts_and_wraps_the_hue_around_the_circle():
    """Draws: apply below 0.33, then the hue shift above 0.5 (else a gamma), then the amount: 8/180 of the
    circle at most, added to Pillow's 0-255 hue and wrapped around 256."""
    import random

    from library.images import color_aug

    hues = np.arange(256, dtype=np.uint8)
    hsv = np.stack([hues[None, :], np.full((1, 256), 255, np.uint8), np.full((1, 256), 255, np.uint8)], -1)
    colours = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    before = np.asarray(Image.fromarray(colours).convert("HSV"))[..., 0].astype(np.float32)
    checked = set()
    for seed in range(40):
        r = random.Random(seed)
        if r.random() > 0.33 or r.random() <= 0.5:
            continue
        shift = r.uniform(-8.0, 8.0) * 256.0 / 180.0
        out = np.asarray(Image.fromarray(color_aug(colours, random.Random(seed))).convert("HSV"))[..., 0]
        expected = ((before + shift) % 256.0).astype(np.uint8)
        back = np.asarray(Image.fromarray(np.stack([expected, hsv[..., 1], hsv[..., 2]], -1), "HSV").convert("RGB"))
        assert np.array_equal(out, np.asarray(Image.fromarray(back).convert("HSV"))[..., 0]), seed
        checked.add(shift > 0)
    assert checked == {True, False}


def test_color_aug_gamma_rounds_to_the_nearest_value():
    import random

    from library.images import color_aug

    grey = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (1, 1, 3))
    checked = 0
    for seed in range(40):
        r = random.Random(seed)
        if r.random() > 0.33 or r.random() > 0.5:
            continue
        gamma = r.uniform(0.95, 1.05)
        expected = np.floor(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5)
        out = color_aug(grey, random.Random(seed))[0, :, 0]
        assert (out != expected).mean() < 0.03, seed
        checked += 1
    assert checked >= 3


# ---- the loaders ----


def test_tensors_are_converted_one_block_at_a_time_and_integers_are_not_cast(tmp_path, dev_file):
    from library.flux_utils import _load_tensors

    path, model = dev_file
    groups = []
    sd = _load_tensors([path], "cpu", torch.bfloat16, convert=lambda group: groups.append(sorted(group)) or group)
    assert sd.keys() == model.state_dict().keys()
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in sd if k.startswith(("double_blocks.", "single_blocks."))}
    assert len(groups) == len(blocks) + 1 == 5
    for keys in groups:
        assert len({k.split(".")[:2][0] + k.split(".")[:2][1] if "blocks." in k else "" for k in keys}) == 1, keys
    save_file({"w": torch.randn(2), "n": torch.arange(3)}, str(tmp_path / "mixed.safetensors"))
    mixed = _load_tensors([str(tmp_path / "mixed.safetensors")], "cpu", torch.bfloat16)
    assert mixed["w"].dtype == torch.bfloat16 and mixed["n"].dtype == torch.int64


def test_a_comfy_scaled_fp8_file_loaded_in_its_own_dtype_is_dequantized_to_float32(tmp_path, dev_file):
    from library.flux_utils import load_flow_model

    path, model = dev_file
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448.0
            sd[key] = (value / scale).to(torch.float8_e4m3fn)
            sd[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            sd[key] = value
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "scaled.safetensors"))
    _, loaded = load_flow_model(str(tmp_path / "scaled.safetensors"), None, "cpu")
    weight = loaded.double_blocks[0].img_attn.qkv.weight
    assert weight.dtype == torch.float32
    assert (weight - model.double_blocks[0].img_attn.qkv.weight).abs().max() < 0.1 * weight.abs().max()


def test_fp8_block_linears_store_only_the_blocks_linears_in_fp8(dev_file):
    from library.flux_utils import load_flow_model

    path, _ = dev_file
    _, loaded = load_flow_model(path, torch.bfloat16, "cpu", fp8_block_linears=True)
    assert loaded.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert loaded.single_blocks[1].linear2.weight.dtype == torch.float8_e4m3fn
    assert loaded.img_in.weight.dtype == torch.bfloat16 and loaded.double_blocks[0].img_attn.qkv.bias.dtype == (
        torch.bfloat16)  # fmt: skip


def test_assign_names_the_first_ten_missing_keys_and_their_count(dev_file, caplog):
    from library.flux_utils import assign_state_dict, dit_on_meta
    from library.tiny_models import tiny_flux_params

    _, model = dev_file
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("double_blocks.")}
    missing = sorted(k for k in model.state_dict() if k.startswith("double_blocks."))
    assert len(missing) > 11
    with pytest.raises(CheckpointError) as e:
        assign_state_dict(dit_on_meta(tiny_flux_params(True)), sd, "src.safetensors")
    assert str(e.value) == (f"src.safetensors: missing keys: {', '.join(missing[:10])}, ... ({len(missing)} in all). "
                            "The file is incomplete or not the model it was given as")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="library.flux_utils"):
        assign_state_dict(dit_on_meta(tiny_flux_params(True)), dict(model.state_dict(), extra=torch.ones(1)), "src")
    assert "src: ignoring unexpected keys: extra" in caplog.text


def test_packed_weights_are_refused_in_either_layout_and_a_diffusers_lora_is_named_as_one(tmp_path, dev_file):
    from library.flux_key_mapping import bfl_to_diffusers
    from library.flux_utils import check_flow_model_file

    _, model = dev_file
    sd = dict(model.state_dict())
    sd["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(sd["double_blocks.0.img_attn.qkv.weight"].shape,
                                                            dtype=torch.uint8)  # fmt: skip
    save_file(sd, str(tmp_path / "nf4.safetensors"))
    with pytest.raises(CheckpointError, match=r"nf4\.safetensors: double_blocks\.0\.img_attn\.qkv\.weight is stored "
                                              r"as U8: an int8 or 4-bit quantized file"):  # fmt: skip
        check_flow_model_file(str(tmp_path / "nf4.safetensors"))
    diffusers = bfl_to_diffusers(dict(model.state_dict()))
    q = "transformer_blocks.0.attn.to_q.weight"
    diffusers[q] = diffusers[q].to(torch.int8)
    save_file(diffusers, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.to_q\.weight is stored as I8"):
        check_flow_model_file(str(tmp_path / "int8.safetensors"))
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError) as e:
        check_flow_model_file(str(tmp_path / "lora.safetensors"))
    assert "expected a FLUX.1 or Chroma DiT, but this file looks like a LoRA" in str(e.value)


def test_an_ae_file_without_a_decoder_or_one_tensor_short_stops_at_the_header(tmp_path, tiny_ae):
    from library.flux_utils import check_ae_file

    sd = tiny_ae.state_dict()
    save_file({k: v for k, v in sd.items() if k.startswith("encoder.")}, str(tmp_path / "enc.safetensors"))
    with pytest.raises(CheckpointError) as e:
        check_ae_file(str(tmp_path / "enc.safetensors"))
    assert "the FLUX autoencoder" in str(e.value) and "unsupported autoencoder layout" not in str(e.value)
    save_file({k: v for k, v in sd.items() if k != "decoder.norm_out.bias"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match=r"short\.safetensors.*decoder\.norm_out\.bias"):
        check_ae_file(str(tmp_path / "short.safetensors"))
