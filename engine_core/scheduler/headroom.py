"""Admission headroom: KV blocks kept free for the running requests' next tokens.

Admitting prompts for as long as blocks are free (vLLM's rule) fills the cache with
prompts, and then the running requests preempt each other as soon as they grow: W1
(1000 prompts of 1024 tokens, 128 outputs each, up to 1024 sequences) recomputed
70,560 tokens, 6% of the run, and took 35.8 s against 34.1 s with 256 sequences and
no preemption (bench/stalls.py, call 29, H100). Here a prompt is admitted only while
the blocks free after it still cover each running request's next `horizon` tokens
(fewer where its max_tokens or the model length ends it sooner), so preemption is
left to requests that outgrow that lookahead and to priority arrivals. The horizon is
SchedulerConfig.admission_horizon: 256 tokens, or TESSERA_ADMISSION_HORIZON (0 admits
while any block is free, as vLLM does).
"""

from __future__ import annotations

from engine_core.kv_cache.manager import KVCacheManager
from engine_core.request import Request


class Headroom:
    """Blocks the running requests will take within the horizon, for one schedule()."""

    def __init__(
        self, kv: KVCacheManager, horizon: int, max_model_len: int, max_partial: int = 1
    ) -> None:
        self.kv = kv
        self.horizon = horizon
        self.max_model_len = max_model_len
        # what one request can reserve at most, unless its prompt is still partly
        # uncomputed (at most `max_partial` such requests, each short of a whole context)
        self._most_each = kv.num_blocks_needed(horizon) + 1
        self._most_partial = max_partial * kv.num_blocks_needed(max_model_len)
        self._reserved: int | None = None  # summed on first need, then kept up to date

    def allows(self, running: list[Request], req: Request, tokens: int, new_blocks: int) -> bool:
        """Whether `req`, taking `new_blocks` to hold its first `tokens` tokens, leaves
        free what the running requests and its own growth need."""
        if self.horizon <= 0 or not running:
            return True
        spare = self.kv.num_free_blocks - new_blocks
        own = max(0, self.kv.num_blocks_needed(self._end(req)) - self.kv.num_blocks_needed(tokens))
        if self._reserved is None:
            if spare >= own + len(running) * self._most_each + self._most_partial:
                return True  # room for any reserve: the sum (O(running)) is not needed
            self._reserved = self._sum_ahead(running)
        return spare >= self._reserved + own

    def _sum_ahead(self, running: list[Request]) -> int:
        """Σ blocks_ahead over `running`, with `_end` inlined: it runs once a step over
        up to max_num_seqs requests whenever blocks are short, and the call per request
        made it 1.5x slower (644 -> 976 us at 1000 requests, 2-core machine)."""
        size, horizon, cap = self.kv.block_size, self.horizon, self.max_model_len
        held = self.kv.num_held_blocks
        total = 0
        for r in running:
            known = len(r.all_token_ids) + r.num_pending_tokens
            end = min(len(r.prompt_token_ids) + r.max_tokens - 1, known + horizon, cap)
            total += max(0, -(-end // size) - held(r.request_id))
        return total

    def admitted(self, req: Request) -> None:
        if self._reserved is not None:
            self._reserved += self.blocks_ahead(req)

    def blocks_ahead(self, req: Request) -> int:
        """Blocks `req` still lacks for its tokens up to the horizon: the rest of its
        prompt, then up to `horizon` more, within max_tokens and the model length."""
        return self._sum_ahead([req])

    def _end(self, req: Request) -> int:
        """The request's token count at the horizon (the last sampled token is never
        computed, so it takes no slot)."""
        known = req.num_tokens + req.num_pending_tokens
        last = req.num_prompt_tokens + req.max_tokens - 1
        return min(last, known + self.horizon, self.max_model_len)
