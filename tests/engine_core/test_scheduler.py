"""Scheduler decisions with exact token counts and block ids (no model: outputs are made up)."""

from __future__ import annotations

import itertools

from engine_core.kv_cache.manager import KVCacheManager
from engine_core.messages import FinishReason
from engine_core.request import Request
from engine_core.scheduler.headroom import Headroom
from engine_core.scheduler.scheduler import Scheduler
from executor.config import SchedulerConfig
from executor.messages import SamplingOptions, StepInput, StepOutput

BLOCK = 4
_ids = itertools.count()


def make_scheduler(num_blocks=64, budget=16, max_seqs=8, prefix=False, pp=1, **kw) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64, **kw
    )
    kv = KVCacheManager(num_blocks, BLOCK, prefix, "builtin", 64)
    return Scheduler(cfg, kv, pp)


def make_request(n_prompt=5, max_tokens=4, priority=0, arrival=0.0, **sampling) -> Request:
    prompt = [100 + next(_ids) % 50 for _ in range(n_prompt)]
    return Request(
        f"r{next(_ids)}",
        prompt,
        SamplingOptions(temperature=0.0, **sampling),
        max_tokens,
        eos_token_ids=[2],
        arrival_time=arrival,
        priority=priority,
    )


def fake_output(s: Scheduler, step: StepInput, token: int = 7) -> StepOutput:
    """Sample `token` for every request whose known tokens are all computed."""
    ids, sampled = [], []
    for rid in step.num_scheduled_tokens:
        req = s.requests[rid]
        ids.append(rid)
        sampled.append([token] if req.num_computed_tokens == req.num_tokens else [])
    return StepOutput(step.step_id, ids, sampled)


def step(s: Scheduler, token: int = 7):
    inp = s.schedule()
    outs = s.update(inp, fake_output(s, inp, token))
    s.kv.check_integrity()
    return inp, outs


def test_long_prompt_is_chunked_by_the_budget():
    s = make_scheduler(budget=8)
    r = make_request(n_prompt=20)
    s.add_request(r)
    counts = [step(s)[0].num_scheduled_tokens[r.request_id] for _ in range(4)]
    assert counts == [8, 8, 4, 1]  # three prefill chunks, then a decode
    assert r.output_token_ids == [7, 7]


def test_decodes_are_not_starved_by_a_new_prompt():
    s = make_scheduler(budget=8)
    a = make_request(n_prompt=3, max_tokens=10)
    s.add_request(a)
    step(s)
    b = make_request(n_prompt=30)
    s.add_request(b)
    inp, _ = step(s)
    assert inp.num_scheduled_tokens == {a.request_id: 1, b.request_id: 7}


def test_max_num_seqs_caps_the_batch():
    s = make_scheduler(max_seqs=2)
    reqs = [make_request(n_prompt=2) for _ in range(3)]
    for r in reqs:
        s.add_request(r)
    inp, _ = step(s)
    assert list(inp.num_scheduled_tokens) == [reqs[0].request_id, reqs[1].request_id]


def test_step_carries_only_what_changed():
    s = make_scheduler()
    r = make_request(n_prompt=5, max_tokens=8)
    s.add_request(r)
    first, _ = step(s)
    assert [n.req_id for n in first.new_requests] == [r.request_id]
    assert first.new_requests[0].block_ids == [1, 2]  # block 0 is the null block
    second, _ = step(s)  # 6 tokens: fits in the 2 blocks
    assert second.new_requests == [] and second.running[0].new_block_ids == []
    assert second.running[0].num_computed_tokens == 5
    step(s)
    step(s)
    third, _ = step(s)  # position 8 (the 9th token) needs a third block
    assert third.running[0].new_block_ids == [3]


def test_stop_conditions():
    s = make_scheduler(budget=32)
    eos = make_request(max_tokens=5)
    stop_id = make_request(max_tokens=5, stop_token_ids=[7])
    stop_id.ignore_eos = True
    length = make_request(max_tokens=1)
    length.ignore_eos = True
    min_tok = make_request(max_tokens=5, min_tokens=2)
    for r in (eos, stop_id, length, min_tok):
        s.add_request(r)
    inp = s.schedule()
    outs = s.update(inp, fake_output(s, inp, token=2))
    by_id = {o.request_id: o for o in outs}
    assert by_id[eos.request_id].finish_reason == FinishReason.STOP
    assert by_id[stop_id.request_id].finish_reason is None  # ignores EOS; 2 is no stop id
    assert by_id[length.request_id].finish_reason == FinishReason.LENGTH
    assert by_id[min_tok.request_id].finish_reason is None  # EOS before min_tokens
    inp = s.schedule()
    outs = s.update(inp, fake_output(s, inp, token=7))
    by_id = {o.request_id: o for o in outs}
    assert by_id[stop_id.request_id].finish_reason == FinishReason.STOP
    assert by_id[stop_id.request_id].stop_reason == 7
    assert inp.finished_req_ids == sorted(inp.finished_req_ids)  # eos + length told to workers
    assert set(inp.finished_req_ids) == {eos.request_id, length.request_id}


