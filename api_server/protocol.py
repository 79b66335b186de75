"""The OpenAI request schemas the server accepts, and its error type.

Requests are parsed with orjson and checked against msgspec Structs (`parse_request`): a
wrong type, an unknown field or an unsupported OpenAI feature becomes an `APIError` (400)
naming the field, never a 500. A JSON `null` means "not set", as in the OpenAI API.
Responses are plain dicts encoded with orjson; their shapes are documented in the modules
that build them (completions.py, chat.py).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
import orjson

# ---- errors ---------------------------------------------------------------------------

# The error `type` of each HTTP status, as vLLM's server names them.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestEntityTooLarge",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "APIError")

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# ---- request schemas ------------------------------------------------------------------


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Request):
    """The sampling fields shared by completions and chat (OpenAI's and vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    priority: int = 0
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = None  # the response id's tail (an X-Request-Id header wins)
    return_token_ids: bool = False  # token ids beside the text (prompt and completion)
    cache_salt: str | None = None  # prefix-cache blocks are shared only under one salt


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: a string, strings, token ids, or lists of token ids."""

    prompt: Any = None
    max_tokens: int = 16
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    add_special_tokens: bool = True


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = []
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Request):
    """POST /tokenize: either `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int] = []


# OpenAI fields this server does not carry out, with the values that mean "not used".
# A request that sets one of them to anything else is refused with a 400 naming it.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "reasoning_effort": (),
    "web_search_options": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    # vLLM's beam search fields, which its clients send with their neutral values
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
}

_UNSUPPORTED_WHY = {
    "tools": "tool calling is not supported yet",
    "tool_choice": "tool calling is not supported yet",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "structured output is not supported; only {'type': 'text'}",
    "modalities": "only text output is supported",
    "audio": "audio output is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "it applies to beam search, which is not supported",
}

# Integers cross to the engine as msgpack int64: anything wider is refused here.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Lists and objects inside a field: far more than any request needs (a prompt of
# token-id lists is 2 deep, chat content parts 3).
MAX_NESTING = 32

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")

R = TypeVar("R", bound=_Request)


def decode_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    if not body:
        raise bad_request("the request body is empty: expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise bad_request(f"malformed JSON in the request body: {error}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def parse_request(data: dict[str, Any], schema: type[R]) -> R:
    """Check a decoded body against `schema`; raise a 400 naming the offending field."""
    fields = {key: value for key, value in data.items() if value is not None}
    _refuse_unsupported(fields)
    for key, value in fields.items():
        problem = _nesting_problem(value)
        if problem:
            raise bad_request(f"`{key}` {problem}", key)
    known = schema.__struct_fields__
    unknown = sorted(key for key in fields if key not in known)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    try:
        return msgspec.convert(fields, schema)
    except msgspec.ValidationError as error:
        raise _as_bad_request(str(error)) from None


def _nesting_problem(value: Any) -> str | None:
    """Why a field's value is refused before the schema sees it: an integer wider than
    64 bits, or lists and objects nested past MAX_NESTING. Walked with a stack, not by
    recursion: orjson accepts 1,024 levels, deeper than Python's recursion limit."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if type(item) is int and not INT64_MIN <= item <= INT64_MAX:
            return "holds an integer outside the 64-bit range"
        if isinstance(item, list | dict):
            if depth >= MAX_NESTING:
                return f"is nested deeper than {MAX_NESTING} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    for name, neutral in UNSUPPORTED_FIELDS.items():
        if name in fields:
            value = fields.pop(name)
            if value not in neutral:
                why = _UNSUPPORTED_WHY.get(name, "this server does not carry it out")
                raise bad_request(f"`{name}` is not supported: {why}", name)


def _as_bad_request(text: str) -> APIError:
    # msgspec says "Expected `int`, got `str` - at `$.max_tokens`"
    match = _PATH.search(text)
    if match is None:
        return bad_request(f"invalid request: {text}")
    path = match.group(1)
    param = re.split(r"[.\[]", path, maxsplit=1)[0] or None
    what = text[: match.start()]
    return bad_request(f"invalid value for `{path}`: {what[0].lower()}{what[1:]}", param)
