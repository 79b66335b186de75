"""Async scheduling: step N+1 is planned while step N is in flight (no model).

A fake worker keeps each request's tokens the way the real one does with PP = 1
(it appends its own samples), and samples a token that depends only on the tokens
so far, so that a run with steps overlapped must give exactly the tokens of a run
without.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest

from engine_core import LLM, SamplingParams
from engine_core.kv_cache.manager import KVCacheManager
from engine_core.messages import FinishReason
from engine_core.request import Request
from engine_core.scheduler.scheduler import Scheduler
from executor.config import SchedulerConfig
from executor.messages import SamplingOptions, StepInput, StepOutput
from tests.helpers.tiny_models import make_tiny_model

BLOCK = 4
EOS = 2


class FakeWorker:
    """Per-request tokens and progress as a worker holds them; samples deterministically."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.steps_run = 0

    def run(self, step: StepInput) -> StepOutput:
        self.steps_run += 1
        for rid in step.finished_req_ids:
            del self.tokens[rid], self.computed[rid]
        for new in step.new_requests:
            self.tokens[new.req_id] = list(new.token_ids)
            self.computed[new.req_id] = new.num_computed_tokens
        for upd in step.running:
            self.computed[upd.req_id] = upd.num_computed_tokens
        ids, sampled = [], []
        for rid, n in step.num_scheduled_tokens.items():
            tokens = self.tokens[rid]
            self.computed[rid] += n
            assert self.computed[rid] <= len(tokens) + 1, "a token computed before it is known"
            new = [next_token(tokens)] if self.computed[rid] >= len(tokens) else []
            tokens += new
            ids.append(rid)
            sampled.append(new)
        return StepOutput(step.step_id, ids, sampled)


def next_token(tokens: list[int]) -> int:
    h = (sum(tokens) * 31 + len(tokens) * 7) % 97
    return EOS if h < 5 else 3 + h % 40


def make_scheduler(
    async_scheduling: bool, num_blocks=64, budget=16, max_seqs=8, horizon=256
) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        max_model_len=64,
        admission_horizon=horizon,
    )
    kv = KVCacheManager(num_blocks, BLOCK, True, "builtin", 64)
    return Scheduler(cfg, kv, 1, async_scheduling=async_scheduling)


def make_request(rid: str, prompt: list[int], max_tokens: int, ignore_eos=False) -> Request:
    return Request(
        rid, prompt, SamplingOptions(temperature=0.0), max_tokens, [EOS], ignore_eos=ignore_eos
    )


def run(s: Scheduler, worker: FakeWorker, depth: int, max_steps=500) -> dict[str, tuple]:
    """Drive the scheduler like EngineCore does, with up to `depth` steps in flight."""
    results: dict[str, tuple] = {}
    in_flight: deque[tuple[StepInput, StepOutput]] = deque()
    for _ in range(max_steps):
        while len(in_flight) < depth:
            inp = s.schedule()
            if not inp.num_scheduled_tokens:
                break
            in_flight.append((inp, worker.run(inp)))
        if not in_flight:
            return results
        inp, out = in_flight.popleft()
        for o in s.update(inp, out):
            if o.finish_reason is not None:
                req_tokens = results.setdefault(o.request_id, ())
                results[o.request_id] = (*req_tokens, o.finish_reason)
        s.kv.check_integrity()
    raise AssertionError("the requests did not finish")


def outputs_of(s: Scheduler, reqs: list[Request]) -> dict[str, tuple]:
    return {r.request_id: (tuple(r.output_token_ids), r.finish_reason) for r in reqs}


def test_async_steps_give_the_tokens_of_sync_steps():
    rng = random.Random(0)
    specs = [
        (f"r{i}", [rng.randrange(3, 90) for _ in range(rng.randrange(1, 20))], rng.randrange(1, 12))
        for i in range(24)
    ]
    got = {}
    for mode in (False, True):
        s = make_scheduler(mode, num_blocks=24, budget=12, max_seqs=6)
        reqs = [make_request(rid, prompt, mt) for rid, prompt, mt in specs]
        for r in reqs:
            s.add_request(r)
        run(s, FakeWorker(), depth=2 if mode else 1)
        assert s.kv.usage == 0.0 and not s.has_work()
        got[mode] = outputs_of(s, reqs)
    assert got[True] == got[False]
    reasons = {reason for _, reason in got[True].values()}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}  # both endings were exercised


def test_a_decode_is_scheduled_while_its_previous_step_is_in_flight():
    s = make_scheduler(True)
    r = make_request("a", [5, 6, 7], max_tokens=3)
    s.add_request(r)
    worker = FakeWorker()
    first = s.schedule()
    second = s.schedule()  # the prefill's token is not known here yet
    assert first.num_scheduled_tokens == {"a": 3} and second.num_scheduled_tokens == {"a": 1}
    assert r.num_pending_tokens == 2 and r.num_in_flight == 2
    out1, out2 = worker.run(first), worker.run(second)
    s.update(first, out1)
    assert r.num_pending_tokens == 1 and len(r.output_token_ids) == 1
    third = s.schedule()
    # max_tokens = 3: the two pending tokens and this one; nothing after it
    assert third.num_scheduled_tokens == {"a": 1}
    assert s.schedule().num_scheduled_tokens == {}
    s.update(second, out2)
    s.update(third, worker.run(third))
    assert r.finish_reason == FinishReason.LENGTH and worker.steps_run == 3


def test_length_limit_wastes_no_step():
    s = make_scheduler(True)
    reqs = [
        make_request(f"r{i}", [9, 8, 7, i + 3], max_tokens=5, ignore_eos=True) for i in range(3)
    ]
    for r in reqs:
        s.add_request(r)
    worker = FakeWorker()
    run(s, worker, depth=2)
    assert all(len(r.output_token_ids) == 5 for r in reqs)
    assert worker.steps_run == 5  # one prefill step and four decode steps, none wasted


