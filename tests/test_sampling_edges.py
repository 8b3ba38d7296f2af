"""Edges of sample prompts and the Euler sampler that the other sampling tests leave open (a mutation round
over library/sample_prompts.py and library/flux_sampling.py). References are written out here: sd-scripts'
line_to_prompt_dict (option regexes like ``w (\\d+)`` and ``l ([\\d\\.]+)``) and BFL's sampling.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from torch import nn

from library.errors import UserError
from library.flux_sampling import (
    SampleSettings,
    TextConditions,
    decode_image,
    denoise,
    encode_texts,
    generate_image,
    generate_latents,
    make_noise,
    model_compute_dtype,
    png_text_chunks,
    resolve_sample_settings,
    save_png,
)
from library.sample_prompts import SamplePrompt, line_to_prompt_dict, load_prompts
from library.tiny_models import TINY_CLIP_DIM, TINY_T5_DIM
from library.training_samples import sample_image_filename
from tests.sampling_helpers import TXT_LEN, ToyAE, ToyVelocity, fake_encoder


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# region prompt lines


def test_a_number_ending_in_a_point_is_a_number_as_in_sd_scripts():
    """sd-scripts reads ``l ([\\d\\.]+)`` with float(), which takes '3.'."""
    assert line_to_prompt_dict("p --l 3. --g 2.") == {"prompt": "p", "scale": 3.0, "guidance_scale": 2.0}


def test_an_option_letter_glued_to_its_value_is_not_that_option(caplog):
    """sd-scripts' ``w (\\d+)`` needs the space: '--w512' sets no width (and here it says so)."""
    with caplog.at_level(logging.WARNING):
        assert line_to_prompt_dict("a dog --w512 --h 64") == {"prompt": "a dog", "height": 64}
    assert any("unknown option '--w512'" in m for m in warnings_of(caplog))


def test_a_trailing_option_marker_is_silently_empty(caplog):
    with caplog.at_level(logging.WARNING):
        assert line_to_prompt_dict("a dog --w 64 --") == {"prompt": "a dog", "width": 64}
    assert warnings_of(caplog) == []


def test_a_long_unknown_option_is_shortened_in_its_warning(caplog):
    with caplog.at_level(logging.WARNING):
        line_to_prompt_dict("a dog --zz " + "x" * 60)
    (message,) = warnings_of(caplog)
    assert "'--zz " + "x" * 34 + "...'" in message
    assert "x" * 35 not in message


def test_an_unknown_option_warns_once_per_file_whatever_its_values(tmp_path, caplog):
    path = write(tmp_path, "p.txt", "a cat --ar 16:9\na dog --ar 4:3\na bird --AR 1:1\n")
    with caplog.at_level(logging.WARNING):
        assert [p.prompt for p in load_prompts(path)] == ["a cat", "a dog", "a bird"]
    assert sum("unknown option '--ar" in m.lower() for m in warnings_of(caplog)) == 1


# endregion

# region dict entries (.toml, .json)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"prompt": 5}, r"item 0: each entry needs a 'prompt' string"),
        ({"prompt": ["a", "cat"]}, r"item 0: each entry needs a 'prompt' string"),
        ({"prompt": "a", "width": -1}, r"item 0: 'width' must be a whole number of 0 or more, not -1"),
        ({"prompt": "a", "scale": -0.5}, r"item 0: 'scale' must be a number of 0 or more, not -0.5"),
    ],
)
def test_bad_dict_values_are_user_errors(tmp_path, entry, message):
    with pytest.raises(UserError, match=message):
        load_prompts(write(tmp_path, "p.json", json.dumps([entry])))


@pytest.mark.parametrize(("given", "steps"), [(0, 1), (1, 1), (1000, 1000), (1001, 1000)])
def test_dict_steps_are_clamped_like_a_lines(tmp_path, given, steps):
    """A line's --s 0 is 1 step; a dict's sample_steps 0 must not reach the sampler as 0 (an error mid-run)."""
    path = write(tmp_path, "p.json", json.dumps([{"prompt": "a", "sample_steps": given}, f"b --s {given}"]))
    assert [p.sample_steps for p in load_prompts(path)] == [steps, steps]


