"""Online serving benchmark, the analogue of `vllm bench serve`.

A streaming client over aiohttp sends random token-id prompts to a running server's
/v1/completions (Tessera's, or any OpenAI-compatible one), at Poisson or gamma-distributed
arrival times, and measures time to first token (TTFT), time per output token after the
first (TPOT), inter-token latency between streamed chunks (ITL) and end-to-end latency.

    tessera serve tessera/smollm2-135m-instruct --port 8000 &
    python bench/serve.py --port 8000 --num-prompts 200 --random-input-len 256 \\
        --random-output-len 64 --request-rate 8 --ignore-eos --output-json out.json

Random dataset: each prompt is `--random-prefix-len` shared ids, then a random number of
ids in [input_len * (1 - ratio), input_len * (1 + ratio)]; each request asks for a
random number of tokens in the same range around `--random-output-len`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import orjson

# Ids below this are special tokens in most vocabularies: random prompts avoid them.
FIRST_PLAIN_ID = 100


@dataclass
class BenchRequest:
    prompt: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


# ---- dataset and arrivals -------------------------------------------------------------


def random_requests(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    """The random dataset: token-id prompts with a shared prefix, and output lengths."""
    rng = np.random.default_rng(args.seed)
    high = max(vocab_size, FIRST_PLAIN_ID + 1)
    prefix = rng.integers(FIRST_PLAIN_ID, high, args.random_prefix_len).tolist()
    input_lens = _lengths(rng, args.random_input_len, args.random_range_ratio, args.num_prompts)
    output_lens = _lengths(rng, args.random_output_len, args.random_range_ratio, args.num_prompts)
    return [
        BenchRequest(prefix + rng.integers(FIRST_PLAIN_ID, high, n).tolist(), int(m))
        for n, m in zip(input_lens, output_lens, strict=True)
    ]


def _lengths(rng: np.random.Generator, center: int, ratio: float, count: int) -> np.ndarray:
    low = max(int(center * (1 - ratio)), 1)
    high = max(int(center * (1 + ratio)), low)
    return rng.integers(low, high + 1, count)


async def arrivals(
    requests: list[BenchRequest], rate: float, burstiness: float, seed: int
) -> AsyncIterator[BenchRequest]:
    """Yield the requests at their arrival times: gaps drawn from a gamma distribution
    with mean 1/rate (shape `burstiness`; 1 = Poisson); rate inf = all at once."""
    rng = np.random.default_rng(seed + 1)
    for req in requests:
        yield req
        if rate == float("inf"):
            continue
        gap = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness))
        await asyncio.sleep(gap)


# ---- the client -----------------------------------------------------------------------


async def send(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    payload: dict,
    prompt_len: int,
) -> RequestResult:
    """Stream one completion; the times of its chunks make its latencies."""
    result = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.ttft > 0.0
        if not result.ok:
            result.error = "the stream carried no output"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


def payload_of(req: BenchRequest, args: argparse.Namespace, model: str) -> dict:
    return {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def first_model(session: aiohttp.ClientSession, base: str, headers: dict) -> str:
    async with session.get(base + "/v1/models", headers=headers) as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def run_benchmark(args: argparse.Namespace) -> dict:
    base = args.base_url or f"http://{args.host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    requests = random_requests(args, _vocab_size(args))
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)  # concurrency is ours to limit
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await first_model(session, base, headers)
        url = base + args.endpoint
        limit = asyncio.Semaphore(args.max_concurrency or len(requests) or 1)

        async def limited(req: BenchRequest) -> RequestResult:
            async with limit:
                return await send(
                    session, url, headers, payload_of(req, args, model), len(req.prompt)
                )

        tasks = []
        start = time.perf_counter()
        async for req in arrivals(requests, args.request_rate, args.burstiness, args.seed):
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args, model)


def _vocab_size(args: argparse.Namespace) -> int:
    if args.tokenizer is None:
        return args.vocab_size
    from engine_core.tokenizer import load_tokenizer

    return len(load_tokenizer(args.tokenizer))


# ---- the report -----------------------------------------------------------------------


def summarize(results: list[RequestResult], duration: float, args, model: str) -> dict:
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    summary = {
        "model": model,
        "num_prompts": len(results),
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for name, values in (
        ("ttft", [r.ttft for r in ok]),
        ("tpot", tpots),
        ("itl", itls),
        ("e2el", [r.e2e for r in ok]),
    ):
        summary.update(_stats_ms(name, values))
    return summary


def _stats_ms(name: str, values: list[float]) -> dict[str, float]:
    ms = np.asarray(values, dtype=np.float64) * 1000 if values else np.zeros(1)
    return {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def print_report(s: dict) -> None:
    line = "=" * 50
    print(f"{line}\n{'Serving Benchmark Result':^50}\n{line}")
    rows = [
        ("Successful requests:", s["completed"]),
        ("Failed requests:", s["failed"]),
        ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
        ("Total input tokens:", s["total_input_tokens"]),
        ("Total generated tokens:", s["total_output_tokens"]),
        ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}"),
    ]
    for label, value in rows:
        print(f"{label:<40}{value:>10}")
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        print(f"{title:-^50}")
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize()} {name.upper()} (ms):"
            print(f"{label:<40}{s[f'{stat}_{name}_ms']:>10.2f}")
    for error in s["errors"]:
        print(f"error: {error}")
    print(line)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark a running OpenAI-compatible server.")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="Default: the server's first model.")
    p.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"))
    p.add_argument("--dataset-name", choices=["random"], default="random")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=10000, help="Random ids lie below this.")
    p.add_argument("--tokenizer", default=None, help="Take the vocabulary size from here.")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=6 * 3600)
    p.add_argument("--output-json", default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if not 0 <= args.random_range_ratio < 1:
        sys.exit("--random-range-ratio must be in [0, 1)")
    if args.burstiness <= 0 or args.request_rate <= 0:
        sys.exit("--burstiness and --request-rate must be > 0")
    summary = asyncio.run(run_benchmark(args))
    print_report(summary)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**summary, "args": vars(args)}, f, indent=2, default=str)
    return summary


if __name__ == "__main__":
    main()
