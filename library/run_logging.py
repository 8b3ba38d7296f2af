"""How a run reports: console logging (and --console_log_file), and the trackers accelerate logs to
(TensorBoard, wandb) with sd-scripts' run folder and options."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

from library.errors import UserError

SECRET_ARGS = frozenset({"wandb_api_key", "huggingface_token"})  # never logged nor written to a file
# files and folders, left out of --log_config (they name users, machines and projects) whatever their form
PATH_ARGS = frozenset({
    "pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "vae", "dataset_config", "train_data_dir",
    "reg_data_dir", "conditioning_data_dir", "in_json", "output_dir", "logging_dir", "tokenizer_cache_dir",
    "network_weights", "base_weights", "resume", "sample_prompts", "config_file", "output_config",
    "log_tracker_config", "metadata_thumbnail", "console_log_file",
})  # fmt: skip
logger = logging.getLogger(__name__)


@contextmanager
def quiet_loggers(*names: str):
    """Holds back the info lines and warnings of the loggers ``names`` (errors still show): for a rehearsal
    or a check whose real run prints them once."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (GUIs and tests swap it), through tqdm, which
    lifts its progress bars out of the way and draws them again below (a line was glued onto the bar)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class HeldRecords(logging.Handler):
    """Holds what is logged while the arguments are read (the config file's warnings), before the
    logging they choose (``console_log_*``, which the config file may set) exists: inside ``with``, the
    root logger's handlers are this one alone; :meth:`replay` then sends the records where
    :func:`setup_logging` put the run's logging, from the first process only. Should reading fail,
    they are replayed at once, to the handlers there were."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> HeldRecords:
        root = logging.getLogger()
        self._handlers, self._level = root.handlers[:], root.level
        root.handlers[:] = [self]
        root.setLevel(logging.NOTSET)  # every record is held: the level the run asks for filters the replay
        return self

    def __exit__(self, error_type, *_) -> None:
        root = logging.getLogger()
        root.handlers[:] = self._handlers
        root.setLevel(self._level)
        if error_type is not None:
            self.replay()

    def replay(self) -> None:
        root = logging.getLogger()
        records, self.records = self.records, []
        for record in records:
            if first_launched_process() and record.levelno >= root.getEffectiveLevel():
                root.handle(record)


def first_launched_process() -> bool:
    """Whether this is the first of the processes ``accelerate launch`` started (or the only process),
    known before the Accelerator exists: for the work one process does before it (messages, clean-up)."""
    return os.environ.get("RANK", "0") == "0"


def tolerant_stdout() -> None:
    """Lets paths and captions print whatever stdout's encoding: redirected on Windows (a GUI, ``> log``) it
    encodes with the locale's code page and strictly, so a name outside it raised UnicodeEncodeError after
    the work was done (stderr already escapes what it cannot encode)."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def setup_logging(args) -> None:
    """Console (and --console_log_file) logging; installed once, beside any handlers the caller has. Of
    several processes, the first writes the log file (the others would repeat each of its lines)."""
    root = logging.getLogger()
    level = getattr(logging, (getattr(args, "console_log_level", None) or "INFO").upper())
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "flux_trainer", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [_StderrHandler()]
    if getattr(args, "console_log_file", None) and first_launched_process():
        path = args.console_log_file
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            handlers.append(logging.FileHandler(path, encoding="utf-8"))
        except OSError as e:
            raise UserError(f"--console_log_file {path}: cannot write it ({e.strerror or e})") from None
    simple = getattr(args, "console_log_simple", False)
    formatter = logging.Formatter("%(message)s" if simple else "%(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.flux_trainer = True
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def record_in_log_file(message: str, level: int = logging.INFO) -> None:
    """Adds a message printed to the console (the run's outcome: where the LoRA went, its error, or where it
    stopped) to the --console_log_file, which otherwise ends without it."""
    record = logging.makeLogRecord({"name": "train_network", "msg": message, "levelno": level,
                                    "levelname": logging.getLevelName(level)})  # fmt: skip
    for handler in logging.getLogger().handlers:
        if getattr(handler, "flux_trainer", False) and isinstance(handler, logging.FileHandler):
            handler.handle(record)


def tracker_names(args):
    """accelerate's ``log_with`` from --log_with and --logging_dir (tensorboard when only the folder is given)."""
    log_with = args.log_with
    if log_with is None:
        return "tensorboard" if args.logging_dir else None
    if log_with in ("tensorboard", "all") and not args.logging_dir:
        raise UserError(f"--log_with {log_with} needs --logging_dir")
    if log_with in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(f"--log_with {log_with} needs wandb: pip install wandb") from None
    return ["tensorboard", "wandb"] if log_with == "all" else log_with


def process_group_kwargs(args) -> list:
    """--ddp_timeout as accelerate's process-group kwargs."""
    if not args.ddp_timeout:
        return []
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout))]


def run_logging_dir(args) -> str | None:
    """sd-scripts' run folder: <logging_dir>/<log_prefix><YYYYmmddHHMMSS>."""
    if not args.logging_dir:
        return None
    return os.path.join(args.logging_dir, f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def read_tracker_config(args) -> dict:
    """The tables of --log_tracker_config (empty without it); a missing or malformed file stops with its name."""
    if not args.log_tracker_config:
        return {}
    import toml

    if not os.path.isfile(args.log_tracker_config):
        raise UserError(f"--log_tracker_config {args.log_tracker_config}: file not found")
    try:
        with open(args.log_tracker_config, encoding="utf-8-sig") as f:
            return toml.load(f)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--log_tracker_config {args.log_tracker_config}: not valid TOML ({e})") from None


def tracker_init_kwargs(args) -> dict:
    """--log_tracker_config, --wandb_run_name and the wandb login of --wandb_api_key."""
    kwargs = read_tracker_config(args)
    if args.wandb_run_name:
        kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    if args.wandb_api_key:
        if getattr(args, "log_with", None) in ("wandb", "all"):
            import wandb

            wandb.login(key=args.wandb_api_key)
        else:
            logger.warning("--wandb_api_key is not used: wandb logs only with --log_with wandb or all")
    return kwargs


def _holds_a_path(value) -> bool:
    if isinstance(value, os.PathLike):
        return True
    if isinstance(value, str):
        return "/" in value or os.path.sep in value
    return isinstance(value, (list, tuple)) and any(_holds_a_path(v) for v in value)


def loggable_config(args) -> dict:
    """--log_config: the arguments, without secrets and paths (the path options by name, and any other
    value that holds a path)."""
    return {
        k: (str(v) if not isinstance(v, (int, float, str, bool)) else v)
        for k, v in vars(args).items()
        if v is not None and k not in SECRET_ARGS | PATH_ARGS and not _holds_a_path(v)
    }
