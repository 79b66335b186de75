"""KVCacheManager: exact block ids, prefix-cache hits, eviction order, and a stateful
hypothesis test that checks the bookkeeping and the cached contents after every step."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine_core.kv_cache.manager import KVCacheManager

BLOCK_SIZE = 4


@dataclass
class FakeRequest:
    """The fields of the KVRequest protocol, nothing else."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    skip_prefix_cache: bool = False
    cache_salt: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def make_request(request_id: str, token_ids, skip_prefix_cache: bool = False) -> FakeRequest:
    return FakeRequest(request_id, list(token_ids), skip_prefix_cache=skip_prefix_cache)


def make_manager(
    num_blocks: int = 10,
    enable_prefix_caching: bool = True,
    hash_algo: str = "builtin",
    block_size: int = BLOCK_SIZE,
) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, enable_prefix_caching, hash_algo, 64)


def admit(manager: KVCacheManager, request: FakeRequest) -> tuple[list[int], int, list[int]]:
    """Schedule a whole waiting request as the scheduler does; returns (hits, n, new ids)."""
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    new = manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hits, num_hit_tokens)
    assert new is not None
    request.num_computed_tokens = num_hit_tokens
    manager.check_integrity()
    return hits, num_hit_tokens, new


def finish_step(request: FakeRequest, sampled: int | None = None) -> None:
    """The step ran: every scheduled token is computed; maybe a token was sampled."""
    request.num_computed_tokens = request.num_tokens
    if sampled is not None:
        request.all_token_ids.append(sampled)


# ---- allocation ------------------------------------------------------------------------
def test_allocation_ids_in_order_and_growth() -> None:
    manager = make_manager()
    request = make_request("a", range(10))
    assert manager.get_computed_blocks(request) == ([], 0)
    assert manager.allocate_slots(request, 10) == [1, 2, 3]
    manager.check_integrity()
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.num_free_blocks == 6
    assert manager.usage == pytest.approx(3 / 9)
    new_ids = []
    for token in (10, 11, 12):  # three decode steps: tokens 10, 11, 12 get computed
        finish_step(request, sampled=token)
        new_ids.append(manager.allocate_slots(request, 1))
        manager.check_integrity()
    assert new_ids == [[], [], [4]]
    assert manager.get_block_ids("a") == [1, 2, 3, 4]
    assert manager.get_block_ids("unknown") == []


def test_full_blocks_are_registered_once_their_tokens_are_scheduled() -> None:
    manager = make_manager()
    request = make_request("a", range(10))
    manager.allocate_slots(request, 10)
    h0 = manager.cache.hash_block(None, [0, 1, 2, 3])
    h1 = manager.cache.hash_block(h0, [4, 5, 6, 7])
    assert [manager.cache.hash_of(b) for b in (1, 2, 3)] == [h0, h1, None]
    finish_step(request, sampled=10)
    manager.allocate_slots(request, 1)  # token 10 of 11: block 3 holds 8..10, not full
    assert manager.cache.hash_of(3) is None
    finish_step(request, sampled=11)
    manager.allocate_slots(request, 1)  # token 11: block 3 is full
    assert manager.cache.hash_of(3) == manager.cache.hash_block(h1, [8, 9, 10, 11])
    manager.check_integrity()


def test_only_known_tokens_are_hashed() -> None:
    # Scheduling 12 slots for a request of 10 tokens (a lookahead) must not hash
    # block 2, whose last two tokens do not exist yet.
    manager = make_manager()
    request = make_request("a", range(10))
    assert manager.allocate_slots(request, 12) == [1, 2, 3]
    assert manager.cache.hash_of(3) is None
    assert len(manager.cache) == 2


