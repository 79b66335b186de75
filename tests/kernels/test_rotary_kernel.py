"""Rotary embedding: the Triton kernel (interpreted) against the reference in float64."""

from __future__ import annotations

import pytest
import torch

from kernels.rotary import rotary_embedding, rotary_embedding_ref, rotary_embedding_triton
from tests.kernels.kernel_helpers import TOLERANCE, assert_close

NUM_TOKENS, Q_HEADS, K_HEADS, MAX_POS = 6, 4, 2, 64


def cos_sin_cache(rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)  # [max_pos, rot_dim]


def make_qk(head_dim: int, dtype: torch.dtype, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "fused":  # views of one qkv projection output: strided tokens
        qkv = torch.randn(NUM_TOKENS, (Q_HEADS + 2 * K_HEADS) * head_dim).to(dtype)
        return qkv[:, : Q_HEADS * head_dim], qkv[
            :, Q_HEADS * head_dim : (Q_HEADS + K_HEADS) * head_dim
        ]
    q = torch.randn(NUM_TOKENS, Q_HEADS, head_dim).to(dtype)
    k = torch.randn(NUM_TOKENS, K_HEADS, head_dim).to(dtype)
    if layout == "flat":  # [T, H * D]
        return q.flatten(1), k.flatten(1)
    return q, k  # [T, H, D]


@pytest.mark.parametrize(
    ("seed", "head_dim", "rot_dim", "is_neox", "dtype", "layout"),
    [
        (1, 64, 64, True, torch.float32, "heads"),
        (2, 64, 64, False, torch.float32, "flat"),
        (3, 80, 80, True, torch.bfloat16, "fused"),
        (4, 64, 32, True, torch.float32, "flat"),  # partial rotary
        (5, 64, 16, False, torch.bfloat16, "heads"),  # partial, gptj
        (6, 96, 48, False, torch.float16, "fused"),
    ],
)
def test_matches_reference(
    seed: int, head_dim: int, rot_dim: int, is_neox: bool, dtype: torch.dtype, layout: str
) -> None:
    torch.manual_seed(seed)
    q, k = make_qk(head_dim, dtype, layout)
    positions = torch.randint(0, MAX_POS, (NUM_TOKENS,))
    cache = cos_sin_cache(rot_dim)
    q_ref, k_ref = q.double(), k.double()
    rotary_embedding_ref(
        positions, q_ref, k_ref, head_size=head_dim, cos_sin_cache=cache.double(), is_neox=is_neox
    )
    q_before, k_before = q.clone(), k.clone()
    rotary_embedding_triton(positions, q, k, head_dim, cache, is_neox)
    assert_close(q, q_ref, TOLERANCE[dtype])
    assert_close(k, k_ref, TOLERANCE[dtype])
    # Every head changed in its rotary dims, and kept the rest bit for bit.
    for x, before in ((q, q_before), (k, k_before)):
        heads, heads_before = (
            x.reshape(NUM_TOKENS, -1, head_dim),
            before.reshape(NUM_TOKENS, -1, head_dim),
        )
        assert torch.equal(heads[..., rot_dim:], heads_before[..., rot_dim:])
        assert (
            (heads[..., :rot_dim] != heads_before[..., :rot_dim]).any(dim=-1)[positions > 0].all()
        )


def test_public_function_on_cpu_runs_reference() -> None:
    torch.manual_seed(7)
    q, k = make_qk(64, torch.float32, "heads")
    q2, k2 = q.clone(), k.clone()
    positions = torch.randint(0, MAX_POS, (NUM_TOKENS,))
    rotary_embedding(positions, q, k, 64, cos_sin_cache(64), True)
    rotary_embedding_ref(positions, q2, k2, 64, cos_sin_cache(64), True)
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("q_dtype", "query: dtype"),
        ("odd_rot_dim", "must be even"),
        ("width", "not a multiple of 64"),
        ("tokens", "positions has"),
        ("pos_dtype", "positions: dtype"),
        ("q_strided_dim", "last dimension must be contiguous"),
    ],
)
def test_rejects_bad_arguments(change: str, message: str) -> None:
    q, k = make_qk(64, torch.float32, "heads")
    positions = torch.zeros(NUM_TOKENS, dtype=torch.int64)
    cache = cos_sin_cache(64)
    if change == "q_dtype":
        q = q.to(torch.int32)
    elif change == "odd_rot_dim":
        cache = cache[:, :63].contiguous()
    elif change == "width":
        q = torch.randn(NUM_TOKENS, 100)
    elif change == "tokens":
        positions = positions[:3]
    elif change == "pos_dtype":
        positions = positions.float()
    elif change == "q_strided_dim":
        q = torch.randn(NUM_TOKENS, 64, Q_HEADS).transpose(1, 2)
    with pytest.raises(ValueError, match=message):
        rotary_embedding_triton(positions, q, k, 64, cache, True)
