"""One token per row of a logits matrix in a single pass: greedy, or temperature sampling.

Rows whose only sampling option is a temperature (the common case: no top-k, top-p,
min-p, penalties, logprobs or seed) need neither a softmax nor a noise tensor. Sampling
from softmax(x / T) is the Gumbel-max draw argmax(x / T + G), G = -log(-log U), U
uniform in (0, 1): the exponential race of executor.sampler in log space. Here U comes
from a hash of (row key, column), so one pass reads each logit once, in its own dtype,
and keeps a running argmax; the unfused path (float32 copy, divide, softmax, noise,
divide, argmax) moves the [S, V] matrix about eleven times.

Greedy rows (inverse temperature 0) take the plain argmax, first index on ties, as
torch.argmax. Each row's key is a hash of (step seed, row) (`row_keys`): a fresh seed
per step gives every row its own stream of noise, and the same seed the same tokens.

U is 24 bits of lowbias32 (a 32-bit integer hash with very low bias) of the
Weyl-sequence value row_key + column * 0x9E3779B9; the PyTorch reference computes the
same bits, so the kernel and the reference pick the same token up to float rounding of
the log (the tests allow a near-tie there).
"""

from __future__ import annotations

import torch

from kernels.dispatch import (
    FLOAT_DTYPES,
    cdiv,
    check_dim,
    check_dtype,
    check_inner_contiguous,
    check_same_device,
    num_sms,
    require,
    tl,
    triton,
    use_triton,
)

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive columns land far apart
_MIX_A = 0x7FEB352D
_MIX_B = 0x846CA68B
BLOCK_V = 2048  # columns per loop step of a program
SEED_LIMIT = 1 << 31  # step seeds are 31-bit: one int32 kernel argument
# Programs per row at most: the merge reads them in one block of this size, a constant so
# that batch sizes changing from step to step never compile a new variant.
MAX_SPLITS = 64


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for 0 <= x < 2^32 in int64 without overflow: 16-bit halves
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_B)
    return x ^ (x >> 16)


