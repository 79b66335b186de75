"""Batch latency, the analogue of `vllm bench latency` (workload W3).

A batch of --batch-size random token-id prompts of --input-len tokens generates
--output-len tokens each (ignore_eos); the script times whole `generate` calls and
prints the mean end-to-end latency and the mean time per output step. With
--baseline hf, transformers' `generate` runs the same batches in the same process
after the engine has stopped (random weights for --load-format dummy).

    python bench/latency.py --model bench/models/llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-size 1 --input-len 32 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from throughput import _engine_kwargs, hf_generate_kwargs, load_hf_model, make_prompts

from engine_core.args import make_arg_parser


def time_runs(run: Callable[[], object], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def row(engine: str, bs: int, args, times: list[float]) -> dict:
    mean = statistics.mean(times)
    return {
        "engine": engine,
        "batch_size": bs,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "mean_latency_s": round(mean, 4),
        "median_latency_s": round(statistics.median(times), 4),
        "ms_per_step": round(1000 * mean / args.output_len, 3),
    }


def run_tessera(args) -> tuple[list[dict], object]:
    from engine_core import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    rows = []
    with LLM(**_engine_kwargs(args)) as llm:
        config = llm.config
        vocab = int(config.model.hf_config["vocab_size"])
        for bs in args.batch_size:
            prompts = make_prompts(bs, args.input_len, vocab, args.seed)
            gen = partial(llm.generate, prompts, params, use_tqdm=False)
            times = time_runs(gen, args.num_iters_warmup, args.num_iters)
            rows.append(row("tessera", bs, args, times))
            print(json.dumps(rows[-1]), flush=True)
    return rows, config


def run_hf(args, config) -> list[dict]:
    import torch

    model = load_hf_model(config)
    vocab = int(config.model.hf_config["vocab_size"])
    gen_kw = hf_generate_kwargs(args.output_len, 0.0)
    rows = []
    for bs in args.batch_size:
        ids = torch.tensor(make_prompts(bs, args.input_len, vocab, args.seed), device=model.device)
        mask = torch.ones_like(ids)
        gen = partial(model.generate, ids, attention_mask=mask, pad_token_id=0, **gen_kw)
        with torch.inference_mode():
            times = time_runs(gen, args.num_iters_warmup, args.num_iters)
        rows.append(row("hf", bs, args, times))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = make_arg_parser(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=2)
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else 0

    results, config = run_tessera(args)
    if args.baseline == "hf":
        results += run_hf(args, config)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
