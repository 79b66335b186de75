"""Check and time Tessera's Triton kernels on a CUDA GPU.

    PYTHONPATH=. python bench/kernels_gpu.py [--quick]

1. Correctness at realistic sizes (Llama-3-8B shapes: 32 query heads, 8 KV heads, head
   size 128, bf16, cache blocks of 16), plus the variants a model may need (head sizes
   80 and 256, GQA 1, FP8 cache, sliding window, soft cap, fp32): each kernel against
   its PyTorch reference on the same GPU, ||out - ref|| / ||ref|| under 1e-2 for 16-bit
   outputs and 1e-4 for fp32, outputs poisoned with NaN first so unwritten elements show.
2. Timing, two ways, both with the L2 cache flushed before every call:
   - `do_bench us`: triton.testing.do_bench, median. It times eager calls, so where the
     host takes longer to launch a call than the GPU to run it (small shapes, a slow
     host CPU) it measures the launch overhead;
   - `graph us`: the kernel alone, GPU time: a CUDA graph of 20 x (flush, call) replayed,
     minus a graph of the 20 flushes alone. This is what a decode step under CUDA graphs
     pays, and what GB/s, the fraction of the copy floor and TFLOP/s are computed from.
   Bytes are the fewest the kernel must move (each input read once, each output written
   once); the copy floor is a measured device-to-device copy (read + write), the rate no
   memory-bound kernel can beat. The PyTorch reference's do_bench time is shown where
   it is cheap.

Prints a table; writes everything to $OUT/kernels.json when OUT is set. Exit status 1
if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from executor.messages import SamplingOptions
from executor.sampler import Sampler, SamplingBatch
from kernels.activation import (
    gelu_new_ref,
    gelu_new_triton,
    gelu_ref,
    gelu_triton,
    relu_ref,
    relu_triton,
    silu_and_mul_ref,
    silu_and_mul_triton,
)
from kernels.attention import (
    choose_num_splits,
    choose_prefix_splits,
    paged_attention,
    paged_attention_cascade_triton,
    paged_attention_ref,
    paged_attention_split_kv_triton,
    paged_attention_triton,
)
from kernels.dispatch import num_sms
from kernels.kv_write import CacheWrite, write_kv_ref, write_kv_triton
from kernels.norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from kernels.qk_norm_rotary import qk_norm_rotary_ref, qk_norm_rotary_triton
from kernels.rotary import rotary_embedding_ref, rotary_embedding_triton
from kernels.sampling import gumbel_noise_ref, row_keys, sample_tokens_ref, sample_tokens_triton
from kernels.skinny_gemm import skinny_linear_ref, skinny_linear_triton

DEV = "cuda"
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
# Llama-3-8B
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, BLOCK = 32, 8, 128, 4096, 14336, 16


# ---- results ------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    err: float
    tol: float
    ok: bool


@dataclass
class Timing:
    kernel: str
    shape: str
    ms: float  # do_bench median
    graph_ms: float | None  # GPU time alone, from CUDA-graph replays (None if capture failed)
    bytes: int
    gbps: float
    of_copy: float  # achieved GB/s over the copy bandwidth
    tflops: float | None = None
    ref_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


CHECKS: list[Check] = []
TIMINGS: list[Timing] = []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if out64.isnan().any():
        return float("nan")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float | None = None) -> None:
    tol = tol if tol is not None else (1e-4 if out.dtype == torch.float32 else 1e-2)
    err = rel_err(out, ref)
    ok = err == err and err < tol  # NaN fails
    CHECKS.append(Check(name, err, tol, ok))
    print(f"  {'ok ' if ok else 'BAD'} {name:58s} rel err {err:.2e} (tol {tol:.0e})", flush=True)


def bench(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


def _replay_ms(graph: torch.cuda.CUDAGraph, times: int = 7) -> float:
    samples = []
    for _ in range(times):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[times // 2]


def graph_bench(fn: Callable[[], Any], reps: int = 20) -> float | None:
    """GPU time of fn in ms with a cold L2: CUDA graph of reps x (flush, fn) minus one of
    reps x flush. None if fn cannot be captured."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(128 << 20, dtype=torch.uint8, device=DEV))  # > the L2
    flush = _FLUSH[0]
    try:
        fn()  # compile and load outside the capture
        torch.cuda.synchronize()
        graphs = []
        for with_fn in (True, False):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    flush.zero_()
                    if with_fn:
                        fn()
            graphs.append(graph)
        both, flush_only = (_replay_ms(g) for g in graphs)
        return max(both - flush_only, 0.0) / reps
    except RuntimeError as e:  # capture not possible: report eager timings only
        print(f"  (no CUDA graph: {e})", flush=True)
        return None


