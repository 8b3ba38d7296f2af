"""bench/gpu_checks.py on the CPU: the checks a GPU session runs work end to end and are recorded
(the GPU figures themselves are in bench/RESULTS.md)."""

import json

from bench import gpu_checks


def test_fp8_and_trainer_checks_pass_and_are_recorded(tmp_path):
    out = tmp_path / "checks.jsonl"
    assert gpu_checks.main(["--device", "cpu", "--checks", "fp8,trainer", "--out", str(out)]) == 0
    fp8, trainer = [json.loads(line) for line in out.read_text().splitlines()]
    assert fp8["check"] == "fp8" and fp8["ok"]
    assert fp8["relative_error"]["scaled"] < fp8["relative_error"]["plain"]
    assert trainer["runs"]["fp8_swap"] == {"exit": 0, "lora_finite": True, "samples": 1}


def test_a_failing_check_is_reported_and_counted(tmp_path, monkeypatch):
    def broken(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_checks.CHECKS, "fp8", broken)
    out = tmp_path / "checks.jsonl"
    assert gpu_checks.main(["--device", "cpu", "--checks", "fp8", "--out", str(out)]) == 1
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert not result["ok"] and result["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
