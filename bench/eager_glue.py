"""The host's cost of an eager forward, kernels aside: what a step that runs outside the
CUDA graphs (prompt steps over 512 tokens, --enforce-eager) spends in Python per layer.

    python bench/eager_glue.py [--arch qwen3] [--layers 8] [--tokens 16 1024] [--profile]

Runs on the CPU. Every Triton kernel is routed through Triton's interpreter
(TESSERA_KERNELS=triton, TRITON_INTERPRET=1) with its launch replaced by a no-op, so
what is timed is the Python around the launches: our wrappers' argument checks and
allocations, the modules, torch's own ops that are not kernels of ours (on the CPU
those run for real: small at the tiny model's widths). The same Python runs on a GPU
machine's host before each launch; Triton's launch itself is not counted. W2's eager
prompt steps were host-bound (bench/RESULTS.md: a 16K-token step's launch took 45-60
ms on the H100's host), which is what this measures piece by piece. Prints one JSON
line per token count: us per layer (the fastest forward's, and the median's), Triton
launches per layer, us per launch.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stub_triton_launches() -> list[int]:
    """Route every kernel through the interpreter and make its launch a no-op; returns
    the launch counter. Must run before the kernels are imported."""
    os.environ["TESSERA_KERNELS"] = "triton"
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interpreter

    launches = [0]

    def run(self, *args, **kwargs) -> None:
        launches[0] += 1

    interpreter.InterpretedFunction.run = run  # type: ignore[method-assign]
    return launches


def time_forward(runner, tokens: int, reps: int) -> tuple[float, float]:
    """Seconds of one eager forward of `tokens` new tokens of one sequence: the fastest
    and the median of `reps` (the fastest is the steadier on a shared machine)."""
    import torch

    from executor.forward_context import ForwardContext, forward_context
    from executor.warmup import _one_sequence

    attn = _one_sequence(tokens, runner.block_size, runner.device)
    ids = torch.zeros(tokens, dtype=torch.long)
    positions = torch.arange(tokens)
    times = []
    with torch.inference_mode(), forward_context(ForwardContext(attn, runner.kv_caches)):
        for _ in range(reps + 2):  # two warm-up passes
            t0 = time.perf_counter()
            runner.model(ids, positions, None)
            times.append(time.perf_counter() - t0)
    ordered = sorted(times[2:])
    return ordered[0], ordered[reps // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 1024])
    parser.add_argument("--reps", type=int, default=51)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    launches = stub_triton_launches()
    os.environ["TESSERA_ENABLE_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(1)
    from engine_core import LLM
    from tests.helpers.tiny_models import make_tiny_model

    path = make_tiny_model(
        tempfile.mkdtemp(), args.arch, num_hidden_layers=args.layers, max_position_embeddings=2048
    )
    llm = LLM(str(path), max_model_len=2048, distributed_executor_backend="uni", device="cpu")
    runner = llm.engine.core.executor.worker.runner
    for tokens in args.tokens:
        launches[0] = 0
        fastest, median = time_forward(runner, tokens, args.reps)
        per_layer = launches[0] / (args.reps + 2) / args.layers
        row = {"arch": args.arch, "tokens": tokens, "layers": args.layers,
               "us_per_layer": round(fastest / args.layers * 1e6, 1),
               "us_per_layer_median": round(median / args.layers * 1e6, 1),
               "launches_per_layer": round(per_layer, 2),
               "us_per_launch": round(fastest / args.layers / per_layer * 1e6, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(time_forward, runner, args.tokens[-1], args.reps)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    llm.shutdown()


if __name__ == "__main__":
    main()
