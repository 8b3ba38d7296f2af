"""bench/child_runs.py: a case run in a child process comes back as the line it recorded, and a
child that dies without one comes back as a failure naming its exit status."""

import json

from bench.child_runs import run_in_child


def test_a_recorded_line_and_a_dead_child(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"case": "earlier"}) + "\n")
    script = tmp_path / "case.py"
    script.write_text(
        "import json, sys\n"
        "if sys.argv[1] == 'die':\n"
        "    sys.exit(3)\n"
        f"open({str(out)!r}, 'a').write(json.dumps({{'case': sys.argv[1], 'ms': 1.5}}) + '\\n')\n"
    )
    assert run_in_child(str(script), ["fine"], str(out), {"case": "fine"}) == ({"case": "fine", "ms": 1.5}, True)
    result, recorded = run_in_child(str(script), ["die"], str(out), {"case": "die", "ok": False})
    assert not recorded
    assert result == {"case": "die", "ok": False, "error": "the process running it exited with status 3 and no result"}
