"""--sample_prompts files: the three formats, every option with exact values, and the errors."""

import argparse
import json
import logging

import pytest

from library.errors import UserError
from library.sample_prompts import (
    SamplePrompt,
    SampleTriggers,
    line_to_prompt_dict,
    load_prompts,
    prepare_sample_prompts,
)

GUIDE_CHROMA_LINE = (
    "Japanese shrine in the summer forest. --n low quality, ugly, unfinished, out of focus, deformed, "
    "disfigure, blurry, smudged, restricted palette, flat colors --w 512 --h 512 --d 1 --l 4.0 --g 0.0 --s 20"
)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def args(**kw) -> argparse.Namespace:
    values = dict(sample_prompts=None, sample_every_n_steps=None, sample_every_n_epochs=None, sample_at_first=False)
    values.update(kw)
    return argparse.Namespace(**values)


# region prompt lines


def test_every_option_of_a_line_with_exact_values():
    d = line_to_prompt_dict("a cat on a table --w 768 --h 512 --d 42 --s 28 --l 4.5 --g 2.0 --n blurry, ugly")
    assert d == {
        "prompt": "a cat on a table",
        "width": 768,
        "height": 512,
        "seed": 42,
        "sample_steps": 28,
        "scale": 4.5,
        "guidance_scale": 2.0,
        "negative_prompt": "blurry, ugly",
    }


def test_the_guides_chroma_example_line():
    d = line_to_prompt_dict(GUIDE_CHROMA_LINE)
    assert d["prompt"] == "Japanese shrine in the summer forest."
    assert d["negative_prompt"] == (
        "low quality, ugly, unfinished, out of focus, deformed, disfigure, blurry, smudged, "
        "restricted palette, flat colors"
    )
    assert (d["width"], d["height"], d["seed"], d["scale"], d["guidance_scale"], d["sample_steps"]) == (
        512,
        512,
        1,
        4.0,
        0.0,
        20,
    )


def test_option_letters_are_case_insensitive_and_order_free():
    d = line_to_prompt_dict("x --N bad --S 5 --W 64 --G 1.5 --L .5 --D 7 --H 80")
    assert d == {
        "prompt": "x",
        "negative_prompt": "bad",
        "sample_steps": 5,
        "width": 64,
        "guidance_scale": 1.5,
        "scale": 0.5,
        "seed": 7,
        "height": 80,
    }


@pytest.mark.parametrize(("given", "steps"), [("0", 1), ("1", 1), ("1000", 1000), ("5000", 1000)])
def test_steps_are_clamped_to_1_to_1000(given, steps):
    assert line_to_prompt_dict(f"p --s {given}")["sample_steps"] == steps


def test_the_prompt_itself_is_never_read_as_an_option():
    # sd-scripts also matches its regexes against the prompt, so "w 5 ..." set the width
    d = line_to_prompt_dict("w 5 wolves --h 64")
    assert d == {"prompt": "w 5 wolves", "height": 64}


def test_options_start_at_space_dash_dash_and_values_are_trimmed():
    # a "--" inside a word is part of the prompt; spaces around the prompt and each value go
    d = line_to_prompt_dict("  a red--blue ball   --n  ugly, blurry   --w 64")
    assert d == {"prompt": "a red--blue ball", "negative_prompt": "ugly, blurry", "width": 64}


def test_seeds_take_all_64_bits():
    assert line_to_prompt_dict(f"p --d {2**64 - 1}")["seed"] == 2**64 - 1  # (torch's generators take them)
    with pytest.raises(UserError, match=r"the seed must be below 2\*\*64, not 18446744073709551616"):
        line_to_prompt_dict(f"p --d {2**64}")


def test_a_seed_of_minus_1_is_random_as_in_a1111(tmp_path):
    """Prompts copied from A1111 say --d -1 for a random seed (sd-scripts' pattern reads no seed from it): the run
    stopped on it. Other negative seeds still do; in a TOML file -1 overrides the shared seed."""
    assert line_to_prompt_dict("p --d 5 --d -1 --w 64") == {"prompt": "p", "width": 64}
    with pytest.raises(UserError, match=r"--d needs a whole number of 0 or more, not '-2'"):
        line_to_prompt_dict("p --d -2")
    toml = write(tmp_path, "p.toml", '[prompt]\nseed = 9\n[[prompt.subset]]\nprompt = "a"\nseed = -1\n'
                 '[[prompt.subset]]\nprompt = "b"\n')
    assert [p.seed for p in load_prompts(toml)] == [None, 9]
    assert load_prompts(write(tmp_path, "p.json", json.dumps([{"prompt": "a", "seed": -1}])))[0].seed is None