def record(
    kernel: str,
    shape: str,
    fn: Callable[[], Any],
    nbytes: int,
    copy_gbps: float,
    flops: float | None = None,
    ref_fn: Callable[[], Any] | None = None,
    **extra: Any,
) -> Timing:
    ms = bench(fn)
    graph_ms = graph_bench(fn)
    kernel_ms = graph_ms if graph_ms else ms
    gbps = nbytes / kernel_ms / 1e6
    t = Timing(
        kernel=kernel,
        shape=shape,
        ms=ms,
        graph_ms=graph_ms,
        bytes=nbytes,
        gbps=gbps,
        of_copy=gbps / copy_gbps,
        tflops=flops / kernel_ms / 1e9 if flops else None,
        ref_ms=bench(ref_fn) if ref_fn is not None else None,
        extra=extra,
    )
    TIMINGS.append(t)
    graph = f"{graph_ms * 1e3:9.1f}" if graph_ms else "        -"
    print(f"  {kernel:20s} {shape:38s} {ms * 1e3:9.1f} {graph} us {gbps:6.0f} GB/s", flush=True)
    return t


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written, in GB/s."""
    src = torch.randn(1 << 28, device=DEV)  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = bench(partial(dst.copy_, src))
    return 2 * (1 << 30) / ms / 1e6


# ---- attention ----------------------------------------------------------------------------


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    q_lens: list[int]
    ctx_lens: list[int]

    @property
    def max_query_len(self) -> int:
        return max(self.q_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.ctx_lens)

    def args(self, out: torch.Tensor, scale: float) -> tuple[Any, ...]:
        return (
            self.q, self.k_cache, self.v_cache, out, self.query_start_loc, self.seq_lens,
            self.block_tables, self.max_query_len, self.max_seq_len, scale,
        )  # fmt: skip


def make_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    block: int = BLOCK,
    dtype: torch.dtype = BF16,
    cache_dtype: torch.dtype | None = None,
) -> Batch:
    """Random q and cache; each sequence's blocks scattered through the cache."""
    per_seq = [-(-n // block) for n in ctx_lens]
    num_blocks = sum(per_seq) + 1
    width = max(per_seq)
    order = torch.randperm(num_blocks, device=DEV, dtype=torch.int32)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32, device=DEV)
    used = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, block, kv_heads, head_dim)
    cache_dtype = cache_dtype or dtype
    starts = torch.tensor([0, *q_lens], device=DEV).cumsum(0).to(torch.int32)
    return Batch(
        q=torch.randn(sum(q_lens), heads, head_dim, device=DEV).to(dtype),
        k_cache=torch.randn(shape, device=DEV).to(cache_dtype),
        v_cache=torch.randn(shape, device=DEV).to(cache_dtype),
        query_start_loc=starts,
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEV),
        block_tables=tables,
        q_lens=q_lens,
        ctx_lens=ctx_lens,
    )


def share_prefix(b: Batch, prefix_len: int) -> Batch:
    """Every sequence's first prefix_len keys become sequence 0's blocks (prefix caching)."""
    n = prefix_len // b.k_cache.shape[1]
    b.block_tables[:, :n] = b.block_tables[0, :n].clone()
    return b


def prefix_tensor(prefix_len: int) -> torch.Tensor:
    return torch.tensor([prefix_len], dtype=torch.int32, device=DEV)


def attention_ref(b: Batch, scale: float, **kw: Any) -> torch.Tensor:
    # The reference reads the same cache (FP8 included) and computes in float32.
    out = torch.full(b.q.shape, float("nan"), dtype=torch.float32, device=DEV)
    paged_attention_ref(b.q.float(), b.k_cache, b.v_cache, out, *b.args(out, scale)[4:], **kw)
    return out