def test_preemption_recomputes_the_latest_arrival():
    # 5 blocks = null + 4 usable: two requests of 8 tokens fill them (admitted together
    # only without headroom)
    s = make_scheduler(num_blocks=5, admission_horizon=0)
    a = make_request(n_prompt=8, max_tokens=6)
    b = make_request(n_prompt=8, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.kv.num_free_blocks == 0
    inp, _ = step(s)  # a needs a third block: b is preempted
    assert inp.preempted_req_ids == [b.request_id]
    assert inp.num_scheduled_tokens == {a.request_id: 1}
    assert b.num_computed_tokens == 0 and b.output_token_ids == [7]
    while a.request_id in s.requests:
        step(s)
    inp, _ = step(s)  # b comes back: all 9 known tokens recomputed, whole new table
    assert inp.num_scheduled_tokens == {b.request_id: 9}
    assert inp.running[0].resumed and len(inp.running[0].new_block_ids) == 3


def test_admission_leaves_the_running_requests_room_to_grow():
    # null + 8 usable blocks of 4 tokens; each request holds 8 prompt tokens in 2 blocks
    # and grows to 11 computed tokens (the 4th output is never computed): 3 blocks
    s = make_scheduler(num_blocks=9)
    reqs = [make_request(n_prompt=8, max_tokens=4) for _ in range(4)]
    for r in reqs:
        r.ignore_eos = True
        s.add_request(r)
    ids = [r.request_id for r in reqs]
    inp, _ = step(s)
    assert list(inp.num_scheduled_tokens) == ids[:2]  # the budget of 16 tokens
    inp, _ = step(s)  # 2 blocks free would hold c's prompt, but leave it none to grow in
    assert list(inp.num_scheduled_tokens) == ids[:2]
    admitted, preempted = [], []
    while s.requests:
        inp, _ = step(s)
        admitted += [n.req_id for n in inp.new_requests]
        preempted += inp.preempted_req_ids
    assert admitted == ids[2:] and preempted == []
    assert all(len(r.output_token_ids) == 4 for r in reqs)
    # without headroom the third request comes in at once and is preempted later
    s = make_scheduler(num_blocks=9, admission_horizon=0)
    for r in [make_request(n_prompt=8, max_tokens=4) for _ in range(4)]:
        r.ignore_eos = True
        s.add_request(r)
    preempted = []
    while s.requests:
        preempted += step(s)[0].preempted_req_ids
    assert preempted


def test_the_horizon_caps_what_a_long_request_reserves():
    s = make_scheduler(num_blocks=64, admission_horizon=8)
    r = make_request(n_prompt=6, max_tokens=40)
    s.add_request(r)
    step(s)  # 7 tokens in 2 blocks: 8 more end at 15, in 4 blocks
    headroom = Headroom(s.kv, 8, 64)
    assert headroom.blocks_ahead(r) == 2
    assert headroom._sum_ahead(s.running) == 2  # the sum that allows() takes
    assert Headroom(s.kv, 256, 64).blocks_ahead(r) == 10  # 45 computed tokens: 12 blocks
    assert Headroom(s.kv, 256, 20).blocks_ahead(r) == 3  # the model length: 20 tokens
    new = make_request(n_prompt=4, max_tokens=5)  # 1 block now, 8 tokens: 1 more ahead
    # 61 blocks free: after the new one takes its blocks, 2 + 1 must stay free
    assert headroom.allows(s.running, new, 4, 58) and not headroom.allows(s.running, new, 4, 59)
    assert Headroom(s.kv, 0, 64).allows(s.running, new, 4, 61)  # horizon 0: whatever fits


def test_a_prompt_is_admitted_when_nothing_runs_whatever_it_leaves():
    s = make_scheduler(num_blocks=5)
    r = make_request(n_prompt=16, max_tokens=8)  # all 4 usable blocks, none to grow in
    s.add_request(r)
    inp, _ = step(s)
    assert inp.num_scheduled_tokens == {r.request_id: 16}


def test_priority_arrival_preempts_a_running_request():
    s = make_scheduler(num_blocks=6, policy="priority")
    low = make_request(n_prompt=16, max_tokens=4, priority=5)
    s.add_request(low)
    step(s)
    high = make_request(n_prompt=8, max_tokens=2, priority=0, arrival=1.0)
    s.add_request(high)
    inp, _ = step(s)
    assert inp.preempted_req_ids == [low.request_id]
    assert list(inp.num_scheduled_tokens) == [high.request_id]


def test_one_partial_prefill_at_a_time():
    s = make_scheduler(budget=8, max_num_partial_prefills=1)
    a = make_request(n_prompt=12)
    b = make_request(n_prompt=12)
    s.add_request(a)
    s.add_request(b)
    inp, _ = step(s)
    # a takes the whole budget; b may not start a second partial prefill
    assert inp.num_scheduled_tokens == {a.request_id: 8}
    inp, _ = step(s)
    # a's prefill ends this step, so b may start the one partial prefill
    assert inp.num_scheduled_tokens == {a.request_id: 4, b.request_id: 4}


def test_long_prefill_threshold_caps_each_chunk():
    s = make_scheduler(
        budget=16,
        long_prefill_token_threshold=6,
        max_num_partial_prefills=2,
        max_long_partial_prefills=1,
    )
    long_a = make_request(n_prompt=20)
    long_b = make_request(n_prompt=20)
    short = make_request(n_prompt=3)
    for r in (long_a, long_b, short):
        s.add_request(r)
    inp, _ = step(s)
    # long_a gets a 6-token chunk; long_b may not be a second long partial prefill,
    # but the short prompt behind it jumps ahead
    assert inp.num_scheduled_tokens == {long_a.request_id: 6, short.request_id: 3}
    assert [r.request_id for r in s.waiting] == [long_b.request_id]


def test_abort_frees_blocks_and_tells_the_worker():
    s = make_scheduler()
    r = make_request(n_prompt=9, max_tokens=10)
    s.add_request(r)
    step(s)
    outs = s.abort_requests([r.request_id])
    assert outs[0].finish_reason == FinishReason.ABORT
    assert s.kv.usage == 0.0
    assert s.schedule().finished_req_ids == []  # an empty step is not sent: the id waits
    s.add_request(make_request())
    inp = s.schedule()
    assert inp.finished_req_ids == [r.request_id]


def test_prefix_hits_skip_computed_tokens():
    s = make_scheduler(prefix=True)
    a = make_request(n_prompt=9, max_tokens=1)
    s.add_request(a)
    step(s)
    b = Request("b", list(a.prompt_token_ids), SamplingOptions(temperature=0.0), 1)
    s.add_request(b)
    inp, outs = step(s)
    # two full blocks (8 tokens) cached; the 9th is computed again
    assert inp.num_scheduled_tokens == {"b": 1}
    assert outs[0].num_cached_tokens == 8


# --- pipeline parallelism: several steps in flight before their updates


def test_micro_batches_share_the_requests_and_never_overlap():
    s = make_scheduler(pp=2)
    reqs = [make_request(n_prompt=3, max_tokens=4) for _ in range(4)]
    ids = [r.request_id for r in reqs]
    for r in reqs:
        s.add_request(r)
    a, b = s.schedule(), s.schedule()
    assert list(a.num_scheduled_tokens) == ids[:2] and list(b.num_scheduled_tokens) == ids[2:]
    assert s.schedule().num_scheduled_tokens == {}  # everything is in flight
    s.update(a, fake_output(s, a, token=7))
    c = s.schedule()  # a's requests came back: their decodes, with the tokens sampled
    assert c.num_scheduled_tokens == {ids[0]: 1, ids[1]: 1}
    assert [u.new_token_ids for u in c.running] == [[7], [7]]
    s.update(b, fake_output(s, b, token=8))
    d = s.schedule()
    assert d.num_scheduled_tokens == {ids[2]: 1, ids[3]: 1}
    assert [u.new_token_ids for u in d.running] == [[8], [8]]
    s.kv.check_integrity()


def test_a_request_in_flight_is_never_preempted():
    # 5 blocks = null + 4 usable: two requests of 8 tokens fill them
    s = make_scheduler(num_blocks=5, pp=2, admission_horizon=0)
    a = make_request(n_prompt=8, max_tokens=3)
    b = make_request(n_prompt=8, max_tokens=3)
    s.add_request(a)
    s.add_request(b)
    first, second = s.schedule(), s.schedule()
    s.update(first, fake_output(s, first, token=7))
    # a needs a third block; b is in flight, so a gives way itself
    inp = s.schedule()
    assert inp.preempted_req_ids == [a.request_id] and inp.num_scheduled_tokens == {}
    s.update(second, fake_output(s, second, token=7))
    assert b.output_token_ids == [7]
    while b.request_id in s.requests:
        step(s)
    inp, _ = step(s)  # a comes back with the token the workers never kept
    assert inp.num_scheduled_tokens == {a.request_id: 9}
    assert inp.running[0].resumed and inp.running[0].new_token_ids == [7]
    s.kv.check_integrity()


def test_abort_while_in_flight():
    s = make_scheduler(pp=2)
    a = make_request(n_prompt=5, max_tokens=4)
    b = make_request(n_prompt=5, max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    first, second = s.schedule(), s.schedule()
    assert s.abort_requests([a.request_id])[0].finish_reason == FinishReason.ABORT
    # the id is reused before the aborted step comes back: the new request gets nothing
    again = Request(a.request_id, [5, 6], SamplingOptions(temperature=0.0), 4)
    s.add_request(again)
    assert s.update(first, StepOutput(first.step_id, [a.request_id], [[7]])) == []
    assert again.output_token_ids == [] and a.output_token_ids == []
    s.update(second, fake_output(s, second))
    inp, nxt = s.schedule(), s.schedule()  # one request each
    assert inp.finished_req_ids == [a.request_id]  # the workers drop the aborted one
    assert [n.req_id for n in nxt.new_requests] == [a.request_id]  # and take the new one
    s.kv.check_integrity()
