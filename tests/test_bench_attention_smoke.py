"""bench/bench_attention.py on the CPU: cases that have a kernel here are checked against the math
kernel and timed; a backend without a kernel here is recorded as a failure, and the run goes on."""

import json

from bench import bench_attention


def test_cases_are_checked_timed_and_recorded(tmp_path):
    out = tmp_path / "attention.jsonl"
    argv = ["--device", "cpu", "--tokens", "128", "--steps", "1", "--warmup", "0", "--out", str(out),
            "--cases", "flash:strided,math:contiguous,cudnn:contiguous"]  # fmt: skip
    results = bench_attention.main(argv)
    recorded = [json.loads(line) for line in out.read_text().splitlines()]
    assert recorded == results
    flash, math, cudnn = recorded
    assert (flash["backend"], flash["layout"]) == ("flash", "strided")
    for case in (flash, math):
        assert case["ok"] and case["worst_relative_error"] < 1e-4 and case["ms"] > 0
    assert not cudnn["ok"] and "No viable backend" in cudnn["error"]
