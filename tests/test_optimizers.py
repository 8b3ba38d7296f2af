"""Optimizer factory (library.optimizers): names, options, aliases and Adafactor handling."""

import argparse
import importlib.util
import logging

import pytest
import torch

from library.errors import UserError
from library.optimizers import get_optimizer, get_optimizer_train_eval_fn, parse_kv_literals


def make_args(**kw) -> argparse.Namespace:
    base = dict(
        optimizer_type="", optimizer_args=None, learning_rate=1e-3, use_8bit_adam=False, use_lion_optimizer=False,
        fused_backward_pass=False, gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler="constant",
        unet_lr=None, text_encoder_lr=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def make_params() -> list[torch.nn.Parameter]:
    # 4096 elements: the bitsandbytes 8-bit state threshold (smaller tensors keep fp32 state)
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 64, generator=g)), torch.nn.Parameter(torch.randn(64, generator=g))]


def step_changes_params(optimizer, params) -> bool:
    before = [p.detach().clone() for p in params]
    for _ in range(6):  # RAdam-style optimizers leave the first few steps at zero update
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        optimizer.step()
    return all(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


BUILTIN = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.adamw.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.sgd.SGD8bit",
    "Adafactor": "transformers.optimization.Adafactor",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "RAdamScheduleFree": "schedulefree.radam_schedulefree.RAdamScheduleFree",
    "SGDScheduleFree": "schedulefree.sgd_schedulefree.SGDScheduleFree",
}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_each_builtin_optimizer_constructs_and_steps(name):
    params = make_params()
    opt_name, _, optimizer = get_optimizer(make_args(optimizer_type=name), params)
    assert opt_name == BUILTIN[name]
    assert step_changes_params(optimizer, params)


@pytest.mark.parametrize("name", ["adamw8BIT", "ADAFACTOR", "prodigy", "sgdnesterov", "adamwschedulefree"])
def test_builtin_names_are_case_insensitive(name):
    opt_name, _, _ = get_optimizer(make_args(optimizer_type=name), make_params())
    expected = next(v for k, v in BUILTIN.items() if k.lower() == name.lower())
    assert opt_name == expected


def test_empty_optimizer_type_means_adamw():
    assert get_optimizer(make_args(optimizer_type=""), make_params())[0] == "torch.optim.adamw.AdamW"


OPTIONAL = {
    "Lion": "lion-pytorch",
    "DAdaptation": "dadaptation",
    "DAdaptAdamPreprint": "dadaptation",
    "DAdaptAdaGrad": "dadaptation",
    "DAdaptAdam": "dadaptation",
    "DAdaptAdan": "dadaptation",
    "DAdaptAdanIP": "dadaptation",
    "DAdaptLion": "dadaptation",
    "DAdaptSGD": "dadaptation",
}


@pytest.mark.parametrize("name", list(OPTIONAL))
def test_optional_package_optimizers_step_or_name_the_package_to_install(name):
    pip_name = OPTIONAL[name]
    params = make_params()
    if importlib.util.find_spec(pip_name.replace("-", "_")) is None:
        with pytest.raises(UserError) as e:
            get_optimizer(make_args(optimizer_type=name, learning_rate=1.0), params)
        assert f"pip install {pip_name}" in str(e.value) and name in str(e.value)
    else:
        _, _, optimizer = get_optimizer(make_args(optimizer_type=name, learning_rate=1.0), params)
        assert step_changes_params(optimizer, params)


@pytest.mark.parametrize(
    "name, cls",
    [("Adam", torch.optim.Adam), ("rmsprop", torch.optim.RMSprop), ("RAdam", torch.optim.RAdam),
     ("torch.optim.Adagrad", torch.optim.Adagrad)],
)  # fmt: skip
def test_torch_optim_names_and_class_paths(name, cls):
    params = make_params()
    _, _, optimizer = get_optimizer(make_args(optimizer_type=name), params)
    assert type(optimizer) is cls
    assert step_changes_params(optimizer, params)


def test_dotted_path_to_another_package():
    params = make_params()
    name, _, optimizer = get_optimizer(make_args(optimizer_type="bitsandbytes.optim.AdEMAMix8bit"), params)
    assert name.endswith("AdEMAMix8bit")
    assert step_changes_params(optimizer, params)


@pytest.mark.parametrize("name", ["NoSuchOptimizer", "nosuchpackage.Opt", "torch.optim.NoSuch"])
def test_unknown_optimizer_is_a_user_error_naming_it(name):
    with pytest.raises(UserError, match="--optimizer_type"):
        get_optimizer(make_args(optimizer_type=name), make_params())


def test_optimizer_args_are_parsed_as_literals():
    kwargs = parse_kv_literals(
        ["weight_decay=0.01", "betas=0.9,0.999", "decouple=True", "d_coef=2", "name='a=b'", "eps=None"],
        "--optimizer_args",
    )
    assert kwargs == {"weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True, "d_coef": 2, "name": "a=b",
                      "eps": None}  # fmt: skip
    assert parse_kv_literals(None, "--x") == {}


