"""Caption files and each caption transform (spec §c.6), deterministic under a seed."""

from __future__ import annotations

import random

import pytest

from library.captions import CaptionOptions, caption_for_cache, process_caption, read_caption_file
from library.errors import UserError


def run(caption, seed=0, epoch=1, step=0, max_steps=0, **opts):
    return process_caption(caption, CaptionOptions(**opts), random.Random(seed), epoch, step, max_steps)


def test_prefix_and_suffix_are_joined_with_spaces():
    assert run("a cat", caption_prefix="photo of", caption_suffix="4k") == "photo of a cat 4k"


def test_every_wildcard_line_gets_the_prefix_and_suffix():
    cap = "line one {red|green}\nline two\nline three"
    outs = {run(cap, seed=s, enable_wildcard=True, caption_prefix="sks", caption_suffix="4k") for s in range(40)}
    assert outs == {"sks line one red 4k", "sks line one green 4k", "sks line two 4k", "sks line three 4k"}
    assert caption_for_cache("only line", CaptionOptions(caption_prefix="sks"), "a.png") == "sks only line"


def test_first_line_only_without_wildcard():
    assert run("line one\nline two") == "line one"


def test_wildcard_picks_a_line_and_alternatives_deterministically():
    cap = "a {red|green|blue} ball\nthe {big|small} box"
    outs = {run(cap, seed=s, enable_wildcard=True) for s in range(60)}
    assert outs == {"a red ball", "a green ball", "a blue ball", "the big box", "the small box"}
    assert run(cap, seed=7, enable_wildcard=True) == run(cap, seed=7, enable_wildcard=True)


def test_wildcard_double_braces_are_literal():
    assert run("{{x}} {a|a}", enable_wildcard=True) == "{x} a"


def test_double_braces_around_alternatives_stay_literal():
    # (the braces escape the alternatives too: no choice is drawn inside them)
    assert {run("{{red|blue}} {x|x}", seed=s, enable_wildcard=True) for s in range(20)} == {"{red|blue} x"}


def test_shuffle_keeps_first_keep_tokens_in_place():
    cap = "sks, dog, red, blue, green, tall"
    outs = [run(cap, seed=s, shuffle_caption=True, keep_tokens=2) for s in range(20)]
    assert all(o.startswith("sks, dog, ") for o in outs)
    assert all(sorted(o.split(", ")[2:]) == ["blue", "green", "red", "tall"] for o in outs)
    assert len(set(outs)) > 1
    assert run(cap, seed=3, shuffle_caption=True, keep_tokens=2) == run(
        cap, seed=3, shuffle_caption=True, keep_tokens=2
    )


def test_keep_tokens_separator_fixes_prefix_and_suffix_parts():
    cap = "sks, dog ||| red, blue, green ||| best quality, 4k"
    outs = {run(cap, seed=s, shuffle_caption=True, keep_tokens_separator="|||") for s in range(30)}
    for o in outs:
        parts = o.split(", ")
        assert parts[:2] == ["sks", "dog"] and parts[-2:] == ["best quality", "4k"]
        assert sorted(parts[2:5]) == ["blue", "green", "red"]
    assert len(outs) > 1


def test_keep_tokens_separator_drops_empty_tags_in_every_part():
    got = run("a, , b ||| c, , d ||| , e", keep_tokens_separator="|||", shuffle_caption=True, seed=3)
    assert got.startswith("a, b, ") and got.endswith(", e") and sorted(got.split(", ")[2:4]) == ["c", "d"]


def test_keep_tokens_separator_is_removed_even_without_shuffling():
    assert run("sks ||| red, blue", keep_tokens_separator="|||") == "sks, red, blue"


def test_custom_caption_separator_splits_but_rejoins_with_comma_space():
    assert run("a;b;c", caption_separator=";", keep_tokens=1, caption_tag_dropout_rate=1.0) == "a"
    assert run("a; b; c", caption_separator=";", shuffle_caption=True, seed=1).count(", ") == 2


def test_secondary_separator_is_replaced_after_shuffle():
    outs = {run("a;;;b, c, d", seed=s, shuffle_caption=True, secondary_separator=";;;") for s in range(30)}
    assert all("a,b" in o for o in outs)  # `a;;;b` moved as one tag
    assert run("a;;;b, c", secondary_separator=";;;") == "a,b, c"


