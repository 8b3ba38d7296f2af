"""Edges of the tokenizers, the text encoders, the model hashes and the stop-on-signal handling that the other tests
left open (found by a mutation round over library/tokenizers_flux.py, text_encoders.py, model_hashes.py and
interrupts.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import types

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer, T5TokenizerFast

from library import interrupts
from library.errors import CheckpointError, UserError
from library.model_hashes import (
    build_modelspec,
    model_hash,
    modelspec_date,
    precalculate_safetensors_hashes,
    sha256_in_background,
)
from library.text_encoders import FluxTextEncodingStrategy, load_clip_l, load_t5xxl
from library.tiny_text_encoders import write_tiny_clip_l, write_tiny_t5
from library.tokenizers_flux import (
    CLIP_L_TOKENIZER_ID,
    T5_XXL_TOKENIZER_ID,
    FluxTokenizeStrategy,
    load_tokenizer,
    placeholder_reason,
    write_tiny_tokenizers,
)

CLIP_DIR = "openai_clip-vit-large-patch14"

# ---------------------------------------------------------------------------------------------
# interrupts


class OneProcess:
    num_processes, device = 1, "cpu"

    def reduce(self, tensor, reduction):  # pragma: no cover - a single process never reduces
        raise AssertionError("a single process does not reduce")


class TwoProcesses:
    """The other process got ``other`` (or nothing)."""

    num_processes, device = 2, "cpu"

    def __init__(self, other):
        self.other = other

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + torch.tensor([float(s == self.other) for s in interrupts.HANDLED])


def test_the_handlers_are_installed_for_sigint_and_sigterm_inside_and_restored_after():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupts.GracefulStop() as stop:
        for s in (signal.SIGINT, signal.SIGTERM):
            assert signal.getsignal(s) == stop._handle, signal.Signals(s).name
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl+C: a stop request, no KeyboardInterrupt
        deadline = time.monotonic() + 5
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_without_a_signal_the_name_is_empty_and_the_exit_status_is_sigints():
    stop = interrupts.GracefulStop()
    assert stop.name == "" and stop.exit_code == 128 + signal.SIGINT
    stop._handle(signal.SIGTERM, None)
    assert stop.name == "SIGTERM" and stop.exit_code == 128 + signal.SIGTERM


def test_a_single_process_is_stopped_by_its_own_signal_alone():
    stop = interrupts.GracefulStop()
    assert stop.requested(OneProcess()) is False
    stop._handle(signal.SIGINT, None)
    assert stop.requested(OneProcess()) is True


def test_a_process_keeps_the_signal_it_got_itself_when_another_got_a_different_one():
    stop = interrupts.GracefulStop()
    stop._handle(signal.SIGTERM, None)
    assert stop.requested(TwoProcesses(signal.SIGINT)) and stop.name == "SIGTERM" and stop.exit_code == 143
    quiet = interrupts.GracefulStop()
    assert quiet.requested(TwoProcesses(None)) is False and quiet.signum is None


def test_a_repeat_is_the_same_request_for_three_seconds_after_the_first(monkeypatch):
    """docs/flux_train_network.md: "a second one, 3 s or more later, ends the process at once"."""
    now = [1000.0]
    monkeypatch.setattr(interrupts, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    killed = []
    monkeypatch.setattr(interrupts.os, "kill", lambda pid, signum: killed.append(signum))
    monkeypatch.setattr(interrupts.signal, "signal", lambda signum, handler: None)  # leave the real handlers be
    stop = interrupts.GracefulStop()
    stop._handle(signal.SIGTERM, None)
    now[0] += 2.9
    stop._handle(signal.SIGTERM, None)
    assert killed == []
    now[0] = 1003.0  # 3 s after the first
    stop._handle(signal.SIGTERM, None)
    assert killed == [signal.SIGTERM]


# ---------------------------------------------------------------------------------------------
# tokenizers


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return root, write_tiny_tokenizers(root)


def _word_level(words: list[str]):
    """A real fast tokenizer that knows only ``words`` (everything else is [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_a_vocabulary_that_reads_the_probe_as_unknown_only_is_a_placeholder_and_one_unknown_word_is_not():
    stranger = _word_level(["dog", "tree", "house", "red", "blue", "green", "sky", "night", "city", "old"])
    assert placeholder_reason(stranger) == "it turns 'a photo of a cat' into unknown tokens only"
    partly = _word_level(["a", "photo", "of", "dog", "tree", "house", "red", "blue", "green", "sky"])  # no "cat"
    assert partly("a photo of a cat", add_special_tokens=False)["input_ids"][-1] == partly.unk_token_id
    assert placeholder_reason(partly) is None


def test_a_placeholder_saved_in_the_tokenizer_cache_dir_is_refused_not_used(tmp_path):
    CLIPTokenizer().save_pretrained(str(tmp_path / CLIP_DIR))  # what an offline run could have saved
    with pytest.raises(UserError, match=r"not a usable copy .*\(it has 2 tokens, almost all special: a placehold") as e:
        load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, tmp_path)
    assert "HF_HUB_OFFLINE=1 skips the minutes of network retries" in str(e.value)


def test_the_t5_length_defaults_to_512_when_none_is_given(tiny_tokenizers):
    root, _ = tiny_tokenizers
    strategy = FluxTokenizeStrategy(None, tokenizer_cache_dir=root)
    _, t5_ids, mask = strategy.tokenize("a photo of a cat")
    assert t5_ids.shape == mask.shape == (1, 512) and strategy.t5xxl_max_length == 512


def test_a_clip_copy_configured_for_another_length_still_gets_77(tmp_path):
    """environment.md: a CLIP tokenizer config with model_max_length other than 77 breaks pipelines."""
    write_tiny_tokenizers(tmp_path)
    config_file = tmp_path / CLIP_DIR / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 1000
    config_file.write_text(json.dumps(config))
    assert CLIPTokenizer.from_pretrained(str(tmp_path / CLIP_DIR)).model_max_length == 1000
    strategy = FluxTokenizeStrategy(16, tokenizer_cache_dir=tmp_path)
    assert strategy.clip_l.model_max_length == 77 and strategy.tokenize("a cat")[0].shape == (1, 77)


def _serve_from(monkeypatch, source):
    """``CLIPTokenizer.from_pretrained(CLIP-L's hub id)`` reads ``source``: a download that works."""
    original = CLIPTokenizer.from_pretrained

    def fake(klass, name, *args, local_files_only=False, **kwargs):
        return original(str(source) if name == CLIP_L_TOKENIZER_ID else name, *args, **kwargs)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(fake))


