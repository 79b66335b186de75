"""The aiohttp application: routes, and the middleware that guards them.

Middleware, outermost first: errors (every failure becomes an OpenAI-format error body,
with the status of its cause; bad input is never a 500), CORS preflight, body size (413
before the body is read), API key (401 on /v1/* only; health and metrics stay open). CORS headers
are added as each response is prepared, so that streamed responses carry them too.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from api_server.chat import create_chat_completion, render_chat
from api_server.completions import create_completion
from api_server.metrics import CONTENT_TYPE
from api_server.protocol import (
    APIError,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    parse_request,
)
from api_server.serving import ServerState, api_error_of, json_response, now_s, read_json
from executor.profiler import profiler_dir

logger = logging.getLogger("api_server")

# The largest request body accepted (a long prompt as token ids is ~8 bytes a token).
MAX_BODY_BYTES = 32 * 1024 * 1024

STATE_KEY: web.AppKey[ServerState] = web.AppKey("state", ServerState)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(state: ServerState) -> web.Application:
    """The HTTP application of one server (its routes under / and under --root-path)."""
    app = web.Application(
        middlewares=[
            error_middleware,
            preflight_middleware,
            body_limit_middleware,
            auth_middleware,
        ],
        client_max_size=MAX_BODY_BYTES,
    )
    app[STATE_KEY] = state
    prefixes = [""]
    root = state.options.root_path.rstrip("/")
    if root:
        prefixes.append(root if root.startswith("/") else "/" + root)
    for prefix in prefixes:
        _add_routes(app, state, prefix)
    app.on_response_prepare.append(_cors_headers)
    return app


def _add_routes(app: web.Application, state: ServerState, prefix: str) -> None:
    def bind(handler: Callable[[ServerState, web.Request], Awaitable[web.StreamResponse]]):
        async def route(request: web.Request) -> web.StreamResponse:
            return await handler(state, request)

        return route

    r = app.router
    r.add_post(prefix + "/v1/completions", bind(create_completion))
    r.add_post(prefix + "/v1/chat/completions", bind(create_chat_completion))
    r.add_get(prefix + "/v1/models", bind(list_models))
    r.add_get(prefix + "/v1/models/{model:.+}", bind(retrieve_model))
    r.add_get(prefix + "/health", bind(health))
    r.add_get(prefix + "/ping", bind(health))
    r.add_post(prefix + "/ping", bind(health))
    r.add_get(prefix + "/version", bind(version))
    r.add_post(prefix + "/tokenize", bind(tokenize))
    r.add_post(prefix + "/detokenize", bind(detokenize))
    r.add_get(prefix + "/metrics", bind(metrics))
    if profiler_dir() is not None:  # as vLLM: only when profiling is switched on
        r.add_post(prefix + "/start_profile", bind(start_profile))
        r.add_post(prefix + "/stop_profile", bind(stop_profile))


# ---- middleware -----------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = error.text if error.text and error.text != error.reason else error.reason
        if error.status == 413:
            message = f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes"
        if error.status == 404:
            message = f"no route {request.method} {request.path}"
        if error.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        return _error_response(APIError(error.status, message), error.headers)
    except ConnectionError:
        raise  # the client left mid-response: nobody to answer
    except Exception as error:
        return _error_response(api_error_of(error))


def _error_response(error: APIError, headers=None) -> web.Response:
    extra = {k: v for k, v in (headers or {}).items() if k.lower() == "allow"}
    return web.Response(
        body=orjson.dumps(error.to_dict()),
        status=error.status,
        content_type="application/json",
        headers=extra,
    )


@web.middleware
async def body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise APIError(
            413, f"the request body ({length} bytes) is larger than the limit of {MAX_BODY_BYTES}"
        )
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    key = state.options.api_key
    if key and request.method != "OPTIONS" and _is_api_path(request.path, state):
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {key}"
        # surrogateescape: a header of undecodable bytes is a wrong key (401), not a 400
        if not hmac.compare_digest(_raw(given), _raw(expected)):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)")
    return await handler(request)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _is_api_path(path: str, state: ServerState) -> bool:
    root = state.options.root_path.rstrip("/")
    if root and path.startswith(root + "/"):
        path = path[len(root) :]
    return path.startswith("/v1/") or path == "/v1"


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = request.app[STATE_KEY].options.allowed_origins
    if "*" in allowed:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin in allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS preflight (OPTIONS with Access-Control-Request-Method) on any path: answered
    here, since no route takes OPTIONS."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return await handler(request)
    headers = {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type"
        ),
        "Access-Control-Max-Age": "600",
    }
    return web.Response(status=200, headers=headers)


# ---- simple routes --------------------------------------------------------------------


async def list_models(state: ServerState, request: web.Request) -> web.StreamResponse:
    data = [_model_card(state, name) for name in state.options.served_names]
    return json_response({"object": "list", "data": data})


async def retrieve_model(state: ServerState, request: web.Request) -> web.StreamResponse:
    """One served model's card (OpenAI's GET /v1/models/{model}); 404 for another name."""
    name = request.match_info["model"]
    if name not in state.options.served_names:
        raise APIError(404, f"The model `{name}` does not exist.", "model")
    return json_response(_model_card(state, name))


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": now_s(),
        "owned_by": "tessera",
        "root": state.config.model.model,
        "parent": None,
        "max_model_len": state.max_model_len,
        "permission": [],
    }


async def health(state: ServerState, request: web.Request) -> web.StreamResponse:
    """200 while the engine lives; 503 once it died."""
    if state.client.errored:
        return _error_response(APIError(503, f"the engine is dead: {state.client.dead_reason}"))
    return web.Response(status=200)


async def version(state: ServerState, request: web.Request) -> web.StreamResponse:
    try:
        number = importlib.metadata.version("tessera")
    except importlib.metadata.PackageNotFoundError:
        number = "unknown"
    return json_response({"version": number})


async def start_profile(state: ServerState, request: web.Request) -> web.StreamResponse:
    """Start the torch profiler in every worker (TESSERA_TORCH_PROFILER_DIR is set)."""
    try:
        await state.client.call("profile_start")
    except RuntimeError as error:  # already running
        return _error_response(APIError(400, str(error)))
    return json_response({"status": "started"})


async def stop_profile(state: ServerState, request: web.Request) -> web.StreamResponse:
    """Stop it; the files the workers wrote."""
    try:
        paths = await state.client.call("profile_stop")
    except RuntimeError as error:  # not running
        return _error_response(APIError(400, str(error)))
    return json_response({"status": "stopped", "files": paths})


async def metrics(state: ServerState, request: web.Request) -> web.StreamResponse:
    await state.metrics.refresh(state.client)
    body = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def tokenize(state: ServerState, request: web.Request) -> web.StreamResponse:
    """{prompt} or {messages} -> {count, max_model_len, tokens[, token_strs]}."""
    req = parse_request(await read_json(request), TokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.need_tokenizer("tokenize")
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        text = render_chat(
            state, req.messages, req.add_generation_prompt, req.continue_final_message, req
        )
        add_special = False if req.add_special_tokens is None else req.add_special_tokens
    else:
        assert req.prompt is not None
        text = req.prompt
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
    ids = await state.encode(text, add_special)
    body = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = tokenizer.hf.convert_ids_to_tokens(ids)
    return json_response(body)


async def detokenize(state: ServerState, request: web.Request) -> web.StreamResponse:
    """{tokens} -> {prompt}."""
    req = parse_request(await read_json(request), DetokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.need_tokenizer("detokenize")
    vocab = state.vocab_size
    if any(t < 0 or (vocab and t >= vocab) for t in req.tokens):
        raise bad_request(f"token ids must lie in [0, {vocab})", "tokens")
    return json_response({"prompt": tokenizer.decode(req.tokens)})
