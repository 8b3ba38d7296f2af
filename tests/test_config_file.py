"""--config_file (a TOML of arguments, as GUIs and sd-scripts write them) and --output_config."""

import errno
import json
import logging
import os
import re

import pytest
import toml

import flux_train_network
from library.config_file import parse_args_with_config
from library.errors import UserError


def test_config_file_sections_are_flattened_and_the_command_line_wins(tmp_path, caplog):
    config = tmp_path / "run.toml"
    config.write_text(
        "[training]\nmax_train_steps = 77\nlearning_rate = 0.5\n[network]\nnetwork_dim = 8\n"
        "network_args = ['img_attn_dim=4']\n[gui]\nsome_gui_setting = 3\n"
    )
    parser = flux_train_network.setup_parser()
    args = parse_args_with_config(parser, ["--config_file", str(config), "--learning_rate", "0.1"])
    assert args.max_train_steps == 77
    assert args.learning_rate == 0.1  # the command line overrides the file
    assert args.network_dim == 8 and args.network_args == ["img_attn_dim=4"]
    assert "some_gui_setting" in caplog.text  # unknown keys warn instead of failing
    assert parser.get_default("max_train_steps") == 1600  # the parser is left as it was


@pytest.mark.parametrize("line, message", [
    ('cache_latents_to_disk = "false"', "cache_latents_to_disk = 'false': give true or false, without quotes"),
    ("cache_latents_to_disk = 2", "cache_latents_to_disk = 2: give true or false, without quotes"),
    ("max_train_steps = 1.5", "max_train_steps = 1.5: invalid literal for int()"),
    ("max_train_steps = true", "max_train_steps = True: expected a value, not true or false"),
    ("max_train_steps = [2]", "max_train_steps = [2]: expected one value, not a list"),  # was a TypeError later
])
def test_config_file_values_that_mean_something_else_stop(tmp_path, line, message):
    """A quoted "false" would turn a flag on; a fraction of a step has no meaning."""
    config = tmp_path / "run.toml"
    config.write_text(line + "\n")
    with pytest.raises(UserError) as e:
        parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert str(e.value).startswith(f"{config}: {message}")


def test_config_file_values_outside_the_choices_warn_and_keep_the_default(tmp_path, caplog):
    # GUIs write every option they show: kohya_ss writes dynamo_backend = "no" and an int for a checkbox
    config = tmp_path / "run.toml"
    config.write_text('dynamo_backend = "no"\nmixed_precision = "fp32"\nsave_model_as = "bin"\n'
                      "persistent_data_loader_workers = 1\ncache_latents = 0\ntext_encoder_lr = [1, 2]\n")  # fmt: skip
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert (args.dynamo_backend, args.mixed_precision, args.save_model_as) == ("no", "no", "safetensors")
    assert "dynamo_backend" not in caplog.text  # "no" is a choice: accelerate's, kohya_ss writes it on every run
    assert f"{config}: save_model_as = 'bin' is not one of 'ckpt', 'pt', 'safetensors'" in caplog.text
    assert "mixed_precision = 'fp32' is not one of 'no', 'fp16', 'bf16'; the default 'no' is used" in caplog.text
    assert args.persistent_data_loader_workers is True and args.cache_latents is False
    assert args.text_encoder_lr == [1.0, 2.0] and all(type(rate) is float for rate in args.text_encoder_lr)


def test_config_file_values_take_the_options_types(tmp_path, caplog):
    config = tmp_path / "run.toml"
    config.write_text("max_train_steps = 10.0\nlr_warmup_steps = 1.0\nlr_decay_steps = 20.0\noutput_name = 2024\n"
                      "learning_rate = 1\n"
                      "max_token_length = 75\n")  # fmt: skip
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert args.max_train_steps == 10 and type(args.max_train_steps) is int
    # a float up to 1 is a ratio, as sd-scripts reads it: kohya_ss writes its warmup slider's 100% as 1.0
    assert args.lr_warmup_steps == 1.0 and type(args.lr_warmup_steps) is float
    assert args.lr_decay_steps == 20 and type(args.lr_decay_steps) is int  # above 1: steps
    assert args.output_name == "2024" and args.learning_rate == 1.0 and type(args.learning_rate) is float
    assert args.max_token_length is None  # not one of sd-scripts' 150, 225: it has no effect for FLUX anyway
    assert "max_token_length" not in caplog.text  # and kohya_ss writes 75 on every run: no warning


