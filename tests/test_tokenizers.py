"""Tokenizer sources (--tokenizer_cache_dir, HF cache, hub), tokenization, and FLUX text encoding."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer, T5TokenizerFast

from library.errors import UserError
from library.text_encoders import FluxTextEncodingStrategy, load_clip_l, load_t5xxl
from library.tiny_text_encoders import write_tiny_clip_l, write_tiny_t5
from library.tokenizers_flux import (
    CLIP_L_TOKENIZER_ID,
    T5_XXL_TOKENIZER_ID,
    FluxTokenizeStrategy,
    clip_text,
    load_tokenizer,
    placeholder_reason,
    tokenizer_cache_path,
    write_tiny_tokenizers,
)

CLIP_DIR = "openai_clip-vit-large-patch14"
T5_DIR = "google_t5-v1_1-xxl"
L = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    sizes = write_tiny_tokenizers(root)
    return root, sizes


@pytest.fixture(scope="module")
def encoders(tiny, tmp_path_factory):
    root, sizes = tiny
    folder = tmp_path_factory.mktemp("encoders")
    write_tiny_clip_l(folder / "clip_l.safetensors", vocab=sizes.clip_l)
    write_tiny_t5(folder / "t5xxl.safetensors", vocab=sizes.t5xxl)
    clip = load_clip_l(folder / "clip_l.safetensors", torch.float32, "cpu")
    t5 = load_t5xxl(folder / "t5xxl.safetensors", torch.float32, "cpu")
    return clip, t5


def _no_hub(monkeypatch, cls):
    """Any hub id given to ``cls.from_pretrained`` fails the test: only local folders may be read."""
    original = cls.from_pretrained

    def guarded(klass, name, *args, **kwargs):
        assert name not in (CLIP_L_TOKENIZER_ID, T5_XXL_TOKENIZER_ID), f"hub consulted for {name}"
        return original(name, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(guarded))


def _fake_hub(monkeypatch, cls, model_id, source, calls, in_hf_cache=False, online=True, error=None):
    """Simulates the hub for ``model_id``: a download serves ``source``; misses behave as transformers 5."""
    original = cls.from_pretrained

    def fake(klass, name, *args, local_files_only=False, **kwargs):
        if name != model_id:
            return original(name, *args, local_files_only=local_files_only, **kwargs)
        calls.append("cache" if local_files_only else "hub")
        if (local_files_only and not in_hf_cache) or (not local_files_only and not online):
            if error is not None:
                raise error
            return klass()  # transformers 5's placeholder when nothing can be fetched
        return original(str(source), **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(fake))


# ---------------------------------------------------------------------------------------------
# the tiny tokenizers


def test_tiny_tokenizers_layout_sizes_and_determinism(tiny, tmp_path):
    root, sizes = tiny
    assert {p.name for p in (root / CLIP_DIR).iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    }
    assert {p.name for p in (root / T5_DIR).iterdir()} == {"tokenizer.json", "tokenizer_config.json", "spiece.model"}
    assert len(CLIPTokenizer.from_pretrained(str(root / CLIP_DIR))) == sizes.clip_l
    assert len(T5TokenizerFast.from_pretrained(str(root / T5_DIR))) == sizes.t5xxl == 132  # 32 pieces + 100 sentinels
    again = write_tiny_tokenizers(tmp_path)
    assert again == sizes
    for sub in (CLIP_DIR, T5_DIR):
        for f in (root / sub).iterdir():
            assert (tmp_path / sub / f.name).read_bytes() == f.read_bytes(), f"{sub}/{f.name} differs"


def test_tiny_clip_tokenizer_behaves_like_clip_l(tiny):
    root, sizes = tiny
    tok = CLIPTokenizer.from_pretrained(str(root / CLIP_DIR))
    ids = tok("A photo of a  CAT")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    # as in CLIP-L (49406, 49407): specials last, EOS the largest id, padding with EOS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        sizes.clip_l - 2,
        sizes.clip_l - 1,
        sizes.clip_l - 1,
    )
    assert tok.model_max_length == 77
    unseen = tok("zebra!", add_special_tokens=False)["input_ids"]
    assert len(unseen) == 6 and tok.eos_token_id not in unseen  # bytes, never <unk>


def test_tiny_t5_tokenizer_behaves_like_t5(tiny):
    root, _ = tiny
    tok = T5TokenizerFast.from_pretrained(str(root / T5_DIR))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a photo of a cat")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # sentinels last, reversed, as T5's


def test_placeholders_are_detected(tiny):
    root, _ = tiny
    assert "placeholder" in placeholder_reason(CLIPTokenizer())
    assert "placeholder" in placeholder_reason(T5TokenizerFast())
    assert placeholder_reason(CLIPTokenizer.from_pretrained(str(root / CLIP_DIR))) is None
    assert placeholder_reason(T5TokenizerFast.from_pretrained(str(root / T5_DIR))) is None


# ---------------------------------------------------------------------------------------------
# where tokenizers come from


def test_tokenizer_cache_dir_is_read_without_the_hub(tiny, monkeypatch):
    root, sizes = tiny
    _no_hub(monkeypatch, CLIPTokenizer)
    _no_hub(monkeypatch, T5TokenizerFast)
    assert tokenizer_cache_path(root, CLIP_L_TOKENIZER_ID) == root / CLIP_DIR
    clip = load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, root, model_max_length=77)
    t5 = load_tokenizer(T5TokenizerFast, T5_XXL_TOKENIZER_ID, str(root))
    assert (len(clip), len(t5)) == (sizes.clip_l, sizes.t5xxl)


def test_a_download_is_saved_into_the_tokenizer_cache_dir(tiny, tmp_path, monkeypatch):
    root, sizes = tiny
    calls = []
    _fake_hub(monkeypatch, CLIPTokenizer, CLIP_L_TOKENIZER_ID, root / CLIP_DIR, calls)
    cache = tmp_path / "cache"
    tok = load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, cache, model_max_length=77)
    assert calls == ["cache", "hub"]
    assert len(tok) == sizes.clip_l
    assert {p.name for p in cache.iterdir()} == {CLIP_DIR}  # no temporary folder left behind
    assert (cache / CLIP_DIR / "tokenizer.json").is_file()

    monkeypatch.undo()
    _no_hub(monkeypatch, CLIPTokenizer)
    again = load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, cache, model_max_length=77)
    text = "a photo of the dog, painting style"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.model_max_length == 77


def test_the_hugging_face_cache_is_tried_before_the_hub(tiny, monkeypatch):
    root, sizes = tiny
    calls = []
    _fake_hub(monkeypatch, T5TokenizerFast, T5_XXL_TOKENIZER_ID, root / T5_DIR, calls, in_hf_cache=True)
    assert len(load_tokenizer(T5TokenizerFast, T5_XXL_TOKENIZER_ID)) == sizes.t5xxl
    assert calls == ["cache"]


@pytest.mark.parametrize("error", [None, OSError("We couldn't connect to 'https://huggingface.co'")])
def test_without_network_or_copy_the_error_names_both_ids_and_the_flag(tiny, tmp_path, monkeypatch, error):
    root, _ = tiny
    calls = []
    _fake_hub(monkeypatch, CLIPTokenizer, CLIP_L_TOKENIZER_ID, root / CLIP_DIR, calls, online=False, error=error)
    with pytest.raises(UserError) as e:
        FluxTokenizeStrategy(512, tokenizer_cache_dir=None)
    msg = str(e.value)
    assert CLIP_L_TOKENIZER_ID in msg and T5_XXL_TOKENIZER_ID in msg and "--tokenizer_cache_dir" in msg
    assert CLIP_DIR in msg and T5_DIR in msg
    assert ("placeholder" in msg) if error is None else ("couldn't connect" in msg)
    assert calls == ["cache", "hub"]
    with pytest.raises(UserError, match="--tokenizer_cache_dir"):
        load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, tmp_path / "empty")
    assert not (tmp_path / "empty" / CLIP_DIR).exists()  # nothing saved when nothing loaded


def test_a_broken_copy_in_the_cache_dir_is_named(tmp_path, monkeypatch):
    (tmp_path / CLIP_DIR).mkdir()
    _no_hub(monkeypatch, CLIPTokenizer)
    with pytest.raises(UserError, match=f"{tmp_path / CLIP_DIR}: not a usable copy.*Delete the folder"):
        load_tokenizer(CLIPTokenizer, CLIP_L_TOKENIZER_ID, tmp_path)


# ---------------------------------------------------------------------------------------------
# tokenize


def test_tokenize_pads_truncates_and_masks(tiny):
    root, _ = tiny
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root)
    long = "the dog " * 60
    clip_ids, t5_ids, mask = strategy.tokenize(["a photo of a cat", long])
    assert clip_ids.shape == (2, 77) and t5_ids.shape == mask.shape == (2, L)
    assert clip_ids.dtype == t5_ids.dtype == mask.dtype == torch.int64

    clip = strategy.clip_l
    words = clip.convert_tokens_to_ids(["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"])
    bos, eos = clip.bos_token_id, clip.eos_token_id
    assert clip_ids[0].tolist() == [bos, *words] + [eos] * 71
    assert clip_ids[1, 0] == bos and clip_ids[1, 76] == eos and (clip_ids[1, 1:76] != eos).all()

    short = strategy.t5xxl("a photo of a cat")["input_ids"]  # tokens + EOS
    n = len(short)
    assert t5_ids[0, :n].tolist() == short and (t5_ids[0, n:] == 0).all()
    assert mask[0].tolist() == [1] * n + [0] * (L - n)  # 1 on the tokens and the EOS
    assert mask[1].tolist() == [1] * L and t5_ids[1, -1] == 1  # truncated, EOS kept

    one = strategy.tokenize("a photo of a cat")
    assert one[0].shape == (1, 77) and one[1].shape == (1, L)


def test_clip_reads_captions_cleaned_as_clips_own_tokenizer_cleans_them(tiny):
    """sd-scripts' slow CLIPTokenizer runs ftfy first; transformers 5's fast one does not, so curly quotes, HTML
    entities, full-width letters and ligatures became other ids than CLIP-L was trained on. T5 reads the caption as
    given, as its fast tokenizer does in sd-scripts."""
    root, _ = tiny
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root)
    for raw, clean in [("the dog’s “house”", "the dog's \"house\""), ("cat &amp; dog", "cat & dog"),
                       ("ｔｈｅ　ｃａｔ", "the cat"), ("ﬁne", "fine"), ("cafÃ©", "café")]:  # fmt: skip
        assert clip_text(raw) == clean
        raw_ids, clean_ids = strategy.tokenize(raw), strategy.tokenize(clean)
        assert raw_ids[0].tolist() == clean_ids[0].tolist(), raw
        assert raw_ids[0].tolist() != strategy.clip_l([raw], max_length=77, padding="max_length")["input_ids"], raw
        assert raw_ids[1].tolist() == strategy.t5xxl([raw], max_length=L, padding="max_length")["input_ids"]


def test_chroma_tokenizes_without_clip(tiny, monkeypatch):
    root, _ = tiny

    def no_clip(*args, **kwargs):
        raise AssertionError("Chroma must not load a CLIP tokenizer")

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(no_clip))
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root, use_clip_l=False)
    clip_ids, t5_ids, mask = strategy.tokenize(["a cat", "a dog"])
    assert clip_ids is None and t5_ids.shape == mask.shape == (2, L)


# ---------------------------------------------------------------------------------------------
# encode_tokens


def test_encode_tokens_shapes_and_outputs(tiny, encoders):
    root, _ = tiny
    clip, t5 = encoders
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root)
    tokens = strategy.tokenize(["a photo of a cat", "a red painting of a house in the city at night"])
    with torch.no_grad():
        l_pooled, t5_out, txt_ids, t5_mask = FluxTextEncodingStrategy(False).encode_tokens(strategy, [clip, t5], tokens)
        clip_out = clip(tokens[0])
        unmasked = t5(tokens[1]).last_hidden_state
    assert l_pooled.shape == (2, 32) and t5_out.shape == (2, L, 32) and txt_ids.shape == (2, L, 3)
    torch.testing.assert_close(l_pooled, clip_out.pooler_output, rtol=0, atol=0)
    first_eos = (tokens[0] == strategy.clip_l.eos_token_id).int().argmax(dim=1)
    torch.testing.assert_close(l_pooled, clip_out.last_hidden_state[torch.arange(2), first_eos], rtol=0, atol=0)
    torch.testing.assert_close(t5_out, unmasked, rtol=0, atol=0)
    assert not txt_ids.any()
    assert t5_mask is tokens[2]


def test_encode_tokens_passes_the_t5_mask_only_when_asked(tiny, encoders):
    root, _ = tiny
    clip, t5 = encoders
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root)
    tokens = strategy.tokenize(["a photo of a cat", "a dog"])
    with torch.no_grad():
        masked_ref = t5(tokens[1], attention_mask=tokens[2]).last_hidden_state
        on = FluxTextEncodingStrategy(True).encode_tokens(strategy, [clip, t5], tokens)[1]
        override = FluxTextEncodingStrategy(False).encode_tokens(strategy, [clip, t5], tokens, apply_t5_attn_mask=True)
        off = FluxTextEncodingStrategy(True).encode_tokens(strategy, [clip, t5], tokens, apply_t5_attn_mask=False)
    torch.testing.assert_close(on, masked_ref, rtol=0, atol=0)
    torch.testing.assert_close(override[1], masked_ref, rtol=0, atol=0)
    assert (off[1] - on).abs().max() > 1e-4


@pytest.mark.parametrize("models", ["clip_only", "clip_and_none"])
def test_encode_tokens_without_t5(tiny, encoders, models):
    root, _ = tiny
    clip, _ = encoders
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root)
    tokens = strategy.tokenize(["a cat", "a dog", "a tree"])
    with torch.no_grad():
        out = FluxTextEncodingStrategy(True).encode_tokens(
            strategy, [clip] if models == "clip_only" else [clip, None], tokens
        )
    assert out[0].shape == (3, 32)
    assert out[1:] == [None, None, None]


def test_chroma_encoding_gives_the_dummy_pooled_zeros(tiny, encoders):
    root, _ = tiny
    _, t5 = encoders
    strategy = FluxTokenizeStrategy(L, tokenizer_cache_dir=root, use_clip_l=False)
    tokens = strategy.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        l_pooled, t5_out, txt_ids, mask = FluxTextEncodingStrategy(True).encode_tokens(strategy, [None, t5], tokens)
        want = t5(tokens[1], attention_mask=tokens[2]).last_hidden_state
    assert l_pooled.shape == (2, 77, 1) and l_pooled.dtype == t5_out.dtype and not l_pooled.any()
    torch.testing.assert_close(t5_out, want, rtol=0, atol=0)
    assert txt_ids.shape == (2, L, 3) and mask is tokens[2]
