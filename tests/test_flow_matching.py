"""FLUX training math (library.flow_matching) against its formulas (spec §d)."""

import argparse
import math

import pytest
import torch

from library import flow_matching as fm
from library.errors import UserError


def cfg(**kw) -> fm.FlowMatchingConfig:
    return fm.FlowMatchingConfig(**kw)


def draw_sigmas(config: fm.FlowMatchingConfig, n: int = 6000, latent_shape=(1, 2, 2)) -> torch.Tensor:
    seeds = fm.per_sample_seeds(1234, step=0, indices=range(n))
    return fm.sample_noise_and_sigmas(config, latent_shape, seeds).sigmas


def assert_cdf_matches(samples: torch.Tensor, quantile, tol: float = 0.03) -> None:
    """The empirical CDF at the analytic q-quantiles must be q (a KS-style check)."""
    for q in torch.linspace(0.05, 0.95, 19).tolist():
        x = float(quantile(torch.tensor(q, dtype=torch.float64)))
        frac = (samples.double() <= x).double().mean().item()
        assert abs(frac - q) < tol, f"at q={q:.2f}: P(sigma <= {x:.4f}) = {frac:.4f}"


def probit(q: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(q)


def shift(s: torch.Tensor, S: float) -> torch.Tensor:
    return S * s / (1 + (S - 1) * s)


# region timestep sampling


def test_uniform_sampling_is_uniform_on_0_1():
    s = draw_sigmas(cfg(timestep_sampling="uniform"))
    assert s.min() >= 0 and s.max() < 1
    assert_cdf_matches(s, lambda q: q)


def test_sigmoid_sampling_is_sigmoid_of_scaled_normal():
    k = 1.5
    s = draw_sigmas(cfg(timestep_sampling="sigmoid", sigmoid_scale=k))
    assert_cdf_matches(s, lambda q: torch.sigmoid(k * probit(q)))


def test_a_zero_spread_fixes_the_noise_level_as_in_sd_scripts():
    assert draw_sigmas(cfg(timestep_sampling="sigmoid", sigmoid_scale=0.0), n=50).unique().tolist() == [0.5]
    shifted = draw_sigmas(cfg(timestep_sampling="shift", sigmoid_scale=0.0, discrete_flow_shift=3.0), n=50)
    assert shifted.unique().tolist() == [pytest.approx(0.75)]  # shift(0.5) = 3·0.5 / (1 + 2·0.5)
    fixed = draw_sigmas(cfg(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.0), n=50).unique()
    assert len(fixed) == 1 and torch.isin(fixed, fm.discrete_flow_sigmas(3.0)).all()
    assert fixed.item() == pytest.approx(shift(torch.sigmoid(torch.tensor(-0.5)), 3.0).item(), abs=2e-3)
    for flag in ("sigmoid_scale", "logit_std"):
        with pytest.raises(UserError, match=f"--{flag} must be >= 0 \\(got -1.0\\)"):
            cfg(**{flag: -1.0})


def test_shift_sampling_shifts_the_sigmoid_by_discrete_flow_shift():
    S, k = 3.1582, 0.8
    s = draw_sigmas(cfg(timestep_sampling="shift", discrete_flow_shift=S, sigmoid_scale=k))
    assert_cdf_matches(s, lambda q: shift(torch.sigmoid(k * probit(q)), S))
    # an unshifted sigmoid would put the median at 0.5, not at shift(0.5) = 0.76
    assert s.median() > 0.7


def test_flux_shift_uses_mu_from_the_packed_token_count():
    # latent 64x64 = 512x512 px -> 32*32 = 1024 tokens -> mu = 0.5 + (1024-256)*(0.65/3840)
    mu = 0.5 + (1024 - 256) * (1.15 - 0.5) / (4096 - 256)
    assert fm.flux_mu(fm.packed_seq_len(64, 64)) == pytest.approx(mu)
    s = draw_sigmas(cfg(timestep_sampling="flux_shift"), n=3000, latent_shape=(1, 64, 64))
    assert_cdf_matches(s, lambda q: math.exp(mu) / (math.exp(mu) + 1 / torch.sigmoid(probit(q)) - 1))


def test_flux_shift_at_1024px_is_shift_with_e_to_the_1_15():
    assert fm.flux_mu(fm.packed_seq_len(128, 128)) == pytest.approx(1.15)
    t = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(fm.time_shift(1.15, 1.0, t), fm.shift_sigmas(t, math.exp(1.15)))


def test_discrete_flow_sigmas_match_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for S in (1.0, 3.0, 3.1582):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=S).sigmas
        torch.testing.assert_close(fm.discrete_flow_sigmas(S), ref.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["uniform", "none", "sigma_sqrt", "cosmap"])