def test_whole_numbers_written_with_a_point_are_whole_numbers(tmp_path):
    """A GUI's number field writes 1024.0; sd-scripts' pattern reads it as 1024, and it stopped the run here.
    A fraction is still refused, in lines and in JSON and TOML files."""
    d = line_to_prompt_dict("p --w 1024.0 --h 768. --d 42.00 --s 20.0")
    assert d == {"prompt": "p", "width": 1024, "height": 768, "seed": 42, "sample_steps": 20}
    assert all(type(d[k]) is int for k in ("width", "height", "seed", "sample_steps"))
    assert line_to_prompt_dict("p --s 5000.0")["sample_steps"] == 1000
    with pytest.raises(UserError, match=r"--w needs a whole number of 0 or more, not '1024\.5'"):
        line_to_prompt_dict("p --w 1024.5")
    with pytest.raises(UserError, match=r"bad\.json, item 0: 'width' must be a whole number of 0 or more, not 64\.5"):
        load_prompts(write(tmp_path, "bad.json", json.dumps([{"prompt": "a", "width": 64.5}])))
    with pytest.raises(UserError, match=r"the seed must be below 2\*\*64, not 18446744073709551616"):
        load_prompts(write(tmp_path, "big.json", json.dumps([{"prompt": "a", "seed": 2.0**64}])))
    entry = {"prompt": "a", "width": 512.0, "seed": 7.0, "sample_steps": 3000.0}
    (prompt,) = load_prompts(write(tmp_path, "p.json", json.dumps([entry])))
    assert (prompt.width, prompt.seed, prompt.sample_steps) == (512, 7, 1000)
    assert type(prompt.width) is int and type(prompt.seed) is int
    toml = write(tmp_path, "p.toml", '[prompt]\nwidth = 256.0\n[[prompt.subset]]\nprompt = "a"\n')
    assert load_prompts(toml)[0].width == 256


def test_ignored_options_are_accepted_and_warn_once_each(caplog):
    with caplog.at_level(logging.WARNING):
        d = line_to_prompt_dict("p --ss euler_a --cn img.png --ctr 0.25 --rcfg 1.0 --fs 3.0 --ss ddim")
    assert d == {
        "prompt": "p",
        "sample_sampler": "ddim",
        "controlnet_image": "img.png",
        "cfg_trunc_ratio": "0.25",
        "renorm_cfg": "1.0",
        "flow_shift": "3.0",
    }
    messages = [r.getMessage() for r in caplog.records]
    for option in ("--ss", "--cn", "--ctr", "--rcfg", "--fs"):
        assert sum(f"{option} is ignored" in m for m in messages) == 1


def test_unknown_option_is_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        d = line_to_prompt_dict("a dog --ar 16:9 --w 64")
    assert d == {"prompt": "a dog", "width": 64}
    assert any("unknown option '--ar 16:9'" in r.getMessage() for r in caplog.records)


def test_empty_option_segments_are_skipped():
    assert line_to_prompt_dict("a dog -- --w 64") == {"prompt": "a dog", "width": 64}


@pytest.mark.parametrize(
    ("line", "option"),
    [
        ("p --w abc", "--w"),
        ("p --h -64", "--h"),
        ("p --d 1.5", "--d"),
        ("p --s", "--s"),
        ("p --l 1.2.3", "--l"),
        ("p --g -1", "--g"),
        ("p --w 512 cats", "--w"),
    ],
)
def test_malformed_values_name_the_place_and_option(line, option):
    with pytest.raises(UserError, match=rf"prompts\.txt, line 3: {option} needs"):
        line_to_prompt_dict(line, where="prompts.txt, line 3")


# endregion

# region files


@pytest.mark.parametrize("bom", ["", "\ufeff"])
def test_txt_skips_blank_and_comment_lines(tmp_path, bom):
    path = write(tmp_path, "p.txt", bom + "# a comment\n\na cat --w 256\n   \n  # indented comment\na dog --d 3\n")
    prompts = load_prompts(path)
    assert prompts == [
        SamplePrompt(index=0, prompt="a cat", width=256),
        SamplePrompt(index=1, prompt="a dog", seed=3),
    ]


def test_toml_subsets_share_the_prompt_table_and_override_it(tmp_path):
    path = write(
        tmp_path,
        "p.toml",
        """
[prompt]
width = 768
height = 512
sample_steps = 12
scale = 1.0
negative_prompt = "blurry"

[[prompt.subset]]
prompt = "a cat"
seed = 1

[[prompt.subset]]
prompt = "a dog"
width = 640
scale = 3.5
guidance_scale = 0.0
""",
    )
    assert load_prompts(path) == [
        SamplePrompt(0, "a cat", "blurry", 768, 512, 1, 12, 1.0, None),
        SamplePrompt(1, "a dog", "blurry", 640, 512, None, 12, 3.5, 0.0),
    ]