def test_sd_scripts_bookkeeping_keys_are_silently_accepted(tmp_path, caplog):
    """sd-scripts writes 'enum' (and 'subset') into its prompt dicts; a file saved from one is not warned about."""
    path = write(tmp_path, "p.json", json.dumps([{"prompt": "a", "enum": 7, "subset": [], "width": 64}]))
    with caplog.at_level(logging.WARNING):
        assert load_prompts(path) == [SamplePrompt(0, "a", width=64)]
    assert warnings_of(caplog) == []


def test_a_toml_error_names_the_subset_counting_from_one(tmp_path):
    text = '[prompt]\nwidth = 64\n\n[[prompt.subset]]\nprompt = "a"\n\n[[prompt.subset]]\nprompt = "b"\nheight = -8\n'
    with pytest.raises(UserError, match=r"p\.toml, \[\[prompt\.subset\]\] #2: 'height' must be"):
        load_prompts(write(tmp_path, "p.toml", text))


def test_toml_subset_entries_must_be_tables(tmp_path):
    text = '[prompt]\nwidth = 64\nsubset = ["a cat --w 128"]\n'
    with pytest.raises(UserError, match=r"p\.toml: expected a \[prompt\] table with \[\[prompt\.subset\]\] entries"):
        load_prompts(write(tmp_path, "p.toml", text))


# endregion

# region settings: a value of 0 is a value


def test_seed_0_is_a_seed_not_a_missing_one(tmp_path):
    """sd-scripts seeds whenever ``seed is not None``: --d 0 gives the image of seed 0 every time."""
    (prompt,) = load_prompts(write(tmp_path, "p.txt", "a cat --d 0\n"))
    assert prompt.seed == 0
    assert resolve_sample_settings(prompt, "flux", seed=7).seed == 0
    assert resolve_sample_settings(prompt, "chroma").seed == 0


@pytest.mark.parametrize("model_type", ["flux", "chroma"])
def test_explicit_zeros_are_not_replaced_by_the_models_defaults(model_type):
    """--g 0 on dev is no embedded guidance (not 3.5), --l 0 is CFG at scale 0 (the negative prompt alone, not
    Chroma's 4.0), and --w 0 / --h 0 are floored to the minimum 64 (not the default 512)."""
    s = resolve_sample_settings(SamplePrompt(0, "p", "n", width=0, height=0, guidance_scale=0.0, cfg_scale=0.0),
                                model_type, seed=1)  # fmt: skip
    assert (s.guidance, s.cfg_scale, s.use_cfg, s.negative_prompt) == (0.0, 0.0, True, "n")
    assert (s.width, s.height) == (64, 64)


def test_zero_steps_are_refused_by_the_settings():
    with pytest.raises(ValueError, match="at least 1 step"):
        SampleSettings("p", steps=0)
    assert SampleSettings("p", steps=1).steps == 1


# endregion

# region what the DiT is fed