def test_sigma_sampling_is_the_shifted_discrete_schedule_at_uniform_u(scheme):
    S = 3.0
    s = draw_sigmas(cfg(timestep_sampling="sigma", weighting_scheme=scheme, discrete_flow_shift=S))
    table = fm.discrete_flow_sigmas(S)
    assert torch.isin(s, table).all()  # only table values
    assert_cdf_matches(s, lambda q: shift(q, S))


def test_sigma_sampling_with_logit_normal_density():
    S, m, sd = 2.0, 0.5, 0.8
    s = draw_sigmas(cfg(weighting_scheme="logit_normal", logit_mean=m, logit_std=sd, discrete_flow_shift=S))
    # u = sigmoid(m + sd*z) indexes the table from sigma=1 down, so s = 1 - u = sigmoid(-m - sd*z)
    assert_cdf_matches(s, lambda q: shift(torch.sigmoid(sd * probit(q) - m), S))


def test_sigma_sampling_with_mode_density():
    S, scale = 3.0, 1.29
    s = draw_sigmas(cfg(weighting_scheme="mode", mode_scale=scale, discrete_flow_shift=S))

    def f(v):
        return 1 - v - scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)

    assert_cdf_matches(s, lambda q: shift(1 - f(q), S))
    # the CDF check is too loose to see a few percent off the mode term: compare points with the spec's formula
    # (v = 0.5 is left out, the mode term is 0 there)
    vs = [0.0, 0.1, 0.25, 0.4, 0.6, 0.75, 0.9]
    u = fm.density_u(torch.tensor(vs, dtype=torch.float64), cfg(weighting_scheme="mode", mode_scale=scale))
    expected = [1 - v - scale * (math.cos(math.pi * v / 2) ** 2 - 1 + v) for v in vs]
    assert u.tolist() == pytest.approx(expected, abs=1e-12)


def test_sigma_sampling_clamps_u_equal_1_to_the_last_table_entry():
    u = torch.tensor([0.0, 0.5, 1.0])
    s = fm.sigmas_from_density(u, 3.0)
    table = fm.discrete_flow_sigmas(3.0)
    assert s.tolist() == [1.0, table[500].item(), table[999].item()]


def test_sigma_sampling_index_is_floor_of_1000_u():
    """idx = floor(1000·u), not rounded (spec §d.3); entry i of the table is shift((1000 − i) / 1000)."""
    S = 3.0
    u = torch.tensor([0.0006, 0.2504, 0.5007, 0.9996])
    expected = [shift(torch.tensor((1000 - i) / 1000, dtype=torch.float64), S).item() for i in (0, 250, 500, 999)]
    assert fm.sigmas_from_density(u, S).tolist() == pytest.approx(expected, rel=1e-6)


def test_validation_sigmas_are_fixed_and_noise_is_shared_across_them():
    assert fm.VALIDATION_SIGMAS == (0.2, 0.4, 0.6, 0.8)
    seeds = fm.per_sample_seeds(42, 0, range(3), stream=fm.VALIDATION_STREAM)
    draws = [fm.sample_noise_and_sigmas(cfg(), (4, 8, 8), seeds, fixed_sigma=s) for s in fm.VALIDATION_SIGMAS]
    for d, s in zip(draws, fm.VALIDATION_SIGMAS, strict=True):
        assert torch.all(d.sigmas == torch.tensor(s))
        torch.testing.assert_close(d.noise, draws[0].noise)
        torch.testing.assert_close(d.timesteps, torch.full((3,), 1000 * s))


