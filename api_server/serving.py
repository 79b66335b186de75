"""What the OpenAI routes share: the server state, prompt checks, sampling parameters, SSE.

`ServerState` holds the engine client, the tokenizer, the resolved config and the server
options; every route handler receives it. The helpers here turn a parsed request into
what the engine takes (`Prompt`, `SamplingParams`), answering bad input with a 400
before anything reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from api_server.metrics import RequestTracker, ServerMetrics
from api_server.protocol import APIError, SamplingFields, bad_request, decode_json
from engine_core.client import EngineDeadError
from engine_core.outputs import Logprob, RequestOutput
from engine_core.sampling_params import RequestOutputKind, SamplingParams
from executor.config import EngineConfig

logger = logging.getLogger("api_server")

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    # the charset: clients such as requests would otherwise read the stream as latin-1
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies must not buffer the stream
}
# OpenAI's JSON cannot carry -inf: a logprob below this is reported as this.
MIN_LOGPROB = -9999.0
# Prompts longer than this (characters) are tokenized off the event loop.
LONG_PROMPT_CHARS = 8192
MAX_REQUEST_ID_CHARS = 256
# The most sequences one request may ask for (n, best_of), as OpenAI's API.
MAX_SEQUENCES = 128


@dataclass
class ServerOptions:
    """The front-end options of `tessera serve` (the engine's are in EngineConfig)."""

    served_names: list[str]
    response_role: str = "assistant"
    chat_template: str | None = None
    max_log_len: int | None = None
    log_requests: bool = True
    enable_prompt_tokens_details: bool = False
    return_tokens_as_token_ids: bool = False
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    root_path: str = ""


@dataclass
class Prompt:
    """One prompt as the engine takes it: its text (None for token ids), its ids, and
    the request's cache_salt."""

    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None

    def as_engine_input(self) -> dict[str, Any]:
        engine_input: dict[str, Any] = {"prompt": self.text, "prompt_token_ids": self.token_ids}
        if self.cache_salt is not None:
            engine_input["cache_salt"] = self.cache_salt
        return engine_input


class ServerState:
    """Everything a route handler needs, built once at startup."""

    def __init__(
        self,
        client: Any,  # engine_core.async_client.AsyncEngineClient
        tokenizer: Any | None,  # engine_core.tokenizer.Tokenizer
        config: EngineConfig,
        options: ServerOptions,
        metrics: ServerMetrics,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.config = config
        self.options = options
        self.metrics = metrics
        self.model_name = options.served_names[0]
        self.max_model_len = config.model.max_model_len
        self.vocab_size = client.inputs.vocab_size

    # ---- checks -------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        """A request may name any served model, or none (the first is meant)."""
        if name is not None and name not in self.options.served_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    def check_alive(self) -> None:
        if self.client.errored:
            raise APIError(503, f"the engine is dead: {self.client.dead_reason}")

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise bad_request(
                f"{what} needs a tokenizer; the server runs with --skip-tokenizer-init"
            )
        return self.tokenizer

    # ---- prompts ------------------------------------------------------------------
    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return (await self.encode_all([text], add_special_tokens))[0]

    async def encode_all(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text; off the event loop when they are long together (a
        thousand prompts of a few KB would otherwise stall every stream for seconds)."""
        if not texts:
            return []
        tokenizer = self.need_tokenizer("a text prompt")

        def encode() -> list[list[int]]:
            return [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]

        if sum(map(len, texts)) <= LONG_PROMPT_CHARS:
            return encode()
        return await asyncio.get_running_loop().run_in_executor(None, encode)

    def check_prompt(self, prompt: Prompt, max_tokens: int | None, param: str) -> None:
        """Refuse a prompt the engine could never run, with OpenAI's wording."""
        n = len(prompt.token_ids)
        if n == 0:
            raise bad_request("the prompt is empty", param)
        limit = self.max_model_len
        if n >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {n} tokens, which leaves no room for any output. Please shorten it.",
                param,
            )
        if max_tokens is not None and n + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or the completion.",
                "max_tokens",
            )
        vocab = self.vocab_size
        if vocab and any(t >= vocab for t in prompt.token_ids):
            raise bad_request(f"prompt token ids must lie in [0, {vocab})", param)

    # ---- sampling parameters ------------------------------------------------------
    def sampling_params(
        self,
        req: SamplingFields,
        *,
        n: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
        stream: bool,
    ) -> SamplingParams:
        """The engine's SamplingParams for a request: unset fields take the model's
        generation config; every value is checked (400 naming the field)."""
        if n > MAX_SEQUENCES:
            param = "best_of" if getattr(req, "best_of", None) == n else "n"
            raise bad_request(f"{param} must be <= {MAX_SEQUENCES}, got {n}", param)
        if req.priority != 0 and self.config.scheduler.policy != "priority":
            raise bad_request(
                "priority is only honoured with --scheduling-policy priority", "priority"
            )
        try:
            params = SamplingParams.from_optional(
                n=n,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                bad_words=req.bad_words,
                allowed_token_ids=req.allowed_token_ids,
                logit_bias=_logit_bias(req.logit_bias),
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
            )
            params = self.client.inputs.resolve_params(params, 0)
        except (ValueError, TypeError) as error:
            raise _param_error(error) from None
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        return msgspec.structs.replace(params, output_kind=kind)

    def log_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> None:
        if not self.options.log_requests or not logger.isEnabledFor(logging.INFO):
            return
        limit = self.options.max_log_len
        text = prompt.text if limit is None or prompt.text is None else prompt.text[:limit]
        ids = prompt.token_ids if limit is None else prompt.token_ids[:limit]
        logger.info(
            "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
            request_id,
            text,
            params,
            ids,
        )

    def token_namer(self, as_ids: bool | None) -> Callable[[int, Logprob | None], str]:
        """How a request shows tokens in logprobs: its return_tokens_as_token_ids, or
        when unset the server's --return-tokens-as-token-ids."""
        if as_ids is None:
            as_ids = self.options.return_tokens_as_token_ids
        return _token_id_str if as_ids else self.token_str

    def token_str(self, token_id: int, logprob: Logprob | None) -> str:
        """A token's text as logprobs show it."""
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def usage(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if self.options.enable_prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return usage


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
            ) from None
        out[token_id] = max(-100.0, min(100.0, float(value)))  # OpenAI's range
    return out


def _param_error(error: Exception) -> APIError:
    # SamplingParams' messages start with the field name: "top_p must be in (0, 1], got 2.0"
    message = str(error)
    first = message.split(" ", 1)[0]
    param = first if first.isidentifier() else None
    return bad_request(message, param)


def new_request_id(prefix: str, request: web.Request, given: str | None) -> str:
    """`prefix`-<id>: the X-Request-Id header, else the body's request_id (as vLLM
    takes them), else a fresh one. An id still in flight is refused by the engine
    client (a 400)."""
    chosen = request.headers.get("X-Request-Id") or given
    if chosen is not None and not 0 < len(chosen) <= MAX_REQUEST_ID_CHARS:
        raise bad_request(f"request_id must be 1-{MAX_REQUEST_ID_CHARS} characters", "request_id")
    return f"{prefix}-{chosen or uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def clamp_logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    return response


def salt_prompts(prompts: list[Prompt], salt: str | None) -> None:
    """Give the request's prompts its cache_salt (vLLM's field)."""
    if salt is None:
        return
    if not salt:
        raise bad_request("cache_salt must be a non-empty string", "cache_salt")
    for prompt in prompts:
        prompt.cache_salt = salt


def _token_id_str(token_id: int, logprob: Logprob | None) -> str:
    return f"token_id:{token_id}"


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object, or a 400 (a body that does not match its
    Content-Encoding, too)."""
    try:
        body = await request.read()
    except RequestPayloadError as error:
        raise bad_request(f"the request body could not be read: {error}") from None
    return decode_json(body)


def api_error_of(error: BaseException) -> APIError:
    """The OpenAI error that answers an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineDeadError):
        return APIError(503, f"the engine is dead: {error}")
    if isinstance(error, ValueError):
        # the engine client's input checks raise ValueError naming the problem
        logger.warning("request refused by the engine client: %s", error)
        return APIError(400, str(error))
    logger.error("internal error while serving a request", exc_info=error)
    return APIError(500, f"internal server error: {type(error).__name__}: {error}")


