"""Sizing the KV cache on a GPU by profiling one forward pass at the token budget."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import msgspec
import torch

from executor.config import EngineConfig
from executor.forward_context import ForwardContext
from executor.messages import SamplingOptions
from executor.nvml import process_memory_used
from executor.sampler import Sampler, SamplerOutput, SamplingBatch
from executor.warmup import dummy_forward
from kernels.dispatch import use_triton
from kernels.sampling import sample_tokens_triton

GIB = 1 << 30

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class MemorySnapshot:
    """A device's memory as its driver and this process's torch allocator see it."""

    free: int
    total: int
    torch_reserved: int
    # this process's own use, by the driver's per-process count (None: it can't tell)
    process_used: int | None = None

    @property
    def non_torch(self) -> int:
        """Used, but not through this process's allocator: other processes, CUDA
        contexts, cuBLAS and NCCL workspaces."""
        return self.total - self.free - self.torch_reserved


def memory_snapshot(device: torch.device) -> MemorySnapshot:
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return MemorySnapshot(free, total, reserved, process_memory_used(_uuid(device), os.getpid()))


def _uuid(device: torch.device) -> str:
    """The device's UUID as NVML names it ("GPU-..."; torch prints it bare)."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def own_non_torch_growth(startup: MemorySnapshot, after: MemorySnapshot) -> tuple[int, str]:
    """What this process took outside torch between the two snapshots, and how that was
    counted. The driver's per-process count where it has one: the device-wide count
    also holds what other processes took meanwhile (two instances starting at once
    each counted the other's weights and KV cache as their own, and found no room)."""
    if startup.process_used is not None and after.process_used is not None:
        grown = (after.process_used - after.torch_reserved) - (
            startup.process_used - startup.torch_reserved
        )
        return max(grown, 0), "this process"
    return max(after.non_torch - startup.non_torch, 0), "device-wide"


def check_share_is_free(util: float, startup: MemorySnapshot) -> None:
    """--gpu-memory-utilization is this instance's share of the device, as vLLM's: other
    processes' memory does not shrink it (two instances of 0.45 share a device), but
    the share must be free when the instance starts."""
    requested = util * startup.total
    if startup.free < requested:
        raise KVCacheSizeError(
            f"--gpu-memory-utilization {util:.2f} asks for {requested / GIB:.1f} GiB of "
            f"the device's {startup.total / GIB:.1f} GiB, but only {startup.free / GIB:.1f} "
            "GiB are free (other processes hold the rest): lower --gpu-memory-utilization "
            "or free the device"
        )


def kv_budget(util: float, startup: MemorySnapshot, after: MemorySnapshot, peak: int) -> int:
    """Bytes for the KV cache: this instance's share, less the weights and the profiled
    step's peak (`peak`, torch's) and what this process took outside torch since it
    started (`after` against `startup`, see own_non_torch_growth)."""
    own_non_torch, counted = own_non_torch_growth(startup, after)
    budget = int(startup.total * util) - peak - own_non_torch
    logger.info(
        "profiled step: %.2f GiB weights and peak activations, %.2f GiB outside torch (counted %s)",
        peak / GIB,
        own_non_torch / GIB,
        counted,
    )
    if budget <= 0:
        raise KVCacheSizeError(
            f"no KV cache block fits: {util:.2f} x {startup.total / GIB:.1f} GiB allowed, "
            f"{peak / GIB:.2f} GiB taken by weights and peak activations, "
            f"{own_non_torch / GIB:.2f} GiB outside torch (counted {counted}); "
            "raise --gpu-memory-utilization or lower --max-model-len / --max-num-batched-tokens"
        )
    return budget


def available_kv_bytes(runner, config: EngineConfig, startup: MemorySnapshot) -> int:
    """Bytes left for the KV cache after a profiled step (see kv_budget); `startup` is
    the device's memory when this worker started."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _profile_forward(runner, config)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    after = memory_snapshot(runner.device)
    return kv_budget(config.cache.gpu_memory_utilization, startup, after, peak)
