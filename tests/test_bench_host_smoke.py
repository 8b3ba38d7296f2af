"""bench/bench_host.py on a shallow model: every setting is timed and its operators counted."""

import pytest

from bench import bench_host


def test_settings_are_timed_and_counted():
    pytest.importorskip("peft")
    results = bench_host.main(["--settings", "a,b,ref", "--steps", "1", "--warmup", "0", "--depth", "2", "4"])
    by_name = {r["setting"]: r for r in results}
    assert list(by_name) == ["a", "b", "ref"]
    assert all(r["ms"] > 0 and r["operators"] > 100 for r in results)
    # (b) repeats each block's forward before its backward: more operators than (a), not twice as many
    assert by_name["a"]["operators"] < by_name["b"]["operators"] < 2 * by_name["a"]["operators"]


def test_an_unknown_setting_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_host.main(["--settings", "zz"])
    assert "unknown settings ['zz']" in capsys.readouterr().err
