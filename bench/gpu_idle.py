"""Where the GPU waits: a throughput workload's timed generate under the torch profiler
in the worker, then the device's idle time, when it falls, and for each idle gap
whether the host launched the next kernel late (the host was the limit) and what the
host did in the meantime.

    python bench/gpu_idle.py --model $M/qwen3-0.6b --load-format dummy --dtype bfloat16 \
        --max-model-len 4096 --dataset nano-vllm --num-prompts 256 --temperature 0.6 \
        [--max-output 32] [--gap-us 20] [--keep-trace DIR]
    python bench/gpu_idle.py --trace rank0-....trace.json      (a trace made before)

The workload arguments are bench/throughput.py's; --max-output caps each request's
tokens (the prompt phase at full size, a shorter trace). Prints one JSON object:
- span_ms, busy_ms, idle_ms: from the first kernel to the last, the union of kernel
  (and device copy) time, the rest;
- idle_by_tenth_ms: the idle time in each tenth of the span;
- gaps: idle gaps over --gap-us, split by how the kernel after each was launched: `late`
  (its launch call came after the device went idle: the host was the limit; `late_ms`
  sums from the device going idle to the launch) or `early` (launched before: a wait
  inside the stream, or the device's own latency);
- host_in_late_gaps: what the host ran while the device sat idle before a late launch,
  the CUDA runtime and driver calls (a synchronize here is a stall) and the outermost
  torch ops, by total ms;
- largest_gaps: the longest, with the kernels on each side.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def load_events(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def analyze(events: list[dict[str, Any]], gap_us: float = 20.0, largest: int = 8) -> dict:
    """The summary the top describes, from a Chrome trace's complete ("X") events."""
    kernels = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    if not kernels:
        return {"error": "no device kernels in the trace (a CPU run?)"}
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    host = sorted((e for e in events if e.get("cat") in LAUNCH_CATS), key=lambda e: e["ts"])
    ops = _outermost(e for e in events if e.get("cat") == "cpu_op")
    busy = _union((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    start, end = busy[0][0], busy[-1][1]
    gaps = _gaps(busy, kernels, gap_us)
    out: dict[str, Any] = {
        "kernels": len(kernels),
        "span_ms": _ms(end - start),
        "busy_ms": _ms(sum(b - a for a, b in busy)),
        "idle_ms": _ms(end - start - sum(b - a for a, b in busy)),
        "idle_by_tenth_ms": _idle_by_tenth(busy, start, end),
    }
    late: list[tuple[dict, float]] = []  # (gap, when its next kernel was launched)
    summary = {"late": [0, 0.0, 0.0], "early": [0, 0.0, 0.0]}  # count, idle us, late us
    for gap in gaps:
        launch = launches.get(gap["next"].get("args", {}).get("correlation"))
        launched_at = launch["ts"] if launch is not None else None
        kind = "late" if launched_at is not None and launched_at > gap["from"] else "early"
        row = summary[kind]
        row[0] += 1
        row[1] += gap["to"] - gap["from"]
        if kind == "late":
            row[2] += launched_at - gap["from"]
            late.append((gap, launched_at))
        gap["kind"] = kind
    out["gaps"] = {
        k: {"count": n, "idle_ms": _ms(idle), **({"late_ms": _ms(lag)} if k == "late" else {})}
        for k, (n, idle, lag) in summary.items()
    }
    out["host_in_late_gaps"] = {
        "calls_ms": _top(_overlaps(host, [(g["from"], t) for g, t in late])),
        "torch_ops_ms": _top(_overlaps(ops, [(g["from"], t) for g, t in late])),
    }
    out["largest_gaps"] = [
        {
            "at_ms": _ms(g["from"] - start),
            "idle_us": round(g["to"] - g["from"], 1),
            "kind": g["kind"],
            "before": g["prev"]["name"][:60],
            "after": g["next"]["name"][:60],
        }
        for g in sorted(gaps, key=lambda g: g["from"] - g["to"])[:largest]
    ]
    return out


def _union(intervals) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _gaps(busy, kernels, gap_us: float) -> list[dict[str, Any]]:
    """Idle stretches over gap_us, with the kernel that ended before and the one after."""
    starts = [k["ts"] for k in kernels]
    gaps = []
    for (_, a), (b, _) in zip(busy, busy[1:], strict=False):
        if b - a <= gap_us:
            continue
        after = bisect.bisect_left(starts, b)
        before = max(
            (k for k in kernels[max(0, after - 64) : after] if k["ts"] + k["dur"] <= a + 1e-3),
            key=lambda k: k["ts"] + k["dur"],
        )
        gaps.append({"from": a, "to": b, "prev": before, "next": kernels[after]})
    return gaps


def _idle_by_tenth(busy, start: float, end: float) -> list[float]:
    width = (end - start) / 10
    idle = [width] * 10
    for a, b in busy:
        for i in range(int((a - start) // width), min(int((b - start) // width), 9) + 1):
            lo, hi = start + i * width, start + (i + 1) * width
            idle[i] -= max(0.0, min(b, hi) - max(a, lo))
    return [_ms(x) for x in idle]


def _outermost(ops) -> list[dict[str, Any]]:
    """The torch ops no other op of their thread encloses."""
    out: list[dict[str, Any]] = []
    ends: dict[Any, float] = {}
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        key = (e.get("pid"), e.get("tid"))
        if e["ts"] >= ends.get(key, float("-inf")):
            out.append(e)
            ends[key] = e["ts"] + e["dur"]
    return out


def _overlaps(events: list[dict[str, Any]], windows: list[tuple[float, float]]) -> dict:
    """Time of each event name inside the windows (both sorted by start)."""
    total: dict[str, float] = defaultdict(float)
    starts = [e["ts"] for e in events]
    for lo, hi in windows:
        i = max(0, bisect.bisect_left(starts, lo) - 1)
        while i < len(events) and events[i]["ts"] < hi:
            e = events[i]
            overlap = min(hi, e["ts"] + e["dur"]) - max(lo, e["ts"])
            if overlap > 0:
                total[e["name"]] += overlap
            i += 1
    return total


def _top(total: dict[str, float], n: int = 10) -> dict[str, float]:
    return {k: _ms(v) for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:n]}


def _ms(us: float) -> float:
    return round(us / 1e3, 2)


def profile_workload(args, keep: Path | None) -> Path:
    """Run the workload's timed generate under the profiler; the trace's path."""
    folder = keep or Path(tempfile.mkdtemp(prefix="tessera-gpu-idle-"))
    os.environ["TESSERA_TORCH_PROFILER_DIR"] = str(folder)  # the workers inherit it
    from bench.throughput import _engine_kwargs, warm_up, workload
    from engine_core import LLM, SamplingParams

    _, prompts, max_tokens = workload(args)
    if args.max_output:
        max_tokens = [min(m, args.max_output) for m in max_tokens]
    params = [
        SamplingParams(max_tokens=m, ignore_eos=True, temperature=args.temperature)
        for m in max_tokens
    ]
    with LLM(**_engine_kwargs(args)) as llm:
        warm_up(llm, args.seed)
        llm.start_profile()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        print(f"generate: {time.perf_counter() - t0:.3f} s profiled", file=sys.stderr)
        paths = llm.stop_profile()
    return Path(next(p for p in paths if p.endswith(".trace.json")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trace", type=Path, default=None, help="analyze this trace only")
    parser.add_argument("--gap-us", type=float, default=20.0)
    parser.add_argument("--max-output", type=int, default=0, help="cap each request's tokens")
    parser.add_argument("--keep-trace", type=Path, default=None, help="write the trace here")
    ours, rest = parser.parse_known_args()
    trace = ours.trace
    if trace is None:
        from bench.throughput import add_workload_args
        from engine_core.args import make_arg_parser

        workload = make_arg_parser(argparse.ArgumentParser(description=__doc__))
        add_workload_args(workload)
        args = workload.parse_args(rest)
        args.seed = args.seed if args.seed is not None else 0
        args.max_output = ours.max_output
        trace = profile_workload(args, ours.keep_trace)
    elif rest:
        parser.error(f"--trace analyzes a trace made before; not with {rest}")
    print(json.dumps({"trace": str(trace)} | analyze(load_events(trace), ours.gap_us)))


if __name__ == "__main__":
    main()
