"""Engine overhead per step outside the model forward, on the CPU (issue: process split).

A tiny model (so the forward is cheap), a steady decode batch of --batch-size requests;
per step, for the `uni` executor (worker in the engine core, core in this process) and
for `mp` (core and worker each in their own process): the wall time, the model forward,
the rest of the worker's step (batch building, LM head, sampler, outputs), and what lies
outside the worker (scheduling, IPC both ways, output processing, detokenization). The
worker's times come from `collective_rpc("get_timing")`.

    python bench/overhead.py --batch-size 256 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(model: str, backend: str, batch: int, output_len: int) -> dict:
    from engine_core import LLM, SamplingParams

    os.environ["TESSERA_ENABLE_MULTIPROCESSING"] = "0" if backend == "uni" else "1"
    llm = LLM(
        model,
        distributed_executor_backend=backend,
        max_num_seqs=batch,
        max_model_len=256,
        enable_prefix_caching=False,
    )
    rng = random.Random(0)
    prompts = [[rng.randint(10, 5000) for _ in range(16)] for _ in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    before = llm.collective_rpc("get_timing")[0]
    steps = 0
    get = llm.engine.get_outputs

    def counting():
        nonlocal steps
        steps += 1
        return get()

    llm.engine.get_outputs = counting
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = llm.collective_rpc("get_timing")[0]
    llm.shutdown()
    forward = after["forward_s"] - before["forward_s"]
    execute = after["execute_s"] - before["execute_s"]
    n = after["steps"] - before["steps"]
    return {
        "backend": backend,
        "batch_size": batch,
        "steps": n,
        "wall_ms_per_step": round(1000 * wall / n, 3),
        "forward_ms_per_step": round(1000 * forward / n, 3),
        # LM head, sampler, batch building and output building in the worker
        "worker_rest_ms_per_step": round(1000 * (execute - forward) / n, 3),
        # scheduling, IPC both ways, output processing and detokenization
        "outside_worker_ms_per_step": round(1000 * (wall - execute) / n, 3),
        "client_outputs": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--backends", default="uni,mp")
    args = parser.parse_args()
    from tests.helpers.tiny_models import make_tiny_model

    model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama"))
    for backend in args.backends.split(","):
        print(json.dumps(measure(model, backend, args.batch_size, args.output_len)), flush=True)


if __name__ == "__main__":
    main()
