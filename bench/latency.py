"""Batch latency, the analogue of `vllm bench latency` (workload W3).

A batch of --batch-size random token-id prompts of --input-len tokens generates
--output-len tokens each (ignore_eos); the script times whole `generate` calls and
prints the mean end-to-end latency and the mean time per output step.

    python bench/latency.py --model bench/models/llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-size 1 --input-len 32 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from throughput import _engine_kwargs, make_prompts  # sibling script

from engine_core.args import make_arg_parser


def main() -> None:
    parser = make_arg_parser(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=2)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else 0

    from engine_core import LLM, SamplingParams

    llm = LLM(**_engine_kwargs(args))
    vocab = int(llm.config.model.hf_config["vocab_size"])
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    results = []
    for bs in args.batch_size:
        prompts = make_prompts(bs, args.input_len, vocab, args.seed)
        for _ in range(args.num_iters_warmup):
            llm.generate(prompts, params, use_tqdm=False)
        times = []
        for _ in range(args.num_iters):
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        mean = statistics.mean(times)
        results.append(
            {
                "batch_size": bs,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "mean_latency_s": round(mean, 4),
                "median_latency_s": round(statistics.median(times), 4),
                "ms_per_step": round(1000 * mean / args.output_len, 3),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    llm.shutdown()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
