"""bench/bench_dit.py at a few tokens: both models run on identical weights and the ratio is printed;
--keep-freed-memory restarts the process with glibc's tunables set (they act only at start-up)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_dit.py"


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-freed-memory"])
def test_bench_dit_prints_both_times_and_their_ratio(keep):
    pytest.importorskip("diffusers")
    argv = [sys.executable, str(SCRIPT), "--threads", "1", "--rounds", "1", "--repeats", "1",
            "--img-tokens", "16", "--txt-tokens", "8"] + (["--keep-freed-memory"] if keep else [])  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    ours = float(re.search(r"^ours\s+([\d.]+) ms", out, re.M).group(1))
    theirs = float(re.search(r"^diffusers\s+([\d.]+) ms", out, re.M).group(1))
    ratio = float(re.search(r"^ratio ours/diffusers ([\d.]+)$", out, re.M).group(1))
    assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, abs=2e-3)
    spread = re.search(r"^per-round ratios ([\d.]+)-([\d.]+), median ([\d.]+) \(95% interval ([\d.]+)-([\d.]+);",
                       out, re.M)  # fmt: skip
    low, high, median, interval_low, interval_high = map(float, spread.groups())
    assert low <= interval_low <= median <= interval_high <= high
    assert ("freed memory kept" in out) == keep  # printed when the process runs with the tunables set


def test_median_interval_brackets_the_median_and_narrows_with_more_rounds():
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_dit import median_interval

    noisy = [0.9 + 0.1 * ((i * 37) % 11 - 5) / 5 for i in range(30)]  # 0.8 to 1.0, median 0.9
    low, high = median_interval(noisy)
    assert low < 0.9 < high and 0.8 <= low and high <= 1.0
    wide = high - low
    low, high = median_interval(noisy * 4)  # the same spread over four times the rounds
    assert low <= 0.9 <= high and high - low < wide
    assert median_interval([0.93] * 5) == (0.93, 0.93)
