"""bench/eager_glue.py: an eager forward's host time with every kernel launch stubbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_times_a_layers_python_and_counts_its_launches() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "bench/eager_glue.py", "--layers", "2", "--tokens", "16", "--reps", "3"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert row["arch"] == "qwen3" and row["tokens"] == 16 and row["layers"] == 2
    # a Qwen3 layer at 16 tokens: two norms, four skinny GEMMs, q/k norm + rotary + KV
    # write, attention, SiLU; the embedding and the final norm spread over the layers
    assert 9 <= row["launches_per_layer"] <= 12
    assert 0 < row["us_per_layer"] <= row["us_per_layer_median"]
