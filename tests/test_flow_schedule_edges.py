"""Edges of the training math, the lr schedules and the optimizer factory that a mutation round found unpinned.

Expected values come from the formulas written out here (spec §d, §b.2), from the seeded generator draws
replayed by hand, or from transformers' own schedule functions, not from the modules under test."""

import argparse
import math

import pytest
import torch

from library import flow_matching as fm
from library.errors import UserError

# region timestep and noise draws


def replay(seed: int, shape, method: str, k: float = 1.0, gamma: float | None = None, random_strength=False):
    """One sample's draws in the documented order: the σ variate, ε, then the IP strength and ξ."""
    g = torch.Generator().manual_seed(seed)
    variate = torch.rand(1, generator=g) if method == "uniform" else torch.randn(1, generator=g)
    eps = torch.randn(*shape, generator=g)
    ip = None
    if gamma:
        strength = torch.rand(1, generator=g).item() if random_strength else 1.0
        ip = gamma * strength * torch.randn(*shape, generator=g)
    return variate.item() if method == "uniform" else torch.sigmoid(k * variate).item(), eps, ip


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_each_draw_replays_from_its_seed_in_the_documented_order(method):
    k, S, shape, seeds = 0.7, 5.0, (2, 32, 64), [11, 12, 13]
    c = fm.FlowMatchingConfig(timestep_sampling=method, sigmoid_scale=k, discrete_flow_shift=S, ip_noise_gamma=0.5,
                              ip_noise_gamma_random_strength=True)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the global generator must not matter
        got = fm.sample_noise_and_sigmas(c, shape, seeds)
    mu = 0.5 + ((32 // 2) * (64 // 2) - 256) * (1.15 - 0.5) / (4096 - 256)  # 512 packed tokens of a 32x64 latent
    for i, seed in enumerate(seeds):
        s0, eps, ip = replay(seed, shape, method, k, 0.5, True)
        expected = {"uniform": s0, "sigmoid": s0, "shift": S * s0 / (1 + (S - 1) * s0),
                    "flux_shift": math.exp(mu) / (math.exp(mu) + 1 / s0 - 1)}[method]  # fmt: skip
        assert got.sigmas[i].item() == pytest.approx(expected, rel=1e-6)
        assert torch.equal(got.noise[i], eps)  # standard normal, as drawn
        torch.testing.assert_close(got.ip_noise[i], ip)


def test_a_fixed_sigma_still_consumes_the_sigma_variate_and_zero_is_a_noise_level():
    """Validation's ε is the training draw's ε for the same seed; fixed_sigma=0.0 means σ = 0, not "unset"."""
    c = fm.FlowMatchingConfig(timestep_sampling="uniform")
    seeds = [3, 4]
    drawn = fm.sample_noise_and_sigmas(c, (1, 4, 4), seeds)
    for fixed in (0.0, 0.4):
        at = fm.sample_noise_and_sigmas(c, (1, 4, 4), seeds, fixed_sigma=fixed)
        assert at.sigmas.tolist() == [pytest.approx(fixed)] * 2
        assert torch.equal(at.noise, drawn.noise)
        assert torch.equal(at.noise[0], replay(3, (1, 4, 4), "uniform")[1])


def test_per_sample_seeds_pass_their_stream_on():
    got = fm.per_sample_seeds(5, 7, [0, 1], stream=fm.VALIDATION_STREAM)
    assert got == [fm.sample_seed(5, 7, i, fm.VALIDATION_STREAM) for i in (0, 1)]
    assert got != fm.per_sample_seeds(5, 7, [0, 1])
    assert max(fm.sample_seed(0, 0, i) for i in range(64)) >= 2**62  # 63-bit seeds, as documented


def test_get_schedule_takes_its_shift_line_and_time_shift_its_exponent():
    # base_shift is mu at 256 tokens, max_shift at 4096; BFL's time_shift raises (1/t − 1) to its sigma
    mu = 1.0
    expected = [1.0, math.exp(mu) / (math.exp(mu) + 1), 0.0]
    assert fm.get_schedule(2, 256, base_shift=mu, max_shift=2.0) == pytest.approx(expected, abs=1e-6)
    assert fm.get_schedule(2, 4096, base_shift=0.1, max_shift=mu) == pytest.approx(expected, abs=1e-6)
    t = torch.tensor([0.2])
    assert fm.time_shift(0.5, 2.0, t).item() == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 4.0**2), rel=1e-6)