def test_out_of_blocks_returns_none_and_changes_nothing() -> None:
    manager = make_manager(num_blocks=4)  # blocks 1, 2, 3
    first = make_request("a", range(8))
    assert manager.allocate_slots(first, 8) == [1, 2]
    second = make_request("b", range(100, 109))
    assert manager.allocate_slots(second, 9) is None
    assert manager.get_block_ids("b") == []
    assert manager.num_free_blocks == 1
    finish_step(first, sampled=8)
    assert manager.allocate_slots(first, 1) == [3]
    finish_step(first, sampled=9)
    for _ in range(3):
        finish_step(first, sampled=first.num_tokens)
    assert manager.allocate_slots(first, 1) is None  # token 12 needs a fourth block
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.num_free_blocks == 0
    manager.check_integrity()


def test_hit_blocks_in_the_free_list_count_against_free_blocks() -> None:
    manager = make_manager(num_blocks=5)  # blocks 1..4
    prefix = list(range(8))
    first = make_request("a", [*prefix, 50])
    admit(manager, first)
    finish_step(first)
    manager.free(first)
    assert manager.cache.block_of(manager.cache.hash_block(None, prefix[:4])) == 1
    # 17 tokens: 2 hit blocks (free) + 3 new blocks > 4 free
    too_long = make_request("b", [*prefix, *range(200, 209)])
    hits, num_hit_tokens = manager.get_computed_blocks(too_long)
    assert (hits, num_hit_tokens) == ([1, 2], 8)
    assert manager.allocate_slots(too_long, 9, hits, num_hit_tokens) is None
    assert manager.num_free_blocks == 4
    manager.check_integrity()
    # 16 tokens: 2 hit blocks + 2 new blocks fits exactly
    fits = make_request("c", [*prefix, *range(200, 208)])
    hits, num_hit_tokens, new = admit(manager, fits)
    assert (hits, num_hit_tokens, new) == ([1, 2], 8, [4, 3])
    assert manager.get_block_ids("c") == [1, 2, 4, 3]
    assert manager.num_free_blocks == 0


def test_invalid_arguments_raise() -> None:
    manager = make_manager()
    request = make_request("a", range(8))
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        manager.allocate_slots(request, -1)
    with pytest.raises(ValueError, match="4 cached tokens do not fill 2 blocks of 4"):
        manager.allocate_slots(request, 4, [1, 2], 4)
    with pytest.raises(ValueError, match="65 tokens exceed max_model_len 64"):
        manager.allocate_slots(request, 65)
    manager.check_integrity()


# ---- freeing and eviction ------------------------------------------------------------
def test_free_order_and_lru_eviction() -> None:
    manager = make_manager(num_blocks=7)  # blocks 1..6
    prompt_a = list(range(100, 112))
    first = make_request("a", prompt_a)
    assert admit(manager, first) == ([], 0, [1, 2, 3])
    finish_step(first)
    h0 = manager.cache.hash_block(None, prompt_a[0:4])
    h1 = manager.cache.hash_block(h0, prompt_a[4:8])
    h2 = manager.cache.hash_block(h1, prompt_a[8:12])
    assert [manager.cache.hash_of(b) for b in (1, 2, 3)] == [h0, h1, h2]
    manager.free(first)
    # Tail first: block 3 (the end of a's prompt) will be evicted before 2 and 1.
    assert manager.pool.free_block_ids() == [4, 5, 6, 3, 2, 1]
    assert manager.num_free_blocks == 6
    assert manager.usage == 0.0
    assert len(manager.cache) == 3  # freed blocks stay cached
    manager.check_integrity()

    other = make_request("b", range(200, 208))
    assert admit(manager, other)[2] == [4, 5]
    third = make_request("c", range(300, 308))
    assert admit(manager, third)[2] == [6, 3]  # block 3 is taken: its hash goes
    assert manager.cache.block_of(h2) is None
    assert [manager.cache.block_of(h0), manager.cache.block_of(h1)] == [1, 2]

    again = make_request("d", prompt_a)
    assert manager.get_computed_blocks(again) == ([1, 2], 8)
    manager.check_integrity()