def error_event(error: BaseException) -> bytes:
    """The SSE event that reports an error inside a stream (the status is already sent)."""
    return sse(api_error_of(error).to_dict())


def start_request(
    state: ServerState, request_id: str, prompt: Prompt, params: SamplingParams, priority: int
) -> tuple[AsyncIterator[RequestOutput], RequestTracker]:
    """Log and time a request and hand it to the engine; returns its output stream."""
    state.log_request(request_id, prompt, params)
    tracker = state.metrics.track(request_id, len(prompt.token_ids), params.n)
    stream = state.client.generate(prompt.as_engine_input(), params, request_id, priority)
    return stream, tracker


async def tracked_outputs(
    state: ServerState,
    request_id: str,
    prompt: Prompt,
    params: SamplingParams,
    priority: int,
    tag: int = 0,
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(tag, output) for each output of a request, streamed. Closing this aborts the
    request in the engine; the metrics learn how each sequence ended."""
    stream, tracker = start_request(state, request_id, prompt, params, priority)
    reasons: list[str | None] = [None] * params.n
    try:
        async for out in stream:
            for c in out.outputs:
                if c.finish_reason is not None:
                    reasons[c.index] = c.finish_reason
            yield tag, out
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        tracker.finish(reasons)


async def run_to_end(
    state: ServerState, request_id: str, prompt: Prompt, params: SamplingParams, priority: int
) -> RequestOutput:
    """The final output of a (FINAL_ONLY) request; an engine failure raises."""
    stream, tracker = start_request(state, request_id, prompt, params, priority)
    out: RequestOutput | None = None
    try:
        async for item in stream:
            out = item
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        tracker.finish([c.finish_reason for c in out.outputs] if out else [None] * params.n)
    if out is None:
        raise RuntimeError("the engine ended a request without an output")
    if out.error is not None:
        raise RuntimeError(f"the engine failed the request: {out.error}")
    return out


async def gather_all(coros: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await all together; when one fails, cancel the rest (which aborts their requests)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge_streams(streams: Sequence[AsyncIterator[Any]]) -> AsyncGenerator[Any, None]:
    """Items of several async iterators as they come; closing this closes them all."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except BaseException as error:  # handed to the consumer, which re-raises it
            queue.put_nowait(error)
            raise
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