@pytest.mark.parametrize("item", ["weight_decay", "=1", "relative_step=Flase", "betas=(0.9,"])
def test_bad_optimizer_args_name_the_flag(item):
    with pytest.raises(UserError, match="--optimizer_args"):
        parse_kv_literals([item], "--optimizer_args")


def test_optimizer_args_reach_the_optimizer_and_the_metadata_string():
    args = make_args(optimizer_type="AdamW", optimizer_args=["betas=0.8,0.9", "weight_decay=0.05"])
    _, args_str, optimizer = get_optimizer(args, make_params())
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["weight_decay"] == 0.05
    assert args_str == "betas=(0.8, 0.9),weight_decay=0.05"


def test_optimizer_args_that_do_not_fit_are_a_user_error():
    with pytest.raises(UserError, match="--optimizer_args"):
        get_optimizer(make_args(optimizer_type="AdamW", optimizer_args=["no_such_option=1"]), make_params())


def test_sgd_nesterov_defaults_momentum_and_nesterov():
    _, args_str, optimizer = get_optimizer(make_args(optimizer_type="SGDNesterov"), make_params())
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    assert args_str == "momentum=0.9"


def test_legacy_use_8bit_adam_and_use_lion_optimizer():
    name, _, _ = get_optimizer(make_args(use_8bit_adam=True), make_params())
    assert name == BUILTIN["AdamW8bit"]
    if importlib.util.find_spec("lion_pytorch") is None:
        with pytest.raises(UserError, match="pip install lion-pytorch"):
            get_optimizer(make_args(use_lion_optimizer=True), make_params())
    else:
        assert get_optimizer(make_args(use_lion_optimizer=True), make_params())[0].endswith("Lion")


@pytest.mark.parametrize(
    "kw, flag",
    [({"use_8bit_adam": True, "use_lion_optimizer": True}, "--use_lion_optimizer"),
     ({"use_8bit_adam": True, "optimizer_type": "AdamW"}, "--use_8bit_adam"),
     ({"use_lion_optimizer": True, "optimizer_type": "Prodigy"}, "--use_lion_optimizer")],
)  # fmt: skip
def test_legacy_flags_conflicting_with_others_are_refused(kw, flag):
    with pytest.raises(UserError, match=flag):
        get_optimizer(make_args(**kw), make_params())


def test_adafactor_guide_recipe_uses_the_given_lr():
    args = make_args(
        optimizer_type="adafactor",
        learning_rate=1e-4,
        optimizer_args=["relative_step=False", "scale_parameter=False", "warmup_init=False"],
        lr_scheduler="constant_with_warmup",
        max_grad_norm=0.0,
    )
    _, _, optimizer = get_optimizer(args, make_params())
    assert optimizer.param_groups[0]["lr"] == 1e-4
    assert optimizer.defaults["relative_step"] is False and optimizer.defaults["scale_parameter"] is False
    assert args.lr_scheduler == "constant_with_warmup" and args.learning_rate == 1e-4


def test_adafactor_relative_step_default_forces_the_adafactor_scheduler_and_drops_group_lrs(caplog):
    params = make_params()
    groups = [{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 5e-5}]
    args = make_args(optimizer_type="Adafactor", learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=[5e-5])
    with caplog.at_level(logging.WARNING):
        _, args_str, optimizer = get_optimizer(args, groups)
    assert args.lr_scheduler == "adafactor:0.0001"
    assert args.learning_rate is None and args.unet_lr is None and args.text_encoder_lr is None
    assert all(g["lr"] is None for g in optimizer.param_groups) and optimizer.defaults["relative_step"]
    assert args_str == "relative_step=True"
    assert "unet_lr" in caplog.text
    assert step_changes_params(optimizer, params)


def test_adafactor_warmup_init_forces_relative_step():
    args = make_args(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "warmup_init=True"])
    _, _, optimizer = get_optimizer(args, make_params())
    assert optimizer.defaults["relative_step"] is True and args.lr_scheduler.startswith("adafactor:")


def test_adafactor_without_the_recipe_warns(caplog):
    args = make_args(optimizer_type="Adafactor", optimizer_args=["relative_step=False"], max_grad_norm=1.0)
    with caplog.at_level(logging.WARNING):
        get_optimizer(args, make_params())
    assert "max_grad_norm" in caplog.text and "constant_with_warmup" in caplog.text


def test_schedule_free_optimizers_start_in_train_mode_and_switch():
    _, _, optimizer = get_optimizer(make_args(optimizer_type="AdamWScheduleFree"), make_params())
    assert optimizer.param_groups[0]["train_mode"] is True
    train_fn, eval_fn = get_optimizer_train_eval_fn(optimizer)
    eval_fn()
    assert optimizer.param_groups[0]["train_mode"] is False
    train_fn()
    assert optimizer.param_groups[0]["train_mode"] is True
    _, _, adamw = get_optimizer(make_args(), make_params())
    noop_train, noop_eval = get_optimizer_train_eval_fn(adamw)
    assert noop_train() is None and noop_eval() is None and not hasattr(adamw, "eval")


