"""The model runner: per-request state on the worker, batch building, forward, sampling.

The engine core sends only what changed each step; the runner keeps every request's
tokens, block table and sampling state, turns a `StepInput` into flat input tensors
(all tokens of all sequences in one row, no padding), runs the model inside a
forward context carrying the attention metadata and the KV caches, and samples one
token for every sequence whose known tokens are all computed after the step.

With pipeline parallelism every stage keeps the same request state; a stage after
the first receives the previous stage's intermediate tensors instead of embedding
the tokens, one before the last sends its own on, and only the last samples. No
stage keeps its own samples then: the engine core sends them back with the next
step that schedules the request (`RunningRequest.new_token_ids`), so every stage
holds the same tokens.

A step runs in two halves, `launch` (batch, forward and sampling queued on the
device; the sampled ids start their copy to the host) and `finish` (wait for that
copy, append the tokens, build the StepOutput); `execute` is both. The mp worker
launches step N+1 before it finishes step N, so that the device never waits for
the host between steps: a request of step N+1 whose last token step N sampled gets
it on the device (`RequestState.pending`), never through the host. Where sampling
needs a request's output so far (penalties, bad words, min_tokens), the previous
step is finished first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from executor.block_table import BlockTables
from executor.config import EngineConfig
from executor.cuda_graphs import StepGraphs, capture_sizes, mixed_sizes
from executor.forward_context import AttentionMetadata, ForwardContext, forward_context
from executor.layers import graph_breaks
from executor.loader import torch_dtype
from executor.loader.kv_scales import attention_layers
from executor.messages import Logprobs, NewRequest, SamplingOptions, StepInput, StepOutput
from executor.pipeline import get_pp_group
from executor.sampler import (
    LogprobsTensors,
    Sampler,
    SamplingBatch,
    compute_prompt_logprobs,
    reads_output_ids,
    temperature_only,
)
from executor.shared_prefix import shared_prefix_len
from executor.transfer import to_device, to_host
from executor.upload import send_packed
from executor.warmup import warm_up_prefill
from kernels.dispatch import use_triton, use_triton_on


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + sampled so far
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingOptions
    generator: torch.Generator | None = None
    prompt_logprob_rows: list = field(default_factory=list)
    # Tokens sampled by launched, unfinished steps (PP = 1), and where the latest of
    # them lies on the device: (that step's sampled ids, this request's row).
    num_pending: int = 0
    pending: tuple[torch.Tensor, int] | None = None
    table_row: int = -1  # this request's row of ModelRunner.block_tables
    # greedy or a bare temperature (sampler.temperature_only), and whether sampling
    # reads the output so far (sampler.reads_output_ids): decided once per request
    temperature_only: bool = field(init=False)
    reads_outputs: bool = field(init=False)

    def __post_init__(self) -> None:
        self.temperature_only = temperature_only(self.sampling)
        self.reads_outputs = reads_output_ids(self.sampling)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class _Batch:
    """Host-side description of one step's batch, in the scheduler's order."""

    states: list[RequestState]
    num_tokens: list[int]  # tokens computed per request this step
    sample_rows: list[int]  # indices into states of the requests that sample
    logits_index: list[int]  # the flat token index of each sampling row's last token
    logits_index_dev: torch.Tensor | None = None  # the same on the device, once sent


@dataclass
class Launched:
    """A step queued on the device; `ModelRunner.finish` turns it into its StepOutput."""

    step: StepInput
    batch: _Batch | None = None
    sample_states: list[RequestState] = field(default_factory=list)
    sampled_host: torch.Tensor | None = None  # [S], the sampled ids (copy in flight on CUDA)
    logprobs_host: LogprobsTensors | None = None
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)
    copied: torch.cuda.Event | None = None  # recorded after the copies to the host
    output: StepOutput | None = None  # set once finished

    def ready(self) -> bool:
        """Whether finish() would not wait."""
        return self.output is not None or self.copied is None or self.copied.query()


class ModelRunner:
    def __init__(self, config: EngineConfig, model: Any, device: torch.device):
        self.config = config
        self.model = model
        if config.compilation.level > 0:
            compile_model(model)
        self.device = device
        self.block_size = config.cache.block_size
        self.vocab_size = int(config.model.hf_config.get("vocab_size", 0))
        self.requests: dict[str, RequestState] = {}
        self.block_tables = BlockTables(-(-config.model.max_model_len // self.block_size))
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self.pp = get_pp_group()
        self.graphs: StepGraphs | None = None
        # Cascade attention where the kernels run (the reference has nothing to save).
        self.use_cascade = not config.model.disable_cascade_attn and use_triton(
            torch.empty(0, device=device)
        )
        # seconds spent in model forwards and steps executed, for bench/overhead.py
        self.forward_time_s = 0.0
        self.execute_time_s = 0.0  # whole steps: inputs, forward, logits, sampling, outputs
        self.num_steps = 0
        self._capture_after_first_step = False
        self._last: Launched | None = None  # the latest launched step
        if config.cache.calculate_kv_scales:
            for layer in attention_layers(model):
                layer.calculate_scales = True

    # ---- KV cache ----------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, num_layers: int, num_kv_heads: int, head_dim: int):
        """A cache for each layer of this stage; the list is indexed by global layer number
        (attention layers read theirs by it), so other stages' layers hold an empty tensor."""
        dtype = self.kv_cache_dtype()
        shape = (2, num_blocks, self.block_size, num_kv_heads, head_dim)
        start, end = self.model.start_layer, self.model.end_layer
        self.kv_caches = [
            zeroed(shape if start <= i < end else (0,), dtype, self.device)
            for i in range(num_layers)
        ]

    def kv_cache_dtype(self) -> torch.dtype:
        name = self.config.cache.cache_dtype
        if name in ("fp8", "fp8_e4m3"):
            return torch.float8_e4m3fn
        if name == "fp8_e5m2":
            return torch.float8_e5m2
        return torch_dtype(self.config.model.dtype)

    def capture_cuda_graphs(self) -> None:
        """Decode graphs for every batch size up to --max-num-seqs, and graphs of small
        steps with prompt tokens (CUDA, not eager; see executor.cuda_graphs).

        With --calculate-kv-scales the capture waits for the first step: the graphs
        bake the scales in, and those come from that step's keys and values.
        """
        if any(layer.calculate_scales for layer in attention_layers(self.model)):
            self._capture_after_first_step = True
            return
        self.graphs = self._step_graphs(mixed=True)
        self.graphs.capture()

    def _step_graphs(self, mixed: bool) -> StepGraphs:
        cfg = self.config
        max_len = min(cfg.model.max_seq_len_to_capture, cfg.model.max_model_len)
        return StepGraphs(
            self.model,
            self.kv_caches,
            capture_sizes(cfg.scheduler.max_num_seqs, cfg.compilation.cudagraph_capture_sizes),
            -(-cfg.model.max_model_len // self.block_size),
            max_len,
            self.device,
            cascade=self.use_cascade,
            mixed=mixed_sizes(cfg.scheduler.max_num_batched_tokens) if mixed else None,
        )

    def warm_up(self, graphs: bool) -> None:
        """Compile the kernels that steps will need before the first request (see
        executor.warmup), then capture the decode graphs when `graphs`. Without them the
        decode forwards run once eagerly instead (on one pipeline stage only: they send
        nothing between stages)."""
        triton = use_triton_on(self.device)
        if triton:
            cfg = self.config
            warm_up_prefill(
                self, min(cfg.scheduler.max_num_batched_tokens, cfg.model.max_model_len)
            )
        if graphs:
            self.capture_cuda_graphs()
        elif triton and self.pp.size == 1:
            self._step_graphs(mixed=False).compile_kernels()

    # ---- request state -----------------------------------------------------------
    def _apply_step(self, step: StepInput) -> None:
        for rid in step.finished_req_ids:
            gone = self.requests.pop(rid, None)
            if gone is not None:
                self.block_tables.remove(gone.table_row)
        for new in step.new_requests:
            self.requests[new.req_id] = self._new_state(new)
        for upd in step.running:
            state = self.requests[upd.req_id]
            if upd.resumed:
                state.block_ids = list(upd.new_block_ids)
                self.block_tables.set(state.table_row, 0, state.block_ids)
            elif upd.new_block_ids:
                self.block_tables.set(state.table_row, len(state.block_ids), upd.new_block_ids)
                state.block_ids.extend(upd.new_block_ids)
            state.num_computed_tokens = upd.num_computed_tokens
            state.token_ids.extend(upd.new_token_ids)  # PP > 1: sampled by the last stage

    def _new_state(self, new: NewRequest) -> RequestState:
        gen = None
        if new.sampling.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(new.sampling.seed)
        old = self.requests.get(new.req_id)
        if old is not None:  # resumed after preemption, sent whole again
            self.block_tables.remove(old.table_row)
        return RequestState(
            new.req_id,
            list(new.token_ids),
            new.num_prompt_tokens,
            list(new.block_ids),
            new.num_computed_tokens,
            new.sampling,
            gen,
            table_row=self.block_tables.add(new.block_ids),
        )

    # ---- batch -------------------------------------------------------------------
    def _plan_batch(self, step: StepInput) -> _Batch:
        states: list[RequestState] = []
        counts: list[int] = []
        sample_rows: list[int] = []
        logits_index: list[int] = []
        offset = 0
        for rid, n in step.num_scheduled_tokens.items():
            state = self.requests[rid]
            if state.num_computed_tokens + n >= len(state.token_ids) + state.num_pending:
                sample_rows.append(len(states))
                logits_index.append(offset + n - 1)
            states.append(state)
            counts.append(n)
            offset += n
        return _Batch(states, counts, sample_rows, logits_index)

    def _prepare_inputs(
        self, batch: _Batch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        states = batch.states
        starts_list = [s.num_computed_tokens for s in states]
        ids, from_device = self._input_ids(batch, starts_list)
        starts = np.array(starts_list, dtype=np.int64)
        counts = np.array(batch.num_tokens, dtype=np.int64)
        seq_lens = starts + counts
        total = len(ids)
        # positions: for each request, start .. start + n - 1
        first = np.repeat(np.cumsum(counts) - counts, counts)  # [T] flat index of its row's start
        positions = np.repeat(starts, counts) + (np.arange(total) - first)
        width = max(len(s.block_ids) for s in states)
        tables = self.block_tables.gather([s.table_row for s in states], width)  # [S, width]
        row = np.repeat(np.arange(len(states)), counts)
        bs = self.block_size
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        qsl = np.zeros(len(states) + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        max_query_len = int(counts.max())
        shared = 0
        if self.use_cascade and max_query_len == 1:
            shared = shared_prefix_len(tables, seq_lens, bs)
        pending = [[i, r] for i, (_, r) in from_device]  # [P, 2]
        input_ids, positions_dev, slots_dev, pending_dev, batch.logits_index_dev = send_packed(
            self.device, np.int64, ids, positions, slots, pending, batch.logits_index
        )
        qsl_dev, seq_lens_dev, tables_dev, shared_dev = send_packed(
            self.device, np.int32, qsl, seq_lens, tables, [shared]
        )
        attn = AttentionMetadata(
            slot_mapping=slots_dev,
            query_start_loc=qsl_dev,
            seq_lens=seq_lens_dev,
            block_tables=tables_dev,
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            shared_prefix_len=shared_dev if shared else None,
        )
        if from_device:
            self._fill_from_device(input_ids, from_device, pending_dev)
        return input_ids, positions_dev, attn

    @staticmethod
    def _input_ids(
        batch: _Batch, starts: list[int]
    ) -> tuple[list[int], list[tuple[int, tuple[torch.Tensor, int]]]]:
        """The step's token ids, flat; (flat index, source) of those still on the device."""
        ids: list[int] = []
        from_device: list[tuple[int, tuple[torch.Tensor, int]]] = []
        for s, start, n in zip(batch.states, starts, batch.num_tokens, strict=True):
            tokens = s.token_ids
            if start + n <= len(tokens):
                ids += tokens[start : start + n]
                continue
            # the last input is the token the previous step sampled
            assert start + n == len(tokens) + 1 and s.num_pending == 1 and s.pending is not None
            ids += tokens[start:]
            from_device.append((len(ids), s.pending))
            ids.append(0)
        return ids, from_device

    @staticmethod
    def _fill_from_device(
        input_ids: torch.Tensor,
        sources: list[tuple[int, tuple[torch.Tensor, int]]],
        index: torch.Tensor,  # [P, 2] on the device: (flat index, row of the sampled ids)
    ) -> None:
        """input_ids[i] = the token a launched step sampled, without a host round trip."""
        sampled = sources[0][1][0]
        assert all(src is sampled for _, (src, _) in sources), "pending tokens of two steps"
        input_ids[index[:, 0]] = sampled[index[:, 1]]

    # ---- execute -----------------------------------------------------------------
    def execute(self, step: StepInput) -> StepOutput:
        return self.finish(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepInput, between: Callable[[], None] | None = None) -> Launched:
        """Queue the step on the device. `between`, if given, is called once its forward
        is queued and before its sampling is: the worker process answers the step before
        there (executor/worker_proc.py). A step without sampling never calls it."""
        t0 = time.perf_counter()
        try:
            return self._launch(step, between)
        finally:
            self.execute_time_s += time.perf_counter() - t0

    def finish(self, launched: Launched) -> StepOutput:
        if launched.output is None:
            t0 = time.perf_counter()
            launched.output = self._finish(launched)
            self.execute_time_s += time.perf_counter() - t0
        return launched.output

    def _launch(self, step: StepInput, between: Callable[[], None] | None = None) -> Launched:
        self._apply_step(step)
        if not step.num_scheduled_tokens:
            return Launched(step, output=StepOutput(step.step_id))
        batch = self._plan_batch(step)
        if self._last is not None and self._needs_outputs_so_far(batch):
            self.finish(self._last)
        input_ids, positions, attn = self._prepare_inputs(batch)
        t0 = time.perf_counter()
        hidden = self._forward(input_ids, positions, attn)  # [T, hidden]
        # on CUDA this is launch time only (no sync here: it would stall the host)
        self.forward_time_s += time.perf_counter() - t0
        self.num_steps += 1
        if not self.pp.is_last:
            self._advance(batch)
            return Launched(step, output=StepOutput(step.step_id))  # the last stage answers
        launched = Launched(step, batch, prompt_logprobs=self._prompt_logprobs(batch, hidden))
        if between is not None:
            between()
        self._sample(launched, hidden)
        self._advance(batch)
        if self._capture_after_first_step:
            self._capture_after_first_step = False
            self.capture_cuda_graphs()
        self._last = launched
        return launched

    def _needs_outputs_so_far(self, batch: _Batch) -> bool:
        """Whether a request with a token still on the device samples with its outputs."""
        return any(s.num_pending and s.reads_outputs for s in batch.states)

    def _finish(self, launched: Launched) -> StepOutput:
        if launched.copied is not None:
            launched.copied.synchronize()
        tokens: list[int] = []
        if launched.sampled_host is not None:
            tokens = launched.sampled_host.tolist()
        states = launched.sample_states
        if self.pp.size == 1:  # with PP the engine core sends them back (see the top)
            for s, tok in zip(states, tokens, strict=True):
                s.token_ids.append(tok)
                s.num_pending -= 1
        if self._last is launched:
            self._last = None
        logprobs = self._logprobs_by_request(states, launched.logprobs_host)
        return self._make_output(launched, tokens, logprobs)

    def _forward(self, input_ids, positions, attn: AttentionMetadata) -> Any:
        """[T, hidden] on the last stage; a stage before it returns what it sent on."""
        if self.graphs is not None:
            out = self.graphs.run(input_ids, positions, attn)
            if out is not None:
                return out
        intermediate = None
        if not self.pp.is_first:
            empty = self.model.empty_intermediate(input_ids.shape[0], self.device)
            intermediate = self.pp.recv(empty)  # [T, hidden] each
        with forward_context(ForwardContext(attn, self.kv_caches)):
            out = self.model(input_ids, positions, intermediate)
        if not self.pp.is_last:
            self.pp.send(out)
        return out

    def _sample(self, launched: Launched, hidden: torch.Tensor) -> None:
        """Queue the sampling and the copies of its results to the host."""
        batch = launched.batch
        assert batch is not None
        if not batch.sample_rows:
            return
        if len(batch.logits_index) == hidden.shape[0]:  # every token samples: decodes
            logits = self.model.compute_logits(hidden)  # [S, V], the model dtype
        else:
            logits = self.model.compute_logits(hidden[batch.logits_index_dev])
        states = [batch.states[i] for i in batch.sample_rows]
        sbatch = SamplingBatch.build(
            [s.sampling for s in states],
            _PerRow(states, lambda s: s.token_ids[: s.num_prompt_tokens]),
            _PerRow(states, lambda s: s.output_ids),
            {i: s.generator for i, s in enumerate(states) if s.generator is not None},
            logits.shape[-1],
            logits.device,
            all_temperature_only=all(s.temperature_only for s in states),
        )
        out = self.sampler(logits, sbatch)
        launched.sample_states = states
        launched.sampled_host = to_host(out.token_ids)
        if out.logprobs is not None:
            launched.logprobs_host = LogprobsTensors(*(to_host(t) for t in out.logprobs))
        if out.token_ids.is_cuda:
            launched.copied = torch.cuda.Event()
            launched.copied.record()
        if self.pp.size == 1:
            for row, s in enumerate(states):
                s.num_pending += 1
                s.pending = (out.token_ids, row)

    def _logprobs_by_request(
        self, states: list[RequestState], logprobs: LogprobsTensors | None
    ) -> dict[str, Logprobs]:
        if logprobs is None:
            return {}
        ids, vals, ranks = (t.tolist() for t in logprobs)
        result = {}
        for i, s in enumerate(states):
            k = s.sampling.logprobs
            if k is not None:
                result[s.req_id] = Logprobs([ids[i][: k + 1]], [vals[i][: k + 1]], [ranks[i]])
        return result

    def _prompt_logprobs(self, batch: _Batch, hidden: torch.Tensor) -> dict[str, Logprobs]:
        result = {}
        offset = 0
        for s, n in zip(batch.states, batch.num_tokens, strict=True):
            k = s.sampling.prompt_logprobs
            start = s.num_computed_tokens
            # position j predicts token j + 1; only prompt targets count
            end = min(start + n, s.num_prompt_tokens - 1)
            if k is not None and end > start:
                logits = self.model.compute_logits(hidden[offset : offset + end - start])
                # through pinned memory: a pageable copy would wait for the forward
                targets = to_device(torch.tensor(s.token_ids[start + 1 : end + 1]), hidden.device)
                result[s.req_id] = compute_prompt_logprobs(logits, targets, k)
            offset += n
        return result

    @staticmethod
    def _make_output(
        launched: Launched, sampled: list[int], logprobs: dict[str, Logprobs]
    ) -> StepOutput:
        batch = launched.batch
        assert batch is not None
        per_row: list[list[int]] = [[] for _ in batch.states]
        for row, tok in zip(batch.sample_rows, sampled, strict=True):
            per_row[row] = [tok]
        return StepOutput(
            launched.step.step_id,
            [s.req_id for s in batch.states],
            per_row,
            logprobs,
            launched.prompt_logprobs,
        )

    @staticmethod
    def _advance(batch: _Batch) -> None:
        for s, n in zip(batch.states, batch.num_tokens, strict=True):
            s.num_computed_tokens += n


class _PerRow(Sequence[list[int]]):
    """Each row's token list, made only when the sampler asks for that row (penalties,
    bad words, min_tokens): slicing every request's tokens every step cost more than
    the rest of the sampler's host work at batch 256."""

    def __init__(self, states: list[RequestState], tokens: Callable[[RequestState], list[int]]):
        self._states = states
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._states)

    @overload
    def __getitem__(self, i: int) -> list[int]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[list[int]]: ...
    def __getitem__(self, i: int | slice) -> list[int] | Sequence[list[int]]:
        if isinstance(i, slice):
            return [self._tokens(s) for s in self._states[i]]
        return self._tokens(self._states[i])


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of zeros; on the CPU from calloc'd memory (numpy.zeros), whose pages the
    OS maps as zeros on first touch. torch.zeros writes every byte up front: about 9 s
    for the default 4 GiB CPU KV cache on a slow machine, before any block is used."""
    if device.type != "cpu" or math.prod(shape) == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(math.prod(shape) * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def compile_model(model: Any) -> None:
    """-O 1-3: torch.compile the model's forward, in pieces between attention layers.

    Attention and the collectives are graph breaks (they run our kernels, eagerly);
    between them the compiler fuses norms, rotary, activations and residual adds.
    Shapes are dynamic: one compile serves every number of tokens (batch size 1 is
    specialized once). CUDA graphs, when on, capture the compiled code.
    """
    graph_breaks.apply()
    model.forward = torch.compile(model.forward, dynamic=True)