def test_config_file_single_values_of_list_options_and_a_name_without_suffix(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('text_encoder_lr = 1e-5\nnetwork_args = "img_attn_dim=4"\n')
    # sd-scripts adds .toml to a --config_file given without it
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(tmp_path / "run")])
    assert args.text_encoder_lr == [1e-5] and args.network_args == ["img_attn_dim=4"]  # lists, as on the command line


def test_config_file_resolution_may_be_written_as_in_a_dataset_config(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("resolution = [64, 48]\nface_crop_aug_range = [2.0, 4.0]\n")
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert args.resolution == "64,48"  # the command line's form, recorded as such in the metadata
    assert args.face_crop_aug_range == "2.0,4.0"


def test_output_config_into_a_new_folder_creates_it_and_a_blocked_one_is_one_message(tmp_path):
    config = tmp_path / "configs" / "saved.toml"
    with pytest.raises(SystemExit):
        parse_args_with_config(flux_train_network.setup_parser(),
                               ["--config_file", str(config), "--output_config", "--network_dim", "12"])  # fmt: skip
    assert toml.load(config) == {"network_dim": 12}
    (tmp_path / "a_file").write_text("x")
    blocked = tmp_path / "a_file" / "saved.toml"
    with pytest.raises(UserError, match=rf"^--output_config: cannot write {re.escape(str(blocked))} \("):
        parse_args_with_config(flux_train_network.setup_parser(),
                               ["--config_file", str(blocked), "--output_config"])  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["a_file", "configs"] and os.listdir(tmp_path / "configs") == ["saved.toml"]


def test_output_config_under_several_processes_is_written_by_the_first(tmp_path, monkeypatch):
    """Every process raced to write it: one wrote it, the next stopped with "exists already" (exit 1)."""
    config = tmp_path / "saved.toml"
    argv = ["--config_file", str(config), "--output_config", "--network_dim", "12"]
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        parse_args_with_config(flux_train_network.setup_parser(), argv)
    assert exited.value.code == 0 and not config.exists()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        parse_args_with_config(flux_train_network.setup_parser(), argv)
    assert toml.load(config) == {"network_dim": 12}


@pytest.mark.parametrize("first_line", ["network_dim = 8", "[network]\nnetwork_dim = 8"])
def test_config_file_with_a_bom_reads_its_first_key(tmp_path, first_line):
    config = tmp_path / "bom.toml"
    config.write_text("\ufeff" + first_line + "\nnetwork_alpha = 8\n", encoding="utf-8")
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert (args.network_dim, args.network_alpha) == (8, 8)


def test_output_config_writes_the_arguments(tmp_path, caplog):
    config = tmp_path / "saved.toml"
    argv = ["--config_file", str(config), "--output_config", "--network_dim", "12", "--wandb_api_key", "KEY"]
    with pytest.raises(SystemExit) as done:
        parse_args_with_config(flux_train_network.setup_parser(), argv)
    assert done.value.code == 0
    # what differs from the defaults, and no API key
    assert toml.load(config) == {"network_dim": 12}
    assert "wandb_api_key not written" in caplog.text
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert args.network_dim == 12 and args.max_train_steps == 1600
    # an existing file, hand-written or not, is never replaced
    with pytest.raises(UserError, match=r"--output_config: .*saved\.toml exists already"):
        parse_args_with_config(flux_train_network.setup_parser(), [*argv[:3], "--network_dim", "4"])
    assert toml.load(config) == {"network_dim": 12}


def test_output_config_that_fails_to_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk part-way through --output_config: one message, and neither the file nor its .tmp."""
    from library.config_file import parse_args_with_config

    def full_disk(values, f, **kwargs):
        f.write("network_dim = ")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(toml, "dump", full_disk)
    config = tmp_path / "saved.toml"
    with pytest.raises(UserError, match=r"^--output_config: cannot write .*saved\.toml \(No space left on device\)$"):
        parse_args_with_config(flux_train_network.setup_parser(),
                               ["--config_file", str(config), "--output_config", "--network_dim", "12"])  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_output_config_round_trips_windows_paths(tmp_path):
    """toml 0.10 wrote D:\\xl\\out with a \\x escape that it then refused to read (and \\t became a tab)."""
    config = tmp_path / "saved.toml"
    paths = {"output_dir": "D:\\xl\\out", "train_data_dir": "D:\\train\\x_person", "output_name": 'caf\u00e9 "1"'}
    argv = ["--config_file", str(config), "--output_config"]
    argv += [x for key, value in paths.items() for x in (f"--{key}", value)]
    with pytest.raises(SystemExit):
        parse_args_with_config(flux_train_network.setup_parser(), argv)
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert {key: getattr(args, key) for key in paths} == paths


def test_config_file_empty_strings_of_list_options_are_not_given(tmp_path):
    """GUIs write an unused list option as ""; sd-scripts reads it as none given (here it stopped the run)."""
    config = tmp_path / "run.toml"
    keys = ("network_args", "optimizer_args", "lr_scheduler_args", "base_weights", "base_weights_multiplier")
    config.write_text("".join(f'{key} = ""\n' for key in keys))
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config)])
    assert {key: getattr(args, key) for key in keys} == dict.fromkeys(keys)


def test_config_file_warnings_reach_the_log_file_from_the_first_process_only(tmp_path, capsys, monkeypatch):
    """They were logged before the run's logging existed: bare lines on stderr, none in --console_log_file
    (the BF16 one explains an fp32 run), and one per process under accelerate launch."""
    import train_network

    log = tmp_path / "log.txt"
    config = tmp_path / "run.toml"
    config.write_text(f'mixed_precision = "BF16"\nfoo_bar = 1\nconsole_log_file = {json.dumps(str(log))}\n')
    # train_network.py trains no model: it stops right after setting up the logging
    assert train_network.main(["--config_file", str(config)]) == 1
    lines = log.read_text().splitlines()
    assert lines[0].startswith(f"WARNING library.config_file: {config}: mixed_precision = 'BF16' is not one of")
    assert lines[1] == f"WARNING library.config_file: {config}: unknown key 'foo_bar' ignored"
    assert capsys.readouterr().err.count("unknown key 'foo_bar' ignored") == 1
    log.unlink()
    monkeypatch.setenv("RANK", "1")
    assert train_network.main(["--config_file", str(config)]) == 1
    assert "foo_bar" not in capsys.readouterr().err and not log.exists()


def test_max_train_steps_on_the_command_line_beats_the_files_max_train_epochs(tmp_path, caplog):
    """The examples set max_train_epochs: a --max_train_steps 3 to try one out was not used (40 steps ran)."""
    config = tmp_path / "run.toml"
    config.write_text("max_train_epochs = 10\n")

    def parse(*argv):
        return parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(config), *argv])

    with caplog.at_level(logging.INFO):
        args = parse("--max_train_steps", "3")
    assert (args.max_train_steps, args.max_train_epochs) == (3, None)
    assert caplog.messages == ["--max_train_steps 3 on the command line: the file's max_train_epochs = 10 is not used"]
    assert parse().max_train_epochs == 10  # the file alone, or epochs on the command line too: epochs decide
    assert parse("--max_train_steps", "3", "--max_train_epochs", "2").max_train_epochs == 2
    # typed, not merely other than the default
    assert parse("--max_train_steps", "1600").max_train_epochs is None
    assert parse("--max_train_steps=1600").max_train_epochs is None


def test_the_files_info_lines_reach_the_run_log_too(tmp_path, capsys):
    """Held until the run's logging existed, they met the root logger's default WARNING level and were dropped."""
    import train_network

    log = tmp_path / "log.txt"
    config = tmp_path / "run.toml"
    config.write_text(f"max_train_epochs = 10\nconsole_log_file = {json.dumps(str(log))}\n")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # a fresh process's, whatever earlier tests left
    try:
        assert train_network.main(["--config_file", str(config), "--max_train_steps", "3"]) == 1  # trains no model
    finally:
        root.setLevel(level)
    message = "--max_train_steps 3 on the command line: the file's max_train_epochs = 10 is not used"
    assert f"INFO library.config_file: {message}" in log.read_text().splitlines()
    assert message in capsys.readouterr().err


def test_the_files_warnings_are_shown_when_the_log_file_cannot_be_written(tmp_path, capsys, caplog):
    """They were held for the run's logging, which then failed to start: they were lost."""
    import train_network

    (tmp_path / "a_file").write_text("x")
    config = tmp_path / "run.toml"
    config.write_text(f"foo_bar = 1\nconsole_log_file = {json.dumps(str(tmp_path / 'a_file' / 'log.txt'))}\n")
    assert train_network.main(["--config_file", str(config)]) == 1
    assert "error: --console_log_file" in capsys.readouterr().err
    assert f"{config}: unknown key 'foo_bar' ignored" in caplog.messages  # where the handlers there are put it


def test_output_config_of_a_path_with_undecodable_bytes_is_one_message(tmp_path):
    """Such a path (bytes of another encoding in a POSIX name) has no UTF-8 form: it was a traceback."""
    config = tmp_path / "saved.toml"
    with pytest.raises(UserError, match=r"^--output_config: cannot write .*saved\.toml \("):
        argv = ["--config_file", str(config), "--output_config", "--output_dir", "out\udcff"]
        parse_args_with_config(flux_train_network.setup_parser(), argv)
    assert os.listdir(tmp_path) == []


def test_the_files_warnings_are_shown_when_reading_the_arguments_fails(tmp_path, caplog):
    """A value that stops the run after a warning: the warning was held, and lost with the error."""
    import train_network

    config = tmp_path / "run.toml"
    config.write_text('foo_bar = 1\nlearning_rate = "abc"\n')
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # a fresh process's
    try:
        assert train_network.main(["--config_file", str(config)]) == 1
        assert root.level == logging.WARNING  # and the root logger is as it was (GUIs call main again)
    finally:
        root.setLevel(level)
    assert f"{config}: unknown key 'foo_bar' ignored" in caplog.messages


def test_held_lines_below_the_console_log_level_stay_unshown(tmp_path, capsys):
    import train_network

    config = tmp_path / "run.toml"
    config.write_text("max_train_epochs = 10\n")
    argv = ["--config_file", str(config), "--max_train_steps", "3", "--console_log_level", "WARNING"]
    assert train_network.main(argv) == 1  # train_network.py trains no model
    assert "is not used" not in capsys.readouterr().err


@pytest.mark.parametrize("text, steps", [
    ("[a]\nmax_train_steps = 5\n[b]\nmax_train_steps = 9\n", 9),  # a later section wins
    ("[a]\n[a.b]\nmax_train_steps = 7\n", 7),  # nested sections flatten too (sd-scripts flattens one level)
])  # fmt: skip
def test_sections_flatten_and_the_later_one_wins(tmp_path, text, steps):
    (tmp_path / "r.toml").write_text(text)
    args = parse_args_with_config(flux_train_network.setup_parser(), ["--config_file", str(tmp_path / "r.toml")])
    assert args.max_train_steps == steps


def test_output_config_needs_config_file():
    with pytest.raises(UserError, match="--output_config needs --config_file"):
        parse_args_with_config(flux_train_network.setup_parser(), ["--output_config"])
