"""Client <-> engine core wire messages (msgpack via msgspec; never pickle).

The client (offline `LLM` or the API server's async client) tokenizes and sends
`EngineCoreRequest`; the core answers with `EngineCoreOutputs` batches. Stop strings
and detokenization stay on the client side: the core only sees token ids.
"""

from __future__ import annotations

import enum

import msgspec

from executor.messages import Logprobs, SamplingOptions


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    pass


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, stop token id or stop string
    LENGTH = 1  # max_tokens or max_model_len
    ABORT = 2  # client abort
    ERROR = 3  # rejected or failed inside the engine

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreRequest(_Msg, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    max_tokens: int
    eos_token_ids: list[int] = []
    ignore_eos: bool = False
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None  # salts the prefix-cache hashes (tenant isolation)


class AbortRequests(_Msg, tag=True):
    request_ids: list[str]


class UtilityCall(_Msg, tag=True):
    """A call of a named method of the engine core (reset_prefix_cache, collective_rpc...)."""

    call_id: int
    method: str
    args: list = []


UTILITY_METHODS = frozenset(
    {
        "reset_prefix_cache",
        "collective_rpc",
        "get_stats",
        "profile_start",
        "profile_stop",
        "sleep",
        "wake_up",
        "add_lora",
        "remove_lora",
        "check_health",
    }
)

ClientMessage = EngineCoreRequest | AbortRequests | UtilityCall


class EngineCoreOutput(_Msg):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(_Msg):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preempted: int = 0
    step_tokens: int = 0


class EngineCoreOutputs(_Msg, tag=True):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


class UtilityResult(_Msg, tag=True):
    call_id: int
    result: object = None
    error: str | None = None


class EngineDead(_Msg, tag=True):
    reason: str


CoreMessage = EngineCoreOutputs | UtilityResult | EngineDead