class DtypeRecorder(nn.Module):
    """A DiT stand-in with weights in ``dtype`` that records the dtypes of its inputs; velocity 0."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dtype=dtype))
        self.seen: list[dict] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None):
        inputs = dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y, guidance=guidance,
                      mask=txt_attention_mask)  # fmt: skip
        self.seen.append({name: None if t is None else t.dtype for name, t in inputs.items()})
        return torch.zeros_like(img)


def test_the_dit_is_fed_its_compute_dtype_and_the_state_stays_fp32():
    """Text states, the latent, σ and the guidance go to the DiT in ``dtype`` (a bf16 DiT without autocast
    cannot take fp32 inputs); the position ids stay fp32 (RoPE's precision), the mask keeps its integer type."""
    model = DtypeRecorder(torch.bfloat16)
    cond = TextConditions(torch.zeros(1, TINY_CLIP_DIM), torch.zeros(1, TXT_LEN, TINY_T5_DIM),
                          torch.zeros(1, TXT_LEN, 3), torch.ones(1, TXT_LEN, dtype=torch.long))  # fmt: skip
    noise = make_noise(0, 64, 64)
    x = denoise(model, noise, torch.zeros(1, 16, 3), cond, [1.0, 0.5, 0.0], 3.5, neg_cond=cond, cfg_scale=2.0,
                apply_t5_attn_mask=True, dtype=torch.bfloat16)  # fmt: skip
    assert x.dtype == torch.float32 and torch.equal(x, noise)
    assert len(model.seen) == 2
    for seen in model.seen:
        assert seen == {"img": torch.bfloat16, "img_ids": torch.float32, "txt": torch.bfloat16,
                        "txt_ids": torch.float32, "timesteps": torch.bfloat16, "y": torch.bfloat16,
                        "guidance": torch.bfloat16, "mask": torch.long}  # fmt: skip


def test_generate_latents_feeds_the_dits_dtype_and_returns_fp32():
    model = DtypeRecorder(torch.bfloat16)
    cond = TextConditions(torch.zeros(1, TINY_CLIP_DIM), torch.zeros(1, TXT_LEN, TINY_T5_DIM),
                          torch.zeros(1, TXT_LEN, 3))  # fmt: skip
    latents = generate_latents(model, SampleSettings("p", width=64, height=96, steps=2, seed=3), cond)
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 12, 8)
    assert [seen["img"] for seen in model.seen] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize(
    ("weights", "fed"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float8_e4m3fn, torch.bfloat16),
        (torch.float8_e5m2, torch.bfloat16),
    ],
)
def test_the_compute_dtype_is_the_weights_or_bf16_for_fp8(weights, fed):
    assert model_compute_dtype(DtypeRecorder(torch.float32).to(weights)) == fed


# endregion

# region batching text conditions


def test_outputs_without_ids_get_zero_ids_of_the_t5_length():
    t5 = torch.randn(2, 5, TINY_T5_DIM)
    cond = TextConditions.from_outputs([torch.zeros(2, TINY_CLIP_DIM), t5, None, None])
    assert torch.equal(cond.txt_ids, torch.zeros(2, 5, 3)) and cond.t5_out is t5


def test_outputs_without_t5_are_refused_by_name():
    with pytest.raises(ValueError, match="sampling needs T5 outputs"):
        TextConditions.from_outputs([torch.zeros(1, TINY_CLIP_DIM), None, None, None])


def test_texts_are_encoded_one_at_a_time_once_each():
    """encode_texts runs the text encoders on one text at a time (the peak memory of one prompt)."""
    encode = fake_encoder()
    conds = encode_texts(["a cat", "", "a cat", "blurry"], encode)
    assert encode.calls == [["a cat"], [""], ["blurry"]]
    assert list(conds) == ["a cat", "", "blurry"] and all(len(c) == 1 for c in conds.values())


def test_conditions_that_cannot_be_batched_are_named():
    def cond(length: int, mask: bool) -> TextConditions:
        return TextConditions(None, torch.zeros(1, length, 4), torch.zeros(1, length, 3),
                              torch.ones(1, length) if mask else None)  # fmt: skip

    with pytest.raises(ValueError, match=r"different T5 lengths \[8, 16\]"):
        TextConditions.cat([cond(8, False), cond(16, False)])
    with pytest.raises(ValueError, match="only some have t5_attn_mask"):
        TextConditions.cat([cond(8, True), cond(8, False)])
    assert len(TextConditions.cat([cond(8, True), cond(8, True)])) == 2


# endregion

# region generate_image and decode_image


def test_with_cfg_the_positive_prompt_is_the_positive_half():
    """generate_image encodes [negative, positive] as one batch; the DiT must then see [neg, pos], not [neg, neg]."""
    model, encode = ToyVelocity(), fake_encoder()
    settings = SampleSettings("a cat", "blurry", width=64, height=64, steps=2, seed=1, cfg_scale=3.0)
    generate_image(model, ToyAE(), settings, encode_prompts=encode)
    assert encode.calls == [["blurry", "a cat"]]
    neg, pos = (float(fake_encoder()([text])[1][0, 0, 0]) for text in ("blurry", "a cat"))
    assert neg != pos
    for call in model.calls:
        assert call["txt"][:, 0, 0].tolist() == pytest.approx([neg, pos])


