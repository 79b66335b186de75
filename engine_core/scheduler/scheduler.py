"""The scheduler: which requests run this step, and how many tokens each computes.

There are no prefill and decode phases. Each step every running request gets the
tokens it still lacks (1 for a decode, the rest of its prompt for a prefill) under
the token budget (`max_num_batched_tokens`) and `max_num_seqs`, so long prompts are
chunked and decodes are never starved. A prompt is admitted only while the running
requests keep room to grow (`headroom`); when the KV cache runs out all the same, the
lowest-priority running request is preempted and later recomputed.

`schedule()` returns plain data (`StepInput`); `update()` takes the step's output and
returns the per-request outputs for the client.

With pipeline parallelism the engine core keeps up to PP steps (micro-batches) in
flight, so `schedule()` may run again before `update()` of the previous step. A
request belongs to at most one step in flight: `schedule()` passes over requests in
flight and never preempts one, and each micro-batch takes at most 1/PP of the
requests, so that the next one has requests left to run. The workers' last stage
samples without keeping the tokens; the step that next schedules a request carries
them (`RunningRequest.new_token_ids`).

With async scheduling (PP = 1, `async_scheduling`) the engine core schedules step
N+1 while step N runs, so the requests of step N are in flight when N+1 is planned.
There a request may be in two steps at once: each step that samples for it leaves
one pending token (`Request.num_pending_tokens`), which the worker knows and the
scheduler does not yet; the next step computes it. A request whose pending tokens
reach max_tokens or the model length is not scheduled again; one that stops on EOS
or a stop token wastes the one step behind it, whose output is dropped. Requests
in flight are never preempted: when blocks run out and every candidate is in
flight, the request waits for the next step.
"""

from __future__ import annotations

import enum
import math
import time

from engine_core.kv_cache.manager import KVCacheManager
from engine_core.messages import EngineCoreOutput, FinishReason, SchedulerStats
from engine_core.request import Request, RequestStatus
from engine_core.scheduler.headroom import Headroom
from engine_core.scheduler.queues import make_queue
from executor.config import SchedulerConfig
from executor.messages import NewRequest, RunningRequest, StepInput, StepOutput


class _Admit(enum.Enum):
    YES = enum.auto()
    SKIP = enum.auto()  # not this one, but look at the next waiting request
    STOP = enum.auto()  # admit nothing more this step


