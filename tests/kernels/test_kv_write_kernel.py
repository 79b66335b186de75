"""write_kv: the Triton kernel (interpreted) against the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_write import write_kv, write_kv_ref, write_kv_triton

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 6, 16, 2, 80


def poisoned_cache(dtype: torch.dtype) -> torch.Tensor:
    # NaN in every slot: a slot the kernel should not touch stays NaN, bit for bit.
    return torch.full((NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM), float("nan")).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def make_inputs(num_tokens: int, dtype: torch.dtype, strided: bool):
    if strided:  # key and value as views of one fused [T, 2, Hk, D] tensor
        kv = torch.randn(num_tokens, 2, KV_HEADS, HEAD_DIM).to(dtype)
        key, value = kv[:, 0], kv[:, 1]
    else:
        key = torch.randn(num_tokens, KV_HEADS, HEAD_DIM).to(dtype)
        value = torch.randn(num_tokens, KV_HEADS, HEAD_DIM).to(dtype)
    # Distinct random slots, two of them padding (-1).
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE)[:num_tokens]
    slots[[1, num_tokens - 2]] = -1
    return key, value, slots


@pytest.mark.parametrize(
    ("seed", "dtype", "cache_dtype", "k_scale", "v_scale", "strided"),
    [
        (1, torch.float32, torch.float32, 1.0, 1.0, False),
        (2, torch.bfloat16, torch.bfloat16, 1.0, 1.0, True),
        (3, torch.float32, torch.bfloat16, 1.0, 1.0, False),  # rounded on the way in
        (4, torch.bfloat16, torch.float8_e4m3fn, 0.5, 2.0, True),
        (5, torch.float32, torch.float8_e4m3fn, 0.03, 0.7, False),
        (6, torch.float16, torch.float8_e5m2, 0.25, 1.0, False),
    ],
)
def test_matches_reference_bit_for_bit(
    seed: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    k_scale: float,
    v_scale: float,
    strided: bool,
) -> None:
    torch.manual_seed(seed)
    key, value, slots = make_inputs(13, dtype, strided)
    k_ref, v_ref = poisoned_cache(cache_dtype), poisoned_cache(cache_dtype)
    write_kv_ref(key, value, k_ref, v_ref, slots, k_scale, v_scale)
    k_out, v_out = poisoned_cache(cache_dtype), poisoned_cache(cache_dtype)
    write_kv_triton(key, value, k_out, v_out, slots.int(), k_scale, v_scale)
    assert torch.equal(bits(k_out), bits(k_ref))
    assert torch.equal(bits(v_out), bits(v_ref))
    # 11 tokens written, the rest of the cache untouched
    written = ~k_out.float().isnan().all(dim=-1).all(dim=-1)
    assert int(written.sum()) == 11


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_write_saturates_instead_of_nan(cache_dtype: torch.dtype) -> None:
    # Values beyond the FP8 range (a scale computed on an earlier step can be too small)
    # must store the largest finite value, in the kernel and in the reference alike.
    torch.manual_seed(8)
    key, value, slots = make_inputs(6, torch.float32, False)
    key[0, 0, 0], value[2, 1, 3] = 1e9, -1e9
    fp8_max = torch.finfo(cache_dtype).max
    for write in (write_kv_ref, write_kv_triton):
        k_cache, v_cache = poisoned_cache(cache_dtype), poisoned_cache(cache_dtype)
        write(key, value, k_cache, v_cache, slots, 1.0, 1.0)
        k_flat, v_flat = k_cache.view(-1, KV_HEADS, HEAD_DIM), v_cache.view(-1, KV_HEADS, HEAD_DIM)
        assert float(k_flat[slots[0], 0, 0].float()) == fp8_max
        assert float(v_flat[slots[2], 1, 3].float()) == -fp8_max


def test_public_function_on_cpu_runs_reference() -> None:
    torch.manual_seed(7)
    key, value, slots = make_inputs(5, torch.float32, False)
    k_cache, v_cache = poisoned_cache(torch.float32), poisoned_cache(torch.float32)
    write_kv(key, value, k_cache, v_cache, slots)
    flat = k_cache.view(-1, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[slots[0]], key[0])
    assert torch.equal(v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots[4]], value[4])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("key_dtype", "key: dtype"),
        ("cache_heads", "key heads/head size"),
        ("slot_dtype", "slot_mapping: dtype"),
        ("slot_count", "one entry per token"),
        ("key_strided_dim", "last dimension must be contiguous"),
    ],
)
def test_rejects_bad_arguments(change: str, message: str) -> None:
    key, value, slots = make_inputs(4, torch.float32, False)
    k_cache, v_cache = poisoned_cache(torch.float32), poisoned_cache(torch.float32)
    if change == "key_dtype":
        key = key.to(torch.int32)
    elif change == "cache_heads":
        k_cache = v_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS + 1, HEAD_DIM)
    elif change == "slot_dtype":
        slots = slots.float()
    elif change == "slot_count":
        slots = slots[:3]
    elif change == "key_strided_dim":
        key = torch.randn(4, HEAD_DIM, KV_HEADS).transpose(1, 2)
    with pytest.raises(ValueError, match=message):
        write_kv_triton(key, value, k_cache, v_cache, slots)
