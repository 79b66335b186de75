"""Sweep split-KV partitions per decode batch size, at the workloads' decode states.

    PYTHONPATH=. python bench/split_tune.py [--model qwen3 8b] [--splits 1 2 4 ...]

`kernels.attention.choose_num_splits` decides how many partitions each decode context
is cut into. Under CUDA graphs it knows only the batch size and the graph's bound on the
context length, so its rule must hold for the lengths a workload actually has at that
batch size. This times every split count at each batch size with those lengths and the
graph's bound as max_seq_len (GPU time of CUDA-graph replays with a cold L2, as
bench/kernels_gpu.py), checks each against the float32 reference, and prints the split
count chosen now beside the fastest. Writes $OUT/split_tune.json when OUT is set.

Lengths: W2 (Qwen3-0.6B heads) holds at step t the requests whose output is longer than
t, each at its prompt length plus t; prompts and outputs are uniform in 100..1024, so
b of the 256 remain near t = 1024 - 924 b / 256. W1/W4 (8B heads) decode 1024-token
prompts for 128 tokens; 8b-4k is #5's decode at 4,096 keys. Also times, at batch 1 and 4,096 keys, a device copy of the
same bytes: the least any kernel moving them takes at this size on this card.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from typing import Any

import torch

from bench.kernels_gpu import (
    attention_cost,
    attention_ref,
    copy_bandwidth,
    graph_bench,
    make_batch,
    rel_err,
)
from kernels.attention import (
    choose_num_splits,
    paged_attention_split_kv_triton,
    paged_attention_triton,
)
from kernels.dispatch import num_sms

BATCHES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 32]
# query heads, the graph's bound on context lengths
MODELS = {"qwen3": (16, 4096), "8b": (32, 2048), "8b-4k": (32, 4096)}


def lengths(model: str, batch: int, gen: torch.Generator) -> list[int]:
    if model == "qwen3":
        t = max(0, round(1024 - 924 * batch / 256))
        return (torch.randint(100, 1025, (batch,), generator=gen) + t).tolist()
    if model == "8b-4k":  # #5's long-context decode
        return [4096] * batch
    return torch.randint(1024, 1153, (batch,), generator=gen).tolist()


def time_splits(b: Any, bound: int, splits: int, ref: torch.Tensor) -> dict[str, Any]:
    out = torch.empty_like(b.q)
    args = (*b.args(out, b.q.shape[2] ** -0.5)[:8], bound, b.q.shape[2] ** -0.5)
    if splits == 1:
        call = partial(paged_attention_triton, *args)
    else:
        call = partial(paged_attention_split_kv_triton, *args, num_splits=splits)
    out.fill_(float("nan"))
    call()
    err = rel_err(out.float(), ref)
    if not err < 2e-2:
        return {"splits": splits, "error": f"rel. err. {err:.2e}"}
    ms = graph_bench(call)
    return {"splits": splits, "us": ms * 1e3 if ms else None, "rel_err": err}


def sweep(model: str, batch: int, splits: list[int], copy_gbps: float, sms: int, gen) -> dict:
    heads, bound = MODELS[model]
    b = make_batch([1] * batch, lengths(model, batch, gen), heads=heads)
    ref = attention_ref(b, b.q.shape[2] ** -0.5)
    nbytes, _ = attention_cost(b)
    rows = [time_splits(b, bound, s, ref) for s in splits]
    for r in rows:
        if r.get("us"):
            r["of_copy"] = nbytes / (r["us"] * 1e-6) / 1e9 / copy_gbps
    chosen = choose_num_splits(batch, b.k_cache.shape[2], 1, bound, sms)
    return {"model": model, "batch": batch, "chosen": chosen, "bytes": nbytes, "rows": rows}


def report(r: dict[str, Any]) -> None:
    timed = [x for x in r["rows"] if x.get("us")]
    best = min(timed, key=lambda x: x["us"])
    now = next((x for x in timed if x["splits"] == r["chosen"]), None)
    cells = " ".join(f"{x['splits']}:{x['us']:.1f}" for x in timed)
    now_txt = f"{now['us']:.1f} us ({now['of_copy']:.2f})" if now else "not swept"
    print(
        f"{r['model']:5s} b={r['batch']:3d} chosen {r['chosen']:2d} {now_txt}; best "
        f"{best['splits']:2d} {best['us']:.1f} us ({best['of_copy']:.2f}) | {cells}",
        flush=True,
    )


def copy_floor(copy_gbps: float) -> dict[str, float]:
    """A device copy moving the bytes of 8B batch-1 decode attention at 4,096 keys."""
    kv_bytes = 4096 * 8 * 128 * 2 * 2  # keys and values, 8 KV heads of 128, bf16
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_bench(partial(dst.copy_, src)) or float("nan")
    return {"bytes": kv_bytes, "us": ms * 1e3, "of_copy": kv_bytes / (ms * 1e-3) / 1e9 / copy_gbps}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", nargs="*", type=int, default=BATCHES)
    parser.add_argument("--splits", nargs="*", type=int, default=SPLITS)
    args = parser.parse_args()
    copy_gbps = copy_bandwidth()
    sms = num_sms(torch.cuda.current_device())
    floor = copy_floor(copy_gbps)
    print(
        f"copy {copy_gbps:.0f} GB/s, {sms} SMs; a copy of 8B b=1 4K's {floor['bytes']} bytes:"
        f" {floor['us']:.1f} us ({floor['of_copy']:.2f} of the rate)",
        flush=True,
    )
    results = []
    for model in args.model:
        gen = torch.Generator().manual_seed(0)
        for batch in args.batch:
            r = sweep(model, batch, args.splits, copy_gbps, sms, gen)
            report(r)
            results.append(r)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "split_tune.json"), "w") as f:
            json.dump({"copy_gbps": copy_gbps, "copy_floor": floor, "results": results}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
