"""Stopping a training run cleanly on SIGINT / SIGTERM.

The first signal asks the loop to stop after the current micro-batch, where it saves the weights
of the last finished step; a second one ends the process at once (every file is written under a
temporary name and renamed, so even that leaves nothing half-written under a final name). A repeat
within ``REPEAT_GRACE_S`` of the first is taken as the same request: under ``accelerate launch`` a
worker often gets one signal twice, from the launcher and from whoever signalled the whole job
(``kill`` of the process group, SLURM, systemd). In a multi-process run the request is shared with
an all-reduce after each micro-batch, so every process stops at the same place.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch

logger = logging.getLogger(__name__)

# SIGBREAK (Windows): Ctrl+Break, and the console event a parent process sends to stop a child (SIGTERM never
# comes from outside there)
HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))
REPEAT_GRACE_S = 3.0


class GracefulStop:
    """Context manager that turns the first SIGINT/SIGTERM into a stop request."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._received_at = signum, time.monotonic()
            logger.warning("%s received: stopping after the current micro-batch and saving; send it again (after "
                           "%g s) to exit at once", signal.Signals(signum).name, REPEAT_GRACE_S)  # fmt: skip
            return
        if time.monotonic() - self._received_at < REPEAT_GRACE_S:
            return  # the same request delivered twice
        if sys.platform == "win32":  # os.kill there is TerminateProcess with the signal number as the exit status
            os._exit(128 + signum)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def requested(self, accelerator) -> bool:
        """Whether any process got a signal (a collective call in multi-process runs); a process that
        got none takes on the signal another one got, to report it."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flags = torch.tensor([float(self.signum == s) for s in HANDLED], device=accelerator.device)
        received = [s for s, count in zip(HANDLED, accelerator.reduce(flags, reduction="sum").tolist(), strict=True)
                    if count > 0]  # fmt: skip
        if received and self.signum is None:
            self.signum = received[0]
        return bool(received)