def test_without_cfg_the_negative_prompt_needs_no_encoding():
    """CFG 1 runs only the positive prompt: its precomputed conditions alone suffice, and nothing else is encoded."""
    settings = SampleSettings("a cat", "blurry", width=64, height=64, steps=1, seed=1, cfg_scale=1.0)
    cache = encode_texts(["a cat"], fake_encoder())
    generate_image(ToyVelocity(), ToyAE(), settings, conditions=cache)
    encode = fake_encoder()
    generate_image(ToyVelocity(), ToyAE(), settings, encode_prompts=encode)
    assert encode.calls == [["a cat"]]


def test_the_autocast_factory_wraps_sampling_and_decoding():
    events: list[str] = []

    class Recorder(ToyVelocity):
        def forward(self, *args, **kwargs):
            events.append("dit")
            return super().forward(*args, **kwargs)

    class RecordingAE(ToyAE):
        def decode(self, z):
            events.append("decode")
            return super().decode(z)

    class Autocast:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    settings = SampleSettings("a cat", width=64, height=64, steps=2, seed=1)
    generate_image(Recorder(), RecordingAE(), settings, encode_prompts=fake_encoder(), autocast=Autocast)
    assert events == ["enter", "dit", "dit", "decode", "exit"]


def test_the_ae_visits_the_decode_device_and_goes_back():
    moves: list[str] = []

    class StayingAE(ToyAE):  # records where it is sent; stays on the CPU so the test runs anywhere
        def to(self, *args, **kwargs):
            moves.append(str(args[0]))
            return self

        def decode(self, z):
            moves.append(f"decode on {z.device}")
            return torch.zeros(1, 3, 8, 8)

    image = decode_image(StayingAE(), torch.zeros(1, 16, 1, 1), device="meta")
    assert moves == ["meta", "decode on meta", "cpu"]
    assert image.size == (8, 8)
    moves.clear()
    decode_image(StayingAE(), torch.zeros(1, 16, 1, 1))
    assert moves == ["decode on cpu"]


# endregion

# region PNG text chunks


def test_png_chunks_of_a_cfg_sample_with_a_64_bit_seed_exactly():
    """Every chunk, and the A1111 ``parameters`` layout (CFG scale = --l, Distilled CFG Scale = --g), spelled out."""
    seed = 2**64 - 1
    settings = SampleSettings("a cat", "blurry", width=96, height=64, steps=7, seed=seed, guidance=0.5, cfg_scale=2.5)
    chunks = png_text_chunks(settings, model_type="chroma", loras=[("a.safetensors", 0.75), ("b", 1)],
                             extra={"epoch": 3})  # fmt: skip
    assert chunks == {
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "seed": "18446744073709551615",
        "steps": "7",
        "width": "96",
        "height": "64",
        "guidance": "0.5",
        "cfg_scale": "2.5",
        "sampler": "euler",
        "schedule": "shifted",
        "model": "chroma",
        "loras": '[{"name": "a.safetensors", "multiplier": 0.75}, {"name": "b", "multiplier": 1.0}]',
        "epoch": "3",
        "parameters": "a cat\nNegative prompt: blurry\nSteps: 7, Sampler: Euler, Schedule type: shifted, "
        "CFG scale: 2.5, Distilled CFG Scale: 0.5, Seed: 18446744073709551615, Size: 96x64, Model: chroma, "
        "Lora: a.safetensors:0.75, Lora: b:1",
    }


# endregion


def test_save_png_makes_the_folders_of_its_name(tmp_path):
    """An --output_name such as "run1/lora" puts the images in a folder that does not exist yet."""
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "run1" / "lora" / "x.png", {"prompt": "p"})
    with Image.open(path) as im:
        assert im.text["prompt"] == "p"
    assert sorted(p.name for p in (tmp_path / "run1" / "lora").iterdir()) == ["x.png"]


@pytest.mark.parametrize(("output_name", "expected"), [(None, "000010_00_20250101000000.png"),
                                                       ("", "_000010_00_20250101000000.png")])  # fmt: skip
def test_only_a_missing_output_name_drops_the_prefix(output_name, expected):
    """sd-scripts: ``'' if args.output_name is None else args.output_name + '_'`` (an empty name keeps the '_')."""
    assert sample_image_filename(output_name, None, 10, 0, None, timestamp="20250101000000") == expected