# endregion

# region loss edges


def test_sigma_sqrt_at_sigma_0_is_a_finite_zero_loss_not_nan():
    """Uniform sampling can draw σ = 0; sigma_scaled's error is exactly 0 there and σ⁻² is clamped, not inf."""
    x0, eps = torch.ones(1, 1, 1, 2), torch.full((1, 1, 1, 2), 2.0)
    sample = fm.NoiseSample(noise=eps, sigmas=torch.tensor([0.0]))
    c = fm.FlowMatchingConfig(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    loss = fm.per_sample_loss(torch.zeros_like(x0), x0, sample, c)
    assert torch.isfinite(loss).all() and loss.item() == 0.0


def test_the_exponential_huber_c_follows_each_samples_sigma_in_the_loss():
    x0 = torch.zeros(2, 1, 1, 1)
    sample = fm.NoiseSample(noise=torch.zeros(2, 1, 1, 1), sigmas=torch.tensor([0.25, 1.0]))
    pred = torch.full((2, 1, 1, 1), 3.0)  # d = 3 for both samples (raw)
    c = fm.FlowMatchingConfig(model_prediction_type="raw", loss_type="huber", huber_schedule="exponential",
                              huber_c=0.1, huber_scale=2.0)  # fmt: skip
    cs = [0.1**s * 2.0 for s in (0.25, 1.0)]  # huber_c^σ · scale
    expected = [2 * h * (math.sqrt(9 + h * h) - h) for h in cs]
    assert fm.per_sample_loss(pred, x0, sample, c).tolist() == pytest.approx(expected, rel=1e-6)


# endregion

# region configuration


def test_zero_ip_noise_gamma_is_accepted_as_off_and_a_zero_huber_scale_is_refused():
    c = fm.FlowMatchingConfig(ip_noise_gamma=0.0)
    assert fm.sample_noise_and_sigmas(c, (1, 2, 2), [1]).ip_noise is None
    with pytest.raises(UserError, match="--huber_scale must be > 0"):
        fm.FlowMatchingConfig(loss_type="huber", huber_schedule="constant", huber_scale=0.0)
    with pytest.raises(UserError, match="--huber_c must be > 0"):
        fm.FlowMatchingConfig(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.0)


def test_from_args_reads_every_field():
    values = dict(timestep_sampling="shift", sigmoid_scale=0.5, discrete_flow_shift=2.5, weighting_scheme="cosmap",
                  logit_mean=0.3, logit_std=0.7, mode_scale=1.1, ip_noise_gamma=0.05,
                  ip_noise_gamma_random_strength=True, model_prediction_type="additive", loss_type="smooth_l1",
                  huber_schedule="exponential", huber_c=0.2, huber_scale=3.0)  # fmt: skip
    assert set(values) == set(fm.FlowMatchingConfig.__dataclass_fields__)
    assert fm.FlowMatchingConfig.from_args(argparse.Namespace(**values, unrelated=1)) == fm.FlowMatchingConfig(**values)


@pytest.mark.parametrize("options, unused", [
    # the density options are read by --timestep_sampling sigma only
    ({"timestep_sampling": "shift", "weighting_scheme": "mode", "mode_scale": 0.8}, ["weighting_scheme", "mode_scale"]),
    ({"timestep_sampling": "uniform", "weighting_scheme": "logit_normal", "logit_std": 2.0},
     ["weighting_scheme", "logit_std"]),
])  # fmt: skip
def test_density_options_are_unused_without_sigma_sampling(options, unused):
    messages = fm.FlowMatchingConfig(**options).unused_options()
    assert [m.split()[0] for m in messages] == [f"--{name}" for name in unused]


# endregion

# region lr schedules


def lr_args(**kw) -> argparse.Namespace:
    base = dict(lr_scheduler="constant", lr_scheduler_type="", lr_scheduler_args=None, lr_warmup_steps=0,
                lr_decay_steps=0, lr_scheduler_num_cycles=1, lr_scheduler_power=1.0, lr_scheduler_timescale=None,
                lr_scheduler_min_lr_ratio=None, max_train_steps=10, optimizer_type="AdamW")  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def run_lrs(scheduler, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def ours(n: int, **kw) -> list[float]:
    from library.lr_schedulers import get_scheduler_fix

    return run_lrs(get_scheduler_fix(lr_args(**kw), sgd()), n)


def test_step_counts_accept_0_and_refuse_negative_ratios_and_booleans():
    from library.lr_schedulers import resolve_step_count

    assert resolve_step_count(0.0, 10, "--x") == 0 and resolve_step_count(0, 10, "--x") == 0
    for bad in (-0.1, True, False):
        with pytest.raises(UserError, match="--x"):
            resolve_step_count(bad, 10, "--x")
    with pytest.raises(UserError, match="--lr_decay_steps"):  # the flag that is wrong is named
        ours(1, lr_scheduler="warmup_stable_decay", lr_decay_steps=-2)


def test_no_lr_scheduler_means_constant():
    assert ours(3, lr_scheduler=None, max_train_steps=2) == [1.0, 1.0, 1.0]
    assert ours(3, lr_scheduler="", max_train_steps=2) == [1.0, 1.0, 1.0]


def test_the_warmup_bound_is_the_run_and_only_a_known_run_bounds_it():
    from library.lr_schedulers import get_scheduler_fix

    with pytest.raises(UserError, match="--lr_warmup_steps 11 is longer"):
        get_scheduler_fix(lr_args(lr_scheduler="constant_with_warmup", lr_warmup_steps=11), sgd())
    # constant_with_warmup and inverse_sqrt need no run length
    assert ours(4, lr_scheduler="constant_with_warmup", lr_warmup_steps=2, max_train_steps=None) == [0, 0.5, 1, 1]
    # the others do
    with pytest.raises(UserError, match="--lr_scheduler linear needs --max_train_steps"):
        get_scheduler_fix(lr_args(lr_scheduler="linear", max_train_steps=0), sgd())


def transformers_lrs(factory, n: int, **kw) -> list[float]:
    return run_lrs(factory(sgd(), **kw), n)


def test_cosine_with_min_lr_takes_half_the_cycles_and_an_absolute_min_lr():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup as reference

    got = ours(11, lr_scheduler="cosine_with_min_lr", lr_scheduler_num_cycles=2, lr_scheduler_min_lr_ratio=0.1)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(2 * math.pi * k / 10)) for k in range(11)]  # down and back up
    assert got == pytest.approx(expected, abs=1e-9) and got[10] == pytest.approx(1.0)
    got = ours(11, lr_scheduler="cosine_with_min_lr", lr_scheduler_args=["min_lr=0.25"])  # no ratio needed
    expected = transformers_lrs(reference, 11, num_warmup_steps=0, num_training_steps=10, min_lr=0.25)
    assert got == pytest.approx(expected, abs=1e-12) and got[10] == pytest.approx(0.25)


