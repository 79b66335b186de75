"""Offline throughput, the analogue of `vllm bench throughput`.

One `LLM.generate` over all prompts (ignore_eos), timed. Datasets:
- random: --num-prompts prompts of --input-len random ids, each after the same
  --prefix-len random ids (W1; W6 with --prefix-len 900 --input-len 124), --output-len
  tokens each.
- nano-vllm: the draw of nano-vllm's bench.py (W2): --num-prompts prompts of 100-1024
  ids below 10001, then as many max_tokens of 100-1024, from Python's `random` seeded
  with --seed.
With --baseline hf the first --baseline-num-prompts prompts also run through
transformers' batched `generate` in the same process (after the engine has stopped),
and the ratio is printed. Dummy-weight models get random weights there too.

    python bench/throughput.py --model tessera/smollm2-135m-instruct \
        --num-prompts 64 --input-len 128 --output-len 128 --baseline hf
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from engine_core.args import EngineArgs, make_arg_parser


def make_prompts(
    n: int, input_len: int, vocab: int, seed: int, prefix_len: int = 0
) -> list[list[int]]:
    rng = random.Random(seed)
    # avoid the lowest ids, which are special tokens in most vocabularies
    prefix = [rng.randint(100, vocab - 1) for _ in range(prefix_len)]
    return [prefix + [rng.randint(100, vocab - 1) for _ in range(input_len)] for _ in range(n)]


def nano_vllm_requests(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py draw; n=256, seed=0 gives 142,827 prompt and 133,966 output tokens."""
    rng = random.Random(seed)  # the same stream as random.seed(seed) then random.randint
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    return prompts, [rng.randint(100, 1024) for _ in range(n)]


def make_requests(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The prompts and each one's max_tokens."""
    if args.dataset == "nano-vllm":
        return nano_vllm_requests(args.num_prompts, args.seed)
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed, args.prefix_len)
    return prompts, [args.output_len] * len(prompts)


def workload(args) -> tuple[Any, list[list[int]], list[int]]:
    """The resolved engine config, and the workload's prompts and max_tokens (random ids
    are drawn below the model's vocabulary size)."""
    from engine_core.config import resolve_config

    config = resolve_config(EngineArgs(**_engine_kwargs(args)))
    prompts, max_tokens = make_requests(args, int(config.model.hf_config["vocab_size"]))
    return config, prompts, max_tokens


def warm_up(llm: Any, seed: int) -> None:
    """Two short requests on other prompts than the timed ones, so that the prefix cache
    holds none of them."""
    from engine_core import SamplingParams

    warm = make_prompts(2, 16, 1000, seed + 1)
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)


def run_tessera(args, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    from engine_core import LLM, SamplingParams

    params = [
        SamplingParams(max_tokens=m, ignore_eos=True, temperature=args.temperature)
        for m in max_tokens
    ]
    with LLM(**_engine_kwargs(args)) as llm:
        warm_up(llm, args.seed)
        before = llm.collective_rpc("allocator_stats")[0]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        after = llm.collective_rpc("allocator_stats")[0]
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    summary = _summary("tessera", prompts, out_tokens, elapsed)
    if after:  # rank 0's CUDA allocator during the timed run: retries stall the host
        summary["allocator"] = {k: after[k] - before[k] for k in after}
    return summary


def load_hf_model(config):
    """transformers' model for the engine's config, on the engine's device; random
    weights when the engine ran with --load-format dummy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = config.model
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    device = "cuda" if config.device.device == "cuda" else "cpu"
    if config.load.load_format == "dummy":
        with torch.device(device):  # random init straight on the device: fast for 8B
            return AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(m.model_path), dtype=dtype[m.dtype]
            ).eval()
    kw = {"gguf_file": m.gguf_file} if m.gguf_file else {}
    folder = m.model_path if not m.gguf_file else str(Path(m.gguf_file).parent)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype[m.dtype], **kw)
    return model.to(device).eval()


def hf_generate_kwargs(output_len: int, temperature: float) -> dict:
    """Exactly output_len new tokens, sampled like the engine's requests."""
    kw: dict = dict(max_new_tokens=output_len, min_new_tokens=output_len)
    if temperature == 0:
        return kw | dict(do_sample=False)
    return kw | dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)


def run_hf(args, prompts: list[list[int]], config) -> dict:
    import torch

    model = load_hf_model(config)
    batch = torch.tensor(prompts, device=model.device)  # equal lengths: no padding needed
    gen = hf_generate_kwargs(args.output_len, args.temperature)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.hf_batch_size):
            ids = batch[i : i + args.hf_batch_size]
            model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **gen)
    elapsed = time.perf_counter() - t0
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
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
    }


def _engine_kwargs(args) -> dict:
    fields = EngineArgs.__dataclass_fields__ if hasattr(EngineArgs, "__dataclass_fields__") else {}
    return {k: v for k, v in vars(args).items() if k in fields}


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The dataset and sampling of the workload (bench/stalls.py runs the same ones)."""
    parser.add_argument("--dataset", choices=["random", "nano-vllm"], default="random")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=0)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)


def main() -> None:
    parser = make_arg_parser(argparse.ArgumentParser(description=__doc__))
    add_workload_args(parser)
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--baseline-num-prompts", type=int, default=None, help="Default: all.")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else 0
    if args.baseline == "hf" and args.dataset != "random":
        parser.error("--baseline hf: only with --dataset random (equal prompt lengths)")

    config, prompts, max_tokens = workload(args)
    results = [run_tessera(args, prompts, max_tokens)]
    print(json.dumps(results[0]), flush=True)
    if args.baseline == "hf":
        results.append(run_hf(args, prompts[: args.baseline_num_prompts], config))
        print(json.dumps(results[1]), flush=True)
        results[0]["speedup_vs_hf"] = round(
            results[0]["output_tokens_per_s"] / results[1]["output_tokens_per_s"], 2
        )
        print(f"speedup vs hf: {results[0]['speedup_vs_hf']}x", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
