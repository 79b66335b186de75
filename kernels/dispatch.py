"""Pick a kernel's Triton version or its PyTorch reference, in one place.

Every public kernel function (`paged_attention`, `write_kv`, `rms_norm`, ...) asks
`use_triton(tensor)`: the Triton kernel runs when the tensors live on a CUDA device
and Triton imports; otherwise the reference runs. The environment variable
`TESSERA_KERNELS` overrides that choice for debugging:

- unset or `auto`: by device, as above;
- `ref`: the PyTorch references everywhere;
- `triton`: the Triton kernels wherever Triton imports, CPU tensors included (only
  useful under Triton's interpreter, `TRITON_INTERPRET=1`).

This module also holds what the kernel wrappers share: the launch checks (shapes,
strides, dtypes) and small Triton helpers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "TESSERA_KERNELS"
_MODES = ("auto", "ref", "triton")


class _NoTriton:
    """Stands in for the `triton` module where it is not installed (it is Linux-only), so
    that the kernel modules still import and their references still run."""

    constexpr = object

    @staticmethod
    def jit(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton ships with every Linux torch
    triton = _NoTriton()  # type: ignore[assignment]
    tl = _NoTriton()  # type: ignore[assignment]
    HAS_TRITON = False

try:  # grid dependency control: Triton 3.4 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton: kernels launch the usual way
    HAS_GDC = False

    @triton.jit
    def gdc_wait() -> None:
        pass

    @triton.jit
    def gdc_launch_dependents() -> None:
        pass


def kernel_mode() -> str:
    """The value of TESSERA_KERNELS: 'auto' (default), 'ref' or 'triton'."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel called on `t` should run its Triton version.

    Inside a torch.compile trace (-O) the reference runs: it is plain torch ops, which
    the compiler fuses with their neighbours into kernels of its own.
    """
    if torch.compiler.is_compiling():
        return False
    return use_triton_on(t.device)


def use_triton_on(device: torch.device | str) -> bool:
    """use_triton for tensors that will live on `device` (outside torch.compile)."""
    mode = kernel_mode()
    if mode == "ref" or not HAS_TRITON:
        return False
    return mode == "triton" or torch.device(device).type == "cuda"


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1). Read
    once: @triton.jit reads it when the kernels are defined, so it cannot change later."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is slow-ish)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


PDL_ENV_VAR = "TESSERA_PDL"


@functools.lru_cache(maxsize=8)
def _pdl_on(device_index: int) -> bool:
    if os.environ.get(PDL_ENV_VAR, "1") == "0" or not HAS_GDC or interpreting():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(t: torch.Tensor) -> dict[str, bool]:
    """Launch options of a kernel that calls `wait_for_prior_kernel` first: programmatic
    dependent launch on Hopper and later CUDA devices (TESSERA_PDL=0 turns it off).

    Such a kernel may be launched while the kernel before it on the stream is still
    running: its programs are placed as that one's last ones drain, instead of after a
    full drain and a fresh launch. Inside a CUDA graph of a decode step (about 420 short
    kernels on an 8B model) that gap is most of the time the GPU idles.
    """
    on = t.is_cuda and _pdl_on(t.get_device())
    return {"PDL": on, "launch_pdl": on}


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- launch checks shared by the wrappers ------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def require(cond: bool, msg: str | Callable[[], str]) -> None:
    """Raise ValueError unless cond: the wrappers' checks before a launch. A callable msg
    is formatted only on failure (the checks run on every call)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name}: dtype {t.dtype} not supported (expected {names})")


def check_dim(name: str, t: torch.Tensor, dims: tuple[int, ...]) -> None:
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dims, got {t.dim()}")


def check_inner_contiguous(name: str, t: torch.Tensor) -> None:
    # The kernels index the last dimension with unit stride (wide, coalesced loads).
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name}: last dimension must be contiguous")


def check_same_device(**tensors: torch.Tensor) -> None:
    first = next(iter(tensors.values())).get_device()  # -1 on the CPU
    if any(t.get_device() != first for t in tensors.values()):
        devices = {name: str(t.device) for name, t in tensors.items()}
        raise ValueError(f"tensors on different devices: {devices}")


# ---- Triton helpers shared by the kernels -----------------------------------------------


@triton.jit
def _round_mantissa(x, DROP: tl.constexpr):
    # Round a float32 to nearest-even, keeping 23 - DROP mantissa bits (normal numbers).
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & (-(1 << DROP))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_fixed(x, MAGIC: tl.constexpr):
    # Round to a nearest-even multiple of MAGIC / 1.5 / 2**23 (the subnormal quantum);
    # on |x| with the sign put back, so that tiny negatives round to -0.0.
    r = (tl.abs(x) + MAGIC) - MAGIC
    return tl.where(x < 0.0, -r, r)


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even, also under the interpreter.

    On a GPU this is a plain conversion. Triton's interpreter truncates float32 to
    bfloat16 and drops the carry when it rounds to FP8 (7.98 becomes 4.0), so there the
    value is first rounded exactly in float32 arithmetic, after which its conversion is
    exact.
    """
    if INTERPRET:
        xf = x.to(tl.float32)
        if dtype == tl.bfloat16:
            xf = _round_mantissa(xf, 16)
        elif dtype == tl.float8e4nv:
            # 3 mantissa bits; below 2**-6 subnormal steps of 2**-9 (magic 1.5 * 2**14)
            xf = tl.where(tl.abs(xf) < 0.015625, _round_fixed(xf, 24576.0), _round_mantissa(xf, 20))
        elif dtype == tl.float8e5:
            # 2 mantissa bits; below 2**-14 subnormal steps of 2**-16 (magic 1.5 * 2**7)
            xf = tl.where(
                tl.abs(xf) < 0.00006103515625, _round_fixed(xf, 192.0), _round_mantissa(xf, 21)
            )
        out = xf.to(dtype)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """tl.dot with a float32 accumulator; under the interpreter bfloat16 operands are
    widened first (its dot multiplies the raw bf16 bit patterns as integers)."""
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    # Under programmatic dependent launch (see pdl_launch) this kernel may start before
    # the previous one on the stream is done: wait for it, and so for everything before
    # it, before any load of what they wrote or any store at all. Then let the next
    # kernel start launching: it waits the same way.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