def test_free_unknown_request_is_a_no_op() -> None:
    manager = make_manager()
    manager.free(make_request("nobody", range(4)))
    assert manager.num_free_blocks == 9
    manager.check_integrity()


def test_free_forgets_blocks_whose_tokens_were_never_computed() -> None:
    # Scheduled, registered, then aborted before the step ran: the blocks hold no KV.
    manager = make_manager()
    prompt = list(range(9))
    aborted = make_request("a", prompt)
    admit(manager, aborted)
    assert len(manager.cache) == 2
    manager.free(aborted)  # num_computed_tokens is still 0
    assert len(manager.cache) == 0
    later = make_request("b", prompt)
    assert manager.get_computed_blocks(later) == ([], 0)
    # The same after the step ran keeps the blocks cached.
    admit(manager, later)
    finish_step(later)
    manager.free(later)
    assert len(manager.cache) == 2
    manager.check_integrity()


# ---- prefix-cache hits -------------------------------------------------------------
@pytest.mark.parametrize("hash_algo", ["builtin", "sha256"])
def test_same_prompt_shares_blocks_in_the_same_step(hash_algo: str) -> None:
    manager = make_manager(hash_algo=hash_algo)
    prompt = list(range(13))  # 3 full blocks + 1 token
    first = make_request("a", prompt)
    assert admit(manager, first) == ([], 0, [1, 2, 3, 4])
    # a's step has not run yet: b hits the blocks a is about to write
    second = make_request("b", prompt)
    assert admit(manager, second) == ([1, 2, 3], 12, [5])
    assert manager.get_block_ids("b") == [1, 2, 3, 5]
    assert [manager.pool.ref_count(b) for b in range(1, 6)] == [2, 2, 2, 1, 1]
    assert manager.prefix_cache_stats() == (26, 12)
    assert manager.prefix_cache_stats() == (0, 0)
    assert manager.usage == pytest.approx(5 / 9)
    manager.free(first)
    assert [manager.pool.ref_count(b) for b in range(1, 6)] == [1, 1, 1, 0, 1]
    assert manager.pool.free_block_ids() == [6, 7, 8, 9, 4]
    manager.check_integrity()


@pytest.mark.parametrize("hash_algo", ["builtin", "sha256"])
def test_full_hit_keeps_the_last_token_uncomputed(hash_algo: str) -> None:
    manager = make_manager(hash_algo=hash_algo)
    prompt = list(range(12))  # exactly 3 full blocks
    first = make_request("a", prompt)
    admit(manager, first)
    finish_step(first)
    second = make_request("b", prompt)
    hits, num_hit_tokens, new = admit(manager, second)
    assert (hits, num_hit_tokens, new) == ([1, 2], 8, [4])
    # Block 4 holds the same tokens as block 3, which keeps the hash.
    h2 = manager.cache.hash_of(3)
    assert h2 is not None
    assert manager.cache.hash_of(4) is None
    assert manager.cache.block_of(h2) == 3
    manager.check_integrity()
    one_token = make_request("c", [0])
    assert manager.get_computed_blocks(one_token) == ([], 0)


@pytest.mark.parametrize("hash_algo", ["builtin", "sha256"])
def test_a_cache_salt_shares_blocks_only_with_its_own(hash_algo: str) -> None:
    manager = make_manager(num_blocks=16, hash_algo=hash_algo)
    prompt = list(range(9))  # 2 full blocks + 1 token
    for rid, salt in [("plain", None), ("a1", "tenant-a"), ("b1", "tenant-b")]:
        request = make_request(rid, prompt)
        request.cache_salt = salt
        assert admit(manager, request)[:2] == ([], 0)  # nobody else's blocks
        finish_step(request)
    again = make_request("a2", prompt)
    again.cache_salt = "tenant-a"
    hits, num_hit_tokens, _ = admit(manager, again)
    assert num_hit_tokens == 8 and hits == manager.get_block_ids("a1")[:2]
    assert admit(manager, make_request("plain2", prompt))[0] == manager.get_block_ids("plain")[:2]
    manager.check_integrity()  # recomputes every table's salted hashes