def test_the_error_names_the_tokenizer_that_could_not_be_loaded_and_why(monkeypatch):
    def offline(klass, name, *args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(T5TokenizerFast, "from_pretrained", classmethod(offline))
    with pytest.raises(UserError) as e:
        load_tokenizer(T5TokenizerFast, T5_XXL_TOKENIZER_ID)
    assert str(e.value).startswith(
        "Could not load the tokenizer 'google/t5-v1_1-xxl': neither the Hugging Face cache nor the hub gave it "
        "(OSError: offline). FLUX needs the tokenizers"
    )


def test_a_download_goes_into_a_cache_dir_whose_parents_do_not_exist_yet(tiny_tokenizers, tmp_path, monkeypatch):
    root, sizes = tiny_tokenizers
    _serve_from(monkeypatch, root / CLIP_DIR)
    cache = tmp_path / "a" / "b"
    assert len(load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, cache)) == sizes.clip_l
    assert (cache / CLIP_DIR / "tokenizer.json").is_file()


def test_a_copy_that_cannot_be_saved_is_a_warning_and_leaves_no_temporary_folder(
    tiny_tokenizers, tmp_path, monkeypatch, caplog
):
    root, sizes = tiny_tokenizers
    _serve_from(monkeypatch, root / CLIP_DIR)
    (tmp_path / CLIP_DIR).write_text("a file where the copy would go")
    with caplog.at_level(logging.WARNING, logger="library.tokenizers_flux"):
        tokenizer = load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, tmp_path)
    assert len(tokenizer) == sizes.clip_l
    assert "could not save the tokenizer to" in caplog.text and "downloaded again next time" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [CLIP_DIR]
    assert (tmp_path / CLIP_DIR).read_text() == "a file where the copy would go"


# ---------------------------------------------------------------------------------------------
# text encoders


@pytest.fixture(scope="module")
def encoders(tiny_tokenizers, tmp_path_factory):
    root, sizes = tiny_tokenizers
    folder = tmp_path_factory.mktemp("encoders")
    write_tiny_clip_l(folder / "clip_l.safetensors", vocab=sizes.clip_l)
    write_tiny_t5(folder / "t5xxl.safetensors", vocab=sizes.t5xxl)
    return (load_clip_l(folder / "clip_l.safetensors", torch.float32, "cpu"),
            load_t5xxl(folder / "t5xxl.safetensors", torch.float32, "cpu"), folder)  # fmt: skip


