"""Tensor parallelism on GPUs, in one run (not a test: CI has no GPU).

    PYTHONPATH=. python bench/tp_check.py --tp 2 [--num-prompts 200]
    PYTHONPATH=. python bench/tp_check.py --greedy MODEL [--tp N] [--pp M] [--device cpu]

1. Tiny random models of four architectures in float32: greedy tokens at TP=N equal TP=1.
2. Throughput of the Llama-3.1-8B shape (dummy bf16 weights), 1024 in / 128 out, at
   TP=1 and TP=N in the same run, and the scaling ratio.
With --greedy, only prints (one JSON line) the greedy tokens of MODEL (a folder or a
.gguf) for the check prompts at the given parallel sizes: bench/tp_scale.py runs it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path


def check_prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randint(10, 5000) for _ in range(rng.randint(3, 40))] for _ in range(4)]


def greedy(path: str, prompts, device: str = "cuda", tp: int = 1, pp: int = 1) -> list[list[int]]:
    from engine_core import LLM, SamplingParams

    with LLM(
        path,
        device=device,
        dtype="float32",
        max_model_len=256,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
    ) as llm:
        outs = llm.generate(
            prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False
        )
    return [o.outputs[0].token_ids for o in outs]


def throughput(tp: int, num_prompts: int) -> dict:
    cmd = [
        sys.executable,
        "bench/throughput.py",
        "--model",
        "bench/models/llama-3.1-8b",
        "--load-format",
        "dummy",
        "--dtype",
        "bfloat16",
        "--skip-tokenizer-init",
        "--max-model-len",
        "2048",
        "--num-prompts",
        str(num_prompts),
        "--input-len",
        "1024",
        "--output-len",
        "128",
        "--temperature",
        "1.0",
        "-tp",
        str(tp),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if not rows:
        raise RuntimeError(out.stderr[-3000:])
    return rows[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--greedy", default=None, metavar="MODEL")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.greedy:
        tokens = greedy(args.greedy, check_prompts(), args.device, args.tp, args.pp)
        print(json.dumps(tokens), flush=True)
        return
    from tests.helpers.tiny_models import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    prompts = check_prompts()
    for arch in ["llama", "qwen3", "opt", "gpt2"]:
        path = str(make_tiny_model(tmp / arch, arch))
        same = greedy(path, prompts, tp=args.tp) == greedy(path, prompts)
        print(
            f"| tiny {arch} fp32 | TP={args.tp} == TP=1 | {'yes' if same else 'NO'} |", flush=True
        )
    one = throughput(1, args.num_prompts)
    many = throughput(args.tp, args.num_prompts)
    for name, r in (("TP=1", one), (f"TP={args.tp}", many)):
        print(
            f"| 8B bf16 {name} | output tok/s | {r['output_tokens_per_s']} "
            f"(total {r['total_tokens_per_s']}, {r['elapsed_s']} s) |",
            flush=True,
        )
    print(
        f"| scaling | TP={args.tp} / TP=1 | "
        f"{many['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x |"
    )


if __name__ == "__main__":
    main()
