"""CUDA graphs for decode steps: one graph per padded batch size.

A decode step (every sequence computes one token) of batch size B runs the graph
captured for the smallest size >= B: its inputs are copied into persistent buffers
(padding rows write nowhere: slot -1, and attend to one key of the null block), the
graph replays, and the first B rows of the output are taken. The attention metadata
of a graph says max_seq_len = --max-seq-len-to-capture: the kernels read the true
lengths from `seq_lens` and use the bound only to size their launch, so one graph
serves every context up to that length. Longer contexts run eagerly.

Steps whose contexts share a prefix (cascade attention, executor.shared_prefix) run
graphs of their own, captured with the shared length in a device buffer, for fewer
sizes (CASCADE_SIZES_STEP apart: padding a wide decode batch costs little).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

from executor.forward_context import AttentionMetadata, ForwardContext, forward_context
from executor.shared_prefix import CASCADE_MIN_SEQS

CASCADE_SIZES_STEP = 32
# Wider decode steps run eagerly: the launches a graph saves are a small part of
# their time, and every size costs capture time and memory.
MAX_CAPTURE_SIZE = 512

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, given: list[int] | None = None) -> list[int]:
    """The configured list, else vLLM's: 1, 2, 4, multiples of 8 below 256, then of 16
    up to max_num_seqs or MAX_CAPTURE_SIZE, whichever is less (and that bound)."""
    if given:
        return sorted(s for s in set(given) if 0 < s <= max_num_seqs)
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= top]
    sizes += list(range(8, min(top + 1, 256), 8)) + list(range(256, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def cascade_sizes(sizes: list[int]) -> list[int]:
    """The sizes of `sizes` that get a cascade graph too: from CASCADE_MIN_SEQS, then
    multiples of CASCADE_SIZES_STEP, and the largest."""
    wide = [s for s in sizes if s >= CASCADE_MIN_SEQS]
    keep = {s for s in wide if s < CASCADE_SIZES_STEP} | {
        s for s in wide if s % CASCADE_SIZES_STEP == 0
    }
    return sorted(keep | set(wide[-1:]))


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
        cascade: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        self.cascade_sizes = cascade_sizes(sizes) if cascade else []
        self.max_seq_len = max_seq_len
        n = sizes[-1]
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=i32, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=i32, device=device)
        # keyed by (batch size, cascade)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        # each graph's output tensor; they share one memory pool, which is safe because
        # a step reads its output before the next replay
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.pool: Any = None

    def _metadata(self, bs: int, cascade: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
            shared_prefix_len=self.shared_prefix_len if cascade else None,
        )

    def _forward(self, bs: int, cascade: bool) -> torch.Tensor:
        with forward_context(ForwardContext(self._metadata(bs, cascade), self.kv_caches)):
            return self.model(self.input_ids[:bs], self.positions[:bs])

    def _keys(self) -> list[tuple[int, bool]]:
        keys = [(bs, False) for bs in self.sizes] + [(bs, True) for bs in self.cascade_sizes]
        return sorted(keys, reverse=True)  # largest first: later graphs reuse its pool

    @torch.inference_mode()
    def compile_kernels(self) -> None:
        """Each graph's forward once, uncaptured: what capture() does first, and all an
        engine without graphs needs to compile the decode kernels before serving."""
        for key in self._keys():
            self._forward(*key)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.monotonic()
        for key in self._keys():
            self._forward(*key)  # warm-up: Triton compiles outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[key] = self._forward(*key)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d CUDA graphs (batch sizes %d..%d, %d of them for shared prefixes) "
            "in %.1f s",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            len(self.cascade_sizes),
            time.monotonic() - t0,
        )

    def padded_size(self, num_seqs: int, max_seq_len: int, cascade: bool = False) -> int | None:
        """The graph for this decode batch, or None when it must run eagerly."""
        sizes = self.cascade_sizes if cascade else self.sizes
        if not sizes or num_seqs > sizes[-1] or max_seq_len > self.max_seq_len:
            return None
        return sizes[bisect.bisect_left(sizes, num_seqs)]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor | None:
        """Replay the graph for a decode batch: [n, hidden], or None if none fits.

        A step with a shared prefix but no cascade graph of its size replays the plain
        graph: the prefix is then read per sequence, as without the cascade.
        """
        n = input_ids.shape[0]
        cascade = attn.shared_prefix_len is not None
        bs = self.padded_size(n, attn.max_seq_len, cascade)
        if bs is None and cascade:
            cascade, bs = False, self.padded_size(n, attn.max_seq_len)
        if bs is None:
            return None
        if cascade:
            assert attn.shared_prefix_len is not None
            self.shared_prefix_len.copy_(attn.shared_prefix_len, non_blocking=True)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(attn.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(attn.seq_lens, non_blocking=True)
        width = attn.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(attn.block_tables, non_blocking=True)
        if n < bs:  # padding rows: write nowhere, read one key of the null block
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].fill_(0)
        self.graphs[bs, cascade].replay()
        return self.outputs[bs, cascade][:n]