@pytest.mark.parametrize("kind", ["clip_l", "t5xxl"])
def test_a_file_missing_middle_layers_is_refused_naming_every_one(tmp_path, kind):
    """The layer count is the highest index plus one: layers 1 and 2 of 4 missing are 2 layers of missing keys, not
    a 2-layer model that misses 1."""
    path = tmp_path / f"{kind}.safetensors"
    if kind == "clip_l":
        tensors, block, load = write_tiny_clip_l(path, layers=4, vocab=64), "text_model.encoder.layers.", load_clip_l
        expected = "text_model.encoder.layers.1.layer_norm1.bias, "  # 16 tensors a layer: 20 of 32 shown
        expected_end = " ... (32 in all)"
    else:
        tensors, block, load = write_tiny_t5(path, layers=4, vocab=64), "encoder.block.", load_t5xxl
        expected = "encoder.block.1.layer.0.SelfAttention.k.weight, "  # 7 tensors a layer: all 14 shown
        expected_end = "encoder.block.2.layer.1.layer_norm.weight"
    save_file({k: v for k, v in tensors.items() if not k.startswith((f"{block}1.", f"{block}2."))}, str(path),
              metadata={"num_attention_heads": "2"})  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        load(path, torch.float32, "cpu")
    assert f"{path}: incomplete checkpoint, missing keys: {expected}" in str(e.value)
    assert str(e.value).endswith(expected_end)


def test_chromas_dummy_pooled_output_takes_the_t5_outputs_dtype(tiny_tokenizers, encoders):
    root, _ = tiny_tokenizers
    *_, folder = encoders
    t5 = load_t5xxl(folder / "t5xxl.safetensors", torch.bfloat16, "cpu")
    tokens = FluxTokenizeStrategy(16, tokenizer_cache_dir=root, use_clip_l=False).tokenize(["a cat", "a dog"])
    with torch.no_grad():
        l_pooled, t5_out, _, _ = FluxTextEncodingStrategy(True).encode_tokens(None, [None, t5], tokens)
    assert t5_out.dtype == l_pooled.dtype == torch.bfloat16 and l_pooled.shape == (2, 77, 1) and not l_pooled.any()


def test_neither_model_gives_the_dummy_pooled_zeros_sized_from_the_clip_ids():
    clip_ids = torch.zeros(3, 77, dtype=torch.long)
    out = FluxTextEncodingStrategy(True).encode_tokens(None, [None], [clip_ids, None, None])
    assert out[0].shape == (3, 77, 1) and out[0].dtype == torch.float32 and not out[0].any()
    assert out[1:] == [None, None, None]


def test_tokens_without_a_mask_encode_unmasked_even_when_the_mask_is_asked_for(tiny_tokenizers, encoders):
    root, _ = tiny_tokenizers
    clip, t5, _ = encoders
    clip_ids, t5_ids, _ = FluxTokenizeStrategy(16, tokenizer_cache_dir=root).tokenize(["a photo of a cat"])
    with torch.no_grad():
        l_pooled, t5_out, txt_ids, mask = FluxTextEncodingStrategy(True).encode_tokens(
            None, [clip, t5], [clip_ids, t5_ids]
        )
        torch.testing.assert_close(t5_out, t5(t5_ids).last_hidden_state, rtol=0, atol=0)
    assert mask is None and l_pooled.shape == (1, 32) and txt_ids.shape == (1, 16, 3)


def test_a_clip_model_without_clip_ids_gives_no_pooled_output(tiny_tokenizers, encoders):
    root, _ = tiny_tokenizers
    clip, t5, _ = encoders
    _, t5_ids, mask = FluxTokenizeStrategy(16, tokenizer_cache_dir=root).tokenize(["a photo of a cat"])
    with torch.no_grad():
        out = FluxTextEncodingStrategy(False).encode_tokens(None, [clip, t5], [None, t5_ids, mask])
    assert out[0] is None and out[1].shape == (1, 16, 32) and out[3] is mask


# ---------------------------------------------------------------------------------------------
# model hashes


def test_hashes_of_a_transposed_trainable_tensor_are_those_of_its_contiguous_copy():
    weight = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4)).t()  # not contiguous, requires grad
    assert not weight.is_contiguous() and weight.requires_grad
    assert precalculate_safetensors_hashes({"w": weight}, {"ss_seed": "1"}) == precalculate_safetensors_hashes(
        {"w": weight.detach().contiguous()}, {"ss_seed": "1"}
    )


def test_ss_values_that_are_not_text_hash_as_their_text():
    tensors = {"w": torch.ones(4)}
    assert precalculate_safetensors_hashes(tensors, {"ss_steps": 10, "ss_lr": 0.5}) == (
        precalculate_safetensors_hashes(tensors, {"ss_steps": "10", "ss_lr": "0.5"})
    )


def test_a_folder_as_the_base_model_hashes_as_is_a_directory(tmp_path):
    assert model_hash(tmp_path) == "IsADirectory"