def run_attention(b: Batch, scale: float, variant: str, **kw: Any) -> torch.Tensor:
    out = torch.full(b.q.shape, float("nan"), dtype=b.q.dtype, device=DEV)
    if variant == "public":
        paged_attention(*b.args(out, scale), **kw)
    elif variant == "one-pass":
        paged_attention_triton(*b.args(out, scale), **kw)
    elif variant.startswith("cascade"):  # cascade:<prefix_len>:<prefix splits>:<splits>
        prefix, prefix_splits, splits = (int(x) for x in variant.split(":")[1:])
        paged_attention_cascade_triton(
            *b.args(out, scale), **kw, shared_prefix_len=prefix_tensor(prefix),
            prefix_splits=prefix_splits, num_splits=splits,
        )  # fmt: skip
    else:
        paged_attention_split_kv_triton(*b.args(out, scale), **kw, num_splits=int(variant))
    return out


def check_attention() -> None:
    print("attention", flush=True)
    sc = HEAD_DIM**-0.5
    cases: list[tuple[str, Batch, dict[str, Any], list[str]]] = [
        ("decode b=1 ctx=8192", make_batch([1], [8192]), {}, ["public", "one-pass", "16"]),
        (
            "decode b=64 ctx=1..4096",
            make_batch([1] * 64, torch.randint(1, 4097, (64,)).tolist()),
            {},
            ["public", "one-pass", "4"],
        ),
        (
            "mixed: 48 decodes + chunk 512@1536 + prefill 300",
            make_batch([1] * 48 + [512, 300], [2048] * 48 + [2048, 300]),
            {},
            ["public"],
        ),
        ("prefill 4096", make_batch([4096], [4096]), {}, ["public"]),
        (
            "qwen3 heads 16/8: decode b=256 ctx=200..2048",
            make_batch([1] * 256, torch.randint(200, 2049, (256,)).tolist(), heads=16),
            {},
            ["public", "one-pass", "4"],
        ),
        (
            "fp8 e4m3 cache, decode b=16 ctx=2048",
            make_batch([1] * 16, [2048] * 16, cache_dtype=FP8),
            {"k_scale": 0.5, "v_scale": 1.5},
            ["one-pass", "8"],
        ),
        (
            "fp8 e4m3 cache, prefill 1024",
            make_batch([1024], [1024], cache_dtype=FP8),
            {"k_scale": 0.5, "v_scale": 1.5},
            ["one-pass"],
        ),
    ]
    cases += [
        (
            "cascade b=256 shared 896 + 124..252",
            share_prefix(make_batch([1] * 256, torch.randint(1020, 1149, (256,)).tolist()), 896),
            {},
            ["cascade:896:5:1", "cascade:896:1:1", "cascade:0:3:1"],
        ),
        (
            "cascade b=8 shared 4096 + 1..2000, fp8 cache",
            share_prefix(
                make_batch([1] * 8, torch.randint(4097, 6097, (8,)).tolist(), cache_dtype=FP8),
                4096,
            ),
            {"k_scale": 0.5, "v_scale": 1.5},
            ["cascade:4096:8:4"],
        ),
    ]
    for name, b, kw, variants in cases:
        ref = attention_ref(b, sc, **kw)
        for v in variants:
            check(f"{name} [{v}]", run_attention(b, sc, v, **kw), ref)
        del b, ref
    # Variants other models need, at small sizes: compile and correctness only.
    small: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("D=80 GQA1 block32", dict(heads=16, kv_heads=16, head_dim=80, block=32), {}),
        ("D=96 fp16", dict(heads=8, kv_heads=2, head_dim=96, dtype=torch.float16), {}),
        ("D=256 window 300 cap 30", dict(heads=8, kv_heads=4, head_dim=256), {"sliding_window": 300, "soft_cap": 30.0}),
        ("D=64 fp32", dict(heads=8, kv_heads=8, head_dim=64, dtype=torch.float32), {}),
        ("D=128 window 256", dict(), {"sliding_window": 256}),
        ("D=128 e5m2 cache", dict(cache_dtype=torch.float8_e5m2), {"k_scale": 2.0}),
    ]  # fmt: skip
    for name, shape, kw in small:
        b = make_batch([1, 1, 37, 200], [700, 1300, 600, 200], **shape)
        sc_b = b.q.shape[-1] ** -0.5
        check(
            f"{name} mixed", run_attention(b, sc_b, "one-pass", **kw), attention_ref(b, sc_b, **kw)
        )
        d = make_batch([1] * 3, [1500, 2100, 90], **shape)
        check(f"{name} split-KV", run_attention(d, sc_b, "5", **kw), attention_ref(d, sc_b, **kw))
        if "sliding_window" not in kw:
            c = share_prefix(make_batch([1] * 9, [600 + 40 * i for i in range(9)], **shape), 512)
            ref = attention_ref(c, sc_b, **kw)
            check(f"{name} cascade", run_attention(c, sc_b, "cascade:512:3:2", **kw), ref)


