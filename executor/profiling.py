"""Sizing the KV cache on a GPU by profiling one forward pass at the token budget."""

from __future__ import annotations

import torch

from executor.config import EngineConfig
from executor.forward_context import ForwardContext
from executor.warmup import dummy_forward
from kernels.dispatch import use_triton
from kernels.sampling import sample_tokens_triton


class KVCacheSizeError(RuntimeError):
    pass


@torch.inference_mode()
def _profile_forward(runner, config: EngineConfig) -> None:
    n = config.scheduler.max_num_batched_tokens
    model = runner.model
    ctx = ForwardContext(None, [])
    hidden = dummy_forward(model, runner.device, n, ctx, config.model.max_model_len)
    if model.pp.is_last:  # [n, hidden]
        logits = model.compute_logits(hidden[: config.scheduler.max_num_seqs])
        _warm_sampler(logits)


def _warm_sampler(logits: torch.Tensor) -> None:
    """Compile the fused sampler now, not on the first request: one variant serves every
    batch size (kernels.sampling), and its buffers count in the profiled peak."""
    if use_triton(logits):
        rows = logits.shape[0]
        inv_temperature = torch.ones(rows, dtype=torch.float32, device=logits.device)
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
        sample_tokens_triton(logits, inv_temperature, 0, out)


def available_kv_bytes(runner, config: EngineConfig) -> int:
    """Bytes left for the KV cache: utilization x total - weights - peak activations."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free_before, total = torch.cuda.mem_get_info()
    non_torch = total - free_before - torch.cuda.memory_reserved()
    _profile_forward(runner, config)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    util = config.cache.gpu_memory_utilization
    budget = int(total * util) - peak - max(non_torch, 0)
    if budget <= 0:
        gib = 1 << 30
        raise KVCacheSizeError(
            f"no KV cache block fits: {util:.2f} x {total / gib:.1f} GiB allowed, "
            f"{peak / gib:.2f} GiB taken by weights and peak activations, "
            f"{max(non_torch, 0) / gib:.2f} GiB by other processes; "
            "raise --gpu-memory-utilization or lower --max-model-len / --max-num-batched-tokens"
        )
    return budget
