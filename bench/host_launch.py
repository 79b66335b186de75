"""The worker's host time per step, piece by piece: what a step's launch costs the CPU.

    python bench/host_launch.py --model M [--load-format dummy --dtype bfloat16 ...]
        [--batch 24x1500 256x600] [--output-len 150] [--profile]

Runs the engine in this process (`uni`, no overlap), one greedy-or-temperature decode
batch per `SxC` (S requests of C random prompt tokens), and times each piece of
`ModelRunner`'s step: applying the step, planning the batch, the inputs (host arrays
and their copies), the forward (on CUDA its launch, or a graph replay), sampling
(logits, the sampling batch, the sampler, the copies out) and finishing (waiting for
the device, the outputs). On CUDA every piece but `_finish` is host time, which is
what the device waits for when a step's launch outlasts the step before it (W2's
tail, bench/RESULTS.md). Prints a median per piece and batch, one JSON line per batch,
and with --profile the functions that took the most time in the last batch.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (owner, method): the pieces of a step, as ModelRunner, StepGraphs and the sampler
# name them
PIECES = [
    ("executor.model_runner:ModelRunner", "_launch"),
    ("executor.model_runner:ModelRunner", "_apply_step"),
    ("executor.model_runner:ModelRunner", "_plan_batch"),
    ("executor.model_runner:ModelRunner", "_prepare_inputs"),
    ("executor.model_runner:ModelRunner", "_forward"),
    ("executor.model_runner:ModelRunner", "_sample"),
    ("executor.model_runner:ModelRunner", "_finish"),
    ("executor.cuda_graphs:StepGraphs", "run"),
    ("executor.sampler:Sampler", "__call__"),
]


@contextlib.contextmanager
def timed_pieces(times: dict[str, list[float]]) -> Iterator[None]:
    """Every piece of PIECES appends its wall time (s) per call to times[name]."""
    import importlib

    saved = []
    for owner, name in PIECES:
        module, cls_name = owner.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        original = cls.__dict__[name]
        saved.append((cls, name, original))
        setattr(cls, name, _timed(original, f"{cls_name}.{name}", times))
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def _timed(fn: Any, key: str, times: dict[str, list[float]]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key].append(time.perf_counter() - t0)

    return wrapper


def run_batch(llm: Any, size: int, context: int, output_len: int, seed: int) -> dict:
    from engine_core import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randint(100, 10000) for _ in range(context)] for _ in range(size)]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.6)
    times: dict[str, list[float]] = defaultdict(list)
    with timed_pieces(times):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    medians = {k: round(sorted(v)[len(v) // 2] * 1e6, 1) for k, v in times.items()}
    return {
        "batch": size,
        "context": context,
        "ms_per_step": round(elapsed * 1e3 / output_len, 3),
        "median_us": dict(sorted(medians.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch", nargs="+", default=["24x1500", "256x600"], help="SxC")
    parser.add_argument("--output-len", type=int, default=150)
    parser.add_argument("--profile", action="store_true", help="cProfile the last batch")
    args = parser.parse_args()
    os.environ["TESSERA_ENABLE_MULTIPROCESSING"] = "0"
    from engine_core import LLM

    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        distributed_executor_backend="uni",
        enable_prefix_caching=False,
    )
    try:
        run_batch(llm, 8, 100, 16, seed=0)  # warm-up: kernels, graphs, allocator
        batches = [tuple(map(int, b.split("x"))) for b in args.batch]
        profiler = cProfile.Profile() if args.profile else None
        for i, (size, context) in enumerate(batches):
            if profiler is not None and i == len(batches) - 1:
                profiler.enable()
            result = run_batch(llm, size, context, args.output_len, seed=i + 1)
            print(f"batch {size} x {context} keys: {result['ms_per_step']} ms a step")
            for name, us in result["median_us"].items():
                print(f"  {name:28s} {us:9.1f} us")
            print(json.dumps(result), flush=True)
        if profiler is not None:
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
