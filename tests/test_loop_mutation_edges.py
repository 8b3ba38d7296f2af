"""Edges of the pre-flight checks, the run's logging and the third-party network adaptation that a mutation
round found unpinned: the bound each count is refused at, what a distribution or an output-folder check reads, where
log records go, and what a network module written for sd-scripts is given (tests/test_loop_mutation_edges_2.py has
the training loop's)."""

from __future__ import annotations

import logging
import os
import sys
import types
from argparse import Namespace

import pytest
import torch
from torch import nn

from library.errors import UserError

# ---- preflight -------------------------------------------------------------------------------------------------


def parse(*argv: str):
    import flux_train_network

    return flux_train_network.setup_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: give 1 or more (batches per optimizer "
                                             "step)"),
    (["--max_validation_steps", "0"], "--max_validation_steps 0: give 1 or more (validation batches; leave it out to "
                                      "validate on every one)"),
    (["--max_train_steps", "0"], "--max_train_steps 0: give 1 or more (optimizer steps)"),
    (["--network_dim", "-1"], "--network_dim -1: give 0 or more (the LoRA rank)"),
    (["--max_grad_norm", "-0.5"], "--max_grad_norm -0.5: give 0 (no clipping) or more"),
])  # fmt: skip
def test_each_count_is_refused_just_below_its_bound_with_its_flag(argv, message):
    from library.preflight import check_counts

    with pytest.raises(UserError) as ei:
        check_counts(parse(*argv))
    assert str(ei.value) == message


def test_dim_from_weights_takes_the_ranks_from_the_file_so_network_dim_is_not_checked():
    from library.preflight import check_counts

    check_counts(parse("--dim_from_weights", "--network_dim", "-1"))  # the file's ranks are used
    check_counts(parse("--max_train_epochs", "1", "--max_train_steps", "0"))  # the epochs set the length


@pytest.mark.parametrize("argv", [
    ["--learning_rate", "0", "--unet_lr", "1e-4", "--network_train_text_encoder_only"],  # the DiT's rate is unused
    ["--unet_lr", "0", "--text_encoder_lr", "1e-4", "--network_train_unet_only"],  # the text encoders' is unused
])  # fmt: skip
def test_only_the_rates_of_the_parts_that_train_count(argv):
    from library.preflight import ZERO_RATES, check_learning_rates

    with pytest.raises(UserError) as ei:
        check_learning_rates(parse(*argv))
    assert str(ei.value) == ZERO_RATES


def test_text_encoder_only_with_unknown_text_encoders_is_left_to_the_network():
    from library.preflight import check_learning_rates

    check_learning_rates(parse("--network_train_text_encoder_only"), None)  # a third-party module decides
    with pytest.raises(UserError, match="^nothing to train: --network_train_text_encoder_only, but no text encoder"):
        check_learning_rates(parse("--network_train_text_encoder_only"), [])


def test_unused_rate_warnings_say_nothing_when_the_text_encoders_are_unknown(caplog):
    from library.preflight import warn_about_unused_text_encoder_rates

    with caplog.at_level(logging.WARNING):
        warn_about_unused_text_encoder_rates(parse("--text_encoder_lr", "1e-4", "5e-5"), None,
                                             {"loraplus_text_encoder_lr_ratio": 4})  # fmt: skip
    assert caplog.messages == []


@pytest.mark.parametrize("environ, distributed_type, refused", [
    ({"ACCELERATE_USE_DEEPSPEED": "True"}, None, "DEEPSPEED"),  # accelerate writes str(True)
    ({"ACCELERATE_USE_FSDP": "YES"}, None, "FSDP"),
    ({"ACCELERATE_USE_MEGATRON_LM": "0", "ACCELERATE_USE_FSDP": ""}, None, None),
    ({}, "fsdp", "FSDP"),  # a type without .value, named in any case
    ({}, "multi_gpu", None),
])  # fmt: skip
def test_unsupported_distributions_are_read_in_any_case(environ, distributed_type, refused):
    from library.preflight import refuse_unsupported_distribution

    if refused is None:
        refuse_unsupported_distribution(distributed_type, environ=environ)
        return
    with pytest.raises(UserError) as ei:
        refuse_unsupported_distribution(distributed_type, environ=environ)
    assert str(ei.value).startswith(f"accelerate is configured for {refused}, which this trainer does not support")


