"""Per-head q/k RMSNorm fused with rotary: the Triton kernel (interpreted) against the
reference in float64, and the reference against the two steps it replaces."""

from __future__ import annotations

import pytest
import torch

from kernels.norm import rms_norm_ref
from kernels.qk_norm_rotary import qk_norm_rotary, qk_norm_rotary_ref, qk_norm_rotary_triton
from kernels.rotary import rotary_embedding_ref
from tests.kernels.kernel_helpers import TOLERANCE, assert_close
from tests.kernels.test_rotary_kernel import MAX_POS, NUM_TOKENS, cos_sin_cache, make_qk

EPS = 1e-6


def weights(head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.rand(head_dim) + 0.5).to(dtype), (torch.rand(head_dim) + 0.5).to(dtype)


@pytest.mark.parametrize(
    ("seed", "head_dim", "rot_dim", "dtype", "layout"),
    [
        (1, 64, 64, torch.float32, "heads"),
        (2, 128, 128, torch.bfloat16, "fused"),  # Qwen3: views of the qkv output
        (3, 80, 80, torch.float16, "flat"),
        (4, 64, 32, torch.float32, "fused"),  # partial rotary: the tail is normed only
        (5, 96, 48, torch.bfloat16, "heads"),
    ],
)
def test_matches_reference(
    seed: int, head_dim: int, rot_dim: int, dtype: torch.dtype, layout: str
) -> None:
    torch.manual_seed(seed)
    q, k = make_qk(head_dim, dtype, layout)
    q = q * 3.0 if layout != "fused" else q  # norms must actually rescale
    qw, kw = weights(head_dim, dtype)
    positions = torch.randint(0, MAX_POS, (NUM_TOKENS,))
    cache = cos_sin_cache(rot_dim)
    q_ref, k_ref = q.double(), k.double()
    qk_norm_rotary_ref(
        positions, q_ref, k_ref, head_dim, cache.double(), qw.double(), kw.double(), EPS
    )
    q_in = q.clone()
    qk_norm_rotary_triton(positions, q, k, head_dim, cache, qw, kw, EPS)
    assert_close(q, q_ref, TOLERANCE[dtype])
    assert_close(k, k_ref, TOLERANCE[dtype])
    assert not torch.equal(q, q_in)


def test_fused_layout_leaves_v_alone() -> None:
    torch.manual_seed(6)
    qkv = torch.randn(NUM_TOKENS, (4 + 2 * 2) * 64)
    q, k, v = qkv.split([4 * 64, 2 * 64, 2 * 64], dim=-1)
    v_before = v.clone()
    qw, kw = weights(64, torch.float32)
    qk_norm_rotary_triton(torch.arange(NUM_TOKENS), q, k, 64, cos_sin_cache(64), qw, kw, EPS)
    assert torch.equal(v, v_before)


def test_reference_is_norm_then_rotary() -> None:
    torch.manual_seed(7)
    q, k = make_qk(64, torch.bfloat16, "fused")
    qw, kw = weights(64, torch.bfloat16)
    positions = torch.randint(0, MAX_POS, (NUM_TOKENS,))
    cache = cos_sin_cache(64)
    q2 = rms_norm_ref(q.reshape(-1, 64), qw, EPS).view(NUM_TOKENS, -1)
    k2 = rms_norm_ref(k.reshape(-1, 64), kw, EPS).view(NUM_TOKENS, -1)
    rotary_embedding_ref(positions, q2, k2, 64, cache, True)
    qk_norm_rotary(positions, q, k, 64, cache, qw, kw, EPS)  # the reference, on the CPU
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("weight_size", "q_weight must be contiguous with 64 elements"),
        ("weight_dtype", "k_weight: dtype"),
        ("odd_rot_dim", "must be even"),
        ("tokens", "positions has"),
    ],
)
def test_rejects_bad_arguments(change: str, message: str) -> None:
    q, k = make_qk(64, torch.float32, "heads")
    qw, kw = weights(64, torch.float32)
    positions = torch.zeros(NUM_TOKENS, dtype=torch.int64)
    cache = cos_sin_cache(64)
    if change == "weight_size":
        qw = qw[:32]
    elif change == "weight_dtype":
        kw = kw.to(torch.int32)
    elif change == "odd_rot_dim":
        cache = cache[:, :63].contiguous()
    elif change == "tokens":
        positions = positions[:3]
    with pytest.raises(ValueError, match=message):
        qk_norm_rotary_triton(positions, q, k, 64, cache, qw, kw, EPS)
