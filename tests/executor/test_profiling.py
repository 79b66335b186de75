"""The profiled step's sampler: the general path at its widest, so its memory counts."""

from __future__ import annotations

import torch

from executor.profiling import run_widest_sampler, widest_batch


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
