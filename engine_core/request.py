"""A request's state inside the engine core: its tokens, progress and status."""

from __future__ import annotations

import enum

from engine_core.messages import EngineCoreRequest, FinishReason
from executor.messages import SamplingOptions


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


class Request:
    """Mutable per-request state; owned by the scheduler."""

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "all_token_ids",
        "sampling",
        "max_tokens",
        "eos_token_ids",
        "ignore_eos",
        "arrival_time",
        "priority",
        "cache_salt",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "finish_reason",
        "stop_reason",
        "num_preemptions",
        "num_in_flight",
        "num_pending_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        max_tokens: int,
        eos_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        arrival_time: float = 0.0,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids or []
        self.ignore_eos = ignore_eos
        self.arrival_time = arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first scheduling; -1 = not yet
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # steps scheduled with this request whose outputs are not back yet, and the
        # tokens those steps sample (unknown here until they come back)
        self.num_in_flight = 0
        self.num_pending_tokens = 0

    @classmethod
    def from_message(cls, msg: EngineCoreRequest) -> Request:
        return cls(
            msg.request_id,
            msg.prompt_token_ids,
            msg.sampling,
            msg.max_tokens,
            msg.eos_token_ids,
            msg.ignore_eos,
            msg.arrival_time,
            msg.priority,
            msg.cache_salt,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def skip_prefix_cache(self) -> bool:
        # Prompt logprobs need logits for every prompt token, so nothing may be skipped.
        return self.sampling.prompt_logprobs is not None

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_output(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def sort_key(self) -> tuple[int, float]:
        # priority policy: lower value first, ties by arrival
        return (self.priority, self.arrival_time)
