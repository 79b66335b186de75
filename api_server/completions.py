"""POST /v1/completions: OpenAI's legacy completions, streamed or whole.

A request holds one or more prompts (text or token ids); each prompt becomes one engine
request `{id}-{i}` (just `{id}` for a single prompt) with `n` sequences, and choice
`prompt_index * n + i` of the response. `best_of > n` runs best_of sequences and keeps
the n with the highest cumulative logprob (not with streaming, where every sequence
would already have been sent).

Streaming sends one SSE chunk per engine output: the text (and logprobs) each sequence
gained since the previous output, its finish reason once it ends, then an optional usage
chunk and `data: [DONE]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from api_server.protocol import CompletionRequest, bad_request, parse_request
from api_server.serving import (
    SSE_DONE,
    Prompt,
    ServerState,
    clamp_logprob,
    error_event,
    gather_all,
    json_response,
    merge_streams,
    new_request_id,
    now_s,
    read_json,
    run_to_end,
    salt_prompts,
    sse,
    start_sse,
    tracked_outputs,
)
from engine_core.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from engine_core.sampling_params import SamplingParams


async def create_completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    req = parse_request(await read_json(request), CompletionRequest)
    state.check_model(req.model)
    echo_only = req.echo and req.max_tokens == 0
    if echo_only:
        # vLLM's echo without generation (lm-eval's loglikelihood requests): one token
        # is generated for the prompt's logprobs to exist, and is not returned
        req = msgspec.structs.replace(req, max_tokens=1)
    _check_options(req)
    state.check_alive()
    prompts = await _prompts(state, req)
    salt_prompts(prompts, req.cache_salt)
    for prompt in prompts:
        state.check_prompt(prompt, req.max_tokens, "prompt")
    params = _sampling_params(state, req)
    request_id = new_request_id("cmpl", request, req.request_id)
    job = _Job(state, req, request_id, prompts, params, echo_only)
    if req.stream:
        return await job.stream(request)
    return json_response(await job.run())


def _check_options(req: CompletionRequest) -> None:
    if req.best_of is not None and req.best_of < req.n:
        raise bad_request(f"best_of must be >= n ({req.n}), got {req.best_of}", "best_of")
    if req.stream and req.best_of is not None and req.best_of > req.n:
        raise bad_request("best_of > n is not supported with stream", "best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream", "stream_options")


async def _prompts(state: ServerState, req: CompletionRequest) -> list[Prompt]:
    """The request's prompts: a string, strings, token ids, or lists of token ids."""
    raw = req.prompt
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(_is_id(t) for t in raw):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids",
            "prompt",
        )
    for item in items:
        if not isinstance(item, str) and not (
            isinstance(item, list) and all(_is_id(t) for t in item)
        ):
            raise bad_request(
                "each prompt must be a string or a list of token ids (ints >= 0)", "prompt"
            )
    texts = [item for item in items if isinstance(item, str)]
    encoded = iter(await state.encode_all(texts, req.add_special_tokens))
    prompts = [
        Prompt(item, next(encoded)) if isinstance(item, str) else Prompt(None, list(item))
        for item in items
    ]
    if req.truncate_prompt_tokens is not None:
        k = req.truncate_prompt_tokens
        if k < 1:
            raise bad_request("truncate_prompt_tokens must be >= 1", "truncate_prompt_tokens")
        prompts = [
            Prompt(p.text if len(p.token_ids) <= k else None, p.token_ids[-k:]) for p in prompts
        ]
    return prompts


def _is_id(value: Any) -> bool:
    return type(value) is int and value >= 0  # JSON true/false are not token ids


def _sampling_params(state: ServerState, req: CompletionRequest) -> SamplingParams:
    logprobs = req.logprobs
    num_seqs = req.n if req.best_of is None else req.best_of
    if num_seqs > req.n and logprobs is None:
        logprobs = 0  # the cumulative logprob that ranks the candidates
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = max(req.logprobs, prompt_logprobs or 0)
    return state.sampling_params(
        req,
        n=num_seqs,
        max_tokens=req.max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        stream=req.stream,
    )