def test_prodigy_low_learning_rate_warns_and_several_rates_become_one(caplog):
    params = [*make_params(), torch.nn.Parameter(torch.ones(3))]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, (1e-4, 2e-4, 0), strict=True)]
    with caplog.at_level(logging.WARNING):
        _, _, optimizer = get_optimizer(make_args(optimizer_type="Prodigy", learning_rate=1e-4), groups)
    assert "about 1.0" in caplog.text
    assert "Prodigy takes one learning rate for all parameter groups" in caplog.text
    assert "every group trains at 0.0002" in caplog.text
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 2e-4, 0.0]  # as Prodigy steps: the largest, or 0
    assert [g["lr"] for g in groups] == [1e-4, 2e-4, 0]  # (the caller's groups are left as they were)
    assert step_changes_params(optimizer, params[:2])  # it raised "only supported for values of 0" at step 1


@pytest.mark.parametrize(
    "kw", [{"optimizer_type": "AdamW"}, {"optimizer_type": "Adafactor", "gradient_accumulation_steps": 2}]
)
def test_fused_backward_pass_has_no_effect_and_stops_nothing(kw):
    """No effect on LoRA training (sd-scripts' stops a run with Adafactor and accumulation): the same optimizer,
    and one compatibility warning naming the flag."""
    import flux_train_network
    from library.train_args import review_compat_flags

    name, optimizer_args, optimizer = get_optimizer(make_args(fused_backward_pass=True, **kw), make_params())
    plain = get_optimizer(make_args(**kw), make_params())
    assert (name, optimizer_args, type(optimizer)) == (plain[0], plain[1], type(plain[2]))
    assert optimizer.defaults == plain[2].defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in plain[2].param_groups]  # fmt: skip
    parser = flux_train_network.setup_parser()
    messages = review_compat_flags(parser.parse_args(["--fused_backward_pass"]), parser)
    assert len(messages) == 1 and "--fused_backward_pass" in messages[0]
    assert "it has no effect on LoRA training" in messages[0]


def test_schedule_free_detection_looks_through_accelerate_wrappers():
    from accelerate.optimizer import AcceleratedOptimizer

    from library.lr_schedulers import ScheduleFreeDummyScheduler, get_scheduler_fix
    from library.optimizers import is_schedulefree_optimizer

    def wrapped(inner):  # AcceleratedOptimizer without an Accelerator: only its train/eval forwarding matters
        w = AcceleratedOptimizer.__new__(AcceleratedOptimizer)
        w.optimizer = inner
        return w

    _, _, adamw = get_optimizer(make_args(), make_params())
    _, _, sf = get_optimizer(make_args(optimizer_type="AdamWScheduleFree"), make_params())
    assert callable(wrapped(adamw).train)  # accelerate defines train/eval for every optimizer
    assert not is_schedulefree_optimizer(wrapped(adamw))
    assert is_schedulefree_optimizer(wrapped(sf))
    sched_args = argparse.Namespace(lr_scheduler="constant", optimizer_type="AdamW", max_train_steps=10)
    assert not isinstance(get_scheduler_fix(sched_args, wrapped(adamw)), ScheduleFreeDummyScheduler)
    train_fn, eval_fn = get_optimizer_train_eval_fn(wrapped(sf))
    eval_fn()
    assert sf.param_groups[0]["train_mode"] is False


class AveragingSGD(torch.optim.SGD):
    """An optimizer with train/eval modes that is not schedule-free (as pytorch_optimizer's SPlus,
    which evaluates on averaged weights): its modes switch, and it takes the asked schedule."""

    def train(self) -> None:
        self.mode = "train"

    def eval(self) -> None:
        self.mode = "eval"


def test_an_optimizer_with_modes_is_switched_but_keeps_the_lr_schedule():
    from transformers.optimization import get_cosine_schedule_with_warmup

    from library.lr_schedulers import get_scheduler_fix
    from library.optimizers import has_train_and_eval_modes, is_schedulefree_optimizer

    args = make_args(optimizer_type="tests.test_optimizers.AveragingSGD", learning_rate=0.1, lr_scheduler="cosine",
                     lr_warmup_steps=2, max_train_steps=8)  # fmt: skip
    _, _, optimizer = get_optimizer(args, make_params())
    assert has_train_and_eval_modes(optimizer) and not is_schedulefree_optimizer(optimizer, args)
    assert optimizer.mode == "train"  # switched on creation, as a schedule-free one
    train_fn, eval_fn = get_optimizer_train_eval_fn(optimizer)
    eval_fn()
    assert optimizer.mode == "eval"
    train_fn()
    scheduler = get_scheduler_fix(args, optimizer)
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 2, 8)
    for _ in range(8):
        assert scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())
        optimizer.step(), scheduler.step(), reference.optimizer.step(), reference.step()
    # the class's name says schedule-free when the option does not (a class path)
    assert is_schedulefree_optimizer(type("ProdigyPlusScheduleFree", (AveragingSGD,), {})(make_params()), None)
