"""The loss ``batch_loss`` returns, end to end, against its formulas (spec §d with the fixes of docs §17.3),
recomputed from nothing but what a stand-in DiT received and the batch's latents."""

import math
import types

import pytest
import torch
from einops import rearrange

import flux_train_network
from library.flow_matching import TRAIN_STREAM, FlowMatchingConfig, per_sample_seeds, sample_noise_and_sigmas
from tests.training_helpers import base_argv, dataset

B, H, W = 3, 12, 8  # a non-square latent: a transposed pack or unpack shows
STEP, INDICES = 5, [0, 1, 2]  # σ in 0.27-0.89 for every sampling: no σ near 0 or 1, where the ulp lost in
# recovering σ from the timesteps would grow past rtol 1e-5 (in σ, or in 1 − σ)
HUBER_C, HUBER_SCALE = 0.2, 1.5  # away from the defaults (0.1, 1), so that a dropped scale shows


class FixedDiT:
    """Records its inputs and predicts the same random velocity whatever they are."""

    params = types.SimpleNamespace(guidance_embed=True)

    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        prediction = torch.randn(kw["img"].shape, generator=torch.Generator().manual_seed(99))
        self.calls.append(kw | {"prediction": prediction})
        return prediction


def run_batch_loss(models, tmp_path, weight_dtype=torch.float32, **flags):
    """One batch_loss call under ``flags``: the per-sample losses, the DiT's one call, the latents and the args."""
    trainer = flux_train_network.FluxNetworkTrainer()
    args = trainer.parser.parse_args(base_argv(models, dataset(tmp_path), str(tmp_path / "out"), **flags))
    trainer.check_args(args)
    dit = FixedDiT()
    ctx = types.SimpleNamespace(args=args, accelerator=types.SimpleNamespace(device=torch.device("cpu")),
                                weight_dtype=weight_dtype, seed=args.seed, models=types.SimpleNamespace(dit=dit),
                                network=None, train_text_encoder=False)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    cached = {"l_pooled": torch.randn(B, 8, generator=g), "t5_out": torch.randn(B, 5, 8, generator=g),
              "txt_ids": torch.zeros(B, 5, 3), "t5_attn_mask": torch.ones(B, 5, dtype=torch.long)}  # fmt: skip
    latents = torch.randn(B, 16, H, W, generator=g)
    batch = {"latents": latents, "captions": ["x"] * B, "text_encoder_outputs": cached,
             "image_paths": [f"{i}.png" for i in range(B)]}  # fmt: skip
    loss = trainer.batch_loss(ctx, batch, STEP, INDICES)
    (call,) = dit.calls
    return loss, call, latents, args


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Spec §d.1's packing undone: (B, h·w, (c ph pw)) -> (B, c, 2h, 2w)."""
    return rearrange(packed, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=H // 2, ph=2, pw=2)


def trained_draws(seed: int, **config) -> tuple:
    """ε, σ and the IP noise as the trainer draws them for the batch (its seeds, step, indices and stream)."""
    drawn = sample_noise_and_sigmas(FlowMatchingConfig(**config), (16, H, W),
                                    per_sample_seeds(seed, STEP, INDICES, stream=TRAIN_STREAM))  # fmt: skip
    return drawn.noise, drawn.sigmas, drawn.ip_noise


def expected_loss(prediction, x0, sigmas, noise, prediction_type, weighting, loss_type, huber_schedule=None):
    """Per-sample loss in float64. Prediction and target v = ε − x0 go through the same map (docs §17.3), so the
    compared difference d is a multiple of pred − v."""
    s = sigmas.double().view(-1, 1, 1, 1)
    d = prediction.double() - (noise.double() - x0.double())
    if prediction_type == "sigma_scaled":  # x_t − σ·pred against x_t − σ·v
        d = -s * d
    elif prediction_type == "additive":  # x_t + (1 − σ)·pred against x_t + (1 − σ)·v
        d = (1 - s) * d
    weight = torch.ones_like(s)  # raw and additive ignore the weighting scheme
    if prediction_type == "sigma_scaled" and weighting == "sigma_sqrt":
        weight = s.clamp_min(1e-6) ** -2
    elif prediction_type == "sigma_scaled" and weighting == "cosmap":
        weight = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    if huber_schedule == "constant":
        c = torch.full_like(s, HUBER_C * HUBER_SCALE)
    elif huber_schedule == "exponential":  # exp(−α·t)·huber_scale with α = −ln(huber_c)/1000, t = 1000·σ
        c = torch.exp(math.log(HUBER_C) / 1000 * (1000 * s)) * HUBER_SCALE
    if loss_type == "l2":
        loss = d**2
    elif loss_type == "l1":
        loss = d.abs()
    elif loss_type == "huber":
        loss = 2 * c * (torch.sqrt(d**2 + c**2) - c)
    else:  # smooth_l1
        loss = 2 * (torch.sqrt(d**2 + c**2) - c)
    return (loss * weight).mean(dim=(1, 2, 3))


# every sampling, prediction type, weighting, loss and Huber schedule at least once; the weightings both where they
# act (logit_normal, mode: the `sigma` density; sigma_sqrt, cosmap: sigma_scaled's loss weight) and where they must not
@pytest.mark.parametrize("sampling, prediction_type, weighting, loss_type, huber_schedule", [
    ("sigma", "raw", "uniform", "l2", None),
    ("sigma", "sigma_scaled", "logit_normal", "l1", None),
    ("sigma", "additive", "mode", "huber", "constant"),
    ("sigma", "sigma_scaled", "sigma_sqrt", "smooth_l1", "exponential"),
    ("sigma", "sigma_scaled", "cosmap", "l2", None),
    ("sigma", "sigma_scaled", "mode", "huber", "exponential"),
    ("uniform", "sigma_scaled", "sigma_sqrt", "l2", None),
    ("uniform", "additive", "uniform", "smooth_l1", "constant"),
    ("uniform", "raw", "cosmap", "huber", "exponential"),
    ("sigmoid", "sigma_scaled", "cosmap", "huber", "constant"),
    ("sigmoid", "raw", "logit_normal", "l1", None),
    ("sigmoid", "additive", "sigma_sqrt", "l2", None),
    ("shift", "sigma_scaled", "uniform", "huber", "exponential"),
    ("shift", "additive", "cosmap", "l1", None),
    ("shift", "raw", "mode", "smooth_l1", "exponential"),
    ("flux_shift", "sigma_scaled", "mode", "l2", None),
    ("flux_shift", "raw", "sigma_sqrt", "huber", "constant"),
    ("flux_shift", "additive", "logit_normal", "smooth_l1", "exponential"),
])  # fmt: skip
def test_the_loss_is_the_formula_of_what_the_dit_received(tiny_model_files, tmp_path, sampling, prediction_type,
                                                          weighting, loss_type, huber_schedule):  # fmt: skip
    huber = {"huber_schedule": huber_schedule, "huber_c": HUBER_C, "huber_scale": HUBER_SCALE} if huber_schedule else {}
    loss, call, x0, _ = run_batch_loss(tiny_model_files, tmp_path, timestep_sampling=sampling, loss_type=loss_type,
                                       model_prediction_type=prediction_type, weighting_scheme=weighting, **huber)
    # in fp32 the DiT gets (1000σ)/1000, σ to float rounding; ε follows from x_t = (1 − σ)·x0 + σ·ε
    sigmas = call["timesteps"].double()
    s = sigmas.view(-1, 1, 1, 1)
    noise = (unpack(call["img"].double()) - (1 - s) * x0.double()) / s
    expected = expected_loss(unpack(call["prediction"]), x0, sigmas, noise, prediction_type, weighting, loss_type,
                             huber_schedule)  # fmt: skip
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_ip_noise_perturbs_the_dit_input_but_the_target_keeps_the_plain_noise(tiny_model_files, tmp_path):
    draws = {"timestep_sampling": "uniform", "ip_noise_gamma": 0.5}
    loss, call, x0, args = run_batch_loss(tiny_model_files, tmp_path, model_prediction_type="raw", **draws)
    noise, sigmas, ip_noise = trained_draws(args.seed, **draws)
    assert ip_noise.abs().mean() > 0.3  # γ·ξ with γ = 0.5: E|ξ|/2 ≈ 0.4
    torch.testing.assert_close(call["timesteps"], sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(unpack(call["img"]), (1 - s) * x0 + s * (noise + ip_noise))
    expected = expected_loss(unpack(call["prediction"]), x0, sigmas, noise, "raw", "uniform", "l2")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_bf16_timesteps_are_1000_sigma_rounded_to_bf16_then_divided_by_1000(tiny_model_files, tmp_path):
    draws = {"timestep_sampling": "sigma", "discrete_flow_shift": 3.0}
    _, call, _, args = run_batch_loss(tiny_model_files, tmp_path, weight_dtype=torch.bfloat16, **draws)
    _, sigmas, _ = trained_draws(args.seed, **draws)
    # sd-scripts' chain (spec §d.9), so the model embeds the t its LoRAs were trained on
    expected = (sigmas * 1000).to(torch.bfloat16) / 1000
    assert call["timesteps"].dtype == torch.bfloat16 and torch.equal(call["timesteps"], expected)
    assert not torch.equal(expected, sigmas.to(torch.bfloat16))  # (these draws tell the two roundings apart)