def test_a_failed_background_hash_hands_its_error_to_whoever_waits(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_in_background(tmp_path / "missing.safetensors").result(timeout=30)


@pytest.mark.parametrize(("resolution", "expected"), [("512x768", "512x768"), ("640", "640x640"), (768, "768x768"),
                                                      ([512, 768], "512x768"), ((896,), "896x896")])  # fmt: skip
def test_modelspec_resolution_spellings(resolution, expected):
    assert build_modelspec("dev", timestamp=0, resolution=resolution)["modelspec.resolution"] == expected


def test_a_thumbnail_of_an_unknown_type_is_embedded_as_octet_stream(tmp_path):
    thumbnail = tmp_path / "thumb.unknownext"
    thumbnail.write_bytes(b"\x00\x01")
    spec = build_modelspec("schnell", timestamp=0, thumbnail=str(thumbnail))
    assert spec["modelspec.thumbnail"] == "data:application/octet-stream;base64,AAE="
    given = "data:image/webp;base64,UklGRg=="
    assert build_modelspec("schnell", timestamp=0, thumbnail=given)["modelspec.thumbnail"] == given


def test_modelspec_keeps_empty_texts_given_and_dates_to_the_second():
    spec = build_modelspec("dev", title="", author="", timestamp=1_700_000_000.75, thumbnail="")
    assert spec["modelspec.title"] == "" and spec["modelspec.author"] == ""  # only None means "not given"
    assert "modelspec.thumbnail" not in spec
    assert spec["modelspec.date"] == modelspec_date(1_700_000_000) and "." not in spec["modelspec.date"]
    with pytest.raises(ValueError, match=r"one of \['chroma', 'dev', 'schnell'\], not 'sdxl'"):
        build_modelspec("sdxl")


def test_a_missing_size_key_is_named_as_the_file_spells_it(tmp_path):
    path = tmp_path / "clip_l.safetensors"
    tensors = write_tiny_clip_l(path, vocab=64)
    del tensors["text_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(tensors, str(path), metadata={"num_attention_heads": "2"})
    with pytest.raises(CheckpointError, match=re.escape(
            "missing key 'text_model.encoder.layers.0.mlp.fc1.weight' (it gives the model's size)")):  # fmt: skip
        load_clip_l(path, torch.float32, "cpu")


@pytest.mark.parametrize("count", [10, 11])
def test_more_than_ten_unexpected_keys_are_shown_ten_and_counted(tmp_path, caplog, count):
    path = tmp_path / "clip_l.safetensors"
    tensors = write_tiny_clip_l(path, vocab=64)
    tensors.update({f"text_model.adapter_{i:02d}.weight": torch.zeros(1) for i in range(count)})
    save_file(tensors, str(path), metadata={"num_attention_heads": "2"})
    with caplog.at_level(logging.WARNING, logger="library.text_encoders"):
        load_clip_l(path, torch.float32, "cpu")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{count} unexpected keys, ignored: text_model.adapter_00.weight" in warning
    assert warning.count("adapter_") == 10
    assert warning.endswith(" ... (11 in all)" if count == 11 else "text_model.adapter_09.weight")


def test_a_file_of_several_text_encoders_gives_the_one_named_for_the_flag(tmp_path):
    """An SD3-style file (clip_g, clip_l and t5xxl under one roof) given as --clip_l loaded CLIP-G, the first
    tower in the header; towers none of which is named for the flag are refused, naming them."""
    small = write_tiny_clip_l(tmp_path / "l.safetensors", layers=2, hidden=32, vocab=64)
    large = write_tiny_clip_l(tmp_path / "g.safetensors", layers=3, hidden=64, heads=1, vocab=64)

    def towers(names, path):
        weights = {}
        for name, tensors in zip(names, (large, small), strict=True):
            weights |= {f"text_encoders.{name}.transformer.{k}": v for k, v in tensors.items()}
        save_file(weights, str(path), metadata={"num_attention_heads": "2"})
        return path

    model = load_clip_l(towers(["clip_g", "clip_l"], tmp_path / "sd3.safetensors"), torch.float32, "cpu")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 32)
    torch.testing.assert_close(model.get_input_embeddings().weight,
                               small["text_model.embeddings.token_embedding.weight"])
    with pytest.raises(CheckpointError, match=re.escape(
            "holds 2 text encoders (keys under 'text_encoders.a.transformer.text_model.', "
            "'text_encoders.b.transformer.text_model.') and none is named for --clip_l: give --clip_l a file of "
            "a CLIP-L text encoder alone")):  # fmt: skip
        load_clip_l(towers(["a", "b"], tmp_path / "two.safetensors"), torch.float32, "cpu")
