"""Where a run's steps wait: kernel compiles, collector pauses, host-bound steps.

The workload of bench/throughput.py (same arguments) runs --runs times in one engine,
through a worker extension (`bench.stalls.StepStalls`, set here as
--worker-extension-cls) that records, in each worker, per run:
- per step, binned by batch size (steps with a prefill apart): the worker's host time
  to launch it, and that time's parts (PHASES: bookkeeping, inputs, the forward's
  launches, sampling), how long finishing it waited for the device
  (a long wait: the GPU is the limit, the host is not), and the worker's idle time
  before it (with mp: the engine core's round trip, from answering one step to
  receiving the next);
- each model forward that held the host over --slow-ms, with the Triton kernel
  variants compiled during it;
- the process's cyclic garbage collections: how many, their total and longest pause;
- the tokens computed: above the prompts' and outputs' count, preemption recomputed.

It found W2's two stalls (bench/RESULTS.md, "Compile stalls and collector pauses"):
attention tiles compiled mid-run, and collector walks of the whole startup heap.

    python bench/stalls.py --model $M/qwen3-0.6b --load-format dummy --dtype bfloat16 \
        --max-model-len 4096 --dataset nano-vllm --num-prompts 256 --temperature 0.6
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# batch sizes of the bins: up to each bound
BIN_BOUNDS = (16, 64, 128, 256, 1 << 30)
# the runner methods (`_` + name) that make up a launch's host time, timed apart:
# the step's bookkeeping, its inputs, the model, and queueing the sampling
PHASES = ("apply_step", "prepare_inputs", "forward", "sample")


class StepStalls:
    """--worker-extension-cls: `stalls_start` / `stalls_stop` around a run."""

    _stalls: _Recorder | None = None

    def stalls_start(self, slow_ms: float) -> None:
        self._stalls = _Recorder(self.runner, slow_ms / 1e3)  # type: ignore[attr-defined]

    def stalls_stop(self) -> dict[str, Any]:
        recorder, self._stalls = self._stalls, None
        if recorder is None:
            raise RuntimeError("stalls_stop without stalls_start")
        return recorder.close()


class _Recorder:
    """Wraps the runner's step methods (instance attributes shadow the class's) and
    listens to the collector until close()."""

    def __init__(self, runner: Any, slow_s: float) -> None:
        self.runner = runner
        self.slow_s = slow_s
        # seqs, prefill, host, idle, then the host's phases (PHASES)
        self.steps: list[tuple[Any, ...]] = []
        self._phases = dict.fromkeys(PHASES, 0.0)  # of the step being launched
        self.tokens = 0  # computed: more than prompts plus outputs when preemption recomputes
        self.waits: list[tuple[int, bool, float]] = []  # seqs, prefill, finish's wait
        self.slow: list[dict[str, Any]] = []
        self.gc_pauses: list[float] = []
        self._gc_t0 = 0.0
        self._last_finish = time.perf_counter()
        self._last_shape = (0, False)
        self._variants0 = compiled_variants()
        self._wrap(runner)
        gc.callbacks.append(self._on_gc)

    def _wrap(self, runner: Any) -> None:
        launch, finish, forward = runner._launch, runner._finish, runner._forward

        def timed_launch(step: Any, between: Any = None) -> Any:
            self._phases = dict.fromkeys(PHASES, 0.0)
            outside = [0.0]  # `between` (the step before's answer) is not this launch's

            def timed_between() -> None:
                t = time.perf_counter()
                between()
                outside[0] += time.perf_counter() - t

            t0 = time.perf_counter()
            idle = t0 - self._last_finish  # before `between` finishes the step before
            out = launch(step, timed_between if between is not None else None)
            counts = step.num_scheduled_tokens
            shape = (len(counts), max(counts.values(), default=1) > 1)
            self.tokens += sum(counts.values())
            host = time.perf_counter() - t0 - outside[0]
            self.steps.append((*shape, host, idle, *self._phases.values()))
            self._last_shape = shape
            return out

        def timed_finish(launched: Any) -> Any:
            t0 = time.perf_counter()
            if launched.copied is not None:
                launched.copied.synchronize()
            self.waits.append((*self._last_shape, time.perf_counter() - t0))
            out = finish(launched)
            self._last_finish = time.perf_counter()
            return out

        def timed_forward(input_ids: Any, positions: Any, attn: Any) -> Any:
            before = compiled_variants()
            t0 = time.perf_counter()
            out = forward(input_ids, positions, attn)
            took = time.perf_counter() - t0
            self._phases["forward"] += took
            if took > self.slow_s:
                self.slow.append(_slow_forward(took, input_ids, attn, before))
            return out

        runner._launch, runner._finish, runner._forward = timed_launch, timed_finish, timed_forward
        for name in PHASES:
            if name != "forward":
                setattr(runner, f"_{name}", self._timed(name, getattr(runner, f"_{name}")))

    def _timed(self, name: str, method: Any) -> Any:
        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                self._phases[name] += time.perf_counter() - t0

        return timed

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_t0)

    def close(self) -> dict[str, Any]:
        gc.callbacks.remove(self._on_gc)
        for name in ("_launch", "_finish", *(f"_{p}" for p in PHASES)):
            delattr(self.runner, name)
        return {
            "steps": len(self.steps),
            "tokens_computed": self.tokens,
            "bins": _bins(self.steps, self.waits),
            "slow_forwards": self.slow,
            "gc": {
                "collections": len(self.gc_pauses),
                "total_ms": round(sum(self.gc_pauses) * 1e3, 1),
                "max_ms": round(max(self.gc_pauses, default=0.0) * 1e3, 1),
            },
            "compiled_during_run": _diff(self._variants0, compiled_variants()),
        }


def _slow_forward(took: float, input_ids: Any, attn: Any, before: dict[str, int]) -> dict:
    return {
        "ms": round(took * 1e3, 1),
        "tokens": int(input_ids.shape[0]),
        "max_query_len": attn.max_query_len if attn is not None else None,
        "seqs": len(attn.seq_lens_cpu) if attn is not None else None,
        "compiled": _diff(before, compiled_variants()),
    }


def _bins(steps: list, waits: list) -> list[dict[str, Any]]:
    """Mean host (and its phases), wait and idle microseconds per (prefill or not,
    batch-size bin)."""
    names = ("host", "idle", *PHASES)
    groups: dict[tuple[bool, int], dict[str, list[float]]] = defaultdict(
        lambda: {k: [] for k in (*names, "wait")}
    )
    for seqs, prefill, *times in steps:
        for name, t in zip(names, times, strict=True):
            groups[prefill, _bound(seqs)][name].append(t)
    for seqs, prefill, wait in waits:
        groups[prefill, _bound(seqs)]["wait"].append(wait)
    rows: list[dict[str, Any]] = []
    for (prefill, bound), g in sorted(groups.items()):
        row: dict[str, Any] = {"prefill": prefill, "max_seqs": bound, "steps": len(g["host"])}
        for k, v in g.items():
            row[f"{k}_us"] = round(sum(v) / len(v) * 1e6) if v else None
        rows.append(row)
    return rows


def _bound(seqs: int) -> int:
    return next(b for b in BIN_BOUNDS if seqs <= b)


def compiled_variants() -> dict[str, int]:
    """Compiled variants of each Triton kernel of kernels/ in this process."""
    import triton

    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernels.") or module is None:
            continue
        for attr, fn in vars(module).items():
            if isinstance(fn, triton.runtime.jit.JITFunction):
                caches = getattr(fn, "device_caches", {}).values()
                found[f"{name}.{attr}"] = sum(len(c[0]) for c in caches)
    return found


def _diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def main() -> None:
    from bench.throughput import _engine_kwargs, add_workload_args, workload
    from engine_core.args import make_arg_parser

    parser = make_arg_parser(argparse.ArgumentParser(description=__doc__))
    add_workload_args(parser)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--slow-ms", type=float, default=20.0)
    args = parser.parse_args()
    if args.worker_extension_cls:
        parser.error("--worker-extension-cls: this script sets it (bench.stalls.StepStalls)")
    args.seed = args.seed if args.seed is not None else 0
    _, prompts, max_tokens = workload(args)
    params = [dict(max_tokens=m, ignore_eos=True, temperature=args.temperature) for m in max_tokens]
    for result in run(_engine_kwargs(args), prompts, params, args.runs, args.slow_ms):
        print(json.dumps(result), flush=True)


def run(
    engine: dict[str, Any],
    prompts: list[list[int]],
    params: list[dict[str, Any]],
    runs: int,
    slow_ms: float,
) -> list[dict[str, Any]]:
    """One dict per run: its wall time, then what each worker recorded."""
    from engine_core import LLM, SamplingParams

    sampling = [SamplingParams(**p) for p in params]
    results = []
    with LLM(**(engine | {"worker_extension_cls": "bench.stalls.StepStalls"})) as llm:
        for i in range(runs):
            llm.collective_rpc("stalls_start", args=(slow_ms,))
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sampling, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            workers = llm.collective_rpc("stalls_stop")
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            results.append(
                {"run": i, "elapsed_s": round(elapsed, 3), "output_tokens": tokens}
                | {"workers": workers}
            )
    return results


if __name__ == "__main__":
    main()