def attention_cost(b: Batch) -> tuple[int, float]:
    """Fewest bytes (q, out, each sequence's K and V once) and the FLOPs of QK and PV."""
    heads, head_dim = b.q.shape[1:]
    kv_heads = b.k_cache.shape[2]
    kv_bytes = sum(b.ctx_lens) * kv_heads * head_dim * 2 * b.k_cache.element_size()
    q_bytes = 2 * b.q.numel() * b.q.element_size()
    # query i of a sequence sits at position ctx - q_len + i and sees that many keys + 1
    keys = sum(
        ql * (cl - ql) + ql * (ql + 1) // 2 for ql, cl in zip(b.q_lens, b.ctx_lens, strict=True)
    )
    return kv_bytes + q_bytes, 4.0 * heads * head_dim * keys


def time_attention(copy_gbps: float, quick: bool) -> None:
    print("attention timings", flush=True)
    sc = HEAD_DIM**-0.5
    sms = num_sms(torch.cuda.current_device())
    batches = [1, 16, 64, 256] if not quick else [1, 64]
    contexts = [1024, 8192] if not quick else [4096]
    for ctx in contexts:
        for bs in batches:
            b = make_batch([1] * bs, [ctx] * bs)
            nbytes, flops = attention_cost(b)
            args = b.args(torch.empty_like(b.q), sc)
            splits = choose_num_splits(bs, KV_HEADS, 1, ctx, sms)
            shape = f"decode b={bs} ctx={ctx}"
            public = partial(paged_attention, *args)
            record("attention", shape, public, nbytes, copy_gbps, flops, splits=splits)
            # The other path, to show what the heuristic chose against.
            if splits > 1:
                other, name = partial(paged_attention_triton, *args), "attention one-pass"
            else:
                other = partial(paged_attention_split_kv_triton, *args, num_splits=4)
                name = "attention split=4"
            record(name, shape, other, nbytes, copy_gbps, flops)
            del b, args
    time_cascade(copy_gbps, sms)
    timed = [
        ([1] * 64, [4096] * 64, FP8, "decode b=64 ctx=4096 fp8 cache"),
        ([4096], [4096], BF16, "prefill 4096"),
        ([1024] * 4, [1024] * 4, BF16, "prefill 4 x 1024"),
        ([1] * 64 + [2048], [2048] * 64 + [4096], BF16, "mixed 64 decodes + chunk 2048@2048"),
    ]
    for q_lens, ctx_lens, cache_dtype, shape in timed:
        b = make_batch(q_lens, ctx_lens, cache_dtype=cache_dtype)
        nbytes, flops = attention_cost(b)
        fn = partial(paged_attention, *b.args(torch.empty_like(b.q), sc))
        record("attention", shape, fn, nbytes, copy_gbps, flops)
        del b, fn


def time_cascade(copy_gbps: float, sms: int) -> None:
    """W6's decode step: 256 contexts of 1024-1152 keys sharing the first 896 (8B shape).
    Bytes: the shared keys once, each sequence's own keys once."""
    sc = HEAD_DIM**-0.5
    for bs, prefix in ((256, 896), (64, 896), (16, 3968)):
        lens = torch.randint(prefix + 124, prefix + 253, (bs,)).tolist()
        b = share_prefix(make_batch([1] * bs, lens), prefix)
        unique = prefix + sum(n - prefix for n in lens)
        nbytes = unique * KV_HEADS * HEAD_DIM * 2 * 2 + 2 * b.q.numel() * 2
        args = b.args(torch.empty_like(b.q), sc)
        shape = f"decode b={bs} shared {prefix} + 124..252"
        record("attention plain", shape, partial(paged_attention, *args), nbytes, copy_gbps)
        fn = partial(paged_attention, *args, shared_prefix_len=prefix_tensor(prefix))
        splits = choose_prefix_splits(bs, HEADS, KV_HEADS, sms)
        record("attention cascade", shape, fn, nbytes, copy_gbps, prefix_splits=splits)
        # what the choice of prefix partitions was made against
        suffix_splits = choose_num_splits(bs, KV_HEADS, 1, max(lens), sms)
        for other in sorted({1, 2, 4, 8} - {splits}):
            fn = partial(
                paged_attention_cascade_triton, *args, shared_prefix_len=prefix_tensor(prefix),
                prefix_splits=other, num_splits=suffix_splits,
            )  # fmt: skip
            record(f"cascade P={other}", shape, fn, nbytes, copy_gbps, prefix_splits=other)
        del b, args, fn


