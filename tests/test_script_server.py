"""tests/script_server.py, through run_script: each run is a process of its own with its own exit
status, output and random state, and an answer that comes at once is not waited for."""

from __future__ import annotations

from tests.conftest import run_script


def test_runs_are_separate_processes_with_their_own_results(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import os, random, sys\nprint(os.getpid(), random.random())\n"
                      "print('to stderr', file=sys.stderr)\nsys.exit(int(sys.argv[1]))\n", encoding="utf-8")
    # a child that ends at once: both answers may reach the client in one read (timeout: fail, not hang)
    first, second = (run_script(str(script), code, timeout=60) for code in ("3", "0"))
    assert (first.returncode, second.returncode) == (3, 0)
    assert first.stderr.strip().endswith("to stderr")
    (pid1, draw1), (pid2, draw2) = (p.stdout.split() for p in (first, second))
    assert pid1 != pid2 and draw1 != draw2