def test_an_output_dir_that_is_a_file_is_named_without_the_output_name(tmp_path):
    from library.preflight import check_output_folder

    blocker = tmp_path / "out"
    blocker.write_text("x")
    with pytest.raises(UserError) as ei:
        check_output_folder(Namespace(output_dir=str(blocker), output_name="lora"))
    assert str(ei.value) == f"--output_dir {blocker}: {blocker} is a file, not a folder; choose another --output_dir"
    check_output_folder(Namespace(output_dir=str(tmp_path / "new" / "out"), output_name=None))  # made later


def test_earlier_outputs_are_the_files_of_that_name_and_its_suffixed_saves_only(tmp_path, caplog, monkeypatch):
    from library.preflight import warn_about_earlier_outputs

    for name in ("lora.pt", "lora.ckpt", "lora2.safetensors", "lora_b.safetensors", "lora-000001.safetensors",
                 "-000001.safetensors"):  # the last one is no file of "lora", nor of an empty name (no name: no check)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.WARNING):
        warn_about_earlier_outputs(Namespace(output_dir=str(tmp_path), output_name="lora", resume=None))
        warn_about_earlier_outputs(Namespace(output_dir=str(tmp_path), output_name="", resume=None))
        warn_about_earlier_outputs(Namespace(output_dir=str(tmp_path / "none"), output_name="lora", resume=None))
    assert caplog.messages == [
        f"--output_dir {tmp_path} already holds 3 file(s) of an earlier run named lora (e.g. lora-000001.safetensors, "
        "lora.ckpt, lora.pt); this run replaces those it writes again and leaves the others"
    ]


def test_a_debug_dynamo_backend_this_torch_registers_is_accepted():
    from library.preflight import check_dynamo_backend

    check_dynamo_backend("eager")  # registered, though list_backends() leaves debug backends out of its default
    check_dynamo_backend("inductor")
    with pytest.raises(UserError, match="^--torch_compile needs a --dynamo_backend this torch has, not 'tensorrt'"):
        check_dynamo_backend("tensorrt")


# ---- run_logging -----------------------------------------------------------------------------------------------


