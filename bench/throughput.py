"""Offline throughput, the analogue of `vllm bench throughput`.

Random token-id prompts (--input-len, --output-len, --num-prompts, --seed), ignore_eos,
one `LLM.generate` over all of them. With --baseline hf the same prompts also run
through transformers' batched `generate` in the same process, and the ratio is printed.

    python bench/throughput.py --model tessera/smollm2-135m-instruct \
        --num-prompts 64 --input-len 128 --output-len 128 --baseline hf
"""

from __future__ import annotations

import argparse
import json
import random
import time

from engine_core.args import EngineArgs, make_arg_parser


def make_prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # avoid the lowest ids, which are special tokens in most vocabularies
    return [[rng.randint(100, vocab - 1) for _ in range(input_len)] for _ in range(n)]


def run_tessera(args, prompts: list[list[int]]) -> dict:
    from engine_core import LLM, SamplingParams

    llm = LLM(**_engine_kwargs(args))
    params = SamplingParams(
        max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature
    )
    llm.generate(prompts[: min(2, len(prompts))], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return _summary("tessera", prompts, out_tokens, elapsed)


def run_hf(args, prompts: list[list[int]], config) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    m = config.model
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    kw = {"gguf_file": m.gguf_file} if m.gguf_file else {}
    folder = (
        m.model_path if not m.gguf_file else str(__import__("pathlib").Path(m.gguf_file).parent)
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype[m.dtype], **kw)
    device = "cuda" if config.device.device == "cuda" else "cpu"
    model.to(device).eval()
    batch = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.hf_batch_size):
            out = model.generate(batch[i : i + args.hf_batch_size], **gen)
    elapsed = time.perf_counter() - t0
    del out
    return _summary("hf", prompts, len(prompts) * args.output_len, elapsed)


def _summary(name: str, prompts: list[list[int]], out_tokens: int, elapsed: float) -> dict:
    in_tokens = sum(len(p) for p in prompts)
    return {
        "engine": name,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 2),
        "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 2),
        "num_prompts": len(prompts),
        "output_tokens": out_tokens,
    }


def _engine_kwargs(args) -> dict:
    fields = EngineArgs.__dataclass_fields__ if hasattr(EngineArgs, "__dataclass_fields__") else {}
    return {k: v for k, v in vars(args).items() if k in fields}


def main() -> None:
    parser = make_arg_parser(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else 0

    from engine_core.config import resolve_config

    config = resolve_config(EngineArgs(**_engine_kwargs(args)))
    vocab = int(config.model.hf_config["vocab_size"])
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    results = [run_tessera(args, prompts)]
    if args.baseline == "hf":
        results.append(run_hf(args, prompts, config))
        results[0]["speedup_vs_hf"] = round(
            results[0]["output_tokens_per_s"] / results[1]["output_tokens_per_s"], 2
        )
    for r in results:
        print(json.dumps(r))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