def hit_pattern(hash_algo: str) -> list[tuple[list[int], int, list[int]]]:
    """Admit a series of overlapping prompts; record what each one hit and got."""
    manager = make_manager(num_blocks=12, hash_algo=hash_algo)
    prompts = [
        [1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, 0, 0],
        [1, 2, 3, 4, 9, 9, 9, 9, 9],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [2, 2, 3, 4, 5, 6, 7, 8, 9],
    ]
    pattern = []
    for index, prompt in enumerate(prompts):
        request = make_request(str(index), prompt)
        pattern.append(admit(manager, request))
        finish_step(request)
        if index % 2:
            manager.free(request)
    return pattern


def test_sha256_and_builtin_give_the_same_hit_pattern() -> None:
    expected = [
        ([], 0, [1, 2, 3]),
        ([1, 2], 8, [4]),
        ([1], 4, [5, 6]),
        ([1], 4, [7]),  # a full hit on 2 blocks gives up the last
        ([], 0, [8, 9, 10]),  # block 4 (freed with b) is not reused before 8..10
    ]
    assert hit_pattern("builtin") == expected
    assert hit_pattern("sha256") == expected


def test_skip_prefix_cache_gets_no_hits_and_counts_no_query() -> None:
    manager = make_manager()
    prompt = list(range(9))
    admit(manager, make_request("a", prompt))
    manager.prefix_cache_stats()
    logprobs = make_request("b", prompt, skip_prefix_cache=True)
    assert admit(manager, logprobs) == ([], 0, [4, 5, 6])
    assert manager.prefix_cache_stats() == (0, 0)
    assert [manager.cache.hash_of(b) for b in (4, 5, 6)] == [None, None, None]


def test_cache_off_gives_no_hits_and_registers_nothing() -> None:
    manager = make_manager(enable_prefix_caching=False)
    prompt = list(range(9))
    first = make_request("a", prompt)
    admit(manager, first)
    finish_step(first)
    assert admit(manager, make_request("b", prompt)) == ([], 0, [4, 5, 6])
    assert len(manager.cache) == 0
    assert manager.prefix_cache_stats() == (0, 0)
    manager.check_integrity()


def test_reset_prefix_cache_refused_while_blocks_in_use() -> None:
    manager = make_manager()
    prompt = list(range(9))
    request = make_request("a", prompt)
    admit(manager, request)
    finish_step(request)
    assert not manager.reset_prefix_cache()
    assert len(manager.cache) == 2
    manager.free(request)
    assert manager.reset_prefix_cache()
    assert len(manager.cache) == 0
    assert manager.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    manager.check_integrity()


def test_stale_hits_are_rejected() -> None:
    manager = make_manager(num_blocks=4)  # blocks 1..3
    prompt = list(range(9))
    first = make_request("a", prompt)
    admit(manager, first)
    finish_step(first)
    manager.free(first)
    late = make_request("b", prompt)
    hits, num_hit_tokens = manager.get_computed_blocks(late)
    assert (hits, num_hit_tokens) == ([1, 2], 8)
    admit(manager, make_request("c", range(100, 112)))  # evicts blocks 3, 2, 1
    with pytest.raises(ValueError, match="block 1 no longer caches the request's prefix"):
        manager.allocate_slots(late, 1, hits, num_hit_tokens)
    manager.check_integrity()


# ---- the integrity check can fail --------------------------------------------------
def test_integrity_check_catches_a_stray_reference() -> None:
    manager = make_manager()
    manager.pool.touch([5])
    with pytest.raises(AssertionError, match="block 5 has 1 references but 0 tables hold it"):
        manager.check_integrity()


