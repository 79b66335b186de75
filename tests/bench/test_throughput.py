"""bench/throughput.py on the CPU: the workload's tokens come back, in one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_reports_the_runs_tokens(tiny_llama) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "bench/throughput.py", "--model", str(tiny_llama),
           "--max-model-len", "128", "--num-prompts", "4", "--input-len", "16",
           "--output-len", "8"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert line["engine"] == "tessera" and line["num_prompts"] == 4
    assert line["prompt_tokens"] == 4 * 16 and line["output_tokens"] == 4 * 8
    assert "allocator" not in line  # the CUDA allocator's counters: none on a CPU worker