def test_warmup_stable_decay_fills_the_run_and_decays_to_0_by_default():
    from transformers.optimization import get_wsd_schedule as reference

    got = ours(11, lr_scheduler="warmup_stable_decay", lr_warmup_steps=4, lr_decay_steps=6)  # no stable steps
    expected = transformers_lrs(reference, 11, num_warmup_steps=4, num_stable_steps=0, num_decay_steps=6)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[:4] == [0, 0.25, 0.5, 0.75] and got[4] == 1.0 and got[10] == 0.0


def test_the_schedule_free_stand_in_reports_each_groups_lr():
    import schedulefree

    from library.lr_schedulers import ScheduleFreeDummyScheduler

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.002}]  # fmt: skip
    scheduler = ScheduleFreeDummyScheduler(schedulefree.AdamWScheduleFree(groups, lr=0.5))
    assert scheduler.get_last_lr() == [0.01, 0.002]


def test_a_custom_scheduler_class_is_checked_but_not_built_for_preflight():
    from library.lr_schedulers import get_scheduler_fix

    args = lr_args(lr_scheduler_type="LambdaLR", lr_scheduler_args=["lr_lambda=[1, 2]"])  # per group: not buildable
    assert get_scheduler_fix(args, sgd(), build_custom=False) is None
    for name, what in (("NoSuchLR", "no class 'NoSuchLR'"), ("no_such_pkg_xyz.SomeLR", "cannot import")):
        with pytest.raises(UserError, match=f"--lr_scheduler_type {name}: {what}"):
            get_scheduler_fix(lr_args(lr_scheduler_type=name), sgd(), build_custom=False)
    # a value the class refuses (ValueError) is a message too
    with pytest.raises(UserError, match="do not fit --lr_scheduler_type CosineAnnealingWarmRestarts"):
        get_scheduler_fix(lr_args(lr_scheduler_type="CosineAnnealingWarmRestarts", lr_scheduler_args=["T_0=0"]), sgd())


