"""bench/gpu_idle.py: the device's idle gaps in a profiler trace, and whether the host
launched late; on the CPU, the profiled run's plumbing (a CPU trace has no kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from gpu_idle import analyze  # noqa: E402  (a script beside the others)


def kernel(ts: float, corr: int, name: str = "k") -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": 100.0,
            "args": {"correlation": corr}}  # fmt: skip


def call(ts: float, dur: float, name: str, corr: int | None = None) -> dict:
    args = {"correlation": corr} if corr is not None else {}
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "args": args}


def op(ts: float, dur: float, name: str) -> dict:
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


def test_gaps_are_split_by_when_the_next_kernel_was_launched():
    events = [
        kernel(0, 1), call(-10, 5, "cudaLaunchKernel", 1),
        kernel(100, 2), call(-5, 5, "cudaLaunchKernel", 2),
        # idle 200 -> 500: the host synchronized, then launched C at 450 (late)
        op(205, 210, "aten::item"), op(206, 205, "aten::_local_scalar_dense"),
        call(210, 200, "cudaStreamSynchronize"),
        kernel(500, 3, "C"), call(450, 5, "cudaLaunchKernel", 3),
        # idle 600 -> 700: D was launched at 550, before the device went idle (early)
        kernel(700, 4, "D"), call(550, 5, "cudaLaunchKernel", 4),
        kernel(810, 5), call(560, 5, "cudaLaunchKernel", 5),  # 10 us: under --gap-us
    ]  # fmt: skip
    out = analyze(events, gap_us=20)
    assert out["span_ms"] == 0.91 and out["busy_ms"] == 0.5 and out["idle_ms"] == 0.41
    assert sum(out["idle_by_tenth_ms"]) == pytest.approx(0.41, abs=0.02)
    assert out["gaps"]["late"] == {"count": 1, "idle_ms": 0.3, "late_ms": 0.25}
    assert out["gaps"]["early"] == {"count": 1, "idle_ms": 0.1}
    host = out["host_in_late_gaps"]
    assert host["calls_ms"] == {"cudaStreamSynchronize": 0.2}
    assert host["torch_ops_ms"] == {"aten::item": 0.21}  # the outermost op only
    first = out["largest_gaps"][0]
    assert first["kind"] == "late" and first["idle_us"] == 300 and first["after"] == "C"


def test_a_trace_without_kernels_says_so():
    assert "no device kernels" in analyze([op(0, 5, "aten::mm")])["error"]


def test_a_cpu_run_profiles_the_timed_generate(tiny_llama, tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "bench/gpu_idle.py", "--model", str(tiny_llama),
           "--max-model-len", "128", "--num-prompts", "2", "--input-len", "8",
           "--output-len", "4", "--keep-trace", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert Path(line["trace"]).parent == tmp_path and Path(line["trace"]).exists()
    assert "no device kernels" in line["error"]
