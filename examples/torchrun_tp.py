"""Tensor parallelism under torchrun: every rank builds the same offline LLM.

    torchrun --nproc-per-node 2 examples/torchrun_tp.py --model MODEL_FOLDER

torchrun starts one process per rank and sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. Each process builds `LLM(...,
distributed_executor_backend="external_launcher", tensor_parallel_size=WORLD_SIZE)`:
the engine core and one worker run inside it, on the device of its local rank.
Every rank sends the same prompts with the same seed, so all ranks schedule the same
steps and return the same outputs, with no messages besides the model's collectives.
Rank 0 prints the completions; with --output-dir each rank writes its own
rank<N>.json (prompt, token ids, text), to compare the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine_core import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Tensor parallelism splits each layer",
    "Once upon a time",
    "The quick brown fox",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tessera/smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens")
    parser.add_argument("--output-dir", type=Path, help="write rank<N>.json there")
    parser.add_argument(
        "--init-process-group",
        action="store_true",
        help="initialize torch.distributed here, before the engine (else the engine does)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.init_process_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    llm = LLM(
        args.model,
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=int(os.environ["WORLD_SIZE"]),
        max_model_len=args.max_model_len,
        seed=0,  # the same on every rank: they must sample alike
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    rank = int(os.environ["RANK"])
    results = [
        {"prompt": o.prompt, "token_ids": o.outputs[0].token_ids, "text": o.outputs[0].text}
        for o in outputs
    ]
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / f"rank{rank}.json").write_text(json.dumps(results))
    if rank == 0:
        for result in results:
            print(f"{result['prompt']!r} -> {result['text']!r}")
    llm.shutdown()
    if args.init_process_group:
        # every rank reaches the teardown before any destroys its group: a gloo group
        # destroyed while a peer still talks to it may abort the process at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