@dataclass
class _Choice:
    """What has been streamed of one choice so far."""

    prompt: Prompt
    text_offset: int = 0
    started: bool = False
    finished: bool = False


class _Job:
    """One completions request: its prompts running in the engine, and the answer."""

    def __init__(
        self,
        state: ServerState,
        req: CompletionRequest,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        echo_only: bool = False,
    ) -> None:
        self.state = state
        self.echo_only = echo_only
        self.req = req
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.created = now_s()
        self.model = req.model or state.model_name

    def _engine_id(self, i: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"

    # ---- whole responses ----------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        results = await gather_all([self._run_one(i) for i in range(len(self.prompts))])
        choices: list[dict[str, Any]] = []
        completion_tokens = cached = 0
        for i, out in enumerate(results):
            outputs = [self._shown(c) for c in out.outputs]
            completion_tokens += sum(len(c.token_ids) for c in outputs)
            cached += out.num_cached_tokens
            for j, c in enumerate(self._best(outputs)):
                choices.append(self._choice(i * self.req.n + j, self.prompts[i], out, c))
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.state.usage(prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None,
        }

    async def _run_one(self, i: int) -> RequestOutput:
        return await run_to_end(
            self.state, self._engine_id(i), self.prompts[i], self.params, self.req.priority
        )

    def _shown(self, c: CompletionOutput) -> CompletionOutput:
        """What the client sees of an output: nothing generated when echo_only."""
        if not self.echo_only:
            return c
        return CompletionOutput(
            c.index, cumulative_logprob=c.cumulative_logprob, finish_reason=c.finish_reason
        )

    def _best(self, outputs: list[CompletionOutput]) -> list[CompletionOutput]:
        if len(outputs) <= self.req.n:
            return outputs
        ranked = sorted(outputs, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
        return ranked[: self.req.n]

    def _choice(
        self, index: int, prompt: Prompt, out: RequestOutput, c: CompletionOutput
    ) -> dict[str, Any]:
        text = c.text
        logprobs = None
        if self.req.echo:
            text = self._prompt_text(prompt) + text
        if self.req.logprobs is not None:
            logprobs = self._logprobs(prompt, out, c, 0, with_prompt=self.req.echo)
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        if self.req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs(out)
        if self.req.return_token_ids:
            choice["prompt_token_ids"] = prompt.token_ids
            choice["token_ids"] = c.token_ids
        return choice

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tokenizer = self.state.need_tokenizer("echo")
        return tokenizer.decode(prompt.token_ids)

    def _logprobs(
        self,
        prompt: Prompt,
        out: RequestOutput,
        c: CompletionOutput,
        offset: int,
        with_prompt: bool,
    ) -> dict[str, Any]:
        """OpenAI's completions logprobs of (the prompt and) the tokens of `c`, with text
        offsets counted from `offset`."""
        k = self.req.logprobs or 0
        lp: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        if with_prompt:
            positions = out.prompt_logprobs or [None] * len(prompt.token_ids)
            offset = self._add_positions(lp, prompt.token_ids, positions, k, offset)
        self._add_positions(lp, c.token_ids, c.logprobs or [], k, offset)
        return lp

    def _add_positions(
        self,
        lp: dict[str, list[Any]],
        token_ids: list[int],
        positions: list[PositionLogprobs | None] | list[PositionLogprobs],
        k: int,
        offset: int,
    ) -> int:
        token_str = self.state.token_namer(self.req.return_tokens_as_token_ids)
        for token_id, pos in zip(token_ids, positions, strict=False):
            chosen = pos.get(token_id) if pos else None
            text = token_str(token_id, chosen)
            lp["tokens"].append(text)
            lp["text_offset"].append(offset)
            offset += len(text)
            if pos is None:
                lp["token_logprobs"].append(None)
                lp["top_logprobs"].append(None)
                continue
            lp["token_logprobs"].append(clamp_logprob(chosen.logprob) if chosen else None)
            top = {}
            for tid, value in pos.items():
                if tid == token_id or (value.rank is not None and value.rank <= k):
                    top[token_str(tid, value)] = clamp_logprob(value.logprob)
            lp["top_logprobs"].append(top)
        return offset

    # ---- streaming ----------------------------------------------------------------
    async def stream(self, request: web.Request) -> web.StreamResponse:
        choices = [_Choice(p) for p in self.prompts for _ in range(self.req.n)]
        response = await start_sse(request)
        try:
            await self._stream_into(response, choices)
        except ConnectionError:  # the client left: nobody to tell
            raise
        except Exception as error:
            await response.write(error_event(error))
        await response.write(SSE_DONE)
        return response

    async def _stream_into(self, response: web.StreamResponse, choices: list[_Choice]) -> None:
        req, n = self.req, self.req.n
        opts = req.stream_options
        include_usage = opts is not None and opts.include_usage
        continuous = opts is not None and opts.continuous_usage_stats
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
        }
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        counts = _Counts()
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for i, out in outputs:
                base = i * n
                parts = []
                new_tokens = 0
                for c in map(self._shown, out.outputs):
                    new_tokens += len(c.token_ids)
                    choice = choices[base + c.index]
                    if choice.finished or not (c.text or c.token_ids or c.finish_reason):
                        continue
                    parts.append(self._chunk_choice(base + c.index, choice, out, c))
                counts.completion += new_tokens
                if out.finished:
                    counts.cached += out.num_cached_tokens
                if out.error is not None:
                    raise RuntimeError(f"the engine failed the request: {out.error}")
                if not parts:
                    continue
                chunk["choices"] = parts
                if continuous:
                    chunk["usage"] = self.state.usage(
                        prompt_tokens, counts.completion, counts.cached
                    )
                await response.write(sse(chunk))
        if include_usage:
            chunk["choices"] = []
            chunk["usage"] = self.state.usage(prompt_tokens, counts.completion, counts.cached)
            await response.write(sse(chunk))

    def _chunk_choice(
        self, index: int, choice: _Choice, out: RequestOutput, c: CompletionOutput
    ) -> dict[str, Any]:
        text = c.text
        echo_prompt = self.req.echo and not choice.started
        if echo_prompt:
            text = self._prompt_text(choice.prompt) + text
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = self._logprobs(choice.prompt, out, c, choice.text_offset, echo_prompt)
        part: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        if self.req.return_token_ids:  # vLLM's: the prompt's ids in a choice's first chunk
            if not choice.started:
                part["prompt_token_ids"] = choice.prompt.token_ids
            part["token_ids"] = c.token_ids
        choice.started = True
        choice.text_offset += len(text)
        if c.finish_reason is not None:
            choice.finished = True
        return part

    def _outputs(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(prompt index, output) of every engine output, prompts interleaved."""
        streams = [
            tracked_outputs(
                self.state, self._engine_id(i), p, self.params, self.req.priority, tag=i
            )
            for i, p in enumerate(self.prompts)
        ]
        # the common case, one prompt, needs no merging task in the hot path
        return streams[0] if len(streams) == 1 else merge_streams(streams)


@dataclass
class _Counts:
    completion: int = 0
    cached: int = 0


def _prompt_logprobs(out: RequestOutput) -> list[Any] | None:
    """vLLM's prompt_logprobs field: per prompt position, token id -> logprob details."""
    if out.prompt_logprobs is None:
        return None
    result: list[Any] = []
    for pos in out.prompt_logprobs:
        if pos is None:
            result.append(None)
            continue
        result.append(
            {
                str(tid): {
                    "logprob": clamp_logprob(v.logprob),
                    "rank": v.rank,
                    "decoded_token": v.decoded_token,
                }
                for tid, v in pos.items()
            }
        )
    return result
