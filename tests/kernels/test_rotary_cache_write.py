"""The rotary kernels' cache write (CacheWrite): interpreted, against rotating and then
write_kv, which it replaces; the same bits, slot -1 skipped, FP8 scales applied."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_write import CacheWrite, write_kv_ref, write_kv_triton
from kernels.qk_norm_rotary import qk_norm_rotary_ref, qk_norm_rotary_triton
from kernels.rotary import rotary_embedding_ref, rotary_embedding_triton
from tests.kernels.test_rotary_kernel import MAX_POS, cos_sin_cache

HQ, HK, D, BLOCK, BLOCKS = 4, 2, 64, 4, 6
SLOTS = [3, -1, 17, 8, 22]  # token 1 is padding: its slot is left alone
SENTINEL = 7.0  # what every slot holds before the write


def _step(dtype: torch.dtype, cache_dtype: torch.dtype, scale: float) -> tuple:
    qkv = (torch.randn(len(SLOTS), (HQ + 2 * HK) * D) * 2).to(dtype)
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)  # strided views, as in a model
    caches = torch.full((2, BLOCKS, BLOCK, HK, D), SENTINEL).to(cache_dtype)
    kv = CacheWrite(v.view(-1, HK, D), caches[0], caches[1], torch.tensor(SLOTS), scale, scale * 2)
    return qkv, q, k, kv, caches


def _rotate(kind: str, fn_rotary, fn_norm, positions, q, k, cos_sin, weights, kv) -> None:
    if kind == "rotary":
        fn_rotary(positions, q, k, D, cos_sin, True, kv)
    else:
        fn_norm(positions, q, k, D, cos_sin, weights[0], weights[1], 1e-6, kv)


@pytest.mark.parametrize(
    ("seed", "kind", "dtype", "cache_dtype", "scale", "rot_dim"),
    [
        (1, "rotary", torch.bfloat16, torch.bfloat16, 1.0, 64),
        (2, "rotary", torch.float32, torch.float8_e4m3fn, 0.5, 32),  # FP8, partial rotary
        (3, "qk_norm", torch.bfloat16, torch.bfloat16, 1.0, 64),
        (4, "qk_norm", torch.float16, torch.float8_e5m2, 0.25, 64),
    ],
)
def test_rotary_kernels_write_the_cache(
    seed: int, kind: str, dtype: torch.dtype, cache_dtype: torch.dtype, scale: float, rot_dim: int
) -> None:
    torch.manual_seed(seed)
    positions = torch.randint(0, MAX_POS, (len(SLOTS),))
    cos_sin = cos_sin_cache(rot_dim)
    weights = ((torch.rand(D) + 0.5).to(dtype), (torch.rand(D) + 0.5).to(dtype))
    qkv, q, k, kv, fused = _step(dtype, cache_dtype, scale)
    qkv2, q2, k2, kv2, apart = _step(dtype, cache_dtype, scale)
    qkv2.copy_(qkv)
    inputs = qkv.clone()  # before the kernels rotate q and k in place
    _rotate(kind, rotary_embedding_triton, qk_norm_rotary_triton, positions, q, k, cos_sin,
            weights, kv)  # fmt: skip
    _rotate(kind, rotary_embedding_triton, qk_norm_rotary_triton, positions, q2, k2, cos_sin,
            weights, None)  # fmt: skip
    write_kv_triton(k2.view(-1, HK, D), kv2.value, apart[0], apart[1], kv2.slot_mapping,
                    scale, scale * 2)  # fmt: skip
    assert torch.equal(qkv, qkv2)  # q, k rotated alike, v untouched
    assert torch.equal(fused.view(torch.uint8), apart.view(torch.uint8))  # the same bits
    untouched = torch.ones(BLOCKS * BLOCK, dtype=torch.bool)
    untouched[[slot for slot in SLOTS if slot >= 0]] = False
    for cache in fused:  # the padding token's slot and every other slot left alone
        assert (cache.view(BLOCKS * BLOCK, HK, D)[untouched].float() == SENTINEL).all()

    # the references take the same CacheWrite
    qkv3, q3, k3, kv3, ref = _step(dtype, cache_dtype, scale)
    qkv3.copy_(inputs)
    ref_k = k3.clone()
    _rotate(kind, rotary_embedding_ref, qk_norm_rotary_ref, positions, q3, ref_k, cos_sin,
            weights, None)  # fmt: skip
    expected = ref.clone()
    write_kv_ref(ref_k.view(-1, HK, D), kv3.value, expected[0], expected[1], kv3.slot_mapping,
                 scale, scale * 2)  # fmt: skip
    _rotate(kind, rotary_embedding_ref, qk_norm_rotary_ref, positions, q3, k3, cos_sin,
            weights, kv3)  # fmt: skip
    assert torch.equal(ref.view(torch.uint8), expected.view(torch.uint8))
