"""Leaving a torch.distributed group: ranks meet first, and a gone peer cannot hang it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# One rank of a two-rank gloo group; with "gone", rank 1 exits without the teardown.
RANK = """
import datetime, sys, time
import torch.distributed as dist
import executor.distributed as d
rank, store, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
d.PEER_WAIT = datetime.timedelta(seconds=5)
if rank == 1 and mode == "gone":
    sys.exit(0)
t0 = time.monotonic()
d.destroy_distributed(wait_for_peers=True)
assert not dist.is_initialized()
print(f"left after {time.monotonic() - t0:.1f} s", flush=True)
"""


def run_pair(tmp_path: Path, mode: str) -> list[tuple[int, str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), store, mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung in the teardown")
        results.append((p.returncode, out))
    return results


def test_teardown_survives_a_peer_that_left_without_it(tmp_path):
    # (the ranks that all meet are test_external_launcher's torchrun runs)
    results = run_pair(tmp_path, "gone")
    for code, out in results:
        assert code == 0, out
    assert "did not all reach the shutdown" in results[0][1]
    assert "left after" in results[0][1]