# ---- the other kernels --------------------------------------------------------------------


def write_kv_case(tokens: int, cache_dtype: torch.dtype, copy_gbps: float) -> None:
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEV).to(BF16)
    value = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEV).to(BF16)
    num_blocks = 2 * tokens // BLOCK + 8
    slots = torch.randperm(num_blocks * BLOCK, device=DEV)[:tokens]
    slots[::7] = -1  # padding tokens
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_ref, v_ref, k_out, v_out = (
        torch.full(shape, float("nan"), device=DEV).to(cache_dtype) for _ in range(4)
    )
    ks, vs = (0.5, 2.0) if cache_dtype == FP8 else (1.0, 1.0)
    write_kv_ref(key, value, k_ref, v_ref, slots, ks, vs)
    write_kv_triton(key, value, k_out, v_out, slots, ks, vs)
    same = all(
        torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        for x, y in ((k_ref, k_out), (v_ref, v_out))
    )
    name = f"write_kv T={tokens} -> {str(cache_dtype).removeprefix('torch.')}"
    CHECKS.append(Check(name + " bit-exact", 0.0 if same else 1.0, 0.0, same))
    print(f"  {'ok ' if same else 'BAD'} {name} bit-exact", flush=True)
    nbytes = 2 * key.numel() * (key.element_size() + k_ref.element_size()) + tokens * 8
    record(
        "write_kv",
        f"T={tokens} Hk=8 D=128 -> {str(cache_dtype).removeprefix('torch.')}",
        lambda: write_kv_triton(key, value, k_out, v_out, slots, ks, vs),
        nbytes,
        copy_gbps,
        ref_fn=lambda: write_kv_ref(key, value, k_ref, v_ref, slots, ks, vs),
    )


def norm_case(tokens: int, copy_gbps: float) -> None:
    x = torch.randn(tokens, HIDDEN, device=DEV).to(BF16)
    residual = torch.randn(tokens, HIDDEN, device=DEV).to(BF16)
    w = (torch.rand(HIDDEN, device=DEV) + 0.5).to(BF16)
    eps = 1e-5
    ref = rms_norm_ref(x.double(), w.double(), eps)
    check(f"rms_norm T={tokens}", rms_norm_triton(x, w, eps), ref)
    out, res = fused_add_rms_norm_triton(x, residual, w, eps)
    ref_out, ref_res = fused_add_rms_norm_ref(x.double(), residual.double(), w.double(), eps)
    check(f"fused_add_rms_norm T={tokens} (out)", out, ref_out)
    check(f"fused_add_rms_norm T={tokens} (residual)", res, ref_res)
    n = x.numel() * x.element_size()
    shape = f"T={tokens} H={HIDDEN} bf16"
    record(
        "rms_norm",
        shape,
        lambda: rms_norm_triton(x, w, eps),
        2 * n,
        copy_gbps,
        ref_fn=lambda: rms_norm_ref(x, w, eps),
    )
    record(
        "fused_add_rms_norm",
        shape,
        lambda: fused_add_rms_norm_triton(x, residual, w, eps),
        4 * n,
        copy_gbps,
        ref_fn=lambda: fused_add_rms_norm_ref(x, residual, w, eps),
    )


def cos_sin_cache(rot_dim: int, max_pos: int = 8192) -> torch.Tensor:
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, rot_dim, 2, device=DEV).float() / rot_dim)
    angles = torch.outer(torch.arange(max_pos, device=DEV).float(), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)  # [max_pos, rot_dim]


