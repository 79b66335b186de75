"""Sizing the KV cache on a GPU by profiling one forward pass at the token budget."""

from __future__ import annotations

import msgspec
import torch

from executor.config import EngineConfig
from executor.forward_context import ForwardContext
from executor.messages import SamplingOptions
from executor.sampler import Sampler, SamplerOutput, SamplingBatch
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
        run_widest_sampler(logits, config.model.max_logprobs)


def _warm_sampler(logits: torch.Tensor) -> None:
    """Compile the fused sampler now, not on the first request: one variant serves every
    batch size (kernels.sampling), and its buffers count in the profiled peak."""
    if use_triton(logits):
        rows = logits.shape[0]
        inv_temperature = torch.ones(rows, dtype=torch.float32, device=logits.device)
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
        sample_tokens_triton(logits, inv_temperature, 0, out)


# Every option that adds [S, V] temporaries to a step: a copy for the processors,
# penalty masks, a full sort for top-p without top-k, min-p, the noise, logprobs.
WIDEST_OPTIONS = SamplingOptions(
    temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.1
)


def run_widest_sampler(logits: torch.Tensor, max_logprobs: int) -> SamplerOutput:
    """The general sampler on every row of `logits` with WIDEST_OPTIONS (and the most
    logprobs a request may ask), so that its temporaries count in the profiled peak: at
    1024 rows of a 128,256-token vocabulary each [S, V] float32 tensor is 0.5 GiB."""
    rows, vocab = logits.shape
    return Sampler()(logits, widest_batch(rows, vocab, max_logprobs, logits.device))


def widest_batch(rows: int, vocab: int, max_logprobs: int, device: torch.device) -> SamplingBatch:
    options = [msgspec.structs.replace(WIDEST_OPTIONS, logprobs=max_logprobs or None)] * rows
    no_ids: list[list[int]] = [[]] * rows
    return SamplingBatch.build(options, no_ids, no_ids, {}, vocab, device)


def available_kv_bytes(runner, config: EngineConfig) -> int:
    """Bytes left for the KV cache: utilization x total - weights - the profiled step's peak."""
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