def test_tag_dropout_drops_only_flexible_tags():
    assert run("x, y, z", keep_tokens=1, caption_tag_dropout_rate=1.0) == "x"
    outs = {run("x, a, b, c, d", seed=s, keep_tokens=1, caption_tag_dropout_rate=0.5) for s in range(30)}
    assert all(o.startswith("x") for o in outs) and len(outs) > 3


def test_caption_dropout_rate():
    assert run("a cat", caption_dropout_rate=1.0) == ""
    outs = [run("a cat", seed=s, caption_dropout_rate=0.5) for s in range(40)]
    # seeds are fixed and random.Random(seed).random() is the same on every Python, so the count is exact;
    # it is one draw per caption compared with the full rate (half the rate would drop 11 of these 40)
    assert outs.count("") == 19


def test_caption_dropout_every_n_epochs_uses_1_based_epochs():
    got = [run("a cat", epoch=e, caption_dropout_every_n_epochs=3) for e in range(1, 7)]
    assert got == ["a cat", "a cat", "", "a cat", "a cat", ""]
    # epoch 0 is outside training (validation, caching): never dropped, although 0 % n == 0
    assert run("a cat", epoch=0, caption_dropout_every_n_epochs=3) == "a cat"
    assert run("a cat", epoch=0, caption_dropout_every_n_epochs=1) == "a cat"


def test_token_warmup_grows_the_flexible_tags():
    cap = "k, a, b, c, d, e, f, g, h"  # 1 fixed + 8 flexible
    # n = floor(step * (8 - 2) / 6) + 2 while step < 6
    got = [run(cap, step=s, keep_tokens=1, token_warmup_min=2, token_warmup_step=6) for s in (0, 3, 5, 6)]
    assert got == ["k, a, b", "k, a, b, c, d, e", "k, a, b, c, d, e, f, g", cap]
    # a non-whole count is floored: n = floor(step * (8 - 1) / 4) + 1, i.e. 1.75 -> 2 and 5.25 -> 6 tags
    got = [run(cap, step=s, keep_tokens=1, token_warmup_min=1, token_warmup_step=4) for s in (1, 3)]
    assert got == ["k, a, b", "k, a, b, c, d, e, f"]


def test_token_warmup_keeps_the_first_tags_then_shuffles_them():
    cap = "a, b, c, d, e, f, g, h"  # n = floor(2 * (8 - 1) / 5) + 1 = 3 tags at step 2 of 5: a, b and c, in any order
    kept = {frozenset(run(cap, seed=s, step=2, shuffle_caption=True, token_warmup_step=5).split(", "))
            for s in range(30)}  # fmt: skip
    assert kept == {frozenset("abc")}


def test_token_warmup_step_1_is_one_step_not_the_whole_run():
    cap = "a, b, c, d, e"  # (a fraction is below 1: 1 is a step count, as in sd-scripts)
    assert run(cap, step=0, max_steps=10, token_warmup_step=1) == "a"
    assert run(cap, step=1, max_steps=10, token_warmup_step=1) == cap


def test_a_caption_nothing_reorders_keeps_its_spacing():
    assert run("a,b ,  c") == "a,b ,  c"  # (only a shuffle, warm-up, tag dropout or separator rejoins it)


def test_caption_dropout_drops_the_prefix_and_suffix_too():
    assert run("a cat", caption_prefix="sks", caption_suffix="4k", caption_dropout_rate=1.0) == ""
    assert run("a cat", epoch=2, caption_prefix="sks", caption_dropout_every_n_epochs=2) == ""


def test_token_warmup_fraction_of_max_train_steps():
    cap = "a, b, c, d, e"
    # 0.5 of 10 steps = 5; at step 0 -> min 1 tag, at step 5 -> all
    assert run(cap, step=0, max_steps=10, token_warmup_step=0.5) == "a"
    assert run(cap, step=5, max_steps=10, token_warmup_step=0.5) == cap
    # 0.25 of 10 steps = floor(2.5) = 2: at step 1 -> floor(1 * 4 / 2) + 1 = 3 tags, at step 2 -> all
    assert run(cap, step=1, max_steps=10, token_warmup_step=0.25) == "a, b, c"
    assert run(cap, step=2, max_steps=10, token_warmup_step=0.25) == cap