def test_json_mixes_lines_and_dicts(tmp_path):
    items = [
        "a cat --w 320 --l 2",
        {"prompt": "a dog", "negative_prompt": "ugly", "height": 448, "seed": 9, "sample_steps": 2000, "scale": 4},
        {"prompt": "a bird", "guidance_scale": 1.5, "enum": 7, "sample_sampler": "euler"},
    ]
    path = write(tmp_path, "p.json", json.dumps(items))
    prompts = load_prompts(path)
    assert prompts[0] == SamplePrompt(0, "a cat", width=320, cfg_scale=2.0)
    assert prompts[1] == SamplePrompt(1, "a dog", "ugly", None, 448, 9, 1000, 4.0, None)
    assert prompts[2] == SamplePrompt(2, "a bird", guidance_scale=1.5, ignored={"sample_sampler": "euler"})
    assert isinstance(prompts[1].cfg_scale, float)


def test_json_null_means_not_given_as_in_sd_scripts(tmp_path):
    """sd-scripts reads each key with dict.get: a null seed is a random one, a null negative prompt none."""
    items = [{"prompt": "a dog", "seed": None, "negative_prompt": None, "width": None, "scale": None}]
    assert load_prompts(write(tmp_path, "p.json", json.dumps(items))) == [SamplePrompt(0, "a dog")]


def test_to_dict_uses_sd_scripts_keys():
    p = SamplePrompt(3, "x", "n", 64, 80, 5, 6, 2.0, 0.0)
    assert p.to_dict() == {
        "prompt": "x",
        "enum": 3,
        "negative_prompt": "n",
        "width": 64,
        "height": 80,
        "seed": 5,
        "sample_steps": 6,
        "scale": 2.0,
        "guidance_scale": 0.0,
    }
    # what was not given is left out; options FLUX ignores are kept, as the file gave them
    assert SamplePrompt(0, "y", seed=7, ignored={"sample_sampler": "euler"}).to_dict() == {
        "prompt": "y", "enum": 0, "seed": 7, "sample_sampler": "euler"}  # fmt: skip


def test_a_value_may_span_lines_and_dict_seeds_take_64_bits(tmp_path):
    assert line_to_prompt_dict("p --n ugly\nblurry --w 64") == {"prompt": "p", "negative_prompt": "ugly\nblurry",
                                                                "width": 64}  # fmt: skip
    largest = load_prompts(write(tmp_path, "ok.json", json.dumps([{"prompt": "a", "seed": 2**64 - 1}])))
    assert largest[0].seed == 2**64 - 1
    with pytest.raises(UserError, match=r"the seed must be below 2\*\*64"):
        load_prompts(write(tmp_path, "big.json", json.dumps([{"prompt": "a", "seed": 2**64}])))


def test_utf8_prompts_round_trip(tmp_path):
    path = write(tmp_path, "p.txt", "夏の森の神社 --n 低品質\n")
    assert load_prompts(path) == [SamplePrompt(0, "夏の森の神社", "低品質")]


@pytest.mark.parametrize("name, text", [("P.TXT", "a cat --w 64\n# b\n"), ("P.Toml", '[prompt]\nwidth = 64\n'
                                        '[[prompt.subset]]\nprompt = "a cat"\n'), ("P.JSON", '["a cat --w 64"]')])
def test_the_extension_chooses_the_format_in_any_case(tmp_path, name, text):
    """Windows users' upper-case extensions read as their format (a .TXT file is not a JSON list)."""
    (prompt,) = load_prompts(write(tmp_path, name, text))
    assert (prompt.prompt, prompt.width) == ("a cat", 64)


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=r"--sample_prompts .*nope\.txt: the file does not exist"):
        load_prompts(missing)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.yaml", "a: 1", r"p\.yaml: the file name must end with \.txt, \.toml or \.json"),
        ("p.toml", "[prompt\n", r"p\.toml: not valid TOML"),
        ("p.toml", 'prompt = "a cat"\n', r"p\.toml: expected a \[prompt\] table with \[\[prompt\.subset\]\]"),
        ("p.json", "[1, 2", r"p\.json: not valid JSON"),
        ("p.json", '{"prompt": "a"}', r"p\.json: expected a JSON list"),
        ("p.json", "[3]", r"p\.json, item 0: expected a prompt string or an object"),
        ("p.json", '[{"width": 64}]', r"p\.json, item 0: each entry needs a 'prompt' string"),
        ("p.json", '[{"prompt": "a", "width": "wide"}]', r"p\.json, item 0: 'width' must be a whole number"),
        ("p.json", '[{"prompt": "a", "width": 64.5}]', r"'width' must be a whole number"),
        ("p.json", '[{"prompt": "a", "seed": true}]', r"'seed' must be a whole number"),
        ("p.json", '[{"prompt": "a", "scale": -2}]', r"'scale' must be a number of 0 or more"),
        # both parse (JSON's Infinity / NaN, TOML's inf / nan) and made every sample black
        ("p.json", '[{"prompt": "a", "scale": Infinity}]', r"'scale' must be a number of 0 or more, not inf"),
        ("p.json", '[{"prompt": "a", "guidance_scale": NaN}]', r"'guidance_scale' must be a number of 0 or more, not"),
        ("p.toml", '[prompt]\nscale = inf\n[[prompt.subset]]\nprompt = "a"\n', r"'scale' must be a number of 0 or"),
        ("p.json", '[{"prompt": "a", "negative_prompt": 5}]', r"'negative_prompt' must be a string"),
        ("p.txt", "ok\nbad --w x\n", r"p\.txt, line 2: --w needs a whole number"),
        ("p.txt", f"p --d {2**64}", r"p\.txt, line 1: the seed must be below 2\*\*64"),
    ],
)
def test_unparsable_files_are_user_errors_naming_file_and_entry(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match=message):
        load_prompts(path)


