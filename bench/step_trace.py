"""Where the time between two steps goes: a workload under TESSERA_STEP_TRACE, summarized.

    python bench/step_trace.py [--dir D] [--slowest 5] -- python bench/latency.py ARGS...
    python bench/step_trace.py --dir D            (summarize a folder traced before)

Runs the command with TESSERA_STEP_TRACE=D (see executor/step_trace.py), so the engine
core and the worker record each step's spans, then prints one JSON object: how many
steps, the median and 90th percentile of the time between two steps' schedules, of
each span (core: schedule, submit, collect, update; worker: launch, finish, answer;
`execute` and `run` instead where steps do not overlap) and of the two hops between
the processes (submitting -> launch or run started, answering -> collected), and the slowest
launches. Spans a run never had are null. A long `finish` is the worker waiting for the
device (the GPU is the limit); long launches and hops are the host's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

# core: schedule, then submit and collect (async scheduling) or execute (one step at a
# time); worker: launch and finish (overlapping steps) or run; answer
SPANS = ("schedule", "submit", "collect", "execute", "update", "launch", "finish", "run", "answer")
# from the start of a send to its receiver's next event (a send may return after the
# other process has the message already)
HOPS = {
    "to_worker": ("submit>", "launch>"),
    "to_worker_run": ("submit>", "run>"),
    "to_core": ("answer>", "collect<"),
}


def load(folder: Path) -> dict[int, dict[str, int]]:
    """step id -> event -> its first time (ns), over every process's file."""
    steps: dict[int, dict[str, int]] = defaultdict(dict)
    for path in sorted(folder.glob("*.json")):
        for t, event, step_id in json.loads(path.read_text()):
            steps[step_id].setdefault(event, t)
    return steps


def summarize(steps: dict[int, dict[str, int]], slowest: int = 5) -> dict[str, Any]:
    ids = sorted(s for s, ev in steps.items() if "schedule>" in ev)
    out: dict[str, Any] = {"steps": len(ids)}
    gaps = [steps[b]["schedule>"] - steps[a]["schedule>"] for a, b in itertools.pairwise(ids)]
    out["between_steps_us"] = _stats(gaps)
    for name in SPANS:
        out[f"{name}_us"] = _stats(_lengths(steps, name + ">", name + "<"))
    for name, (start, end) in HOPS.items():
        out[f"{name}_us"] = _stats(_lengths(steps, start, end))
    launch = "launch" if any("launch<" in ev for ev in steps.values()) else "run"
    launches = sorted(
        ((ev[launch + "<"] - ev[launch + ">"], s) for s, ev in steps.items() if launch + "<" in ev),
        reverse=True,
    )
    out["slowest_launches_ms"] = [[s, round(ns / 1e6, 2)] for ns, s in launches[:slowest]]
    return out


def _lengths(steps: dict[int, dict[str, int]], start: str, end: str) -> list[int]:
    return [ev[end] - ev[start] for ev in steps.values() if start in ev and end in ev]


def _stats(ns: list[int]) -> dict[str, float] | None:
    if not ns:
        return None
    us = sorted(n / 1e3 for n in ns)
    p90 = us[min(len(us) - 1, int(0.9 * len(us)))]
    return {"median": round(statistics.median(us), 1), "p90": round(p90, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="trace folder (default: a fresh one)")
    parser.add_argument("--slowest", type=int, default=5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    folder = Path(args.dir or tempfile.mkdtemp(prefix="tessera-trace-"))
    if command:
        env = os.environ | {"TESSERA_STEP_TRACE": str(folder)}
        rc = subprocess.call(command, env=env)
        if rc != 0:
            print(f"the command exited with {rc}", file=sys.stderr)
            return rc
    steps = load(folder)
    if not steps:
        print(f"no step trace in {folder} (mp engines only: the core and worker processes)")
        return 1
    print(json.dumps({"trace": str(folder)} | summarize(steps, args.slowest)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