def test_integrity_check_catches_a_table_shorter_than_the_computed_tokens() -> None:
    manager = make_manager()
    request = make_request("a", range(9))
    manager.allocate_slots(request, 4)
    request.num_computed_tokens = 5
    with pytest.raises(AssertionError, match="1 blocks cannot hold 5 computed tokens"):
        manager.check_integrity()


# ---- stateful test ---------------------------------------------------------------
Slot = tuple[int, ...] | None


@dataclass
class _Model:
    """What the test remembers about written KV. The KV at position p depends on every
    token up to p, so each slot records that whole prefix (None: never written)."""

    block_size: int
    slots: dict[int, list[Slot]] = field(default_factory=dict)

    def wipe(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            self.slots[block_id] = [None] * self.block_size

    def write(self, table: list[int], request: FakeRequest, start: int, stop: int) -> None:
        for pos in range(start, stop):
            block_id = table[pos // self.block_size]
            self.slots[block_id][pos % self.block_size] = tuple(request.all_token_ids[: pos + 1])

    def contents(self, block_id: int) -> list[Slot]:
        return self.slots.get(block_id, [None] * self.block_size)

    def expected(self, request: FakeRequest, index: int) -> list[Slot]:
        """The slots of block `index` of the request, had the request written it."""
        start = index * self.block_size
        tokens = request.all_token_ids
        return [tuple(tokens[: pos + 1]) for pos in range(start, start + self.block_size)]


# False: the request is aborted after scheduling, before its step runs.
RUNS = st.sampled_from([True, True, True, False])


class KVCacheMachine(RuleBasedStateMachine):
    """Random requests over a tiny alphabet (so prefixes repeat), chunked prefill,
    decode growth, finishes, preemptions and aborts before a step runs."""

    BLOCK_SIZE = 2
    NUM_BLOCKS = 10
    MAX_MODEL_LEN = 12

    def __init__(self) -> None:
        super().__init__()
        self.manager: KVCacheManager | None = None
        self.model = _Model(self.BLOCK_SIZE)
        self.waiting: dict[str, FakeRequest] = {}
        self.running: dict[str, FakeRequest] = {}
        self.next_id = 0

    # Mostly caching on, few prompt-logprobs requests and few aborts: hits are the point.
    @initialize(
        hash_algo=st.sampled_from(["builtin", "sha256"]),
        caching=st.sampled_from([True, True, True, False]),
    )
    def build(self, hash_algo: str, caching: bool) -> None:
        self.manager = KVCacheManager(
            self.NUM_BLOCKS, self.BLOCK_SIZE, caching, hash_algo, self.MAX_MODEL_LEN
        )

    @property
    def kv(self) -> KVCacheManager:
        assert self.manager is not None
        return self.manager

    @rule(
        prompt=st.lists(st.integers(0, 1), min_size=1, max_size=8),
        skip_prefix_cache=st.sampled_from([False, False, False, True]),
    )
    def add_request(self, prompt: list[int], skip_prefix_cache: bool) -> None:
        self._add(prompt, skip_prefix_cache)

    @precondition(lambda self: self.waiting or self.running)
    @rule(
        data=st.data(),
        start=st.integers(0, 3),
        length=st.integers(1, 8),
        tail=st.lists(st.integers(0, 1), max_size=3),
    )
    def add_copy(self, data: st.DataObject, start: int, length: int, tail: list[int]) -> None:
        """A request that repeats part of another's tokens, from its start (a true shared
        prefix) or shifted (the same blocks under another prefix: must not hit)."""
        live = {**self.waiting, **self.running}
        source = live[data.draw(st.sampled_from(sorted(live)))].all_token_ids
        prompt = (source[start : start + length] + tail)[: self.MAX_MODEL_LEN - 1]
        if prompt:
            self._add(prompt, False)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), chunk=st.integers(1, 8), runs=RUNS)
    def admit_waiting(self, data: st.DataObject, chunk: int, runs: bool) -> None:
        request = self.waiting[data.draw(st.sampled_from(sorted(self.waiting)))]
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        self._check_hits(request, hits, num_hit_tokens)
        num_new = min(chunk, request.num_tokens - num_hit_tokens)
        free_before = self.kv.num_free_blocks
        new = self.kv.allocate_slots(request, num_new, hits, num_hit_tokens)
        if new is None:
            assert self.kv.num_free_blocks == free_before
            assert self.kv.get_block_ids(request.request_id) == []
            return
        expected_new = self.kv.num_blocks_needed(num_hit_tokens + num_new) - len(hits)
        assert len(new) == expected_new
        self.model.wipe(new)
        request.num_computed_tokens = num_hit_tokens
        del self.waiting[request.request_id]
        self._run_or_abort(request, num_new, runs, data)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), chunk=st.integers(1, 8), runs=RUNS)
    def step_running(self, data: st.DataObject, chunk: int, runs: bool) -> None:
        request = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        table_before = self.kv.get_block_ids(request.request_id)
        new = self.kv.allocate_slots(request, num_new)
        if new is None:
            assert self.kv.get_block_ids(request.request_id) == table_before
            self._preempt(request)
            return
        assert self.kv.get_block_ids(request.request_id) == table_before + new
        self.model.wipe(new)
        self._run_or_abort(request, num_new, runs, data)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        request = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        self.kv.free(request)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt(self.running.pop(data.draw(st.sampled_from(sorted(self.running)))))

    @rule()
    def reset_prefix_cache(self) -> None:
        idle = self.kv.num_free_blocks == self.NUM_BLOCKS - 1
        assert self.kv.reset_prefix_cache() == idle
        if idle:
            assert len(self.kv.cache) == 0

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        if self.manager is not None:
            self.manager.check_integrity()
            assert set(self.manager._tables) <= set(self.running)

    @invariant()
    def cached_blocks_hold_fully_written_kv(self) -> None:
        if self.manager is None:
            return
        for block_id in range(1, self.NUM_BLOCKS):
            if self.manager.cache.hash_of(block_id) is not None:
                assert None not in self.model.contents(block_id), f"block {block_id}"

    # ---- helpers -------------------------------------------------------------------
    def _add(self, prompt: list[int], skip_prefix_cache: bool) -> None:
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.waiting[request_id] = make_request(request_id, prompt, skip_prefix_cache)

    def _check_hits(self, request: FakeRequest, hits: list[int], num_hit_tokens: int) -> None:
        assert num_hit_tokens == len(hits) * self.BLOCK_SIZE
        assert num_hit_tokens <= request.num_tokens - 1
        if request.skip_prefix_cache or not self.kv.enable_prefix_caching:
            assert hits == []
        for index, block_id in enumerate(hits):
            expected = self.model.expected(request, index)
            assert self.model.contents(block_id) == expected, (
                f"hit block {block_id} holds {self.model.contents(block_id)}, wanted {expected}"
            )

    def _run_or_abort(
        self, request: FakeRequest, num_new: int, runs: bool, data: st.DataObject
    ) -> None:
        """Either the step runs (KV written, maybe a token sampled) or the request is
        aborted before it runs."""
        if not runs:
            self.kv.free(request)
            return
        table = self.kv.get_block_ids(request.request_id)
        start = request.num_computed_tokens
        self.model.write(table, request, start, start + num_new)
        request.num_computed_tokens = start + num_new
        if request.num_computed_tokens < request.num_tokens:
            self.running[request.request_id] = request  # a chunked prefill goes on
        elif request.num_tokens < self.MAX_MODEL_LEN:
            request.all_token_ids.append(data.draw(st.integers(0, 1)))
            self.running[request.request_id] = request
        else:
            self.kv.free(request)

    def _preempt(self, request: FakeRequest) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        self.waiting[request.request_id] = request


KVCacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVCacheMachine = KVCacheMachine.TestCase
