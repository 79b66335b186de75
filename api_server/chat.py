"""POST /v1/chat/completions: chat messages through the chat template, streamed or whole.

The conversation is rendered with the model's chat template (or --chat-template) and
tokenized without adding special tokens again (the template writes them). A stream sends
a first chunk with each choice's role, then one chunk per engine output with the new
content of each choice (and its finish reason when it ends), an optional usage chunk,
and `data: [DONE]`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

from aiohttp import web
from jinja2 import TemplateError

from api_server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    bad_request,
    parse_request,
)
from api_server.serving import (
    SSE_DONE,
    Prompt,
    ServerState,
    clamp_logprob,
    error_event,
    json_response,
    new_request_id,
    now_s,
    read_json,
    run_to_end,
    salt_prompts,
    sse,
    start_sse,
    tracked_outputs,
)
from engine_core.outputs import CompletionOutput, PositionLogprobs
from engine_core.sampling_params import SamplingParams

# Roles a chat template is expected to know; "developer" is OpenAI's new name of "system".
CHAT_ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}


async def create_chat_completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    req = parse_request(await read_json(request), ChatCompletionRequest)
    state.check_model(req.model)
    _check_options(req)
    state.check_alive()
    text = render_chat(
        state, req.messages, req.add_generation_prompt, req.continue_final_message, req
    )
    prompt = Prompt(text, await state.encode(text, req.add_special_tokens))
    if req.truncate_prompt_tokens is not None:
        prompt = Prompt(None, prompt.token_ids[-req.truncate_prompt_tokens :])
    salt_prompts([prompt], req.cache_salt)
    max_tokens = _max_tokens(state, req, prompt)
    state.check_prompt(prompt, max_tokens, "messages")
    params = state.sampling_params(
        req,
        n=req.n,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        prompt_logprobs=req.prompt_logprobs,
        stream=req.stream,
    )
    job = _ChatJob(state, req, new_request_id("chatcmpl", request, req.request_id), prompt, params)
    if req.stream:
        return await job.stream(request)
    return json_response(await job.run())


def _check_options(req: ChatCompletionRequest) -> None:
    if not req.messages:
        raise bad_request("messages must hold at least one message", "messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream", "stream_options")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        raise bad_request("truncate_prompt_tokens must be >= 1", "truncate_prompt_tokens")


def _max_tokens(state: ServerState, req: ChatCompletionRequest, prompt: Prompt) -> int | None:
    """max_completion_tokens (OpenAI's new name) wins over max_tokens; neither = the rest
    of the context."""
    chosen = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if chosen is None:
        return max(state.max_model_len - len(prompt.token_ids), 1)
    return chosen


def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    req: Any,
) -> str:
    """The prompt text of a conversation; a template or message problem is a 400."""
    tokenizer = state.need_tokenizer("chat")
    if continue_final_message and (not messages or messages[-1].role != "assistant"):
        raise bad_request(
            "continue_final_message needs the last message to be the assistant's",
            "continue_final_message",
        )
    if continue_final_message:
        add_generation_prompt = False  # the final message is continued, not a new one opened
    try:
        return tokenizer.apply_chat_template(
            [_message_dict(m) for m in messages],
            chat_template=state.options.chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=_template_kwargs(tokenizer, getattr(req, "chat_template_kwargs", None)),
        )
    except (ValueError, TypeError, KeyError, TemplateError) as error:
        raise bad_request(f"cannot apply the chat template: {error}", "messages") from None


def _template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """chat_template_kwargs are variables of the template (e.g. enable_thinking); none may
    stand for an argument of the tokenizer's own apply_chat_template."""
    if not kwargs:
        return None
    reserved = _reserved_template_args(tokenizer.hf.apply_chat_template)
    clash = sorted(k for k in kwargs if k in reserved)
    if clash:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs"
        )
    return kwargs


@functools.lru_cache(maxsize=4)
def _reserved_template_args(apply_chat_template: Any) -> frozenset[str]:
    params = inspect.signature(apply_chat_template).parameters
    named = {name for name, p in params.items() if p.kind is not p.VAR_KEYWORD}
    return frozenset(named | {"messages", "conversation", "tokenize", "return_dict"})


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    role = ROLE_ALIASES.get(message.role, message.role)
    if role not in CHAT_ROLES:
        raise bad_request(
            f"message role {message.role!r} is not supported; use system, user or assistant",
            "messages",
        )
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    "only text content parts ({'type': 'text', 'text': ...}) are supported",
                    "messages",
                )
    out: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
    if message.name is not None:
        out["name"] = message.name
    return out


