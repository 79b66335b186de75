"""bench/ab.sh: one command in an older tree and in this one, each side's log kept."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_runs_the_command_in_each_tree_and_keeps_both_logs(tmp_path):
    base = tmp_path / "base"
    (base / "bench").mkdir(parents=True)
    script = 'import json, os; print(json.dumps({"tree": os.path.basename(os.getcwd())}))\n'
    (base / "bench" / "where.py").write_text(script)
    (tmp_path / "out").mkdir()
    # this tree has no bench/where.py: its side fails, and the output says so
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "ab.sh"), str(base), "t", "python3", "bench/where.py"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert '=== t before (exit 0)\n{"tree": "base"}' in result.stdout
    assert "=== t after (exit 2)" in result.stdout
    assert (tmp_path / "out" / "t.before.log").read_text().strip() == '{"tree": "base"}'
    assert "where.py" in (tmp_path / "out" / "t.after.log").read_text()
