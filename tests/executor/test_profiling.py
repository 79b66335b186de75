"""The profiled step's sampler (the general path at its widest, so its memory counts),
and the KV cache's share of the device (--gpu-memory-utilization, per instance)."""

from __future__ import annotations

import pytest
import torch

from executor.profiling import (
    KVCacheSizeError,
    MemorySnapshot,
    check_share_is_free,
    kv_budget,
    own_non_torch_growth,
    run_widest_sampler,
    widest_batch,
)

G = 1 << 30


def test_the_widest_sampler_step_takes_every_costly_path():
    batch = widest_batch(8, 100, 20, torch.device("cpu"))
    assert batch.fused is None and batch.penalties is not None
    assert batch.top_p is not None and batch.top_k is None  # top-p alone: a full sort
    assert batch.min_p is not None and batch.max_num_logprobs == 20
    out = run_widest_sampler(torch.randn(8, 100), 20)
    assert out.token_ids.shape == (8,) and out.logprobs is not None
    assert out.logprobs[0].shape == (8, 21)  # the sampled token's, then the top 20


def test_without_logprobs_allowed_none_are_gathered():
    assert widest_batch(4, 50, 0, torch.device("cpu")).max_num_logprobs is None
    assert run_widest_sampler(torch.randn(4, 50), 0).logprobs is None


def test_the_budget_is_the_share_less_weights_peak_and_this_processs_own_growth():
    # 80 GiB card, 1 GiB in use at start (this process's CUDA context)
    startup = MemorySnapshot(free=79 * G, total=80 * G, torch_reserved=0)
    # after the profile: 18 GiB reserved by torch, 1.5 GiB more outside it (cuBLAS, NCCL)
    after = MemorySnapshot(free=59 * G + G // 2, total=80 * G, torch_reserved=18 * G)
    assert after.non_torch - startup.non_torch == G + G // 2
    budget = kv_budget(0.9, startup, after, peak=16 * G)
    assert budget == int(0.9 * 80 * G) - 16 * G - (G + G // 2)


def test_another_process_does_not_shrink_this_instances_share():
    # another instance holds 36 GiB; this one asks for 0.45 x 80 = 36 of the 43 free
    startup = MemorySnapshot(free=43 * G, total=80 * G, torch_reserved=0)
    check_share_is_free(0.45, startup)
    after = MemorySnapshot(free=33 * G, total=80 * G, torch_reserved=10 * G)
    assert kv_budget(0.45, startup, after, peak=9 * G) == int(0.45 * 80 * G) - 9 * G


def test_a_share_that_is_not_free_at_startup_is_refused_with_the_numbers():
    startup = MemorySnapshot(free=30 * G, total=80 * G, torch_reserved=0)
    with pytest.raises(KVCacheSizeError, match=r"--gpu-memory-utilization 0.50 asks for 40.0 GiB"):
        check_share_is_free(0.5, startup)
    check_share_is_free(0.3, startup)  # 24 GiB fit


def test_no_block_left_names_the_arguments_to_change():
    startup = MemorySnapshot(free=80 * G, total=80 * G, torch_reserved=0)
    after = MemorySnapshot(free=60 * G, total=80 * G, torch_reserved=20 * G)
    with pytest.raises(KVCacheSizeError, match="raise --gpu-memory-utilization or lower"):
        kv_budget(0.2, startup, after, peak=17 * G)  # 16 GiB allowed


def test_processes_starting_beside_this_one_do_not_count_as_its_own():
    # two instances start at once on a 140 GiB card: while this one profiled, the other
    # took 9 GiB; the driver's count for this process grew by 0.5 GiB outside torch
    startup = MemorySnapshot(free=139 * G, total=140 * G, torch_reserved=0, process_used=G // 2)
    after = MemorySnapshot(
        free=139 * G - 9 * G - 3 * G - G // 2,
        total=140 * G,
        torch_reserved=3 * G,
        process_used=G // 2 + 3 * G + G // 2,
    )
    assert own_non_torch_growth(startup, after) == (G // 2, "this process")
    assert kv_budget(0.08, startup, after, peak=2 * G) == int(0.08 * 140 * G) - 2 * G - G // 2
    # without the driver's count, the other's 9 GiB would have counted as this one's
    blind = MemorySnapshot(after.free, after.total, after.torch_reserved)
    assert own_non_torch_growth(startup, blind) == (9 * G + G // 2, "device-wide")
    with pytest.raises(KVCacheSizeError, match=r"counted device-wide"):
        kv_budget(0.08, startup, blind, peak=2 * G)
