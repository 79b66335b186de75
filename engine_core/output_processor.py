"""Client-side output processing: token ids from the core to text and RequestOutputs.

One `_ChildState` per core request (a child of an n > 1 request) holds its
incremental detokenizer; one `_ParentState` per user request gathers its children.
A stop string found here ends the child: the caller must abort it in the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine_core.detokenizer import IncrementalDetokenizer
from engine_core.messages import EngineCoreOutput, FinishReason
from engine_core.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from engine_core.processor import child_request_ids
from engine_core.sampling_params import RequestOutputKind, SamplingParams
from executor.messages import Logprobs


@dataclass
class _ChildState:
    parent: _ParentState
    index: int
    detok: IncrementalDetokenizer | None
    out: CompletionOutput
    text_sent: int = 0  # characters already handed out (DELTA outputs)
    tokens_sent: int = 0
    logprobs_sent: int = 0


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    children: list[_ChildState] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        children = self.children
        if len(children) == 1:  # n = 1: checked for every request every step
            return children[0].out.finished
        return all(c.out.finished for c in children)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._children: dict[str, _ChildState] = {}
        self._parents: dict[str, _ParentState] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams
    ) -> list[str]:
        """Register a user request; returns its child (core) request ids."""
        parent = _ParentState(request_id, prompt, prompt_ids, params)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]  # the first prompt token has no logprob
        self._parents[request_id] = parent
        ids = child_request_ids(request_id, params.n)
        for i, rid in enumerate(ids):
            child = _ChildState(
                parent, i, self._make_detok(prompt_ids, params), CompletionOutput(i)
            )
            if params.logprobs is not None:
                child.out.logprobs = []
                child.out.cumulative_logprob = 0.0
            parent.children.append(child)
            self._children[rid] = child
        return ids

    def _make_detok(self, prompt_ids: list[int], params: SamplingParams):
        if self.tokenizer is None or not params.detokenize:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            stop=params.stop_strings,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def num_unfinished(self) -> int:
        return len(self._parents)

    def request_ids(self) -> list[str]:
        return list(self._parents)

    # ---- processing ---------------------------------------------------------------
    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply core outputs. Returns (outputs to hand out, core ids to abort)."""
        touched: dict[str, _ParentState] = {}
        to_abort: list[str] = []
        for o in outputs:
            child = self._children.get(o.request_id)
            if child is None:
                continue
            if self._apply(child, o):
                to_abort.append(o.request_id)
            touched[child.parent.request_id] = child.parent
        results = []
        for parent in touched.values():
            ro = self._make_output(parent)
            if ro is not None:
                results.append(ro)
            if parent.finished:
                self._drop(parent)
        return results, to_abort

    def _apply(self, child: _ChildState, o: EngineCoreOutput) -> bool:
        """Update one child; True when a stop string ended it here (abort in the core)."""
        parent, out = child.parent, child.out
        parent.num_cached_tokens = o.num_cached_tokens
        if o.prompt_logprobs is not None and parent.prompt_logprobs is not None:
            parent.prompt_logprobs.extend(self._positions(o.prompt_logprobs))
        if o.error is not None:
            parent.error = o.error
        out.token_ids.extend(o.new_token_ids)
        if o.new_logprobs is not None and out.logprobs is not None:
            positions = self._positions(o.new_logprobs)
            out.logprobs.extend(positions)
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + sum(
                p[t].logprob for p, t in zip(positions, o.new_token_ids, strict=False)
            )
        stopped_here = False
        if child.detok is not None and o.new_token_ids:
            delta, stop = child.detok.update(o.new_token_ids)
            out.text += delta
            if stop is not None and o.finish_reason is None:
                self._truncate_at_stop(child)
                out.finish_reason, out.stop_reason = "stop", stop
                stopped_here = True
        if o.finish_reason is not None and not out.finished:
            if child.detok is not None:
                out.text += child.detok.flush()
            out.finish_reason = str(o.finish_reason)
            out.stop_reason = o.stop_reason
        return stopped_here

    def _truncate_at_stop(self, child: _ChildState) -> None:
        # tokens after the one that completed the stop string are dropped; the
        # detokenizer already cut the text
        assert child.detok is not None
        child.out.text = child.detok.output_text

    def _positions(self, lp: Logprobs) -> list[PositionLogprobs]:
        result = []
        for ids, vals, rank in zip(lp.token_ids, lp.logprobs, lp.ranks, strict=True):
            pos: PositionLogprobs = {}
            for j, (tid, val) in enumerate(zip(ids, vals, strict=True)):
                if tid not in pos:
                    pos[tid] = Logprob(val, rank if j == 0 else j, self._decode_one(tid))
            result.append(pos)
        return result

    def _decode_one(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    # ---- outputs ------------------------------------------------------------------
    def _make_output(self, parent: _ParentState) -> RequestOutput | None:
        kind = parent.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not parent.finished:
            return None
        if kind == RequestOutputKind.DELTA:
            outs = [self._delta(c) for c in parent.children]
        else:
            outs = [_copy(c.out) for c in parent.children]
        return RequestOutput(
            parent.request_id,
            parent.prompt,
            parent.prompt_ids,
            outs,
            parent.finished,
            parent.prompt_logprobs,
            parent.num_cached_tokens,
            parent.error,
        )

    def _delta(self, c: _ChildState) -> CompletionOutput:
        o = c.out
        d = CompletionOutput(
            c.index,
            o.text[c.text_sent :],
            o.token_ids[c.tokens_sent :],
            o.cumulative_logprob,
            None if o.logprobs is None else o.logprobs[c.logprobs_sent :],
            o.finish_reason,
            o.stop_reason,
        )
        c.text_sent, c.tokens_sent = len(o.text), len(o.token_ids)
        c.logprobs_sent = len(o.logprobs or [])
        return d

    def _drop(self, parent: _ParentState) -> None:
        self._parents.pop(parent.request_id, None)
        for rid in child_request_ids(parent.request_id, len(parent.children)):
            self._children.pop(rid, None)

    def abort(self, request_id: str) -> list[str]:
        """Forget a user request; returns the core ids to abort."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        ids = child_request_ids(request_id, len(parent.children))
        for rid in ids:
            self._children.pop(rid, None)
        return ids

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """The engine died: finish every request with an error."""
        results = []
        for parent in list(self._parents.values()):
            parent.error = reason
            for c in parent.children:
                if not c.out.finished:
                    c.out.finish_reason = str(FinishReason.ERROR)
            ro = self._make_output(parent)
            if ro is not None:
                results.append(ro)
            self._drop(parent)
        return results


def _copy(o: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(
        o.index,
        o.text,
        list(o.token_ids),
        o.cumulative_logprob,
        None if o.logprobs is None else list(o.logprobs),
        o.finish_reason,
        o.stop_reason,
    )