def test_unreadable_bytes_are_a_user_error(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(UserError, match=r"p\.txt: cannot read the file .*UTF-8"):
        load_prompts(path)


def test_unknown_dict_keys_warn(tmp_path, caplog):
    path = write(tmp_path, "p.json", '[{"prompt": "a", "steps": 4}]')
    with caplog.at_level(logging.WARNING):
        assert load_prompts(path) == [SamplePrompt(0, "a")]
    assert any("unknown key 'steps'" in r.getMessage() for r in caplog.records)


# endregion

# region start-of-run check


def test_prepare_returns_none_without_a_prompts_file():
    assert prepare_sample_prompts(args()) is None


def test_prepare_reads_the_file_at_start(tmp_path):
    path = write(tmp_path, "p.txt", "a cat\n")
    assert prepare_sample_prompts(args(sample_prompts=path, sample_every_n_steps=10)) == [SamplePrompt(0, "a cat")]


def test_prepare_refuses_a_missing_file_before_training(tmp_path):
    with pytest.raises(UserError, match="missing.txt: the file does not exist"):
        prepare_sample_prompts(args(sample_prompts=str(tmp_path / "missing.txt"), sample_every_n_epochs=1))


def test_an_interval_of_zero_or_less_turns_it_off(tmp_path, caplog):
    # as in sd-scripts: GUIs write 0 for "off"; the other interval still applies
    run = args(sample_prompts=write(tmp_path, "p.txt", "a"), sample_every_n_epochs=0, sample_every_n_steps=100)
    assert prepare_sample_prompts(run) == [SamplePrompt(0, "a")]
    assert "--sample_every_n_epochs 0: no sampling by epochs" in caplog.text
    assert "is ignored" not in caplog.text  # the epochs interval no longer overrides the steps one
    triggers = SampleTriggers.from_args(run)
    assert [triggers.due(None, 100), triggers.due(1, 100), triggers.due(None, 50)] == [True, False, False]
    caplog.clear()
    off = args(sample_prompts=run.sample_prompts, sample_every_n_steps=-1)
    prepare_sample_prompts(off)
    assert "--sample_every_n_steps -1: no sampling by steps" in caplog.text
    assert "no sample images will be made" in caplog.text
    assert not any(SampleTriggers.from_args(off).due(epoch, steps) for epoch in (None, 1) for steps in (1, 2, 5))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(sample_every_n_steps=5), "--sample_every_n_steps has no effect without --sample_prompts"),
        (dict(sample_at_first=True), "--sample_at_first has no effect without --sample_prompts"),
        (dict(sample_prompts="FILE"), "no --sample_every_n_steps, --sample_every_n_epochs or --sample_at_first"),
        (
            dict(sample_prompts="FILE", sample_every_n_steps=5, sample_every_n_epochs=1),
            "--sample_every_n_steps is ignored",
        ),
        (dict(sample_prompts="EMPTY", sample_at_first=True), "contains no prompts"),
    ],
)
def test_prepare_warns_about_options_that_would_do_nothing(tmp_path, caplog, kw, message):
    files = {"FILE": write(tmp_path, "p.txt", "a cat"), "EMPTY": write(tmp_path, "e.txt", "# nothing\n")}
    kw = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with caplog.at_level(logging.WARNING):
        prepare_sample_prompts(args(**kw))
    assert any(message in r.getMessage() for r in caplog.records)


def test_an_empty_prompts_file_with_sampling_off_is_not_warned_about(tmp_path, caplog):
    # the kohya_ss GUI writes <output_dir>/sample/prompt.txt and passes it on every run, sampling on or off
    with caplog.at_level(logging.WARNING):
        assert prepare_sample_prompts(args(sample_prompts=write(tmp_path, "prompt.txt", ""))) == []
    assert not caplog.records


# endregion
