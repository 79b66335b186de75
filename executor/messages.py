"""Engine core <-> worker wire messages.

A step carries only what changed since the last one: workers keep each request's
tokens, block table and sampling state between steps.
"""

from __future__ import annotations

import msgspec


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    pass


class SamplingOptions(_Msg):
    """What the worker's sampler needs of a request's sampling parameters."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # Until min_tokens outputs exist, these ids (EOS and stop_token_ids) are masked.
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None  # top-k logprobs per sampled token
    prompt_logprobs: int | None = None


class NewRequest(_Msg):
    """A request the worker has not seen (or one resumed after preemption)."""

    req_id: str
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingOptions


class RunningRequest(_Msg):
    """An update for a request the worker already holds."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # After preemption a request's block table is replaced, not extended.
    resumed: bool = False
    # Pipeline parallelism only: the tokens sampled since the workers last heard of this
    # request. The last stage samples but keeps nothing; every stage appends these.
    new_token_ids: list[int] = []


class StepInput(_Msg, tag=True):
    step_id: int
    new_requests: list[NewRequest] = []
    running: list[RunningRequest] = []
    # tokens to compute this step, per request id, in batch order (new, then running)
    num_scheduled_tokens: dict[str, int] = {}
    finished_req_ids: list[str] = []
    preempted_req_ids: list[str] = []

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class Logprobs(_Msg):
    """Top-k logprobs for a run of positions: row i holds position i.

    token_ids[i][0] is the sampled (or prompt) token, followed by the top-k ids;
    logprobs[i] the matching values; ranks[i] the rank of token_ids[i][0].
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class StepOutput(_Msg, tag=True):
    step_id: int
    req_ids: list[str] = []
    # sampled[i]: tokens sampled for req_ids[i] this step (empty while its prefill is partial)
    sampled: list[list[int]] = []
    logprobs: dict[str, Logprobs] = {}
    prompt_logprobs: dict[str, Logprobs] = {}
    error: str | None = None


# ---- mp executor control messages -------------------------------------------------


class WorkerHello(_Msg, tag=True):
    """A worker process is up and asks for the config."""

    rank: int
    pid: int


class WorkerReady(_Msg, tag=True):
    """The worker loaded its model; num_blocks is what fits on its device."""

    rank: int
    num_blocks: int = 0
    error: str | None = None


class WorkerRpc(_Msg, tag=True):
    """Call a method on every worker (the config is frozen: only methods, no state)."""

    call_id: int
    method: str
    args: list = []


class WorkerRpcResult(_Msg, tag=True):
    call_id: int
    rank: int
    result: object = None
    error: str | None = None


class WorkerShutdown(_Msg, tag=True):
    pass


# What the engine core broadcasts to every worker.
ToWorker = StepInput | WorkerRpc | WorkerShutdown
# What workers send back (steps only from the output rank: ParallelConfig.output_rank).
FromWorker = StepOutput | WorkerHello | WorkerReady | WorkerRpcResult