def adafactor(**kw):
    from library.optimizers import get_optimizer

    args = argparse.Namespace(**vars(lr_args()), learning_rate=1e-3, optimizer_args=None, use_8bit_adam=False,
                              use_lion_optimizer=False, max_grad_norm=0.0)  # fmt: skip
    args.optimizer_type = "Adafactor"
    vars(args).update(kw)
    _, _, optimizer = get_optimizer(args, [torch.nn.Parameter(torch.ones(4, 4))])
    return args, optimizer


def test_adafactor_schedule_refuses_a_warmup_and_takes_no_initial_lr():
    from library.lr_schedulers import get_scheduler_fix

    args, optimizer = adafactor(learning_rate=None)  # relative_step with no lr at all
    assert args.lr_scheduler == "adafactor:None"
    assert get_scheduler_fix(args, optimizer).get_last_lr() == [0.0]
    args, optimizer = adafactor(lr_warmup_steps=3)
    with pytest.raises(UserError, match="--lr_scheduler adafactor does not use --lr_warmup_steps"):
        get_scheduler_fix(args, optimizer)


# endregion

# region optimizers


def opt_args(**kw) -> argparse.Namespace:
    base = dict(optimizer_type="", optimizer_args=None, learning_rate=1e-3, use_8bit_adam=False,
                use_lion_optimizer=False, max_grad_norm=1.0, lr_scheduler="constant", unet_lr=None,
                text_encoder_lr=None)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def ours_logged(caplog) -> str:
    """The optimizer factory's own warnings (a package may warn on import)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "library.optimizers")


def two_params():
    return [torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))]


def test_optimizer_args_keys_are_stripped_and_refused_values_are_messages():
    from library.optimizers import get_optimizer, parse_kv_literals

    assert parse_kv_literals([" weight_decay = 0.01 ", "betas= 0.9,0.99"], "--f") == {
        "weight_decay": 0.01, "betas": (0.9, 0.99)}  # fmt: skip
    _, args_str, optimizer = get_optimizer(opt_args(optimizer_args=["weight_decay =0.5"]), two_params())
    assert optimizer.defaults["weight_decay"] == 0.5 and args_str == "weight_decay=0.5"
    with pytest.raises(UserError, match="--optimizer_args .* do not fit AdamW"):  # AdamW's ValueError
        get_optimizer(opt_args(optimizer_args=["betas=2.0,0.9"]), two_params())


def test_the_dadaptation_alias_is_the_preprint_class_from_a_subpackage_its_parent_does_not_import(
    tmp_path, monkeypatch
):
    """DAdaptation means DAdaptAdamPreprint (spec §b.2), in dadaptation.experimental; a stand-in package here."""
    import sys

    from library.optimizers import get_optimizer

    pkg = tmp_path / "dadaptation"
    (pkg / "experimental").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import torch\n\nclass DAdaptAdam(torch.optim.SGD):\n    pass\n")
    (pkg / "experimental" / "__init__.py").write_text(
        "import torch\n\nclass DAdaptAdamPreprint(torch.optim.SGD):\n    pass\n"
    )
    for name in ("dadaptation", "dadaptation.experimental"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, _, optimizer = get_optimizer(opt_args(optimizer_type="DAdaptation", learning_rate=1.0), two_params())
    assert name == "dadaptation.experimental.DAdaptAdamPreprint"
    assert type(optimizer).__name__ == "DAdaptAdamPreprint"
    for name in ("dadaptation", "dadaptation.experimental"):  # (not left for other tests)
        sys.modules.pop(name, None)


def test_prodigy_warnings_read_the_groups_rates(caplog):
    import logging

    from library.optimizers import get_optimizer

    def warnings(group_lrs, lr):
        params = two_params()
        groups = [{"params": [p], "lr": r} for p, r in zip(params, group_lrs, strict=True)]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            get_optimizer(opt_args(optimizer_type="Prodigy", learning_rate=lr), groups)
        return ours_logged(caplog)

    assert warnings([1.0, 1.0], 1.0) == ""  # one rate, shared by two groups: nothing to say
    assert "is low" in warnings([0.01, 0.01], 1.0)  # the groups' rate, not --learning_rate


def test_adafactor_warns_about_a_clip_threshold_off_the_recipe(caplog):
    import logging

    from library.optimizers import get_optimizer

    recipe = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    args = dict(optimizer_type="Adafactor", max_grad_norm=0.0, lr_scheduler="constant_with_warmup")
    with caplog.at_level(logging.WARNING):
        get_optimizer(opt_args(optimizer_args=recipe, **args), two_params())
    assert ours_logged(caplog) == ""
    with caplog.at_level(logging.WARNING):
        get_optimizer(opt_args(optimizer_args=[*recipe, "clip_threshold=2.0"], **args), two_params())
    assert "clip_threshold=1.0 is the usual choice" in ours_logged(caplog)


def test_a_network_with_a_variadic_prepare_gets_all_three_rates():
    from library.optimizers import network_param_groups

    seen = []

    class Net:
        def prepare_optimizer_params(self, *rates):
            seen.append(rates)
            return [{"params": []}]

    network_param_groups(Net(), opt_args(text_encoder_lr=[5e-5], unet_lr=2e-4))
    assert seen == [(5e-5, 2e-4, 1e-3)]


def test_modes_need_both_train_and_eval_and_prodigy_class_paths_adapt():
    from library.optimizers import has_train_and_eval_modes, is_dadapt_or_prodigy

    class TrainOnly(torch.optim.SGD):
        def train(self) -> None:
            pass

    assert not has_train_and_eval_modes(TrainOnly(two_params(), lr=0.1))
    assert is_dadapt_or_prodigy("pytorch_optimizer.Prodigy")


def test_train_mode_gets_back_the_exact_train_weights_after_each_eval():
    """eval_fn keeps the train-mode weights and train_fn restores them, every time; a second eval_fn in a row
    must not keep the eval weights."""
    from library.optimizers import get_optimizer, get_optimizer_train_eval_fn

    g = torch.Generator().manual_seed(0)  # (a schedule-free eval -> train round trip rounds these weights)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=g)), torch.nn.Parameter(torch.randn(64, generator=g))]
    _, _, optimizer = get_optimizer(opt_args(optimizer_type="AdamWScheduleFree", learning_rate=0.1), params)
    train_fn, eval_fn = get_optimizer_train_eval_fn(optimizer)

    def steps(n: int) -> list[torch.Tensor]:
        for _ in range(n):
            optimizer.zero_grad()
            sum((p**3).sum() for p in params).backward()
            optimizer.step()
        return [p.detach().clone() for p in params]

    for n in (3, 2):  # twice: the second round must keep the new weights, not the first round's
        before = steps(n)
        eval_fn()
        assert not torch.equal(params[0], before[0])  # (the eval weights differ)
        eval_fn()
        train_fn()
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


# endregion
