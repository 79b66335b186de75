"""Compiling, before the first request, the kernel variants that steps will need.

Triton compiles a kernel variant the first time a launch asks for it: 1-2 s on an
H100. The paged attention kernel picks its tile from the step's longest query
(kernels.attention.tile_query_lens), so a mixed step that first needs a tile size
stalls every request in flight while it compiles: in W2 a step of 131 sequences
waited 1,475 ms for one (call 25, H200), and the measured run paid for the prefill
tile too. The decode graphs' capture compiles the decode variants; this compiles
the prefill and mixed tiles with one eager forward per tile size, and, when there
are no graphs, the decode variants the capture would have compiled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from executor.forward_context import AttentionMetadata, ForwardContext, forward_context
from executor.loader.kv_scales import attention_layers
from kernels.attention import tile_query_lens

logger = logging.getLogger(__name__)


def dummy_forward(
    model: Any, dev: torch.device, num_tokens: int, ctx: ForwardContext, max_model_len: int
) -> Any:
    """The model on `num_tokens` zero tokens at positions 0..n-1 (wrapping at the model
    length); a later pipeline stage starts from zero intermediate tensors instead, and
    nothing is sent between stages."""
    ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
    positions = torch.arange(num_tokens, device=dev) % max_model_len
    intermediate = None
    if not model.pp.is_first:
        empty = model.empty_intermediate(num_tokens, dev)
        intermediate = {k: t.zero_() for k, t in empty.items()}
    with forward_context(ctx):
        return model(ids, positions, intermediate)


@torch.inference_mode()
def warm_up_prefill(runner: Any, limit: int) -> None:
    """One eager forward of a single fresh sequence per prefill tile size, of at most
    `limit` tokens (the longest query a step can hold, at most the model length).
    Nothing is written to the cache: every slot is -1, and the context reads only the
    null block."""
    t0 = time.monotonic()
    model, dev = runner.model, runner.device
    lens = sorted({n for h in _head_counts(model) for n in tile_query_lens(*h) if n <= limit})
    with _scales_kept(model):
        for n in lens:
            attn = _one_sequence(n, runner.block_size, dev)
            dummy_forward(model, dev, n, ForwardContext(attn, runner.kv_caches), limit)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    logger.info(
        "prefill attention tiles ready in %.1f s (queries of %s tokens)",
        time.monotonic() - t0,
        ", ".join(map(str, lens)),
    )


def _head_counts(model: Any) -> set[tuple[int, int]]:
    return {(a.num_heads, a.num_kv_heads) for a in attention_layers(model)}


def _one_sequence(n: int, block_size: int, dev: torch.device) -> AttentionMetadata:
    """Metadata of one sequence of n new tokens that writes nowhere."""
    blocks = -(-n // block_size)

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dev)

    return AttentionMetadata(
        slot_mapping=put(np.full(n, -1, dtype=np.int64)),
        query_start_loc=put(np.array([0, n], dtype=np.int32)),
        seq_lens=put(np.array([n], dtype=np.int32)),
        block_tables=put(np.zeros((1, blocks), dtype=np.int32)),  # the null block
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=[0, n],
        seq_lens_cpu=[n],
    )


@contextlib.contextmanager
def _scales_kept(model: Any) -> Iterator[None]:
    """With --calculate-kv-scales the first forward sets the FP8 scales: not this one."""
    layers = attention_layers(model)
    pending = [a.calculate_scales for a in layers]
    for a in layers:
        a.calculate_scales = False
    try:
        yield
    finally:
        for a, p in zip(layers, pending, strict=True):
            a.calculate_scales = p