def test_caption_for_cache_applies_only_deterministic_transforms():
    opts = CaptionOptions(caption_prefix="photo of", secondary_separator=";;;", keep_tokens_separator="|||")
    assert caption_for_cache("sks ||| a;;;b\nsecond line", opts, "k") == "photo of sks, a,b"
    wild = CaptionOptions(enable_wildcard=True)
    picks = {caption_for_cache("{a|b|c|d|e|f}", wild, f"img{i}.png") for i in range(20)}
    assert len(picks) > 1  # chosen per image
    assert caption_for_cache("{a|b|c|d|e|f}", wild, "img3.png") == caption_for_cache("{a|b|c|d|e|f}", wild, "img3.png")
    # a file name that is not UTF-8 (Latin-1 "café.png", kept by Python as a surrogate) works too
    assert caption_for_cache("{a|b|c|d|e|f}", wild, "caf\udce9.png") in "abcdef"
    assert caption_for_cache("only", opts, "caf\udce9.png") == "photo of only"


# --- caption files ---------------------------------------------------------------------------------
def test_caption_file_first_line_or_all_lines_with_wildcard(tmp_path):
    (tmp_path / "a.txt").write_text("  first  \n\nsecond\n", encoding="utf-8")
    assert read_caption_file(str(tmp_path / "a.png"), ".txt", False) == "first"
    assert read_caption_file(str(tmp_path / "a.png"), ".txt", True) == "first\nsecond"
    assert read_caption_file(str(tmp_path / "b.png"), ".txt", False) is None


def test_caption_file_bom_is_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffhello".encode())
    assert read_caption_file(str(tmp_path / "a.png"), ".txt", False) == "hello"


def test_face_crop_named_image_falls_back_to_base_caption(tmp_path):
    (tmp_path / "person.txt").write_text("a person", encoding="utf-8")
    assert read_caption_file(str(tmp_path / "person_10_20_30_40.png"), ".txt", False) == "a person"


def test_face_crop_fallback_needs_at_least_5_underscore_fields(tmp_path, monkeypatch):
    """The rule counts `_` fields of the whole path: use relative names so tmp_path's own underscores do not count."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a person", encoding="utf-8")
    (tmp_path / ".txt").write_text("nameless", encoding="utf-8")  # what 4 fields minus their last 4 would name
    assert read_caption_file("p_1_2_3_4.png", ".txt", False) == "a person"  # exactly 5 fields
    assert read_caption_file("1_2_3_4.png", ".txt", False) is None  # 4 fields: no fallback


def test_non_utf8_caption_file_names_the_file_and_the_bytes_offset(tmp_path):
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"a\.txt: caption file is not valid UTF-8 \(.* at byte 3\); re-save it as"):
        read_caption_file(str(tmp_path / "a.png"), ".txt", False)
    # the offset counts from the file's start, past a byte-order mark and the reader's first chunk
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + b"x" * 9000 + b"\x93")
    with pytest.raises(UserError, match=r"b\.txt: caption file is not valid UTF-8 \(.* at byte 9003\)"):
        read_caption_file(str(tmp_path / "b.png"), ".txt", False)


def test_empty_caption_file_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"a\.txt: caption file is empty"):
        read_caption_file(str(tmp_path / "a.png"), ".txt", False)
    (tmp_path / "b.txt").write_bytes(b"  \r\n\n")
    with pytest.raises(UserError, match=r"b\.txt: caption file is empty; "):
        read_caption_file(str(tmp_path / "b.png"), ".txt", True)
    (tmp_path / "c.txt").write_text("\na cat\n")  # without wildcards only the first line is read: it is blank
    with pytest.raises(UserError, match=r"c\.txt: caption file is empty \(its first line is blank\)"):
        read_caption_file(str(tmp_path / "c.png"), ".txt", False)
    assert read_caption_file(str(tmp_path / "c.png"), ".txt", True) == "a cat"
