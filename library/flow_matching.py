"""FLUX rectified-flow training math, as pure functions of tensors.

Conventions (spec §d): x0 is the clean latent, ε ~ N(0, 1) the noise, σ ∈ [0, 1] the noise
level and t = 1000·σ the "timestep". The forward process is the straight line

    x_t = (1 − σ)·x0 + σ·ε,        so  dx_t/dσ = ε − x0 =: v  (the flow velocity).

The model is trained to output v; the sampler integrates dx/dσ = v from σ = 1 to 0.

Prediction types. sd-scripts transforms only the model output and keeps the target v for all
three types, so only ``raw`` trains the model to output v (spec §k.1). Here each type applies
the same map to the output and to the true velocity, so every type is minimised exactly by
``pred = v`` and a LoRA trained with any of them samples correctly:

    raw           pred             vs  v                      error = pred − v
    sigma_scaled  x_t − σ·pred     vs  x_t − σ·v  (= x0)      error = −σ·(pred − v)
    additive      x_t + (1−σ)·pred vs  x_t + (1−σ)·v  (= ε)   error = (1−σ)·(pred − v)

``sigma_scaled`` compares clean-image estimates (SD3's x0 objective, weighted per
``--weighting_scheme``); ``additive`` adds the scaled output to the noisy input to estimate
the noise. Without IP noise the right-hand sides are exactly x0 and ε. With ``--ip_noise_gamma``
the input is perturbed while the target velocity keeps the plain ε, as in sd-scripts; the
transformed target is then "the estimate the true velocity implies from this input".

Randomness: noise and σ are drawn per sample from a CPU generator seeded by
(seed, step, sample index) (:func:`sample_seed`), so a run does not depend on the number of
processes, the batch composition or the device.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from library.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

# Validation evaluates every batch at these noise levels (spec §d.8: sd-scripts' 200/400/600/800).
VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)
# `stream` values of sample_seed(): validation draws never collide with training draws
TRAIN_STREAM = 0
VALIDATION_STREAM = 1

# BFL's resolution shift: mu is linear in the packed image token count, 0.5 at 256 tokens
# (256² pixels) and 1.15 at 4096 tokens (1024² pixels).
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096


# region schedules


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / FlowMatchEulerDiscreteScheduler shift: σ' = S·σ / (1 + (S − 1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """BFL's shift: e^μ / (e^μ + (1/t − 1)^σ). With σ = 1 it is :func:`shift_sigmas` with S = e^μ."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = BASE_SEQ_LEN, y1: float = BASE_SHIFT, x2: float = MAX_SEQ_LEN, y2: float = MAX_SHIFT
):
    """The line through (x1, y1) and (x2, y2), as BFL uses to map token count to mu."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def flux_mu(image_seq_len: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """mu for a packed image of ``image_seq_len`` tokens, i.e. (H/16)·(W/16) for an H×W image."""
    return get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)


def packed_seq_len(latent_h: int, latent_w: int) -> int:
    """Token count of a latent of ``latent_h × latent_w`` after 2×2 patchifying."""
    return (latent_h // 2) * (latent_w // 2)


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
    shift: bool = True,
) -> list[float]:
    """BFL's sampling schedule: ``num_steps + 1`` σ values from 1 to 0.

    ``shift=True`` (dev, Chroma) bends the schedule toward high noise for large images;
    schnell samples on the plain linear schedule.
    """
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = time_shift(flux_mu(image_seq_len, base_shift, max_shift), 1.0, timesteps)
    return timesteps.tolist()


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma_curr: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of dx/dσ = v from ``sigma_curr`` to ``sigma_next``."""
    return x + (sigma_next - sigma_curr) * velocity