def rotary_case(is_neox: bool, rot_dim: int, copy_gbps: float) -> None:
    tokens = 4096
    # q and k as views of one fused qkv projection output, as a model passes them.
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV).to(BF16)
    q = qkv[:, : HEADS * HEAD_DIM]
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM]
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    cache = cos_sin_cache(rot_dim)
    q_ref, k_ref = q.double(), k.double()
    rotary_embedding_ref(positions, q_ref, k_ref, HEAD_DIM, cache.double(), is_neox)
    q_out, k_out = q.clone(), k.clone()
    rotary_embedding_triton(positions, q_out, k_out, HEAD_DIM, cache, is_neox)
    layout = "neox" if is_neox else "gptj"
    check(f"rotary {layout} rot={rot_dim} q", q_out, q_ref)
    check(f"rotary {layout} rot={rot_dim} k", k_out, k_ref)
    nbytes = 2 * tokens * (HEADS + KV_HEADS) * rot_dim * 2 + tokens * (rot_dim * 4 + 8)
    record(
        "rotary",
        f"T={tokens} {HEADS}+{KV_HEADS}x128 {layout} rot={rot_dim}",
        lambda: rotary_embedding_triton(positions, q, k, HEAD_DIM, cache, is_neox),
        nbytes,
        copy_gbps,
        ref_fn=lambda: rotary_embedding_ref(positions, q, k, HEAD_DIM, cache, is_neox),
    )


def qk_norm_rotary_case(tokens: int, copy_gbps: float) -> None:
    """Qwen3-0.6B's heads (16 + 8 of 128): the fused kernel against its reference, and
    its time against the unfused Triton path it replaced (two copies, two norms, rotary)."""
    heads, kv_heads = 16, 8
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * HEAD_DIM, device=DEV).to(BF16)
    q = qkv[:, : heads * HEAD_DIM]
    k = qkv[:, heads * HEAD_DIM : (heads + kv_heads) * HEAD_DIM]
    qw, kw = ((torch.rand(HEAD_DIM, device=DEV) + 0.5).to(BF16) for _ in range(2))
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    cache, eps = cos_sin_cache(HEAD_DIM), 1e-6
    q_ref, k_ref = q.double(), k.double()
    qk_norm_rotary_ref(
        positions, q_ref, k_ref, HEAD_DIM, cache.double(), qw.double(), kw.double(), eps
    )
    q_out, k_out = q.clone(), k.clone()
    qk_norm_rotary_triton(positions, q_out, k_out, HEAD_DIM, cache, qw, kw, eps)
    check(f"qk_norm_rotary T={tokens} q", q_out, q_ref)
    check(f"qk_norm_rotary T={tokens} k", k_out, k_ref)

    def unfused() -> None:
        qn = rms_norm_triton(q.reshape(-1, HEAD_DIM), qw, eps).view(tokens, -1)
        kn = rms_norm_triton(k.reshape(-1, HEAD_DIM), kw, eps).view(tokens, -1)
        rotary_embedding_triton(positions, qn, kn, HEAD_DIM, cache, True)

    shape = f"T={tokens} {heads}+{kv_heads}x128"
    nbytes = 2 * tokens * (heads + kv_heads) * HEAD_DIM * 2 + tokens * (HEAD_DIM * 4 + 8)
    fused = partial(qk_norm_rotary_triton, positions, q, k, HEAD_DIM, cache, qw, kw, eps)
    record("qk_norm_rotary", shape, fused, nbytes, copy_gbps)
    record("qk norms + rotary, unfused", shape, unfused, nbytes, copy_gbps)