class _StepPlan:
    """What one `schedule()` call has decided so far."""

    def __init__(self, budget: int, max_seqs: int) -> None:
        self.budget = budget
        self.max_seqs = max_seqs  # sequences in this step (a micro-batch's share with PP)
        self.tokens: dict[str, int] = {}  # req_id -> tokens this step, in batch order
        self.new_blocks: dict[str, list[int]] = {}
        self.preempted: list[str] = []

    def add(self, req: Request, n: int, blocks: list[int]) -> None:
        self.tokens[req.request_id] = n
        self.new_blocks[req.request_id] = blocks
        self.budget -= n

    def undo(self, req: Request) -> None:
        n = self.tokens.pop(req.request_id, 0)
        self.new_blocks.pop(req.request_id, None)
        self.budget += n


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        pipeline_parallel_size: int = 1,
        async_scheduling: bool = False,
    ) -> None:
        self.config = config
        self.kv = kv
        self.pipeline_parallel_size = pipeline_parallel_size
        self.async_scheduling = async_scheduling and pipeline_parallel_size == 1
        # step id -> the requests of that step, for the steps scheduled and not yet updated
        self._in_flight: dict[int, dict[str, Request]] = {}
        # PP > 1: how many of a request's tokens the workers hold
        self._worker_num_tokens: dict[str, int] = {}
        self.waiting = make_queue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._known_to_worker: set[str] = set()
        self._resumed: set[str] = set()  # preempted, known to the worker, now admitted again
        self._finished_ids: list[str] = []  # to tell the workers next step
        self._step_id = 0
        self._num_preempted = 0
        self._last_prompt_time = 0.0
        self._last_prompt_latency = 0.0

    # ---- requests in and out -------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.add(req)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, FinishReason.ABORT)
            outputs.append(EngineCoreOutput(rid, [], finish_reason=FinishReason.ABORT))
        return outputs

    def has_work(self) -> bool:
        return bool(self.running or len(self.waiting))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- schedule ----------------------------------------------------------------
    def schedule(self) -> StepInput:
        plan = _StepPlan(self.config.max_num_batched_tokens, self._max_seqs_per_step())
        self._schedule_running(plan)
        if not plan.preempted and self._may_admit_prompts():
            self._schedule_waiting(plan)
        return self._build_step_input(plan)

    def _max_seqs_per_step(self) -> int:
        if self.pipeline_parallel_size == 1:
            return self.config.max_num_seqs
        # an even share of what can run, so that PP micro-batches can be in flight at once
        active = min(len(self.requests), self.config.max_num_seqs)
        return max(1, math.ceil(active / self.pipeline_parallel_size))

    def _schedule_running(self, plan: _StepPlan) -> None:
        for req in list(self.running):
            if plan.budget <= 0 or len(plan.tokens) >= plan.max_seqs:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if req.num_in_flight and not self.async_scheduling:
                continue  # PP: its step is not back yet
            n = self._num_new_tokens(req, plan.budget)
            if n == 0:
                continue
            blocks = self._allocate_or_preempt(req, n, plan)
            if blocks is not None:
                plan.add(req, n, blocks)

    def _allocate_or_preempt(self, req: Request, n: int, plan: _StepPlan) -> list[int] | None:
        while True:
            blocks = self.kv.allocate_slots(req, n)
            if blocks is not None:
                return blocks
            victim = self._pick_victim()
            if victim is None:
                return None  # all in flight (async scheduling): it waits for a step back
            self._preempt(victim, plan)
            if victim is req:
                return None

    def _pick_victim(self) -> Request | None:
        # Never one in flight: its step would come back for a request already reset.
        # Without async scheduling the request asking for blocks is not in flight, so
        # there is always a candidate.
        candidates = self._preemptible()
        if not candidates:
            return None
        if self.config.policy == "priority":
            return max(candidates, key=Request.sort_key)
        return candidates[-1]  # the latest arrival among the running

    def _preemptible(self) -> list[Request]:
        if not self._in_flight:
            return self.running
        return [r for r in self.running if not r.num_in_flight]

    def _preempt(self, req: Request, plan: _StepPlan) -> None:
        plan.undo(req)
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self._num_preempted += 1
        plan.preempted.append(req.request_id)
        self.waiting.prepend(req)

    def _may_admit_prompts(self) -> bool:
        # --scheduler-delay-factor: let prompts gather before the next prefill step
        factor = self.config.scheduler_delay_factor
        if factor <= 0 or not self.running or not len(self.waiting):
            return True
        waited = time.time() - self.waiting.peek().arrival_time
        return waited > factor * self._last_prompt_latency

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        admitted = False
        passed_over: list[Request] = []
        cfg = self.config
        headroom = Headroom(
            self.kv, cfg.admission_horizon, cfg.max_model_len, cfg.max_num_partial_prefills
        )
        while len(self.waiting) and plan.budget > 0:
            if len(self.running) >= self.config.max_num_seqs or len(plan.tokens) >= plan.max_seqs:
                break
            req = self.waiting.pop()
            verdict = self._admit(req, plan, headroom)
            if verdict is _Admit.YES:
                admitted = True
                continue
            passed_over.append(req)
            if verdict is _Admit.STOP:
                break
        for req in reversed(passed_over):
            self.waiting.prepend(req)
        if admitted:
            now = time.time()
            if self._last_prompt_time:
                self._last_prompt_latency = now - self._last_prompt_time
            self._last_prompt_time = now

    def _admit(self, req: Request, plan: _StepPlan, headroom: Headroom) -> _Admit:
        if req.request_id in plan.preempted:
            return _Admit.STOP  # preempted in this very step: not back before the next
        while True:
            # looked up again after a preemption: the victim's uncomputed blocks are gone
            cached_blocks, num_cached = self.kv.get_computed_blocks(req)
            remaining = req.num_tokens - num_cached
            n = min(remaining, plan.budget)
            if 0 < self.config.long_prefill_token_threshold < n:
                n = self.config.long_prefill_token_threshold
            if n < remaining:
                verdict = self._may_start_partial(req, plan)
                if verdict is not _Admit.YES:
                    return verdict
            new_blocks = self.kv.num_blocks_needed(num_cached + n) - len(cached_blocks)
            if not headroom.allows(self.running, req, num_cached + n, new_blocks):
                if self._priority_victim_for(req) is None:
                    return _Admit.STOP  # leave the running requests room to grow
            blocks = self.kv.allocate_slots(req, n, cached_blocks, num_cached)
            if blocks is not None:
                break
            victim = self._priority_victim_for(req)
            if victim is None:
                return _Admit.STOP
            self._preempt(victim, plan)
        if req.status == RequestStatus.PREEMPTED and req.request_id in self._known_to_worker:
            self._resumed.add(req.request_id)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_cached
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
        headroom.admitted(req)
        self.running.append(req)
        plan.add(req, n, blocks)
        return _Admit.YES

    def _priority_victim_for(self, req: Request) -> Request | None:
        # Under the priority policy a more urgent arrival may take a running one's blocks.
        candidates = self._preemptible()
        if self.config.policy != "priority" or not candidates:
            return None
        victim = max(candidates, key=Request.sort_key)
        return victim if victim.sort_key() > req.sort_key() else None

    def _may_start_partial(self, req: Request, plan: _StepPlan) -> _Admit:
        """Whether `req` may begin a prefill that this step will not finish."""
        if not self.config.enable_chunked_prefill:
            return _Admit.STOP
        partial = [
            r
            for r in self.running
            if r.num_computed_tokens + plan.tokens.get(r.request_id, 0) < r.num_prompt_tokens
        ]
        if len(partial) >= self.config.max_num_partial_prefills:
            return _Admit.STOP
        if self._is_long(req):
            long_ones = sum(1 for r in partial if self._is_long(r))
            if long_ones >= self.config.max_long_partial_prefills:
                return _Admit.SKIP  # a shorter prompt behind it may still start
        return _Admit.YES

    def _ends_in_flight(self, req: Request) -> bool:
        """Whether the pending tokens already reach max_tokens or the model length."""
        pending = req.num_pending_tokens
        return (
            req.num_output_tokens + pending >= req.max_tokens
            or req.num_tokens + pending >= self.config.max_model_len
        )

    def _is_long(self, req: Request) -> bool:
        threshold = self.config.long_prefill_token_threshold
        return threshold > 0 and req.num_prompt_tokens > threshold

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        if req.num_pending_tokens and self._ends_in_flight(req):
            return 0
        n = min(req.num_tokens + req.num_pending_tokens - req.num_computed_tokens, budget)
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < n:
            n = threshold
        return n

    def _build_step_input(self, plan: _StepPlan) -> StepInput:
        self._step_id += 1
        new, running = [], []
        stepped: dict[str, Request] = {}
        for rid, n in plan.tokens.items():
            req = self.requests[rid]
            blocks = plan.new_blocks[rid]
            if rid not in self._known_to_worker:
                self._known_to_worker.add(rid)
                new.append(self._new_request_msg(req))
            else:
                running.append(self._running_msg(req, blocks))
            # the workers sample when the step computes every token they know
            if req.num_computed_tokens + n >= req.num_tokens + req.num_pending_tokens:
                req.num_pending_tokens += 1
            req.num_computed_tokens += n
            req.num_in_flight += 1
            stepped[rid] = req
        if stepped:
            self._in_flight[self._step_id] = stepped
        # an empty step is not sent: finished ids wait for one that is
        finished: list[str] = []
        if plan.tokens:
            finished, self._finished_ids = self._finished_ids, []
        return StepInput(
            step_id=self._step_id,
            new_requests=new,
            running=running,
            num_scheduled_tokens=dict(plan.tokens),
            finished_req_ids=finished,
            preempted_req_ids=plan.preempted,
        )

    def _running_msg(self, req: Request, new_blocks: list[int]) -> RunningRequest:
        rid = req.request_id
        if rid in self._resumed:
            # its block table was freed on preemption: send the whole new one
            self._resumed.discard(rid)
            table = self.kv.get_block_ids(rid)
            upd = RunningRequest(rid, table, req.num_computed_tokens, True)
        else:
            upd = RunningRequest(rid, new_blocks, req.num_computed_tokens)
        if self.pipeline_parallel_size > 1:
            # the workers hold the tokens up to the last step that carried this request
            held = self._worker_num_tokens[rid]
            upd.new_token_ids = req.all_token_ids[held:]
            self._worker_num_tokens[rid] = req.num_tokens
        return upd

    def _new_request_msg(self, req: Request) -> NewRequest:
        if self.pipeline_parallel_size > 1:
            self._worker_num_tokens[req.request_id] = req.num_tokens
        return NewRequest(
            req.request_id,
            list(req.all_token_ids),
            req.num_prompt_tokens,
            self.kv.get_block_ids(req.request_id),
            req.num_computed_tokens,
            req.sampling,
        )

    # ---- update ------------------------------------------------------------------
    def update(self, step: StepInput, out: StepOutput) -> list[EngineCoreOutput]:
        # the step's own Request objects: an id aborted and reused meanwhile is another
        stepped = self._in_flight.pop(step.step_id, {})
        for stepped_req in stepped.values():
            stepped_req.num_in_flight -= 1
        outputs = []
        for i, rid in enumerate(out.req_ids):
            req = stepped.get(rid)
            if req is None or req.is_finished:
                continue  # aborted while the step ran
            sampled = out.sampled[i]
            req.num_pending_tokens -= len(sampled)
            prompt_lp = out.prompt_logprobs.get(rid)
            if not sampled and prompt_lp is None:
                continue
            reason = self._append_and_check(req, sampled)
            outputs.append(
                EngineCoreOutput(
                    rid,
                    sampled,
                    out.logprobs.get(rid),
                    prompt_lp,
                    reason,
                    req.stop_reason,
                    max(req.num_cached_tokens, 0),
                )
            )
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
        return outputs

    def _append_and_check(self, req: Request, sampled: list[int]) -> FinishReason | None:
        for tok in sampled:
            req.append_output([tok])
            reason = self._stop_reason(req, tok)
            if reason is not None:
                return reason
        return None

    def _stop_reason(self, req: Request, tok: int) -> FinishReason | None:
        enough = req.num_output_tokens >= req.sampling.min_tokens
        if enough and not req.ignore_eos and tok in req.eos_token_ids:
            return FinishReason.STOP
        if enough and req.sampling.stop_token_ids and tok in req.sampling.stop_token_ids:
            req.stop_reason = tok
            return FinishReason.STOP
        if req.num_output_tokens >= req.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.kv.free(req)
        del self.requests[req.request_id]
        self._resumed.discard(req.request_id)
        self._worker_num_tokens.pop(req.request_id, None)
        if req.request_id in self._known_to_worker:
            self._known_to_worker.discard(req.request_id)
            self._finished_ids.append(req.request_id)

    def stats(self) -> SchedulerStats:
        queries, hits = self.kv.prefix_cache_stats()
        preempted, self._num_preempted = self._num_preempted, 0
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preempted=preempted,
        )
