"""Run one benchmark case in a child process, so that a CUDA fault (which ends the CUDA context)
costs that case alone. The child appends its own JSON line to the results file; a child that dies
without one is recorded here with its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def recorded_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def run_in_child(script: str, argv: list[str], out: str, failure: dict) -> tuple[dict, bool]:
    """Runs ``python script *argv`` and returns (the line it appended to ``out``, True), or, when it
    appended none, (``failure`` with the exit status added, False); the caller records the latter."""
    before = len(recorded_lines(out))
    code = subprocess.run([sys.executable, os.path.abspath(script), *argv], check=False).returncode
    lines = recorded_lines(out)[before:]
    if lines:
        return json.loads(lines[-1]), True
    return {**failure, "error": f"the process running it exited with status {code} and no result"}, False
