"""How a run reports: --log_config without secrets or paths, --wandb_api_key only for wandb, and the
keys wandb's logs carry (sd-scripts' dashboards plot against global_step and epoch)."""

import logging
import os
import sys
import types
from argparse import Namespace

import pytest
import torch

import flux_train_network
from library.run_logging import loggable_config, tracker_init_kwargs
from tests.training_helpers import base_argv, dataset


def test_log_config_leaves_out_secrets_and_every_path():
    home = os.path.join(os.sep, "home", "me")
    args = flux_train_network.setup_parser().parse_args([
        "--pretrained_model_name_or_path", "flux1-dev.safetensors",  # a path option, even without a separator
        "--dataset_config", os.path.join(home, "data.toml"),  # a pathlib.Path
        "--output_dir", "out", "--base_weights", os.path.join(home, "a.safetensors"),  # a list of paths
        "--wandb_api_key", "KEY", "--network_dim", "8", "--network_args", "img_attn_dim=4",
        "--optimizer_args", "betas=0.9,0.99", "--log_config",
        # paths in options that are not path options: a string, and an item of a list
        "--lr_scheduler_type", "schedulers/mine.py", "--lr_scheduler_args", f"table={home}/t.csv", "warmup=3",
    ])  # fmt: skip
    config = loggable_config(args)
    assert config["network_dim"] == 8 and config["network_args"] == "['img_attn_dim=4']"
    assert config["optimizer_args"] == "['betas=0.9,0.99']" and config["log_config"] is True
    for left_out in ("pretrained_model_name_or_path", "dataset_config", "output_dir", "base_weights", "wandb_api_key",
                     "lr_scheduler_type", "lr_scheduler_args"):  # fmt: skip
        assert left_out not in config
    assert not any("home" in str(v) or "KEY" in str(v) for v in config.values())


def test_wandb_run_name_joins_the_tracker_configs_wandb_table(tmp_path):
    config = tmp_path / "trackers.toml"
    config.write_text('[wandb]\nentity = "team"\nproject = "p"\n')
    args = types.SimpleNamespace(log_tracker_config=str(config), wandb_run_name="run-1", wandb_api_key=None)
    assert tracker_init_kwargs(args) == {"wandb": {"entity": "team", "project": "p", "name": "run-1"}}


@pytest.mark.parametrize("log_with, logs_in", [("wandb", True), ("all", True), (None, False), ("tensorboard", False)])
def test_wandb_api_key_logs_in_only_for_wandb(monkeypatch, caplog, log_with, logs_in):
    # a GUI's saved key beside TensorBoard logging: no login (without wandb installed it was a traceback)
    keys = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(login=lambda key: keys.append(key)))
    args = types.SimpleNamespace(log_tracker_config=None, wandb_run_name=None, wandb_api_key="KEY", log_with=log_with)
    with caplog.at_level(logging.WARNING):
        assert tracker_init_kwargs(args) == {}
    assert keys == (["KEY"] if logs_in else [])
    assert ("--wandb_api_key is not used: wandb logs only with --log_with wandb or all" in caplog.text) != logs_in


def test_wandb_logs_carry_global_step_and_epoch_and_tensorboard_does_not(tiny_model_files, tmp_path, monkeypatch):
    from accelerate.tracking import GeneralTracker

    logged = {"wandb": [], "tensorboard": []}

    class Recording(GeneralTracker):
        name, requires_logging_directory, main_process_only = "wandb", False, True

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            logged[self.name].append((step, dict(values)))

    class Tensorboard(Recording):
        name = "tensorboard"

    monkeypatch.setattr(flux_train_network.train_network, "tracker_names", lambda args: [Recording(), Tensorboard()])
    data = dataset(tmp_path, batch_size=3)
    argv = base_argv(tiny_model_files, data, str(tmp_path / "out"), steps=5)
    assert flux_train_network.main(argv) == 0
    steps = [(step, values["global_step"], values["epoch"]) for step, values in logged["wandb"]
             if "loss/current" in values]  # fmt: skip
    assert [(step, global_step) for step, global_step, _ in steps] == [(s, s) for s in range(1, 6)]
    epochs = [epoch for _, _, epoch in steps]
    assert epochs == sorted(epochs) and epochs[0] == 1 and epochs[-1] >= 2  # 1-based, as sd-scripts counts
    last_step_of = {epoch: step for step, _, epoch in steps}
    epoch_ends = [(step, values["epoch"]) for step, values in logged["wandb"] if "loss/epoch_average" in values]
    assert epoch_ends and all(last_step_of[epoch] == step for step, epoch in epoch_ends)
    assert logged["tensorboard"] and not any("global_step" in v or "epoch" in v for _, v in logged["tensorboard"])
    assert all(torch.isfinite(torch.tensor(v["loss/current"])) for _, v in logged["tensorboard"] if "loss/current" in v)


@pytest.mark.parametrize("option", ["resume", "output_dir", "network_weights", "pretrained_model_name_or_path",
                                    "sample_prompts", "logging_dir", "console_log_file"])  # fmt: skip
def test_log_config_leaves_out_path_options_given_as_bare_names(option):
    """A folder or file in the working folder has no separator, and still names the user's files."""
    from library.run_logging import loggable_config

    assert option not in loggable_config(Namespace(**{option: "my_project_v3", "network_dim": 4}))
    assert loggable_config(Namespace(network_dim=4)) == {"network_dim": 4}


def test_log_lines_leave_an_open_progress_bar_alone(capsys):
    """A line logged while the steps bar was open was glued onto the bar's line ("...it/s]INFO ...")."""
    from tqdm import tqdm

    from library.run_logging import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(Namespace())
        bar = tqdm(total=3, desc="steps", file=sys.stderr)
        bar.update()
        logging.getLogger("tests").info("validation loss (epoch): 1.0")
        bar.update()
        bar.close()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    before, line, after = err.partition("INFO tests: validation loss (epoch): 1.0\n")
    # the bar's line was blanked ("\r" + spaces + "\r") before the message was written on it
    assert line and before.endswith("\r") and before.rsplit("\r", 2)[-2].strip() == ""
    assert after.startswith("\rsteps:  33%")  # and the bar drawn again below


def test_a_closed_console_does_not_end_the_run(monkeypatch):
    """A GUI that closed the pipe it read stderr from: logging a line raised OSError in the training loop."""
    from library.run_logging import _StderrHandler

    class Closed:
        def write(self, text):
            raise OSError(32, "Broken pipe")

        def flush(self):
            raise OSError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", Closed())
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as in a run: logging reports nothing more
    _StderrHandler().emit(logging.makeLogRecord({"msg": "saved", "levelno": logging.INFO}))