# endregion

# region per-sample seeding


def test_each_samples_draw_depends_only_on_its_seed_not_on_batch_composition():
    c = cfg(timestep_sampling="shift", ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    seeds = fm.per_sample_seeds(7, step=3, indices=range(4))
    whole = fm.sample_noise_and_sigmas(c, (4, 8, 8), seeds)
    # the same global batch split over two "processes", and in another order
    halves = [fm.sample_noise_and_sigmas(c, (4, 8, 8), seeds[:2]), fm.sample_noise_and_sigmas(c, (4, 8, 8), seeds[2:])]
    torch.testing.assert_close(torch.cat([h.noise for h in halves]), whole.noise)
    torch.testing.assert_close(torch.cat([h.sigmas for h in halves]), whole.sigmas)
    torch.testing.assert_close(torch.cat([h.ip_noise for h in halves]), whole.ip_noise)
    rev = fm.sample_noise_and_sigmas(c, (4, 8, 8), seeds[::-1])
    torch.testing.assert_close(rev.noise.flip(0), whole.noise)
    # and the samples differ from each other
    assert not torch.allclose(whole.noise[0], whole.noise[1])


def test_sample_seed_is_deterministic_and_separates_seed_step_index_and_stream():
    base = fm.sample_seed(1, 2, 3)
    assert base == fm.sample_seed(1, 2, 3)
    assert 0 <= base < 2**63
    others = {fm.sample_seed(2, 2, 3), fm.sample_seed(1, 3, 3), fm.sample_seed(1, 2, 4), fm.sample_seed(1, 2, 3, 1)}
    assert base not in others and len(others) == 4
    # neighbouring steps/indices must not just shift one stream: no shared values
    a = fm.sample_noise_and_sigmas(cfg(), (1, 4, 4), [fm.sample_seed(0, 0, 1)]).noise
    b = fm.sample_noise_and_sigmas(cfg(), (1, 4, 4), [fm.sample_seed(0, 1, 0)]).noise
    assert not torch.isin(a, b).any()


def test_ip_noise_random_strength_stays_within_gamma():
    seeds = fm.per_sample_seeds(0, 0, range(200))
    fixed = fm.sample_noise_and_sigmas(cfg(ip_noise_gamma=0.5), (1, 16, 16), seeds)
    rand = fm.sample_noise_and_sigmas(cfg(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True), (1, 16, 16), seeds)
    assert fixed.ip_noise.std().item() == pytest.approx(0.5, rel=0.05)
    ratio = rand.ip_noise.flatten(1).std(1) / fixed.ip_noise.flatten(1).std(1)
    assert ratio.max() < 1.05 and ratio.min() < 0.2 and 0.35 < ratio.mean() < 0.65  # U(0,1)·gamma
    assert fm.sample_noise_and_sigmas(cfg(), (1, 4, 4), seeds[:2]).ip_noise is None


# endregion

# region noisy input, prediction types, losses

X0 = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
EPS = torch.tensor([3.0, -1.0]).view(1, 1, 1, 2)
SIGMA = torch.tensor([0.25])
PRED = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
SAMPLE = fm.NoiseSample(noise=EPS, sigmas=SIGMA)


def test_noisy_input_interpolates_latents_and_noise():
    x_t = fm.noisy_input(X0, SAMPLE)
    assert x_t.flatten().tolist() == [1.5, 1.25]  # 0.75*[1,2] + 0.25*[3,-1]
    with_ip = fm.noisy_input(X0, fm.NoiseSample(noise=EPS, sigmas=SIGMA, ip_noise=torch.full_like(EPS, 2.0)))
    assert with_ip.flatten().tolist() == [2.0, 1.75]  # + 0.25*2
    assert fm.flow_velocity(X0, EPS).flatten().tolist() == [2.0, -3.0]


@pytest.mark.parametrize(
    "ptype, pred_t, target_t, l2",
    [
        ("raw", [1.0, 0.0], [2.0, -3.0], 5.0),  # pred vs v
        ("sigma_scaled", [1.25, 1.25], [1.0, 2.0], 0.3125),  # x_t - σ·pred vs x0
        ("additive", [2.25, 1.25], [3.0, -1.0], 2.8125),  # x_t + (1-σ)·pred vs ε
    ],
)
def test_prediction_types_on_hand_computed_tensors(ptype, pred_t, target_t, l2):
    error = fm.prediction_error(PRED, fm.flow_velocity(X0, EPS), SIGMA, ptype)
    assert error.flatten().tolist() == [p - t for p, t in zip(pred_t, target_t, strict=True)]
    loss = fm.per_sample_loss(PRED, X0, SAMPLE, cfg(model_prediction_type=ptype))
    assert loss.item() == pytest.approx(l2)


def test_sigma_scaled_keeps_its_precision_at_tiny_sigma():
    # sigma_sqrt weights σ⁻²: the loss is (pred − v)², however small σ, and the clean-image estimates
    # x_t − σ·pred and x_t − σ·v, both about x_t, must not be subtracted (their difference, about
    # 2e-6 here, is near the rounding step of numbers around 3 in fp32)
    x0 = torch.tensor([3.0, -2.5, 1.7, 0.3]).view(1, 1, 2, 2)
    eps = torch.tensor([0.9, -1.2, 2.2, -0.4]).view(1, 1, 2, 2)
    sample = fm.NoiseSample(noise=eps, sigmas=torch.tensor([2e-6]))
    pred = fm.flow_velocity(x0, eps) + torch.tensor([1.0, -0.5, 0.25, 2.0]).view(1, 1, 2, 2)
    weighted = cfg(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    assert fm.per_sample_loss(pred, x0, sample, weighted).item() == pytest.approx((1 + 0.25 + 0.0625 + 4) / 4, rel=1e-5)


@pytest.mark.parametrize(
    "scheme, weight", [("uniform", 1.0), ("sigma_sqrt", 16.0), ("cosmap", 2 / (math.pi * 0.625)), ("mode", 1.0)]
)
def test_sigma_scaled_weighting_schemes(scheme, weight):
    assert fm.loss_weighting(scheme, SIGMA).item() == pytest.approx(weight)
    loss = fm.per_sample_loss(PRED, X0, SAMPLE, cfg(model_prediction_type="sigma_scaled", weighting_scheme=scheme))
    assert loss.item() == pytest.approx(0.3125 * weight)
    # raw ignores the weighting scheme, as in sd-scripts
    raw = fm.per_sample_loss(PRED, X0, SAMPLE, cfg(model_prediction_type="raw", weighting_scheme=scheme))
    assert raw.item() == pytest.approx(5.0)


def test_loss_types_on_hand_computed_differences():
    pred, target = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, -3.0]])  # d = [-1, 3]
    c = torch.tensor([0.1])
    assert fm.loss_of_error(pred - target, "l2").tolist() == [[1.0, 9.0]]
    assert fm.loss_of_error(pred - target, "l1").tolist() == [[1.0, 3.0]]
    huber = [2 * 0.1 * (math.sqrt(d * d + 0.01) - 0.1) for d in (-1, 3)]
    smooth = [2 * (math.sqrt(d * d + 0.01) - 0.1) for d in (-1, 3)]
    assert fm.loss_of_error(pred - target, "huber", c).flatten().tolist() == pytest.approx(huber)
    assert fm.loss_of_error(pred - target, "smooth_l1", c).flatten().tolist() == pytest.approx(smooth)