def row_keys(step_seed: int, num_rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[num_rows] int64 (uint32 values): each row's key for one step."""
    rows = torch.arange(num_rows, dtype=torch.int64, device=device)
    return mix32((step_seed % SEED_LIMIT) ^ mix32(rows))


def gumbel_noise_ref(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] float32 Gumbel noise -log(-log U) of each row key, as the kernel makes it."""
    cols = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    z = (keys.to(torch.int64)[:, None] + cols[None, :] * _GOLDEN) & _MASK32  # [S, V]
    u = ((mix32(z) >> 8).to(torch.float32) + 0.5) * (2.0**-24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def sample_tokens_ref(
    logits: torch.Tensor,  # [S, V] float
    inv_temperature: torch.Tensor,  # [S] float32; 0 = greedy
    step_seed: int,  # taken modulo SEED_LIMIT
    out: torch.Tensor,  # [S] int64, written
) -> None:
    x = logits.float()
    keys = row_keys(step_seed, x.shape[0], x.device)
    noisy = x * inv_temperature[:, None].float() + gumbel_noise_ref(keys, x.shape[1])
    scores = torch.where(inv_temperature[:, None] == 0, x, noisy)
    out.copy_(scores.argmax(dim=-1))


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["step_seed", "cols_per_split"])
def _sample_partial_kernel(
    logits_ptr,
    inv_temperature_ptr,
    step_seed,  # int32
    part_val_ptr,  # [S, splits] float32: each split's best score
    part_idx_ptr,  # [S, splits] int32: its column, the first one on ties
    vocab,
    cols_per_split,  # a multiple of BLOCK_V
    stride_row,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    inv_t = tl.load(inv_temperature_ptr + row)
    # [1]-shaped, not scalars: the interpreter's numpy scalars warn when they wrap
    zero = tl.zeros([1], tl.uint32)
    key = _mix32((zero + step_seed.to(tl.uint32)) ^ _mix32(zero + row.to(tl.uint32)))
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, vocab)
    best_val = tl.full([], float("-inf"), tl.float32)
    best_idx = lo  # a row of -inf (or NaN) still names a column of its own
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < hi
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if inv_t != 0.0:
            h = _mix32(key + cols.to(tl.uint32) * 0x9E3779B9)
            u = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
            x = tl.where(ok, x * inv_t - tl.log(-tl.log(u)), float("-inf"))
        m = tl.max(x, 0)
        i = tl.min(tl.where(x == m, cols, hi), 0)
        better = m > best_val  # strict: an earlier block keeps a tie
        best_idx = tl.where(better, i, best_idx)
        best_val = tl.where(better, m, best_val)
    tl.store(part_val_ptr + row * tl.num_programs(1) + split, best_val)
    tl.store(part_idx_ptr + row * tl.num_programs(1) + split, best_idx)


@triton.jit(do_not_specialize=["splits"])
def _sample_reduce_kernel(part_val_ptr, part_idx_ptr, out_ptr, splits, BLOCK_S: tl.constexpr):
    # Splits cover increasing columns: the first split with the best score has its
    # first column.
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < splits
    val = tl.load(part_val_ptr + row * splits + s, mask=ok, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * splits + s, mask=ok, other=0)
    m = tl.max(val, 0)
    first = tl.min(tl.where(ok & (val == m), s, BLOCK_S), 0)
    token = tl.sum(tl.where(s == first, idx, 0), 0)  # 0 when no split matched (NaN)
    tl.store(out_ptr + row, token.to(tl.int64))


def choose_splits(num_rows: int, vocab: int, sms: int) -> int:
    """Programs per row: about four per multiprocessor in all, each a whole number of
    BLOCK_V-wide steps; one row of a 128K vocabulary alone takes 63 programs."""
    return max(1, min(cdiv(4 * sms, num_rows), cdiv(vocab, BLOCK_V), MAX_SPLITS))


def _check_args(logits: torch.Tensor, inv_temperature: torch.Tensor, out: torch.Tensor) -> None:
    check_dim("logits", logits, (2,))
    check_dtype("logits", logits, FLOAT_DTYPES)
    check_inner_contiguous("logits", logits)
    check_dtype("inv_temperature", inv_temperature, (torch.float32,))
    check_dtype("out", out, (torch.int64,))
    rows = logits.shape[0]
    for name, t in (("inv_temperature", inv_temperature), ("out", out)):
        if t.shape != (rows,) or not t.is_contiguous():
            raise ValueError(f"{name}: want a contiguous ({rows},) tensor, got {tuple(t.shape)}")
    require(logits.shape[1] > 0, "logits: empty vocabulary")
    check_same_device(logits=logits, inv_temperature=inv_temperature, out=out)


def sample_tokens_triton(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    step_seed: int,
    out: torch.Tensor,
) -> None:
    """Triton `sample_tokens_ref`: no host sync, two launches. Raises ValueError on bad
    shapes, strides or dtypes."""
    _check_args(logits, inv_temperature, out)
    rows, vocab = logits.shape
    if rows == 0:
        return
    sms = num_sms(logits.device.index or 0) if logits.is_cuda else 4
    splits = choose_splits(rows, vocab, sms)
    cols_per_split = cdiv(cdiv(vocab, splits), BLOCK_V) * BLOCK_V
    splits = cdiv(vocab, cols_per_split)  # no split left without columns
    part_val = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, splits), dtype=torch.int32, device=logits.device)
    _sample_partial_kernel[(rows, splits)](
        logits, inv_temperature, step_seed % SEED_LIMIT, part_val, part_idx, vocab, cols_per_split,
        logits.stride(0), BLOCK_V=BLOCK_V, num_warps=8,
    )  # fmt: skip
    _sample_reduce_kernel[(rows,)](
        part_val, part_idx, out, splits, BLOCK_S=MAX_SPLITS, num_warps=1
    )  # fmt: skip


def sample_tokens(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    step_seed: int,
    out: torch.Tensor,
) -> None:
    """out[i] = argmax(logits[i]) where inv_temperature[i] == 0, else a draw from
    softmax(logits[i] * inv_temperature[i]) with row i's key of step_seed. Triton on CUDA."""
    if use_triton(logits):
        sample_tokens_triton(logits, inv_temperature, step_seed, out)
    else:
        sample_tokens_ref(logits, inv_temperature, step_seed, out)
