"""The linear layers' matmul for decode-sized batches: y = x @ w.T (+ bias), few rows.

A decode step multiplies a handful of rows by every weight matrix once: the time is
the weight read. cuBLAS splits K for the 4096-wide outputs of an 8B model and merges
the halves in a second kernel; this kernel gives each program BLOCK_N output columns
over the whole of K instead, one launch and no float32 partials. H100, 8B shapes, one
row, a cold weight each call (call 42, .run tile sweep): o 16.2 -> 14.2 us, gate_up
82.0 -> 79.4, down 44.4 -> 41.9, LM head 376 -> 336; W3 at batch 1 6.66 -> 6.38 ms a
token with the first tiles (bench/RESULTS.md).

`skinny_linear_ref` is F.linear; `skinny_linear_triton` shares its signature; `linear`
picks the kernel for CUDA batches of up to SKINNY_MAX_ROWS rows and F.linear otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import (
    FLOAT_DTYPES,
    cast_to,
    check_dim,
    check_dtype,
    check_inner_contiguous,
    check_same_device,
    dot,
    interpreting,
    next_pow2,
    pdl_launch,
    require,
    tl,
    triton,
    use_triton,
    wait_for_prior_kernel,
)

SKINNY_MAX_ROWS = 16  # rows of x a program holds: tl.dot's least M


def skinny_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    # x: [M, K], weight: [N, K], bias: [N] -> [M, N]
    return F.linear(x, weight, bias)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    rows,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # Program j makes y[:, j*BLOCK_N : (j+1)*BLOCK_N] for every row, over all of K.
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < rows
    n_ok = rn < N
    # Columns past N read weight row 0 again instead of masking the big load; their
    # sums are never stored.
    w_rows = w_ptr + tl.where(n_ok, rn, 0).to(tl.int64)[:, None] * stride_w  # [BN, 1]
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + rk
        if EVEN_K:
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)  # [BM, BK]
            w = tl.load(w_rows + kk[None, :])  # [BN, BK]
        else:
            k_ok = kk < K
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=k_ok[None, :], other=0.0)
        acc += dot(x, tl.trans(w), PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = cast_to(acc, y_ptr.dtype.element_ty, INTERPRET)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_dim("x", x, (2,))
    check_dim("weight", weight, (2,))
    check_dtype("x", x, FLOAT_DTYPES)
    require(weight.dtype == x.dtype, lambda: f"weight is {weight.dtype}, x is {x.dtype}")
    check_inner_contiguous("x", x)
    check_inner_contiguous("weight", weight)
    require(
        x.shape[1] == weight.shape[1],
        lambda: (
            f"x has {x.shape[1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}"
        ),
    )
    require(
        x.shape[0] <= SKINNY_MAX_ROWS,
        lambda: f"x has {x.shape[0]} rows; the skinny GEMM takes at most {SKINNY_MAX_ROWS}",
    )
    if bias is not None:
        check_dim("bias", bias, (1,))
        require(
            bias.shape[0] == weight.shape[0],
            lambda: f"bias has {bias.shape[0]} entries, weight {weight.shape[0]} rows",
        )
        require(bias.is_contiguous(), "bias must be contiguous")
        check_same_device(x=x, weight=weight, bias=bias)
    else:
        check_same_device(x=x, weight=weight)


def _tiles(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K), from the H100 sweep of call 42 (8B and Qwen3-0.6B shapes, 1 and
    16 rows; 4 warps and 4 stages won or came within 2% everywhere). Outputs of 2048
    columns or fewer take 16 a program, or too few programs would fill the GPU (Qwen3's
    o and down: 64 instead of 32); rows of 2048 or more take 512-wide steps."""
    block_n = 16 if n <= 2048 else 32
    return block_n, min(512 if k >= 2048 else 256, max(16, next_pow2(k)))


def skinny_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton `skinny_linear_ref` for x of at most SKINNY_MAX_ROWS rows: [M, K] x [N, K]
    -> [M, N] in x's dtype, float32 sums. Rows of x may be strided. Raises ValueError on
    bad shapes, strides or dtypes."""
    _check_args(x, weight, bias)
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return y
    block_n, block_k = _tiles(n, k)
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, rows, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        INTERPRET=interpreting(), **pdl_launch(x), num_warps=4, num_stages=4,
    )  # fmt: skip
    return y


def takes_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` sends this product to the Triton kernel: x of 1 to
    SKINNY_MAX_ROWS rows on a device where the kernels run (not under torch.compile),
    with contiguous rows of a weight of its dtype."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= SKINNY_MAX_ROWS
        and x.dtype in FLOAT_DTYPES
        and weight.dtype == x.dtype
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and use_triton(x)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the skinny Triton GEMM for decode-sized batches on CUDA.

    float32 takes it too (exact float32 products, no TF32), so that the float32
    checks against transformers cover it.
    """
    if takes_skinny(x, weight):
        return skinny_linear_triton(x, weight, bias)
    return F.linear(x, weight, bias)