def rotary_cache_write_case(tokens: int, cache_dtype: torch.dtype, copy_gbps: float) -> None:
    """The 8B shape's rotary with the cache write (CacheWrite) against rotary then
    write_kv, the two launches it replaces: the same bits, and both times."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV).to(BF16)
    widths = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]  # q | k | v
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    cos_sin = cos_sin_cache(HEAD_DIM)
    blocks = tokens // BLOCK + 8
    slots = torch.randperm(blocks * BLOCK, device=DEV)[:tokens]
    caches = [torch.zeros(2, blocks, BLOCK, KV_HEADS, HEAD_DIM, device=DEV).to(cache_dtype)
              for _ in range(2)]  # fmt: skip
    qkv_fused, qkv_apart = qkv.clone(), qkv.clone()

    def fused(x: torch.Tensor = qkv) -> None:
        qx, kx, vx = x.split(widths, dim=-1)
        kv = CacheWrite(vx.view(-1, KV_HEADS, HEAD_DIM), caches[0][0], caches[0][1], slots,
                        0.5, 0.25)  # fmt: skip
        rotary_embedding_triton(positions, qx, kx, HEAD_DIM, cos_sin, True, kv)

    def apart(x: torch.Tensor = qkv) -> None:
        qx, kx, vx = x.split(widths, dim=-1)
        rotary_embedding_triton(positions, qx, kx, HEAD_DIM, cos_sin, True)
        write_kv_triton(kx.view(-1, KV_HEADS, HEAD_DIM), vx.view(-1, KV_HEADS, HEAD_DIM),
                        caches[1][0], caches[1][1], slots, 0.5, 0.25)  # fmt: skip

    fused(qkv_fused)
    apart(qkv_apart)
    same = torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8)) and torch.equal(
        qkv_fused, qkv_apart
    )
    name = f"rotary + cache write T={tokens} {str(cache_dtype).split('.')[-1]}"
    CHECKS.append(Check(name, 0.0 if same else 1.0, 1e-9, same))
    print(f"  {'ok ' if same else 'BAD'} {name:58s} {'same bits' if same else 'differs'}")
    nbytes = 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * 2 + 2 * tokens * KV_HEADS * HEAD_DIM * 4
    shape = f"T={tokens} {HEADS}+{KV_HEADS}x128 {str(cache_dtype).split('.')[-1]} cache"
    record("rotary + cache write", shape, fused, nbytes, copy_gbps)
    record("rotary, write_kv apart", shape, apart, nbytes, copy_gbps)


def silu_and_mul_case(tokens: int, copy_gbps: float) -> None:
    x = (torch.randn(tokens, 2 * INTERMEDIATE, device=DEV) * 3).to(BF16)
    check(f"silu_and_mul T={tokens}", silu_and_mul_triton(x), silu_and_mul_ref(x.double()))
    record(
        "silu_and_mul",
        f"T={tokens} I={INTERMEDIATE} bf16",
        lambda: silu_and_mul_triton(x),
        3 * tokens * INTERMEDIATE * x.element_size(),
        copy_gbps,
        ref_fn=lambda: silu_and_mul_ref(x),
    )


def elementwise_case(
    name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    ref: Callable[[torch.Tensor], torch.Tensor],
    copy_gbps: float,
) -> None:
    x = (torch.randn(4096, 3072, device=DEV) * 3).to(BF16)
    check(f"{name} 4096x3072", fn(x), ref(x.double()))
    nbytes = 2 * x.numel() * x.element_size()
    record(name, "4096x3072 bf16", lambda: fn(x), nbytes, copy_gbps, ref_fn=lambda: ref(x))


def sampling_case(rows: int, vocab: int, copy_gbps: float) -> None:
    """The fused sampler against its reference (same tokens but for near-ties of the
    log's rounding), and its time against the unfused Sampler's on the same batch."""
    logits = (torch.randn(rows, vocab, device=DEV) * 3).to(BF16)
    inv_t = torch.tensor([0.0 if r % 5 == 0 else 1.0 / 0.6 for r in range(rows)], device=DEV)
    seed = 12345
    keys = row_keys(seed, rows, DEV)
    out, ref = (torch.full((rows,), -1, dtype=torch.int64, device=DEV) for _ in range(2))
    sample_tokens_triton(logits, inv_t, seed, out)
    sample_tokens_ref(logits, inv_t, seed, ref)
    x = logits.float()
    scores = torch.where(inv_t[:, None] == 0, x, x * inv_t[:, None] + gumbel_noise_ref(keys, vocab))
    gap = scores.gather(1, ref[:, None]) - scores.gather(1, out.clamp(0, vocab - 1)[:, None])
    bad = int(((out != ref) & (gap.squeeze(1) > 1e-5)).sum())
    name = f"sampling {rows}x{vocab} bf16"
    CHECKS.append(Check(name, bad / rows, 1e-9, bad == 0))
    print(f"  {'ok ' if bad == 0 else 'BAD'} {name:58s} {bad} rows differ", flush=True)
    shape = f"{rows}x{vocab} bf16, T=0.6"
    nbytes = logits.numel() * logits.element_size()
    record("sampling fused", shape, lambda: sample_tokens_triton(logits, inv_t, seed, out),
           nbytes, copy_gbps)  # fmt: skip
    options = [SamplingOptions(temperature=0.0 if r % 5 == 0 else 0.6) for r in range(rows)]
    previous = os.environ.get("TESSERA_KERNELS")
    os.environ["TESSERA_KERNELS"] = "ref"  # builds the unfused batch
    try:
        batch = SamplingBatch.build(options, [[]] * rows, [[]] * rows, {}, vocab, DEV)
    finally:
        os.environ.pop("TESSERA_KERNELS")
        if previous is not None:
            os.environ["TESSERA_KERNELS"] = previous
    sampler = Sampler()
    record("sampling unfused", shape, lambda: sampler(logits, batch), nbytes, copy_gbps)


def skinny_gemm_case(rows: int, n: int, k: int, copy_gbps: float) -> None:
    """The decode-sized linear layer against cuBLAS (F.linear) on the same operands."""
    x = torch.randn(rows, k, device=DEV).to(BF16)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF16)
    check(f"skinny_linear {rows}x{k} @ {n}x{k}", skinny_linear_triton(x, w),
          skinny_linear_ref(x.double(), w.double()))  # fmt: skip
    record("skinny_linear", f"M={rows} N={n} K={k} bf16", lambda: skinny_linear_triton(x, w),
           w.numel() * w.element_size(), copy_gbps, ref_fn=lambda: skinny_linear_ref(x, w))  # fmt: skip


def check_and_time_others(copy_gbps: float) -> None:
    print("write_kv, norms, rotary, activations", flush=True)
    for tokens in (256, 4096):
        for cache_dtype in (BF16, FP8):
            write_kv_case(tokens, cache_dtype, copy_gbps)
    for tokens in (256, 4096):
        norm_case(tokens, copy_gbps)
    for is_neox, rot_dim in ((True, 128), (False, 128), (True, 64)):
        rotary_case(is_neox, rot_dim, copy_gbps)
    for tokens in (256, 4096):
        qk_norm_rotary_case(tokens, copy_gbps)
    for tokens, cache_dtype in ((1, BF16), (256, BF16), (256, FP8)):
        rotary_cache_write_case(tokens, cache_dtype, copy_gbps)
    for tokens in (256, 4096):
        silu_and_mul_case(tokens, copy_gbps)
    for rows, n, k in ((1, 6144, HIDDEN), (8, 28672, HIDDEN), (16, HIDDEN, INTERMEDIATE)):
        skinny_gemm_case(rows, n, k, copy_gbps)
    elementwise_case("gelu", gelu_triton, gelu_ref, copy_gbps)
    elementwise_case("gelu_new", gelu_new_triton, gelu_new_ref, copy_gbps)
    elementwise_case("relu", relu_triton, relu_ref, copy_gbps)
    for rows, vocab in ((256, 151936), (256, 128256), (8, 128256), (1, 128256)):
        sampling_case(rows, vocab, copy_gbps)


# ---- main ---------------------------------------------------------------------------------


def print_table(copy_gbps: float) -> None:
    print(f"\ncopy bandwidth floor: {copy_gbps:.0f} GB/s (device-to-device, read + write)")
    head = (
        f"{'kernel':20s} {'shape':38s} {'do_bench':>9s} {'graph us':>9s} {'MB':>8s} "
        f"{'GB/s':>6s} {'of copy':>7s} {'TFLOP/s':>7s} {'ref us':>9s} {'vs ref':>7s}"
    )
    print(head)
    print("-" * len(head))
    for t in TIMINGS:
        graph = f"{t.graph_ms * 1e3:9.1f}" if t.graph_ms else "        -"
        tf = f"{t.tflops:7.1f}" if t.tflops else " " * 7
        ref = f"{t.ref_ms * 1e3:9.1f} {t.ref_ms / t.ms:6.1f}x" if t.ref_ms else ""
        print(
            f"{t.kernel:20s} {t.shape:38s} {t.ms * 1e3:9.1f} {graph} {t.bytes / 1e6:8.1f} "
            f"{t.gbps:6.0f} {t.of_copy:7.0%} {tf} {ref}"
        )
    bad = [c for c in CHECKS if not c.ok]
    print(f"\n{len(CHECKS) - len(bad)} passed, {len(bad)} failed")
    for c in bad:
        print(f"  FAILED {c.name}: rel err {c.err:.3g} (tol {c.tol:.0e})")


def write_json(copy_gbps: float) -> None:
    out_dir = os.environ.get("OUT")
    if not out_dir:
        return
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    import triton

    doc = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": copy_gbps,
        "checks": [asdict(c) for c in CHECKS],
        "timings": [asdict(t) for t in TIMINGS],
    }
    path = os.path.join(out_dir, "kernels.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer attention timing sizes")
    parser.add_argument("--skip-checks", action="store_true", help="timings only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    import triton

    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}"
    )
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    if not args.skip_checks:
        check_attention()
    check_and_time_others(copy_gbps)
    time_attention(copy_gbps, args.quick)
    print_table(copy_gbps)
    write_json(copy_gbps)
    return 0 if all(c.ok for c in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