def test_per_sample_loss_applies_mask_and_reduces_per_sample():
    x0 = torch.zeros(2, 1, 1, 2)
    eps = torch.ones(2, 1, 1, 2)
    sample = fm.NoiseSample(noise=eps, sigmas=torch.tensor([0.5, 0.5]))
    pred = torch.tensor([[1.0, 3.0], [0.0, 1.0]]).view(2, 1, 1, 2)  # d = [0, 2], [-1, 0]
    mask = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    loss = fm.per_sample_loss(pred, x0, sample, cfg(model_prediction_type="raw"), mask=mask)
    assert loss.tolist() == [pytest.approx((0 + 4 * 0.5) / 2), pytest.approx((1 + 0) / 2)]


def _loss_at(pred, ptype, loss_type, sample, x0):
    c = cfg(model_prediction_type=ptype, loss_type=loss_type, huber_schedule="exponential", weighting_scheme="cosmap")
    return fm.per_sample_loss(pred, x0, sample, c).sum()


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("ptype", ["raw", "additive", "sigma_scaled"])
def test_every_prediction_type_is_minimised_by_the_flow_velocity(ptype, loss_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    sample = fm.sample_noise_and_sigmas(cfg(timestep_sampling="uniform", ip_noise_gamma=0.1), (4, 4, 4), [1, 2, 3])
    v = fm.flow_velocity(x0, sample.noise)  # (an IP-perturbed input; the velocity uses the plain noise)

    at_v = v.clone().requires_grad_(True)
    loss = _loss_at(at_v, ptype, loss_type, sample, x0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert at_v.grad.abs().max().item() < 1e-4

    for delta in (0.05, -0.3):
        off = _loss_at(v + delta, ptype, loss_type, sample, x0)
        assert off.item() > 1e-6


def test_sigma_scaled_descends_to_the_velocity_not_to_sd_scripts_optimum():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 2, 2, 2, generator=g)
    sample = fm.sample_noise_and_sigmas(cfg(timestep_sampling="uniform"), (2, 2, 2), [5, 6])
    pred = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.SGD([pred], lr=2.0)
    c = cfg(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    for _ in range(200):
        opt.zero_grad()
        fm.per_sample_loss(pred, x0, sample, c).sum().backward()
        opt.step()
    torch.testing.assert_close(pred.detach(), fm.flow_velocity(x0, sample.noise), atol=1e-4, rtol=0)


# endregion

# region huber schedules and config checks


def test_huber_schedules():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert fm.huber_c_schedule("huber", "constant", 0.1, 2.0, s).tolist() == pytest.approx([0.2] * 3)
    # exponential: exp(-alpha*1000σ)*scale with alpha = -ln(c)/1000, i.e. c**σ * scale
    assert fm.huber_c_schedule("smooth_l1", "exponential", 0.1, 2.0, s).tolist() == pytest.approx(
        [2.0, 2.0 * math.sqrt(0.1), 0.2]
    )
    # above 1 (sd-scripts allows it): c rises from the scale at σ = 0 to huber_c·scale at σ = 1
    cfg(loss_type="huber", huber_schedule="exponential", huber_c=4.0)
    assert fm.huber_c_schedule("huber", "exponential", 4.0, 1.0, s).tolist() == pytest.approx([1.0, 2.0, 4.0])
    assert fm.huber_c_schedule("l2", "snr", 0.1, 1.0, s) is None
    assert fm.huber_c_schedule("l1", "exponential", 0.1, 1.0, s) is None
    with pytest.raises(UserError, match="--huber_schedule"):
        fm.huber_c_schedule("huber", "snr", 0.1, 1.0, s)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_snr_huber_schedule_is_refused_only_with_huber_losses(loss_type):
    with pytest.raises(UserError, match="--huber_schedule snr"):
        cfg(loss_type=loss_type, huber_schedule="snr")
    cfg(loss_type=loss_type, huber_schedule="constant")
    cfg(loss_type="l2", huber_schedule="snr")
    cfg(loss_type="l1", huber_schedule="snr")


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"timestep_sampling": "logit"}, "--timestep_sampling"),
        ({"model_prediction_type": "v"}, "--model_prediction_type"),
        ({"discrete_flow_shift": 0.0}, "--discrete_flow_shift"),
        ({"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.0}, "--huber_c"),
        ({"ip_noise_gamma": -0.1}, "--ip_noise_gamma"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        cfg(**kwargs)


def test_config_from_parser_defaults_matches_sd_scripts_defaults():
    from library import flux_train_utils, train_args

    parser = argparse.ArgumentParser()
    train_args.add_train_network_arguments(parser)
    train_args.add_flux_script_arguments(parser)
    flux_train_utils.add_flux_train_arguments(parser)
    c = fm.FlowMatchingConfig.from_args(parser.parse_args([]))
    assert c == fm.FlowMatchingConfig()
    assert (c.timestep_sampling, c.model_prediction_type, c.discrete_flow_shift) == ("sigma", "sigma_scaled", 3.0)
    c = fm.FlowMatchingConfig.from_args(
        parser.parse_args(["--timestep_sampling", "flux_shift", "--model_prediction_type", "raw"])
    )
    assert (c.timestep_sampling, c.model_prediction_type) == ("flux_shift", "raw")


# endregion

# region inference schedule


def test_get_schedule_matches_bfl_formula():
    for seq_len, mu in ((4096, 1.15), (256, 0.5), (1024, fm.flux_mu(1024))):
        sched = fm.get_schedule(4, seq_len)
        expected = [1.0] + [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (0.75, 0.5, 0.25)] + [0.0]
        assert sched == pytest.approx(expected, abs=1e-6)
    assert fm.get_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_euler_on_the_exact_velocity_lands_on_the_clean_latent():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    x = eps.clone()  # x at σ = 1
    sched = fm.get_schedule(7, 1024)
    for s_curr, s_next in zip(sched[:-1], sched[1:], strict=True):
        x = fm.euler_step(x, eps - x0, s_curr, s_next)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


# endregion


@pytest.mark.parametrize("options, unused", [
    ({"timestep_sampling": "shift", "weighting_scheme": "logit_normal", "logit_mean": 1.0,
      "model_prediction_type": "raw"}, ["weighting_scheme", "logit_mean"]),
    ({"sigmoid_scale": 2.0}, ["sigmoid_scale"]),  # the default sigma sampling draws from the density
    ({"weighting_scheme": "mode", "mode_scale": 0.8, "logit_std": 2.0}, ["logit_std"]),
    ({"ip_noise_gamma_random_strength": True}, ["ip_noise_gamma_random_strength"]),
    # each read where it is set
    ({"timestep_sampling": "sigmoid", "sigmoid_scale": 2.0}, []),
    ({"weighting_scheme": "logit_normal", "logit_mean": 1.0, "logit_std": 2.0}, []),
    ({"timestep_sampling": "shift", "weighting_scheme": "cosmap"}, []),  # the sigma_scaled loss weight
    ({"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}, []),
])  # fmt: skip
def test_options_the_chosen_methods_never_read_are_named(options, unused):
    messages = fm.FlowMatchingConfig(**options).unused_options()
    assert [m.split()[0] for m in messages] == [f"--{name}" for name in unused]
    assert all("has no effect with --timestep_sampling" in m for m in messages)


@pytest.mark.parametrize("options, unused", [
    ({"timestep_sampling": "flux_shift", "sigmoid_scale": 2.0}, []),  # flux_shift draws sigmoid(scale · z) too
    # the shift is read by shift and by the default sigma sampling; flux_shift computes its own from the image size
    ({"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.1582}, ["discrete_flow_shift"]),
    ({"timestep_sampling": "uniform", "discrete_flow_shift": 1.0}, ["discrete_flow_shift"]),
    ({"timestep_sampling": "sigmoid", "discrete_flow_shift": 2.0}, ["discrete_flow_shift"]),
    ({"timestep_sampling": "shift", "discrete_flow_shift": 3.1582}, []),
    ({"discrete_flow_shift": 1.0}, []),
    ({"weighting_scheme": "none"}, []),  # sd-scripts' name for no weighting: read, as uniform is
    # sigma_sqrt and cosmap weight only the sigma_scaled prediction's loss
    ({"timestep_sampling": "shift", "weighting_scheme": "sigma_sqrt", "model_prediction_type": "raw"},
     ["weighting_scheme"]),
    ({"timestep_sampling": "shift", "weighting_scheme": "cosmap", "model_prediction_type": "additive"},
     ["weighting_scheme"]),
])  # fmt: skip
def test_unused_options_follow_what_each_method_reads(options, unused):
    from library.flow_matching import FlowMatchingConfig

    messages = FlowMatchingConfig(**options).unused_options()
    assert [m.split()[0] for m in messages] == [f"--{name}" for name in unused]