def test_eos_drops_the_step_behind_it_and_frees_the_blocks():
    s = make_scheduler(True)
    r = make_request("a", [4, 4], max_tokens=10)
    s.add_request(r)
    worker = FakeWorker()
    first, second = s.schedule(), s.schedule()
    out1 = worker.run(first)
    out1.sampled[0] = [EOS]  # the prefill's token is EOS: the decode behind it is wasted
    (done,) = s.update(first, out1)
    assert done.finish_reason == FinishReason.STOP and s.kv.usage == 0.0
    assert s.update(second, worker.run(second)) == []  # its output is dropped
    s.add_request(make_request("b", [1, 2, 3], max_tokens=1))
    nxt = s.schedule()
    assert nxt.finished_req_ids == ["a"]  # the worker drops it with the next step
    s.kv.check_integrity()


def test_when_every_candidate_is_in_flight_the_request_waits_instead_of_preempting():
    # null + 4 usable blocks of 4 tokens: two requests of 8 tokens fill them (admitted
    # together only without headroom)
    s = make_scheduler(True, num_blocks=5, horizon=0)
    a = make_request("a", [3] * 8, max_tokens=4, ignore_eos=True)
    b = make_request("b", [4] * 8, max_tokens=4, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    worker = FakeWorker()
    first = s.schedule()
    # both decodes need a third block; both are in flight: nothing can be preempted
    second = s.schedule()
    assert second.num_scheduled_tokens == {} and second.preempted_req_ids == []
    s.update(first, worker.run(first))
    third = s.schedule()  # nothing in flight now: the latest arrival gives way
    assert third.preempted_req_ids == ["b"] and third.num_scheduled_tokens == {"a": 1}
    s.update(third, worker.run(third))
    results = run(s, worker, depth=2)
    assert set(results) == {"a", "b"}
    assert a.output_token_ids and len(b.output_token_ids) == 4


# ---- a real engine: the mp executor overlaps steps --------------------------------------


def engine_tokens(path: str, monkeypatch, stop: list[int] | None, **engine_args: Any):
    """Greedy tokens and finish reasons of 6 prompts, and the most steps in flight."""
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")  # the core here, workers apart
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 200) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, stop_token_ids=stop, ignore_eos=True)
        for i in range(6)
    ]
    # one that samples with its outputs so far: a worker that overlaps steps must wait
    # for the previous step's token on the host; one with logprobs
    params[4] = SamplingParams(
        temperature=0.0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True
    )
    params[5] = SamplingParams(temperature=0.0, max_tokens=9, logprobs=2, ignore_eos=True)
    most = 0
    with LLM(path, max_model_len=128, skip_tokenizer_init=True, **engine_args) as llm:
        core: Any = llm.engine.core  # type: ignore[union-attr]
        collect = core.executor.collect

        def counting_collect():
            nonlocal most
            most = max(most, len(core.in_flight))
            return collect()

        core.executor.collect = counting_collect
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert not core.in_flight and core.kv.usage == 0.0
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, _logprobs(o)) for o in outs], most


def _logprobs(output: Any) -> list | None:
    lps = output.outputs[0].logprobs
    if lps is None:
        return None
    return [{tok: round(lp.logprob, 4) for tok, lp in step.items()} for step in lps]


@pytest.mark.slow
def test_mp_engine_with_async_scheduling_equals_sync(tmp_path, monkeypatch):
    path = str(make_tiny_model(tmp_path, "llama"))
    sync, most_sync = engine_tokens(path, monkeypatch, None, disable_async_output_proc=True)
    assert most_sync == 0  # each step executed and awaited alone
    # a token that the model samples in the middle of some outputs stops those early,
    # so that the step behind a stop is wasted and dropped
    stop = [sync[0][0][3]]
    want, _ = engine_tokens(path, monkeypatch, stop, distributed_executor_backend="uni")
    got, most = engine_tokens(path, monkeypatch, stop)
    assert most == 2  # the default with mp: two steps in flight
    assert got == want
    assert {reason for _, reason, _ in got} == {"stop", "length"}
    # the worker launches step N+1 before it answers step N, as on CUDA
    overlapped, most = engine_tokens(
        path, monkeypatch, stop, worker_cls="tests.helpers.worker_classes.OverlappingWorker"
    )
    assert most == 2
    assert overlapped == want


@pytest.mark.slow
def test_the_worker_answers_a_step_between_the_next_ones_forward_and_sampling(
    tmp_path, monkeypatch
):
    # executor/worker_proc.py: once step N+1's forward is queued, step N is finished and
    # answered, and only then is N+1's sampling queued
    path = str(make_tiny_model(tmp_path, "llama"))
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    worker_cls = "tests.helpers.worker_classes.StepOrderWorker"
    with LLM(path, max_model_len=128, skip_tokenizer_init=True, worker_cls=worker_cls) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        outs = llm.generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], params, use_tqdm=False)
        events = [tuple(e) for e in llm.collective_rpc("step_events")[0]]
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    answered_between = 0
    for i, (kind, step_id) in enumerate(events):
        if kind != "between":
            continue
        before = events[i - 1]
        assert before == ("launch", step_id)  # the forward ran, the sampling did not yet
        after = events[i + 1]
        if after[0] == "finish":  # the step launched before this one
            launches = [e[1] for e in events[:i] if e[0] == "launch"]
            assert after[1] == launches[-2]
            assert events[i + 2] == ("launched", step_id)
            answered_between += 1
    assert answered_between > 0
