"""bench/check_pool.py and the pooled token checks of bench/gpu_check.py (on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.check_pool import Unit, run_pool
from tests.helpers.processes import wait_gone

REPO = Path(__file__).resolve().parents[2]


def _unit(name: str, code: str) -> Unit:
    return Unit(name, [sys.executable, "-c", code])


WRITES = (
    "import json, os, sys; rec = {'section': sys.argv[1], 'check': 'c', 'ok': True, 'detail': ''}; "
    "open(os.environ['CHECK_RECORDS'], 'w').write(json.dumps([rec]))"
)


def test_records_come_back_in_the_units_order_whatever_ends_first():
    slow = _unit("slow", "import time; time.sleep(1.0); " + WRITES)
    slow.argv.append("slow")
    fast = _unit("fast", WRITES)
    fast.argv.append("fast")
    ended: list[str] = []
    records = run_pool([slow, fast], 2, 30, on_done=lambda name, recs, s: ended.append(name))
    assert [r["section"] for r in records] == ["slow", "fast"]
    assert ended == ["fast", "slow"]  # both ran at once


def test_a_unit_without_records_is_a_failure_with_its_output():
    records = run_pool([_unit("boom", "print('about to fail'); raise SystemExit(3)")], 1, 30)
    assert len(records) == 1 and records[0]["ok"] is False
    assert records[0]["section"] == "boom"
    assert "exit 3" in records[0]["detail"] and "about to fail" in records[0]["detail"]


def test_a_unit_past_its_time_is_killed_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    start = time.monotonic()
    records = run_pool([_unit("stuck", code)], 1, 2.0)
    assert time.monotonic() - start < 20
    assert records[0]["ok"] is False and "killed after 2 s" in records[0]["detail"]
    grandchild = int(pid_file.read_text())
    assert _gone(grandchild)


def _gone(pid: int) -> bool:
    """Whether the process ends (or is a zombie, which init reaps) within 5 s."""
    try:
        return not wait_gone([psutil.Process(pid)], timeout=5.0)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_gpu_check_pools_its_token_checks(tmp_path):
    """The GPU check's harness, dry-run on the CPU: two tiny models as two units side by
    side, each against transformers with graphs (a CPU engine has none) and eagerly."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OUT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--sections", "tiny",
           "--archs", "llama,gpt2", "--jobs", "2"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = sorted(r["check"] for r in records if r["section"] == "tiny")
    assert checks == [f"{a} fp32 {m}" for a in ("gpt2", "llama") for m in ("eager", "graphs")]
    assert all(r["ok"] for r in records if r["section"] == "tiny")
    assert "[tiny-llama] took" in out.stdout and "[tiny-gpt2] took" in out.stdout


def test_a_sigterm_to_the_pool_ends_its_units(tmp_path):
    pid_file = tmp_path / "unit.pid"
    pool = (
        "import sys; from bench.check_pool import Unit, run_pool; "
        "code = \"import os, time; open(os.environ['PIDF'], 'w').write(str(os.getpid())); "
        'time.sleep(60)"; '
        "run_pool([Unit('u', [sys.executable, '-c', code])], 1, 120)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), PIDF=str(pid_file))
    parent = subprocess.Popen([sys.executable, "-c", pool], env=env)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    unit = int(pid_file.read_text())
    parent.terminate()
    assert parent.wait(timeout=20) == 128 + 15
    assert _gone(unit)


def test_what_a_finished_unit_left_running_is_ended(tmp_path):
    pid_file = tmp_path / "left.pid"
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )  # exits at once, its child still sleeping
    records = run_pool([_unit("leaves", code)], 1, 30)
    assert records[0]["ok"] is False and "no records" in records[0]["detail"]
    left = int(pid_file.read_text())
    assert _gone(left)
