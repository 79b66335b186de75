"""Sweep the attention kernels' tile configurations at the workloads' shapes.

    PYTHONPATH=. python bench/attn_tune.py [--top 5] [--only SUBSTRING ...] [--prefill]

`_tile_config` (the paged kernel) and `_prefix_tile_config` (the cascade's shared-prefix
kernel) were picked from a few H100 timings; this times every (BLOCK_N, warps, stages)
of a decode tile, and every tile of the prefix kernel, at the shapes the workloads of
bench/gpu_suite.sh run, GPU time from CUDA-graph replays with a cold L2
(kernels_gpu.graph_bench). Each result is checked against the float32 reference first,
so a configuration that computes wrong values is reported, never ranked. Prints the
current choice and the fastest ones per shape; writes $OUT/attn_tune.json when OUT is set.

--prefill sweeps the tiles of long queries instead (every BLOCK_M, BLOCK_N, warps and
stages) at the prompt steps of W1 and W2: fresh prompts filling a 16K-token step, where
the kernel is bound by its matrix work, so each result also gives TFLOP/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

import kernels.attention as attention
from bench.kernels_gpu import (
    FP8,
    attention_cost,
    attention_ref,
    copy_bandwidth,
    graph_bench,
    make_batch,
    prefix_tensor,
    rel_err,
    share_prefix,
)
from kernels.attention import paged_attention
from kernels.dispatch import num_sms

Config = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
DECODE_CONFIGS = [
    (16, n, w, s) for n, w, s in itertools.product((32, 64, 128), (1, 2, 4), (2, 3, 4))
]
PREFILL_CONFIGS = [
    *itertools.product((32, 64), (16, 32, 64), (2, 4), (1, 2, 3)),
    (128, 32, 8, 2),
    (128, 128, 8, 3),  # the long-query tile before 64 x 32
]
PREFIX_CONFIGS = [
    (m, n, w, s)
    for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    if not (m == 128 and w == 4)
]


@contextmanager
def paged_tiles(config: Config | None, long_queries: bool) -> Iterator[None]:
    """The paged kernel's decode tiles (rows <= 16), or its tiles of longer queries,
    forced to `config`; None: as shipped. The prefix kernel keeps its own choice."""
    shipped = attention._tile_config
    if config is not None:

        def forced(rows: int, group: int, *rest: int) -> Config:
            return config if (rows > 16) == long_queries else shipped(rows, group, *rest)

        attention._tile_config = forced
    try:
        yield
    finally:
        attention._tile_config = shipped


def decode_tiles(config: Config | None) -> Any:
    return paged_tiles(config, long_queries=False)


def prefill_tiles(config: Config | None) -> Any:
    return paged_tiles(config, long_queries=True)


@contextmanager
def prefix_tiles(config: Config | None) -> Iterator[None]:
    shipped = attention._prefix_tile_config
    if config is not None:
        attention._prefix_tile_config = lambda *_: config
    try:
        yield
    finally:
        attention._prefix_tile_config = shipped


class Shape:
    """One decode batch: its call of the public paged_attention, its reference, bytes."""

    def __init__(
        self,
        name: str,
        heads: int,
        lens: list[int],
        prefix: int = 0,
        q_lens: list[int] | None = None,
        **kw: Any,
    ):
        self.name = name
        b = make_batch(q_lens or [1] * len(lens), lens, heads=heads, **kw)
        self.batch = share_prefix(b, prefix) if prefix else b
        self.scale = b.q.shape[2] ** -0.5
        extra: dict[str, Any] = {"shared_prefix_len": prefix_tensor(prefix)} if prefix else {}
        self.out = torch.empty_like(b.q)
        self.call = partial(paged_attention, *b.args(self.out, self.scale), **extra)
        self.ref = attention_ref(b, self.scale, **extra)
        nbytes, self.flops = attention_cost(b)
        kv_per_key = b.k_cache.shape[2] * b.k_cache.shape[3] * 2 * b.k_cache.element_size()
        self.bytes = nbytes - (len(lens) - 1) * prefix * kv_per_key  # shared keys read once


def time_config(shape: Shape, fits: Callable[[], Any]) -> dict[str, Any]:
    with fits():
        try:
            shape.out.fill_(float("nan"))
            shape.call()
            err = rel_err(shape.out.float(), shape.ref)
            us = graph_bench(shape.call)
        except Exception as e:  # e.g. out of shared memory for the tile
            return {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    if not err < 2e-2:
        return {"error": f"rel. err. {err:.2e}"}
    return {"us": us * 1e3 if us else None, "rel_err": err}


def sweep(
    shape: Shape, configs: list[Config], ctx: Callable[[Config | None], Any], copy_gbps: float
) -> dict[str, Any]:
    shipped = time_config(shape, partial(ctx, None))
    rows = []
    for config in configs:
        r = time_config(shape, partial(ctx, config))
        rows.append({"config": config, **r})
    timed = sorted((r for r in rows if r.get("us")), key=lambda r: r["us"])
    for r in [shipped, *timed]:
        if r.get("us"):
            r["of_copy"] = shape.bytes / (r["us"] * 1e-6) / 1e9 / copy_gbps
            r["tflops"] = shape.flops / (r["us"] * 1e-6) / 1e12
    return {"shape": shape.name, "shipped": shipped, "ranked": timed, "all": rows}


def shapes(only: list[str]) -> Iterator[tuple[Shape, bool]]:
    """(shape, whether to sweep the prefix kernel too) for the shapes whose name holds one
    of `only` (all when empty). Lengths are drawn for every shape, so that a shape's batch
    does not depend on the filter; only the chosen ones are built on the GPU."""
    g = torch.Generator().manual_seed(0)

    def lens(n: int, lo: int, hi: int) -> list[int]:
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    # (name, query heads, context lengths, shared prefix, cache dtype, sweep the prefix)
    specs: list[tuple[str, int, list[int], int, torch.dtype | None, bool]] = [
        # W2 (Qwen3-0.6B: 16 heads, 8 KV heads): 256 contexts mid-run, then a late tail
        ("qwen3 b=256 ctx 200..2048", 16, lens(256, 200, 2048), 0, None, False),
        ("qwen3 b=64 ctx 1000..3000", 16, lens(64, 1000, 3000), 0, None, False),
        # W1 / W4 decode (8B: 32 heads, 8 KV heads)
        ("8b b=256 ctx 1024..1152", 32, lens(256, 1024, 1152), 0, None, False),
        # W6: a 896-key shared prefix, the cascade
        ("8b b=256 cascade 896 + 124..252", 32, lens(256, 1020, 1148), 896, None, True),
        # #5's slow kernels: FP8 cache, batch 1 at 4K (split-KV)
        ("8b b=64 ctx 4096 fp8", 32, [4096] * 64, 0, FP8, False),
        ("8b b=1 ctx 4096", 32, [4096], 0, None, False),
    ]
    for name, heads, ctx_lens, prefix, cache_dtype, with_prefix in specs:
        if not only or any(part in name for part in only):
            yield Shape(name, heads, ctx_lens, prefix, cache_dtype=cache_dtype), with_prefix


def prefill_shapes() -> Iterator[Shape]:
    """Prompt steps of 16K fresh tokens: W2's prompts (100-1024 tokens, Qwen3-0.6B's
    heads) and W1's (1024 tokens, the 8B's)."""
    g = torch.Generator().manual_seed(0)
    w2: list[int] = []
    while sum(w2) < 16384 - 1024:
        w2.append(int(torch.randint(100, 1025, (1,), generator=g)))
    yield Shape(f"qwen3 prefill {len(w2)} x 100..1024", 16, w2, q_lens=w2)
    yield Shape("8b prefill 16 x 1024", 32, [1024] * 16, q_lens=[1024] * 16)
    yield Shape("8b prefill 4 x 4096", 32, [4096] * 4, q_lens=[4096] * 4)


def report(result: dict[str, Any], top: int) -> None:
    def fmt(r: dict[str, Any]) -> str:
        if not r.get("us"):
            return str(r)
        return f"{r['us']:7.1f} us {r['of_copy']:5.2f} of copy {r['tflops']:6.1f} TFLOP/s"

    print(f"{result['shape']} [{result['kernel']}]", flush=True)
    print(f"  shipped            {fmt(result['shipped'])}")
    for r in result["ranked"][:top]:
        print(f"  {str(r['config']):18s} {fmt(r)}")
    errors = [r for r in result["all"] if "error" in r]
    if errors:
        print(f"  {len(errors)} configs failed, e.g. {errors[0]}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=[], help="shapes whose name has one")
    parser.add_argument("--prefill", action="store_true", help="the long-query tiles")
    args = parser.parse_args()
    copy_gbps = copy_bandwidth()
    sms = num_sms(torch.cuda.current_device())
    print(f"copy {copy_gbps:.0f} GB/s, {sms} SMs", flush=True)
    results = []
    for shape in prefill_shapes() if args.prefill else []:
        result = {
            "kernel": "paged prefill",
            **sweep(shape, PREFILL_CONFIGS, prefill_tiles, copy_gbps),
        }
        report(result, args.top)
        results.append(result)
    for shape, with_prefix in [] if args.prefill else shapes(args.only):
        result = {"kernel": "paged", **sweep(shape, DECODE_CONFIGS, decode_tiles, copy_gbps)}
        report(result, args.top)
        results.append(result)
        if with_prefix:
            result = {"kernel": "prefix", **sweep(shape, PREFIX_CONFIGS, prefix_tiles, copy_gbps)}
            report(result, args.top)
            results.append(result)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attn_tune.json"), "w") as f:
            json.dump({"copy_gbps": copy_gbps, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