@pytest.fixture
def root_logging():
    """The root logger's handlers and level, put back afterwards (setup_logging and HeldRecords change them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        for handler in root.handlers:
            if getattr(handler, "flux_trainer", False) and handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_quiet_loggers_hold_back_warnings_and_put_the_levels_back():
    from library.run_logging import quiet_loggers

    quiet, collect = logging.getLogger("tests.mutation.quiet"), Collect()
    quiet.addHandler(collect)
    quiet.setLevel(logging.DEBUG)
    try:
        with quiet_loggers("tests.mutation.quiet"):
            quiet.warning("held back")
            quiet.error("shown")
        quiet.info("after")
    finally:
        quiet.removeHandler(collect)
        quiet.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in collect.records] == ["shown", "after"]


def test_held_records_hold_everything_and_replay_from_the_first_process_at_the_runs_level(root_logging,
                                                                                          monkeypatch):  # fmt: skip
    from library.run_logging import HeldRecords

    before = Collect()
    root_logging.handlers[:] = [before]
    root_logging.setLevel(logging.WARNING)
    with HeldRecords() as held:
        assert root_logging.handlers == [held] and root_logging.level == logging.NOTSET
        logging.getLogger("tests.mutation").info("an info line")
        logging.getLogger("tests.mutation").warning("a warning")
    assert root_logging.handlers == [before] and root_logging.level == logging.WARNING
    assert before.records == [] and [r.getMessage() for r in held.records] == ["an info line", "a warning"]
    monkeypatch.setenv("RANK", "1")
    held.replay()  # the second process: nothing, and nothing is kept
    assert before.records == [] and held.records == []
    with pytest.raises(ValueError), HeldRecords():  # reading failed: replayed at once, at the level there was
        logging.getLogger("tests.mutation").info("dropped below WARNING")
        logging.getLogger("tests.mutation").warning("kept")
        monkeypatch.setenv("RANK", "0")
        raise ValueError
    assert [r.getMessage() for r in before.records] == ["kept"]


@pytest.mark.parametrize("environ, first", [
    ({}, True), ({"RANK": "0"}, True), ({"RANK": "1", "LOCAL_RANK": "0"}, False),
])
def test_the_first_launched_process_is_rank_0_or_a_run_without_rank(monkeypatch, environ, first):
    from library.run_logging import first_launched_process

    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert first_launched_process() is first


@pytest.mark.parametrize("errors, reconfigured", [("strict", "backslashreplace"), ("replace", None)])
def test_a_strict_stdout_is_made_to_escape_what_it_cannot_encode(monkeypatch, errors, reconfigured):
    from library.run_logging import tolerant_stdout

    calls = []
    stdout = types.SimpleNamespace(errors=errors, reconfigure=lambda **kw: calls.append(kw))
    monkeypatch.setattr(sys, "stdout", stdout)
    tolerant_stdout()
    assert calls == ([{"errors": reconfigured}] if reconfigured else [])


def test_setup_logging_sets_the_level_replaces_its_own_handlers_and_quiets_noisy_loggers(root_logging, capsys):
    from library.run_logging import setup_logging

    root_logging.setLevel(logging.ERROR)
    logging.getLogger("PIL").setLevel(logging.DEBUG)
    setup_logging(Namespace())
    assert root_logging.level == logging.INFO and logging.getLogger("PIL").level == logging.WARNING
    setup_logging(Namespace(console_log_simple=True, console_log_level="debug"))  # installed once, not twice
    assert root_logging.level == logging.DEBUG
    assert sum(1 for h in root_logging.handlers if getattr(h, "flux_trainer", False)) == 1
    logging.getLogger("tests.mutation").debug("plain line")
    assert capsys.readouterr().err == "plain line\n"


def test_the_outcome_goes_to_the_runs_log_file_alone(root_logging, tmp_path):
    from library.run_logging import record_in_log_file, setup_logging

    other = logging.FileHandler(tmp_path / "other.log", encoding="utf-8")  # not the run's: left alone
    console = Collect()
    console.flux_trainer = True  # the run's console handler: the message was printed there already
    root_logging.addHandler(other)
    try:
        setup_logging(Namespace(console_log_file=str(tmp_path / "run.log")))
        root_logging.addHandler(console)  # (setup_logging replaces the run's handlers it finds)
        record_in_log_file("saved the LoRA to out/lora.safetensors")
    finally:
        root_logging.removeHandler(other)
        other.close()
    assert (tmp_path / "run.log").read_text() == "INFO train_network: saved the LoRA to out/lora.safetensors\n"
    assert (tmp_path / "other.log").read_text() == "" and console.records == []


@pytest.mark.parametrize("log_with, logging_dir, expected", [
    (None, None, None), (None, "logs", "tensorboard"), ("tensorboard", "logs", "tensorboard"),
    ("wandb", None, "wandb"), ("all", "logs", ["tensorboard", "wandb"]),
    ("all", None, "--log_with all needs --logging_dir"), ("tensorboard", None, "--log_with tensorboard needs"),
])  # fmt: skip
def test_tracker_names(monkeypatch, log_with, logging_dir, expected):
    from library.run_logging import tracker_names

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace())
    args = Namespace(log_with=log_with, logging_dir=logging_dir)
    if isinstance(expected, str) and "needs" in expected:
        with pytest.raises(UserError, match=f"^{expected}"):
            tracker_names(args)
    else:
        assert tracker_names(args) == expected


def test_ddp_timeout_is_in_minutes():
    import datetime

    from library.run_logging import process_group_kwargs

    assert process_group_kwargs(Namespace(ddp_timeout=None)) == []
    (kwargs,) = process_group_kwargs(Namespace(ddp_timeout=30))
    assert kwargs.timeout == datetime.timedelta(minutes=30)


def test_the_run_folder_is_the_prefix_and_the_second_it_started(tmp_path):
    import re

    from library.run_logging import run_logging_dir

    assert run_logging_dir(Namespace(logging_dir=None, log_prefix="x")) is None
    folder = run_logging_dir(Namespace(logging_dir=str(tmp_path), log_prefix="mine_"))
    assert os.path.dirname(folder) == str(tmp_path)
    assert re.fullmatch(r"mine_20\d{12}", os.path.basename(folder))


def test_the_tracker_config_is_read_with_a_bom_and_a_missing_one_is_named(tmp_path):
    from library.run_logging import read_tracker_config

    config = tmp_path / "trackers.toml"
    config.write_bytes(b"\xef\xbb\xbf[wandb]\nproject = 'p'\n")  # as Notepad saves it
    assert read_tracker_config(Namespace(log_tracker_config=str(config))) == {"wandb": {"project": "p"}}
    missing = tmp_path / "missing.toml"
    with pytest.raises(UserError) as ei:
        read_tracker_config(Namespace(log_tracker_config=str(missing)))
    assert str(ei.value) == f"--log_tracker_config {missing}: file not found"


def test_log_config_leaves_out_unset_options_and_path_objects():
    import pathlib

    from library.run_logging import loggable_config

    config = loggable_config(Namespace(network_dim=4, network_alpha=None, sample_sampler=pathlib.Path("x"),
                                       lr_scheduler_args=["a=1", "b=2"]))  # fmt: skip
    assert config == {"network_dim": 4, "lr_scheduler_args": "['a=1', 'b=2']"}


def test_log_config_leaves_out_values_with_either_separator_on_windows(monkeypatch):
    from library.run_logging import loggable_config

    monkeypatch.setattr(os.path, "sep", "\\")
    config = loggable_config(Namespace(network_dim=4, lr_scheduler_type="C:\\schedulers\\mine",
                                       optimizer_type="schedulers/mine.Opt"))  # fmt: skip
    assert config == {"network_dim": 4}


# ---- network_interop -------------------------------------------------------------------------------------------


def test_network_module_names_and_the_modules_sd_scripts_has_for_other_models():
    from library.network_interop import missing_network_module, network_module_name

    assert network_module_name(Namespace()) == network_module_name(Namespace(network_module=None)) == \
        "networks.lora_flux"  # fmt: skip
    assert missing_network_module("networks.lora_sd3", ImportError("x")).startswith(
        "--network_module networks.lora_sd3 is sd-scripts' network for SD3, which finds nothing to adapt in FLUX")
    assert missing_network_module("mine.net", ImportError("No module named 'mine'")) == \
        "--network_module mine.net: cannot import it (No module named 'mine'); is it installed?"  # fmt: skip


def test_third_party_networks_get_clip_l_under_text_model_and_a_stand_in_for_a_missing_encoder():
    from library.network_interop import CLIPFileLayout, NoTextEncoder, text_encoders_for

    clip, t5 = nn.Linear(1, 1), nn.Linear(1, 1)
    assert text_encoders_for("networks.lora_flux", [clip, t5, None]) == [clip, t5, None]  # it handles them itself
    layout, same_t5, none = text_encoders_for("lycoris.kohya", [clip, t5, None])
    assert isinstance(layout, CLIPFileLayout) and layout.text_model is clip and same_t5 is t5
    assert isinstance(none, NoTextEncoder) and list(none.modules()) == [none]
    assert [name for name, _ in layout.named_modules()] == ["", "text_model"]
    wrapped = types.SimpleNamespace(text_model=clip)  # already in the file layout (transformers 4)
    assert text_encoders_for("lycoris.kohya", [wrapped, t5]) == [wrapped, t5]
    chroma = text_encoders_for("lycoris.kohya", [None, t5])
    assert isinstance(chroma[0], NoTextEncoder) and chroma[1] is t5


def test_hooks_declaring_positional_only_keyword_only_or_more_parameters_get_what_they_declare():
    from library.network_interop import network_hook

    text_encoders, dit, calls = ["clip", "t5"], nn.Linear(1, 1), []

    class Net:
        def on_epoch_start(self, unet, /):
            calls.append(("positional only", unet))

        def on_step_start(self, *, every=1):
            calls.append(("keyword only", every))

    class More:
        def on_epoch_start(self, text_encoder, unet, extra=None):
            calls.append(("more", text_encoder, unet, extra))

        def on_step_start(self):
            pass

    def unreadable(*args):
        calls.append(("unreadable", *args))

    unreadable.__signature__ = "no signature"  # inspect.signature raises TypeError
    for network in (Net(), More(), types.SimpleNamespace(on_epoch_start=unreadable)):
        network_hook(network, "on_epoch_start", text_encoders, dit)()
    network_hook(Net(), "on_step_start", text_encoders, dit)()
    assert network_hook(types.SimpleNamespace(), "on_step_start", text_encoders, dit)() is None
    assert calls == [("positional only", dit), ("more", text_encoders, dit, None),
                     ("unreadable", text_encoders, dit), ("keyword only", 1)]  # fmt: skip


def test_loaded_weights_are_reported_with_their_counts_and_an_unreadable_file_only_warns(tmp_path, caplog):
    from library.network_interop import report_loaded_weights
    from library.safetensors_io import save_safetensors

    path = str(tmp_path / "lora.safetensors")
    save_safetensors({"lora_unet_a.lora_down.weight": torch.zeros(1), "lora_unet_b.lora_down.weight": torch.zeros(1),
                      "lora_unet_c.lora_down.weight": torch.zeros(1)}, path)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        report_loaded_weights(path, {"unexpected keys": ["lora_unet_b.lora_down.weight", "lora_unet_c.lora_down"
                                     ".weight"], "missing keys": ["lora_unet_x.lokr_w1", "lora_unet_y.lokr_w1",
                                                                  "lora_unet_z.lokr_w1"]})  # fmt: skip
        report_loaded_weights(path, types.SimpleNamespace(unexpected_keys=["lora_unet_q.w"]))  # not torch's result
    assert caplog.messages == [
        f"--network_weights {path}: 2 weights have no module here and are ignored (e.g. lora_unet_b.lora_down.weight)",
        f"--network_weights {path}: 3 weights of this network are not in the file and start untrained (e.g. "
        "lora_unet_x.lokr_w1)",
    ]
    alphas = str(tmp_path / "alphas.safetensors")
    save_safetensors({"lora_unet_a.alpha": torch.zeros(1)}, alphas)
    report_loaded_weights(alphas, {})  # every weight fitted, though none but an alpha: nothing to refuse
    caplog.clear()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):  # the module loaded it its own way: no names to compare, a warning
        report_loaded_weights(str(damaged), types.SimpleNamespace(unexpected_keys=["k.alpha"], missing_keys=[]))
    assert caplog.messages == [f"--network_weights {damaged}: 1 weights have no module here and are ignored (e.g. "
                               "k.alpha)"]  # fmt: skip
    with pytest.raises(UserError) as ei:  # none fits: the first that does not is named
        report_loaded_weights(path, types.SimpleNamespace(unexpected_keys=[
            "lora_unet_a.lora_down.weight", "lora_unet_b.lora_down.weight", "lora_unet_c.lora_down.weight"],
            missing_keys=[]))  # fmt: skip
    assert str(ei.value).startswith(f"--network_weights {path}: none of its weights belongs to this network (e.g. "
                                    "lora_unet_a.lora_down.weight); give a file")  # fmt: skip