@lru_cache(maxsize=8)
def discrete_flow_sigmas(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The σ table of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`` (spec §d.2).

    Entry i is shift((N − i)/N): from 1.0 down to shift(1/N). Read-only: it is cached.
    """
    s = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float64) / num_train_timesteps
    return shift_sigmas(s, shift).float()


# endregion

# region timestep sampling


@dataclass(frozen=True)
class FlowMatchingConfig:
    """The training-math options of a run, as named by the command-line flags."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    model_prediction_type: str = "sigma_scaled"
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    def __post_init__(self) -> None:
        for flag, value, choices in (
            ("--timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING),
            ("--weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES),
            ("--model_prediction_type", self.model_prediction_type, PREDICTION_TYPES),
            ("--loss_type", self.loss_type, LOSS_TYPES),
            ("--huber_schedule", self.huber_schedule, HUBER_SCHEDULES),
        ):
            if value not in choices:
                raise UserError(f"{flag} {value!r} is not one of: {', '.join(choices)}.")
        if self.discrete_flow_shift <= 0:
            raise UserError(f"--discrete_flow_shift must be > 0 (got {self.discrete_flow_shift}); 3.0 is the default.")
        # 0 is a fixed noise level, as in sd-scripts (sigmoid(0) = 0.5, sigmoid(logit_mean)); below 0 is no spread
        if self.sigmoid_scale < 0:
            raise UserError(f"--sigmoid_scale must be >= 0 (got {self.sigmoid_scale}); 1.0 is the default.")
        if self.logit_std < 0:
            raise UserError(f"--logit_std must be >= 0 (got {self.logit_std}); 1.0 is the default.")
        if self.ip_noise_gamma is not None and self.ip_noise_gamma < 0:
            raise UserError(f"--ip_noise_gamma must be >= 0 (got {self.ip_noise_gamma}); about 0.1 is usual.")
        if self.loss_type in ("huber", "smooth_l1"):
            if self.huber_schedule == "snr":
                raise UserError(
                    f"--huber_schedule snr (the default) cannot be used with --loss_type {self.loss_type}: FLUX has "
                    "no SNR schedule. Pass --huber_schedule constant or --huber_schedule exponential."
                )
            if self.huber_c <= 0:
                raise UserError(f"--huber_c must be > 0; got {self.huber_c}.")
            if self.huber_scale <= 0:  # c = huber_c * huber_scale: 0 makes the loss 0, below 0 makes it negative
                raise UserError(f"--huber_scale must be > 0; got {self.huber_scale}.")

    def unused_options(self) -> list[str]:
        """The options set away from their defaults that this configuration never reads, one message each
        (``--weighting_scheme logit_normal`` beside ``--timestep_sampling shift`` is a common mix-up)."""
        default = FlowMatchingConfig()
        density = self.timestep_sampling == "sigma"
        used = {
            "sigmoid_scale": self.timestep_sampling in ("sigmoid", "shift", "flux_shift"),
            "discrete_flow_shift": self.timestep_sampling in ("sigma", "shift"),
            "weighting_scheme": (density and self.weighting_scheme in ("logit_normal", "mode"))
            or (self.model_prediction_type == "sigma_scaled" and self.weighting_scheme in ("sigma_sqrt", "cosmap"))
            or self.weighting_scheme == "none",
            "logit_mean": density and self.weighting_scheme == "logit_normal",
            "logit_std": density and self.weighting_scheme == "logit_normal",
            "mode_scale": density and self.weighting_scheme == "mode",
            "ip_noise_gamma_random_strength": bool(self.ip_noise_gamma),
        }
        return [
            f"--{name} {getattr(self, name)} has no effect with --timestep_sampling {self.timestep_sampling}, "
            f"--weighting_scheme {self.weighting_scheme}, --model_prediction_type {self.model_prediction_type}"
            + (" and no --ip_noise_gamma" if name == "ip_noise_gamma_random_strength" else "")
            + " (docs section 8 says which option each method reads)"
            for name, is_used in used.items()
            if not is_used and getattr(self, name) != getattr(default, name)
        ]

    @classmethod
    def from_args(cls, args) -> FlowMatchingConfig:
        """Build from an argparse namespace; missing attributes take the defaults above."""
        kwargs = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        return cls(**kwargs)


@dataclass
class NoiseSample:
    """What one training (or validation) step draws for a batch."""

    noise: torch.Tensor  # ε, (B, C, H, W)
    sigmas: torch.Tensor  # σ, (B,)
    ip_noise: torch.Tensor | None = None  # γ'·ξ, the input perturbation, (B, C, H, W)

    @property
    def timesteps(self) -> torch.Tensor:
        """t = 1000·σ."""
        return self.sigmas * NUM_TRAIN_TIMESTEPS


def sample_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """A 63-bit generator seed mixed from (seed, step, sample index, stream).

    Hash-mixed rather than added, so nearby (step, index) pairs give unrelated streams.
    ``stream`` separates uses that share a step: :data:`TRAIN_STREAM`, :data:`VALIDATION_STREAM`
    (validation passes step 0 and an index made from the image's name, so every run sees the same noise).
    """
    data = struct.pack("<4q", *(int(x) % (1 << 63) for x in (seed, step, index, stream)))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def per_sample_seeds(seed: int, step: int, indices: Sequence[int], stream: int = 0) -> list[int]:
    """:func:`sample_seed` for each global sample index of a step."""
    return [sample_seed(seed, step, i, stream) for i in indices]


def sigmas_from_normal(z: torch.Tensor, cfg: FlowMatchingConfig, latent_hw: tuple[int, int]) -> torch.Tensor:
    """σ for ``sigmoid``, ``shift`` and ``flux_shift`` from standard-normal draws ``z``."""
    sigmas = torch.sigmoid(cfg.sigmoid_scale * z)
    if cfg.timestep_sampling == "shift":
        sigmas = shift_sigmas(sigmas, cfg.discrete_flow_shift)
    elif cfg.timestep_sampling == "flux_shift":
        sigmas = time_shift(flux_mu(packed_seq_len(*latent_hw)), 1.0, sigmas)
    return sigmas


def density_u(r: torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """SD3's timestep density for ``timestep_sampling=sigma``, from one draw ``r`` per sample.

    ``r`` is standard normal for ``logit_normal`` and uniform on [0, 1) otherwise.
    """
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * r)
    if cfg.weighting_scheme == "mode":
        return 1 - r - cfg.mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    return r


def sigmas_from_density(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``sigma`` sampling: σ = table[floor(1000·u)] of the shifted discrete schedule.

    Index 0 is σ = 1. u = 1 (reachable with ``mode``) is clamped to the last entry.
    """
    table = discrete_flow_sigmas(float(shift))
    idx = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return table[idx]


def _draw_sigma(gen: torch.Generator, cfg: FlowMatchingConfig, latent_hw: tuple[int, int]) -> torch.Tensor:
    method = cfg.timestep_sampling
    if method == "uniform":
        return torch.rand(1, generator=gen)
    if method in ("sigmoid", "shift", "flux_shift"):
        return sigmas_from_normal(torch.randn(1, generator=gen), cfg, latent_hw)
    normal = cfg.weighting_scheme == "logit_normal"
    r = torch.randn(1, generator=gen) if normal else torch.rand(1, generator=gen)
    return sigmas_from_density(density_u(r, cfg), cfg.discrete_flow_shift)


def sample_noise_and_sigmas(
    cfg: FlowMatchingConfig,
    latent_shape: Sequence[int],
    seeds: Sequence[int],
    *,
    fixed_sigma: float | None = None,
    device: torch.device | str | None = None,
) -> NoiseSample:
    """Draw ε, σ and the IP noise for a batch, one generator per sample.

    ``latent_shape`` is one sample's (C, H, W); ``seeds`` has one entry per sample (see
    :func:`per_sample_seeds`). Each sample's generator draws, in this order: the σ variate,
    ε, then (with ``ip_noise_gamma``) the random strength and ξ. So a sample's draws depend
    only on its seed and shape, not on its batch. ``fixed_sigma`` replaces the σ draw (the
    σ variate is still consumed, so ε is the same at every fixed σ); validation uses it.
    The random IP strength is drawn per sample (sd-scripts: per batch) for the same reason.
    """
    c, h, w = (int(x) for x in latent_shape)
    noises, sigmas, ips = [], [], []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        sigma = _draw_sigma(gen, cfg, (h, w))
        if fixed_sigma is not None:
            sigma = torch.full((1,), float(fixed_sigma))
        sigmas.append(sigma)
        noises.append(torch.randn(c, h, w, generator=gen))
        if cfg.ip_noise_gamma:
            gamma = cfg.ip_noise_gamma
            if cfg.ip_noise_gamma_random_strength:
                gamma = gamma * torch.rand(1, generator=gen).item()
            ips.append(gamma * torch.randn(c, h, w, generator=gen))
    return NoiseSample(
        noise=torch.stack(noises).to(device),
        sigmas=torch.cat(sigmas).to(device),
        ip_noise=torch.stack(ips).to(device) if ips else None,
    )


# endregion

# region noisy input, targets and loss


def _bcast(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, torch.float32)


def noisy_input(latents: torch.Tensor, sample: NoiseSample) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·(ε + γ'·ξ), in float32 (cast to the weight dtype for the model)."""
    x0 = latents.float()
    noise = sample.noise.to(x0.device, torch.float32)
    if sample.ip_noise is not None:
        noise = noise + sample.ip_noise.to(x0.device, torch.float32)
    sigmas = _bcast(sample.sigmas, x0)
    return (1 - sigmas) * x0 + sigmas * noise


def flow_velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = ε − x0 (plain ε: the IP perturbation is not part of it)."""
    return noise.float() - latents.float()


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's per-sample loss weights: σ⁻² for ``sigma_sqrt``, 2/(π(1 − 2σ + 2σ²)) for ``cosmap``, else 1."""
    sigmas = sigmas.float()
    if weighting_scheme == "sigma_sqrt":
        # σ = 0 only with uniform sampling; its error is exactly 0 under sigma_scaled, so a large
        # finite weight keeps the product 0 instead of inf·0 = nan.
        return sigmas.clamp_min(1e-6) ** -2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def prediction_error(
    model_pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """pred − target as the loss compares them after the prediction type's map, in float32.

    ``raw``: v̂ − v. ``sigma_scaled``: x̂0 − x0, the clean-image estimates x_t − σ·v̂ and x_t − σ·v,
    that is −σ·(v̂ − v). ``additive``: ε̂ − ε, the noise estimates x_t + (1 − σ)·v̂ and
    x_t + (1 − σ)·v, that is (1 − σ)·(v̂ − v). Written as differences of the velocities, where x_t
    cancels: subtracting two estimates that are both about x_t (sd-scripts does) loses their
    difference to rounding at σ ≲ 1e-6, which ``sigma_sqrt`` weights by up to 10¹². ``target`` is
    normally :func:`flow_velocity`; with differential output preservation it is the base model's
    output, which goes through the same map.
    """
    error = model_pred.float() - target.float()
    if prediction_type == "raw":
        return error
    if prediction_type == "sigma_scaled":
        return error * -_bcast(sigmas, error)
    if prediction_type == "additive":
        return error * (1 - _bcast(sigmas, error))
    raise UserError(f"--model_prediction_type {prediction_type!r} is not one of: {', '.join(PREDICTION_TYPES)}.")


def huber_c_schedule(
    loss_type: str, huber_schedule: str, huber_c: float, huber_scale: float, sigmas: torch.Tensor
) -> torch.Tensor | None:
    """Per-sample Huber parameter c, or None for l1/l2 (which have no c).

    ``constant``: huber_c·huber_scale. ``exponential``: exp(−α·t)·huber_scale with
    α = −ln(huber_c)/1000 and t = 1000·σ, i.e. huber_c^σ·huber_scale.
    """
    if loss_type not in ("huber", "smooth_l1"):
        return None
    if huber_schedule == "constant":
        return torch.full_like(sigmas.float(), huber_c * huber_scale)
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * sigmas.float() * NUM_TRAIN_TIMESTEPS) * huber_scale
    raise UserError(
        f"--huber_schedule {huber_schedule} cannot be used with --loss_type {loss_type}: FLUX has no SNR schedule. "
        "Pass --huber_schedule constant or exponential."
    )


def loss_of_error(d: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise loss of the error d = pred − target (no reduction).

    l2: d²;  l1: |d|;  huber: 2c(√(d² + c²) − c);  smooth_l1: 2(√(d² + c²) − c).
    ``huber_c`` is per sample (B,), broadcast over the other dimensions.
    """
    if loss_type == "l2":
        return d**2
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        c = _bcast(huber_c, d)
        scale = 2 * c if loss_type == "huber" else 2.0
        return scale * (torch.sqrt(d**2 + c**2) - c)
    raise UserError(f"--loss_type {loss_type!r} is not one of: {', '.join(LOSS_TYPES)}.")


def per_sample_loss(
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    sample: NoiseSample,
    cfg: FlowMatchingConfig,
    *,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full FLUX objective, reduced to one value per sample (B,).

    Steps (spec §d.6): transform per prediction type → elementwise loss → × weighting →
    × ``mask`` (already at latent size, broadcastable to the latents) → mean over (C, H, W).
    The caller multiplies by per-sample loss weights and takes the batch mean.
    """
    if target is None:
        target = flow_velocity(latents, sample.noise.to(latents.device))
    error = prediction_error(model_pred, target, sample.sigmas.to(model_pred.device), cfg.model_prediction_type)
    c = huber_c_schedule(cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, sample.sigmas)
    loss = loss_of_error(error, cfg.loss_type, None if c is None else c.to(error.device))
    if cfg.model_prediction_type == "sigma_scaled":  # (raw and additive ignore the weighting scheme, as sd-scripts)
        loss = loss * _bcast(loss_weighting(cfg.weighting_scheme, sample.sigmas).to(loss.device), loss)
    if mask is not None:
        loss = loss * mask.to(loss.device, loss.dtype)
    return loss.mean(dim=tuple(range(1, loss.ndim)))


# endregion