class _ChatJob:
    """One chat request running in the engine, and its answer."""

    def __init__(
        self,
        state: ServerState,
        req: ChatCompletionRequest,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
    ) -> None:
        self.state = state
        self.req = req
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.created = now_s()
        self.model = req.model or state.model_name
        self.role = state.options.response_role

    # ---- whole responses ----------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        out = await run_to_end(
            self.state, self.request_id, self.prompt, self.params, self.req.priority
        )
        choices = []
        for c in out.outputs:
            choice: dict[str, Any] = {
                "index": c.index,
                "message": {"role": self.role, "content": c.text},
                "logprobs": self._logprobs(c) if self.req.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if self.req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        body = {
            "id": self.request_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.state.usage(
                len(self.prompt.token_ids), completion_tokens, out.num_cached_tokens
            ),
            "system_fingerprint": None,
        }
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.prompt.token_ids
        return body

    def _logprobs(self, c: CompletionOutput) -> dict[str, Any]:
        """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        k = self.req.top_logprobs or 0
        token_str = self.state.token_namer(self.req.return_tokens_as_token_ids)
        content = []
        for token_id, pos in zip(c.token_ids, c.logprobs or [], strict=False):
            chosen = pos.get(token_id)
            text = token_str(token_id, chosen)
            content.append(
                {
                    "token": text,
                    "logprob": clamp_logprob(chosen.logprob) if chosen else None,
                    "bytes": list(text.encode()),
                    "top_logprobs": _top(pos, k, token_str),
                }
            )
        return {"content": content}

    # ---- streaming ----------------------------------------------------------------
    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        try:
            await self._stream_into(response)
        except ConnectionError:  # the client left: nobody to tell
            raise
        except Exception as error:
            await response.write(error_event(error))
        await response.write(SSE_DONE)
        return response

    async def _stream_into(self, response: web.StreamResponse) -> None:
        opts = self.req.stream_options
        include_usage = opts is not None and opts.include_usage
        continuous = opts is not None and opts.continuous_usage_stats
        n = self.req.n
        prompt_tokens = len(self.prompt.token_ids)
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "delta": {"role": self.role, "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(n)
            ],
        }
        if continuous:
            chunk["usage"] = self.state.usage(prompt_tokens, 0, 0)
        if self.req.return_token_ids:  # vLLM's: the prompt's ids in the first chunk only
            chunk["prompt_token_ids"] = self.prompt.token_ids
        await response.write(sse(chunk))  # the role first, before any token is ready
        chunk.pop("prompt_token_ids", None)
        finished = [False] * n
        completion_tokens = cached = 0
        want_logprobs = self.req.logprobs
        stream = tracked_outputs(
            self.state, self.request_id, self.prompt, self.params, self.req.priority
        )
        async with contextlib.aclosing(stream) as outputs:
            async for _, out in outputs:
                parts = []
                new_tokens = 0
                for c in out.outputs:
                    new_tokens += len(c.token_ids)
                    if finished[c.index] or not (c.text or c.token_ids or c.finish_reason):
                        continue
                    finished[c.index] = c.finish_reason is not None
                    part = {
                        "index": c.index,
                        "delta": {"content": c.text} if c.text else {},
                        "logprobs": self._logprobs(c) if want_logprobs else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                    if self.req.return_token_ids:
                        part["token_ids"] = c.token_ids
                    parts.append(part)
                completion_tokens += new_tokens
                if out.finished:
                    cached = out.num_cached_tokens
                if out.error is not None:
                    raise RuntimeError(f"the engine failed the request: {out.error}")
                if not parts:
                    continue
                chunk["choices"] = parts
                if continuous:
                    chunk["usage"] = self.state.usage(prompt_tokens, completion_tokens, cached)
                await response.write(sse(chunk))
        if include_usage:
            chunk["choices"] = []
            chunk["usage"] = self.state.usage(prompt_tokens, completion_tokens, cached)
            await response.write(sse(chunk))


def _top(pos: PositionLogprobs, k: int, token_str: Any) -> list[dict[str, Any]]:
    """The k most likely tokens of a position, most likely first."""
    if k <= 0:
        return []
    ranked = sorted(
        (v.rank, tid, v) for tid, v in pos.items() if v.rank is not None and v.rank <= k
    )
    top = []
    for _, tid, v in ranked[:k]:
        text = token_str(tid, v)
        top.append(
            {"token": text, "logprob": clamp_logprob(v.logprob), "bytes": list(text.encode())}
        )
    return top
