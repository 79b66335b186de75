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

Small steps with prompts in them (a short prefill, a prompt chunk beside a few decodes)
run graphs too, one per token count of MIXED_SIZES: launching such a step eagerly costs
the host more than the device needs to run it (an 8B model's 256-token prefill: ~25 ms
of launches for ~7 ms of GPU work, on every request's first token). A mixed graph is
captured for max_query_len = its token count and MIXED_MAX_SEQS sequences: the kernels
read each sequence's true query and context lengths from the device, so padding
sequences have no queries and the padding tokens belong to none (slot -1: they write
no cache; their rows of the output are never read).
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
# Token counts of the mixed-step graphs, and the most sequences such a step may hold.
# Bigger steps run eagerly: their GPU time covers their launches.
MIXED_SIZES = (16, 32, 64, 128, 256, 512)
MIXED_MAX_SEQS = 64

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


def mixed_sizes(max_num_batched_tokens: int) -> list[int]:
    """The token counts of MIXED_SIZES a step may reach."""
    return [t for t in MIXED_SIZES if t <= max_num_batched_tokens]


def mixed_seqs(num_tokens: int) -> int:
    """Sequences a mixed graph of `num_tokens` tokens holds (each has a token at least)."""
    return min(num_tokens, MIXED_MAX_SEQS)


def cascade_sizes(sizes: list[int]) -> list[int]:
    """The sizes of `sizes` that get a cascade graph too: from CASCADE_MIN_SEQS, then
    multiples of CASCADE_SIZES_STEP, and the largest."""
    wide = [s for s in sizes if s >= CASCADE_MIN_SEQS]
    keep = {s for s in wide if s < CASCADE_SIZES_STEP} | {
        s for s in wide if s % CASCADE_SIZES_STEP == 0
    }
    return sorted(keep | set(wide[-1:]))


DECODE, CASCADE, MIXED = "decode", "cascade", "mixed"  # the kinds of graph


class StepGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
        cascade: bool = False,
        mixed: list[int] | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        self.cascade_sizes = cascade_sizes(sizes) if cascade else []
        self.mixed_sizes = mixed or []
        self.max_seq_len = max_seq_len
        n = max([sizes[-1], *self.mixed_sizes])  # tokens
        seqs = max([sizes[-1], *(mixed_seqs(t) for t in self.mixed_sizes)])
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(seqs, dtype=i32, device=device)
        self.query_start_loc = torch.arange(sizes[-1] + 1, dtype=i32, device=device)
        # mixed steps' own: decode graphs rely on query_start_loc staying 0, 1, 2, ...
        self.mixed_query_start_loc = torch.zeros(seqs + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros((seqs, max_blocks_per_seq), dtype=i32, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=i32, device=device)
        # keyed by (batch size in sequences, or in tokens for MIXED; kind)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        # each graph's output tensor; they share one memory pool, which is safe because
        # a step reads its output before the next replay
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.pool: Any = None

    def _metadata(self, size: int, kind: str) -> AttentionMetadata:
        """A graph's metadata: `size` sequences of one query each, or for MIXED `size`
        tokens over mixed_seqs(size) sequences of up to `size` queries."""
        mixed = kind == MIXED
        seqs = mixed_seqs(size) if mixed else size
        qsl = self.mixed_query_start_loc if mixed else self.query_start_loc
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=qsl[: seqs + 1],
            seq_lens=self.seq_lens[:seqs],
            block_tables=self.block_tables[:seqs],
            max_query_len=size if mixed else 1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=[0] * (seqs + 1) if mixed else list(range(seqs + 1)),
            seq_lens_cpu=[1] * seqs,
            shared_prefix_len=self.shared_prefix_len if kind == CASCADE else None,
        )

    def _forward(self, size: int, kind: str) -> torch.Tensor:
        with forward_context(ForwardContext(self._metadata(size, kind), self.kv_caches)):
            return self.model(self.input_ids[:size], self.positions[:size])

    def _keys(self) -> list[tuple[int, str]]:
        keys = [(bs, DECODE) for bs in self.sizes] + [(bs, CASCADE) for bs in self.cascade_sizes]
        keys += [(t, MIXED) for t in self.mixed_sizes]
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
            "captured %d CUDA graphs (batch sizes %d..%d, %d of them for shared prefixes, "
            "%d for mixed steps of up to %d tokens) in %.1f s",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            len(self.cascade_sizes),
            len(self.mixed_sizes),
            max(self.mixed_sizes, default=0),
            time.monotonic() - t0,
        )

    def padded_size(self, num_seqs: int, max_seq_len: int, cascade: bool = False) -> int | None:
        """The graph for this decode batch, or None when it must run eagerly."""
        sizes = self.cascade_sizes if cascade else self.sizes
        if not sizes or num_seqs > sizes[-1] or max_seq_len > self.max_seq_len:
            return None
        return sizes[bisect.bisect_left(sizes, num_seqs)]

    def mixed_size(self, num_tokens: int, num_seqs: int, max_seq_len: int) -> int | None:
        """The mixed graph for a step with prompt tokens, or None when it runs eagerly."""
        sizes = self.mixed_sizes
        if not sizes or num_tokens > sizes[-1] or max_seq_len > self.max_seq_len:
            return None
        size = sizes[bisect.bisect_left(sizes, num_tokens)]
        return size if num_seqs <= mixed_seqs(size) else None

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor | None:
        """Replay the graph for this step: [n, hidden], or None if none fits."""
        if attn.max_query_len > 1:
            return self._run_mixed(input_ids, positions, attn)
        return self._run_decode(input_ids, positions, attn)

    def _run_decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor | None:
        """A decode batch. A step with a shared prefix but no cascade graph of its size
        replays the plain graph: the prefix is then read per sequence, as without the
        cascade."""
        n = input_ids.shape[0]
        kind = CASCADE if attn.shared_prefix_len is not None else DECODE
        bs = self.padded_size(n, attn.max_seq_len, kind == CASCADE)
        if bs is None and kind == CASCADE:
            kind, bs = DECODE, self.padded_size(n, attn.max_seq_len)
        if bs is None:
            return None
        if kind == CASCADE:
            assert attn.shared_prefix_len is not None
            self.shared_prefix_len.copy_(attn.shared_prefix_len, non_blocking=True)
        self._copy_inputs(input_ids, positions, attn, bs)
        if n < bs:  # padding rows: write nowhere, read one key of the null block
            self.block_tables[n:bs, 0].fill_(0)
        self.graphs[bs, kind].replay()
        return self.outputs[bs, kind][:n]

    def _run_mixed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor | None:
        n, num_seqs = input_ids.shape[0], attn.seq_lens.shape[0]
        size = self.mixed_size(n, num_seqs, attn.max_seq_len)
        if size is None:
            return None
        self._copy_inputs(input_ids, positions, attn, size)
        qsl = self.mixed_query_start_loc
        qsl[: num_seqs + 1].copy_(attn.query_start_loc, non_blocking=True)
        qsl[num_seqs + 1 : mixed_seqs(size) + 1].fill_(n)  # padding sequences: no queries
        self.graphs[size, MIXED].replay()
        return self.outputs[size, MIXED][:n]

    def _copy_inputs(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, size: int
    ) -> None:
        """The step's inputs into the buffers; tokens and sequences past its own up to
        `size` (the graph's) write no cache and see one key."""
        n, num_seqs = input_ids.shape[0], attn.seq_lens.shape[0]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(attn.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(attn.seq_lens, non_blocking=True)
        width = attn.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(attn.block_tables, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[num_seqs:size].fill_(1)
