"""The Euler flow sampler: schedule, Euler and CFG math, diffusers' pipelines as independent
references, tiny real models end to end, PNG files. Training-time behaviour: test_training_samples.py."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from library import flow_matching as fm
from library.flux_sampling import (
    SampleSettings,
    TextConditions,
    combine_cfg,
    decode_image,
    denoise,
    encode_texts,
    generate_image,
    generate_latents,
    make_encode_prompts,
    make_noise,
    png_text_chunks,
    resolve_sample_settings,
    sampling_schedule,
    save_png,
    texts_to_encode,
)
from library.flux_utils import pack_latents
from library.sample_prompts import SamplePrompt
from library.tiny_models import TINY_CLIP_DIM, TINY_T5_DIM, random_model, tiny_ae_params, tiny_chroma_params
from library.tiny_models import tiny_flux_params as tiny_flux
from library.training_samples import sample_images
from tests.sampling_helpers import TXT_LEN, ToyAE, ToyVelocity, fake_encoder


@pytest.fixture(scope="module")
def models():
    return {
        "dev": random_model(tiny_flux(True), seed=1),
        "schnell": random_model(tiny_flux(False), seed=2),
        "chroma": random_model(tiny_chroma_params(), seed=3),
        "ae": random_model(tiny_ae_params(), seed=4),
    }



def cond_with(value: float, mask_len: int | None = None) -> TextConditions:
    t5 = torch.full((1, TXT_LEN, TINY_T5_DIM), value)
    mask = None if mask_len is None else (torch.arange(TXT_LEN)[None] < mask_len).long()
    return TextConditions(torch.zeros(1, TINY_CLIP_DIM), t5, torch.zeros(1, TXT_LEN, 3), mask)


# region schedule


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (512, 512), (768, 512), (256, 256), (1360, 768)])
def test_schedule_is_bfls_resolution_shifted_formula(width, height):
    seq_len = (width // 16) * (height // 16)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    steps = 6
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in np.linspace(1, 0, steps + 1)[1:-1]] + [0.0]
    assert sampling_schedule(steps, width, height, shift=True) == pytest.approx(expected, abs=1e-6)


def test_schnell_schedule_is_unshifted_linspace():
    assert sampling_schedule(4, 1024, 1024, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 1536, 4096, 5000])
def test_mu_line_equals_diffusers_calculate_shift(seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert fm.flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15), abs=1e-12)


@pytest.mark.parametrize("shift", [True, False], ids=["dev-chroma", "schnell"])
def test_schedule_equals_diffusers_flow_match_euler_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    steps, width, height = 7, 768, 512
    seq_len = (width // 16) * (height // 16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=shift)
    sigmas = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's grid; the scheduler appends 0
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15) if shift else None
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    ours = sampling_schedule(steps, width, height, shift=shift)
    assert ours == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6)


# endregion

# region Euler and CFG


def test_euler_with_a_constant_velocity_gives_exact_x0():
    noise = make_noise(5, 64, 96)
    model = ToyVelocity()
    c = 0.37
    for schedule in (sampling_schedule(9, 64, 96), sampling_schedule(3, 64, 96, shift=False)):
        x = denoise(model, noise, torch.zeros(1, noise.shape[1], 3), cond_with(c), schedule, guidance=1.0)
        torch.testing.assert_close(x, noise - c, atol=1e-6, rtol=0)


def test_euler_on_the_exact_flow_of_one_data_point_lands_on_it():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 12, 64, generator=g)

    def flow_to_x0(img, timesteps, **_):
        return (img - x0) / timesteps.view(-1, 1, 1)  # the straight-line velocity through x0

    noise = make_noise(1, 64, 48)
    x = denoise(flow_to_x0, noise, torch.zeros(1, 12, 3), cond_with(0.0), sampling_schedule(11, 64, 48), 0.0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_cfg_combination_formula():
    v_neg, v_pos = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    torch.testing.assert_close(combine_cfg(v_neg, v_pos, 4.0), torch.tensor([9.0, 8.0]))
    torch.testing.assert_close(combine_cfg(v_neg, v_pos, 1.0), v_pos)
    torch.testing.assert_close(combine_cfg(v_neg, v_pos, 0.0), v_neg)


def test_cfg_runs_negative_then_positive_in_one_batch_and_combines_velocities():
    model = ToyVelocity()
    noise = make_noise(2, 64, 64)
    neg, pos, cfg = cond_with(-0.5, 2), cond_with(0.25, 5), 3.0
    schedule = sampling_schedule(4, 64, 64)
    x = denoise(
        model, noise, torch.zeros(1, 16, 3), pos, schedule, 2.0, neg_cond=neg, cfg_scale=cfg, apply_t5_attn_mask=True
    )
    torch.testing.assert_close(x, noise - (-0.5 + cfg * (0.25 + 0.5)), atol=1e-6, rtol=0)
    assert len(model.calls) == 4
    for call, t in zip(model.calls, schedule[:-1], strict=True):
        assert call["batch"] == 2
        assert call["txt"][:, 0, 0].tolist() == [-0.5, 0.25]  # [neg, pos]
        assert call["mask"].sum(1).tolist() == [2, 5]
        assert call["guidance"].tolist() == [2.0, 2.0]  # the same embedded guidance for both
        assert call["t"].tolist() == pytest.approx([t, t])  # σ in [0, 1], not 1000·σ


def test_without_cfg_the_negative_prompt_is_not_run():
    model = ToyVelocity()
    settings = SampleSettings("p", "n", 64, 64, steps=2, seed=0, cfg_scale=1.0)
    generate_latents(model, settings, cond_with(1.0), cond_with(2.0))
    assert [c["batch"] for c in model.calls] == [1, 1]


def test_a_cfg_scale_below_one_still_runs_the_negative_prompt():
    """sd-scripts runs CFG for any scale other than 1 (spec: "CFG when scale ≠ 1"), 0.5 included."""
    model = ToyVelocity()
    settings = SampleSettings("p", "n", 64, 64, steps=2, seed=0, cfg_scale=0.5)
    noise = make_noise(0, 64, 64)
    latents = generate_latents(model, settings, cond_with(1.0), cond_with(2.0))
    assert [c["batch"] for c in model.calls] == [2, 2]
    assert texts_to_encode([SamplePrompt(0, "a", "n", cfg_scale=0.5)]) == ["a", "n"]
    # constant velocities neg 2, pos 1: v = 2 + 0.5·(1 − 2) = 1.5, integrated from σ = 1 to 0
    torch.testing.assert_close(pack_latents(latents), noise - 1.5, atol=1e-6, rtol=0)


def test_the_t5_mask_reaches_the_dit_only_when_asked():
    model = ToyVelocity()
    denoise(model, make_noise(0, 64, 64), torch.zeros(1, 16, 3), cond_with(0.0, 3), [1.0, 0.0], 1.0)
    denoise(
        model, make_noise(0, 64, 64), torch.zeros(1, 16, 3), cond_with(0.0, 3), [1.0, 0.0], 1.0, apply_t5_attn_mask=True
    )
    assert model.calls[0]["mask"] is None
    assert model.calls[1]["mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("model_type", "is_schnell", "shifted", "mask"),
    [
        ("flux", False, True, False),
        ("flux", True, False, False),
        ("chroma", False, True, True),
    ],
)
def test_generate_image_picks_schedule_and_mask_by_model(model_type, is_schnell, shifted, mask):
    model = ToyVelocity()
    settings = SampleSettings("a cat", width=64, height=80, steps=4, seed=1, guidance=0.0)
    generate_image(
        model,
        ToyAE(),
        settings,
        encode_prompts=fake_encoder(model_type == "chroma"),
        model_type=model_type,
        is_schnell=is_schnell,
    )
    expected = sampling_schedule(4, 64, 80, shift=shifted)[:-1]
    assert [c["t"].item() for c in model.calls] == pytest.approx(expected)
    assert all((c["mask"] is not None) == mask for c in model.calls)


def test_noise_depends_only_on_the_seed_and_size():
    a = make_noise(7, 96, 64)
    assert a.shape == (1, 6 * 4, 64) and a.dtype == torch.float32
    torch.manual_seed(123)
    torch.testing.assert_close(make_noise(7, 96, 64), a, rtol=0, atol=0)
    assert not torch.equal(make_noise(8, 96, 64), a)


def test_the_starting_noise_is_a_cpu_generator_seeded_with_the_prompts_seed():
    """The image of a seed is reproducible elsewhere: torch.Generator().manual_seed(seed), (1, h/16·w/16, 64)."""
    seed, width, height = 1234, 96, 64
    expected = torch.randn(1, (height // 16) * (width // 16), 64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(make_noise(seed, width, height), expected, rtol=0, atol=0)
    # through the sampler: a zero velocity leaves the noise as it was, unpacked to (1, 16, h/8, w/8)
    settings = SampleSettings("p", width=width, height=height, steps=2, seed=seed)
    latents = generate_latents(ToyVelocity(), settings, cond_with(0.0))
    h, w = height // 16, width // 16
    unpacked = expected.view(1, h, w, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 2 * h, 2 * w)
    torch.testing.assert_close(latents, unpacked, rtol=0, atol=0)


# endregion

# region settings


def test_flux_defaults_are_sd_scripts():
    s = resolve_sample_settings(SamplePrompt(0, "a cat"), "flux", seed=5)
    assert (s.width, s.height, s.steps, s.seed, s.guidance, s.cfg_scale, s.negative_prompt) == (
        512,
        512,
        20,
        5,
        3.5,
        1.0,
        "",
    )


def test_chroma_defaults_are_guidance_0_and_cfg_with_an_empty_negative():
    s = resolve_sample_settings(SamplePrompt(0, "a cat"), "chroma", seed=5)
    assert (s.guidance, s.cfg_scale, s.negative_prompt, s.use_cfg) == (0.0, 4.0, "", True)
    explicit = resolve_sample_settings(SamplePrompt(0, "a", "bad", cfg_scale=1.0, guidance_scale=2.0), "chroma")
    assert (explicit.guidance, explicit.cfg_scale, explicit.negative_prompt) == (2.0, 1.0, "bad")


@pytest.mark.parametrize(("given", "floored"), [(512, 512), (520, 512), (1360, 1360), (63, 64), (70, 64), (0, 64)])
def test_size_is_floored_to_16_with_a_minimum_of_64(given, floored):
    s = SampleSettings("p", width=given, height=given)
    assert (s.width, s.height) == (floored, floored)


def test_prompt_seed_wins_and_missing_seed_is_random():
    assert resolve_sample_settings(SamplePrompt(0, "p", seed=9), seed=1).seed == 9
    seeds = {resolve_sample_settings(SamplePrompt(0, "p")).seed for _ in range(5)}
    assert len(seeds) > 1


def test_texts_to_encode_include_negatives_only_where_cfg_runs():
    prompts = [SamplePrompt(0, "a", "n1"), SamplePrompt(1, "b", "n2", cfg_scale=3.0), SamplePrompt(2, "a", cfg_scale=2)]
    assert texts_to_encode(prompts, "flux") == ["a", "b", "n2", ""]
    assert texts_to_encode([SamplePrompt(0, "a")], "chroma") == ["a", ""]


# endregion

# region tiny real models


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_samples(models, tmp_path, prompts, kind="dev", **kw):
    model_type = "chroma" if kind == "chroma" else "flux"
    kw.setdefault("encode_prompts", fake_encoder(model_type == "chroma"))
    return sample_images(
        models[kind],
        models["ae"],
        prompts,
        output_dir=str(tmp_path),
        output_name="lora",
        epoch=kw.pop("epoch", None),
        steps=kw.pop("steps", 10),
        model_type=model_type,
        is_schnell=kind == "schnell",
        **kw,
    )


@pytest.mark.parametrize("kind", ["dev", "schnell", "chroma"])
def test_tiny_models_write_a_png_of_the_right_size_with_text_chunks(models, tmp_path, kind):
    prompt = SamplePrompt(0, "a red cat", "blurry", width=90, height=64, seed=11, sample_steps=3, cfg_scale=2.0)
    loras = [("my_lora.safetensors", 0.8)]
    (path,) = run_samples(models, tmp_path, [prompt], kind, loras=loras)
    assert os.path.dirname(path) == str(tmp_path / "sample")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (80, 64) and im.mode == "RGB"
        text = dict(im.text)
    expected_guidance = "0.0" if kind == "chroma" else "3.5"
    assert text["prompt"] == "a red cat" and text["negative_prompt"] == "blurry"
    assert (text["seed"], text["steps"], text["width"], text["height"]) == ("11", "3", "80", "64")
    assert (text["guidance"], text["cfg_scale"], text["step"]) == (expected_guidance, "2.0", "10")
    assert text["sampler"] == "euler"
    assert text["schedule"] == ("linear" if kind == "schnell" else "shifted")
    assert text["model"] == {"dev": "flux1-dev", "schnell": "flux1-schnell", "chroma": "chroma"}[kind]
    assert text["loras"] == '[{"name": "my_lora.safetensors", "multiplier": 0.8}]'
    assert text["parameters"].startswith("a red cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler")
    assert "Seed: 11, Size: 80x64" in text["parameters"] and "Lora: my_lora.safetensors:0.8" in text["parameters"]
    assert pixels(path).std() > 0  # not a blank image


def test_same_seed_same_pixels_and_another_seed_differs(models, tmp_path):
    seeds = [3, 3, 4]
    prompts = [SamplePrompt(i, "a cat", width=64, height=64, seed=s, sample_steps=2) for i, s in enumerate(seeds)]
    a, b, c = run_samples(models, tmp_path, prompts)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_chroma_samples_use_cfg_with_an_empty_negative_by_default(models, tmp_path):
    encode = fake_encoder(chroma=True)
    (path,) = run_samples(
        models,
        tmp_path,
        [SamplePrompt(0, "a cat", seed=1, sample_steps=2, width=64, height=64)],
        "chroma",
        encode_prompts=encode,
    )
    assert encode.calls == [["", "a cat"]]
    with Image.open(path) as im:
        assert (im.text["cfg_scale"], im.text["guidance"], im.text["negative_prompt"]) == ("4.0", "0.0", "")


def test_precomputed_conditions_give_the_same_image_without_an_encoder(models, tmp_path):
    prompts = [SamplePrompt(0, "a dog", "ugly", width=64, height=64, seed=2, sample_steps=2, cfg_scale=3.0)]
    (encoded,) = run_samples(models, tmp_path / "a", prompts)
    cache = encode_texts(texts_to_encode(prompts), fake_encoder())
    (cached,) = run_samples(models, tmp_path / "b", prompts, encode_prompts=None, conditions=cache)
    assert np.array_equal(pixels(encoded), pixels(cached))


class FixedDecoder(nn.Module):
    """An AE stand-in whose decode returns ``pixels`` whatever the latent."""

    def __init__(self, pixels: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.pixels = pixels

    def decode(self, z):
        return self.pixels


def test_decode_maps_minus_one_to_one_onto_0_to_255(models):
    pixels = torch.stack([torch.full((8, 8), -3.0), torch.zeros(8, 8), torch.full((8, 8), 0.5)])[None]
    image = decode_image(FixedDecoder(pixels), torch.zeros(1, 16, 1, 1))
    assert image.size == (8, 8) and np.asarray(image)[0, 0].tolist() == [0, 128, 191]


def test_a_non_finite_image_is_warned_about(caplog):
    with caplog.at_level("WARNING"):
        image = decode_image(FixedDecoder(torch.full((1, 3, 8, 8), float("nan"))), torch.zeros(1, 16, 1, 1))
    assert np.asarray(image).max() == 0
    assert "the image came out non-finite (NaN or inf; saved as black)" in caplog.text


# endregion

# region independent references: diffusers' pipelines, full sampling loop


def _diffusers_transformer(params, chroma: bool):
    import diffusers

    common = dict(
        patch_size=1,
        in_channels=params.in_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        axes_dims_rope=tuple(params.axes_dim),
    )
    if chroma:
        ref = diffusers.ChromaTransformer2DModel(
            **common,
            approximator_num_channels=params.approximator_in_dim,
            approximator_hidden_dim=params.approximator_hidden_size,
            approximator_layers=params.approximator_depth,
        )
    else:
        ref = diffusers.FluxTransformer2DModel(
            **common, pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed
        )
    return ref.eval()


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_sampler_matches_diffusers_flux_pipeline_with_true_cfg(models, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from library.flux_key_mapping import bfl_to_diffusers

    model = models[kind]
    ref = _diffusers_transformer(model.params, chroma=False)
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    # dev's scheduler config shifts by resolution; schnell's does not
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=kind == "dev")
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=ref,
    )
    pipe.set_progress_bar_config(disable=True)
    encoded = TextConditions.from_outputs(fake_encoder()(["a cat", "blurry"]))
    pos, neg = encoded.select(0), encoded.select(1)
    settings = SampleSettings("a cat", "blurry", width=96, height=64, steps=5, seed=3, guidance=3.5, cfg_scale=2.5)
    ours = generate_latents(model, settings, pos, neg, shift=kind == "dev")
    ref_latents = pipe(
        prompt_embeds=pos.t5_out,
        pooled_prompt_embeds=pos.l_pooled,
        negative_prompt_embeds=neg.t5_out,
        negative_pooled_prompt_embeds=neg.l_pooled,
        true_cfg_scale=2.5,
        guidance_scale=3.5,
        height=64,
        width=96,
        num_inference_steps=5,
        latents=make_noise(3, 96, 64),
        output_type="latent",
    ).images
    assert ref_latents.abs().max() > 0.5
    torch.testing.assert_close(pack_latents(ours), ref_latents, atol=1e-4, rtol=0)


def test_chroma_sampler_matches_diffusers_chroma_pipeline(models):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    from library.flux_key_mapping import bfl_to_diffusers

    model = models["chroma"]
    ref = _diffusers_transformer(model.params, chroma=True)
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True)
    pipe = ChromaPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    encoded = TextConditions.from_outputs(fake_encoder(chroma=True)(["a cat on a mat", "ugly"]))
    pos, neg = encoded.select(0), encoded.select(1)
    settings = resolve_sample_settings(SamplePrompt(0, "a cat on a mat", "ugly", 96, 64, 3, 5), "chroma")

    def pipeline_mask(mask):  # the T5 tokens plus one padding token, as ChromaPipeline builds it when encoding
        return torch.arange(mask.shape[1])[None] <= mask.sum(1, keepdim=True)

    ours = generate_latents(model, settings, pos, neg, apply_t5_attn_mask=True)
    ref_latents = pipe(
        prompt_embeds=pos.t5_out,
        prompt_attention_mask=pipeline_mask(pos.t5_attn_mask),
        negative_prompt_embeds=neg.t5_out,
        negative_prompt_attention_mask=pipeline_mask(neg.t5_attn_mask),
        guidance_scale=settings.cfg_scale,
        height=64,
        width=96,
        num_inference_steps=5,
        latents=make_noise(3, 96, 64),
        output_type="latent",
    ).images
    assert ref_latents.abs().max() > 0.5
    torch.testing.assert_close(pack_latents(ours), ref_latents, atol=1e-4, rtol=0)


# endregion

# region PNG files


def test_png_text_round_trips_non_latin_text(tmp_path):
    settings = SampleSettings("夏の森の神社", "低品質", 64, 64, steps=2, seed=1)
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", png_text_chunks(settings, loras=[("ルーラ", 1.0)]))
    with Image.open(path) as im:
        assert im.text["prompt"] == "夏の森の神社" and im.text["negative_prompt"] == "低品質"
        assert im.text["loras"] == '[{"name": "ルーラ", "multiplier": 1.0}]'


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (4, 4)), target, {"prompt": "p"})
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.png"]


# endregion

# region real text encoders through the strategies (the trainer's and the inference script's wiring)


@pytest.mark.slow
def test_real_tiny_files_and_text_encoders_through_make_encode_prompts(tmp_path):
    from library.flux_utils import load_ae, load_flow_model
    from library.text_encoders import FluxTextEncodingStrategy, load_clip_l, load_t5xxl
    from library.tiny_models import write_tiny_models
    from library.tokenizers_flux import FluxTokenizeStrategy

    files = write_tiny_models(str(tmp_path / "models"))
    ae = load_ae(files.ae, torch.float32, "cpu")
    t5 = load_t5xxl(files.t5xxl, torch.float32, "cpu")
    for model_type, ckpt, clip in (
        ("flux", files.flux_dev, load_clip_l(files.clip_l, torch.float32, "cpu")),
        ("chroma", files.chroma, None),
    ):
        is_schnell, dit = load_flow_model(ckpt, torch.float32, "cpu", model_type=model_type)
        tokenize = FluxTokenizeStrategy(32, files.tokenizer_cache_dir, use_clip_l=clip is not None)
        encode = make_encode_prompts(tokenize, FluxTextEncodingStrategy(apply_t5_attn_mask=True), [clip, t5])
        prompts = [SamplePrompt(0, "a photo of a cat", "old painting", 64, 64, seed=5, sample_steps=2, cfg_scale=2.0)]
        out = tmp_path / model_type
        (a,) = sample_images(
            dit,
            ae,
            prompts,
            output_dir=str(out),
            output_name="t",
            epoch=None,
            steps=1,
            encode_prompts=encode,
            model_type=model_type,
            is_schnell=is_schnell,
            apply_t5_attn_mask=True,
        )
        (b,) = sample_images(
            dit,
            ae,
            prompts,
            output_dir=str(out),
            output_name="u",
            epoch=None,
            steps=1,
            encode_prompts=encode,
            model_type=model_type,
            is_schnell=is_schnell,
            apply_t5_attn_mask=True,
        )
        assert pixels(a).shape == (64, 64, 3) and np.array_equal(pixels(a), pixels(b))


# endregion
