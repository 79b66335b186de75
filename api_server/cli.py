"""`tessera serve [MODEL] [engine args] [server args]`: the OpenAI-compatible server.

The process that the user starts parses the command line once, resolves the engine
arguments into the frozen EngineConfig, loads the tokenizer, reserves the port, then
starts the engine core (its own process, with its workers) through AsyncEngineClient
and serves HTTP with aiohttp on uvloop. The front end is always this one process: the
engine core and the workers run in their own processes whatever the flags say.

Exit codes: 0 after SIGTERM/SIGINT, 2 for a bad argument (one line naming it), 1 when
the model, the tokenizer, the port or the engine fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn

from aiohttp import web

from api_server.app import build_app
from api_server.metrics import ServerMetrics, StatsLogger
from api_server.serving import ServerOptions, ServerState
from engine_core.args import EngineArgs, default_of, make_arg_parser
from engine_core.config import resolve_config
from executor.heap import freeze_startup_heap, thaw_heap

logger = logging.getLogger("api_server")

SERVER_GROUP = "Server"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# In-flight requests get this long to finish after SIGTERM before they are cut off.
SHUTDOWN_GRACE_S = 5.0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: `tessera serve: error: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {error}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The front-end options of `tessera serve` (the engine's come from engine_core.args)."""
    g = parser.add_argument_group(SERVER_GROUP)
    g.add_argument("--host", default=None, help="Host to listen on (default: all interfaces).")
    g.add_argument("--port", type=int, default=8000, help="Port to listen on. Default: 8000.")
    g.add_argument(
        "--api-key",
        default=None,
        help="Require this key (Authorization: Bearer KEY) on /v1/* routes. Also read from "
        "the TESSERA_API_KEY environment variable.",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        help="Chat template (Jinja text or a file path) instead of the model's own.",
    )
    g.add_argument(
        "--response-role",
        default="assistant",
        help="Role of generated chat messages. Default: assistant.",
    )
    g.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="Longest prompt (characters and token ids) shown in request logs.",
    )
    g.add_argument(
        "--allowed-origins",
        type=_json_list,
        default=["*"],
        help='CORS allowed origins, a JSON list. Default: ["*"].',
    )
    g.add_argument(
        "--root-path",
        default="",
        help="Path prefix of a reverse proxy; routes are served under it as well.",
    )
    g.add_argument(
        "--log-level",
        "--uvicorn-log-level",
        dest="log_level",
        choices=LOG_LEVELS,
        default="info",
        help="Log level of the server. Default: info.",
    )
    g.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="Accepted for compatibility: this server has no docs routes.",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="Report usage.prompt_tokens_details.cached_tokens.",
    )
    g.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="Show tokens in logprobs as token_id:N.",
    )
    g.add_argument(
        "--disable-frontend-multiprocessing",
        action="store_true",
        help="Accepted for compatibility: the front end is always one process here, and "
        "the engine core always runs in its own.",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="Not supported yet (refused at startup).",
    )
    g.add_argument(
        "--tool-call-parser", default=None, help="Not supported yet (refused at startup)."
    )


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tessera", description="Tessera: an LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser(
        "serve",
        help="Start the OpenAI-compatible HTTP server.",
        usage="tessera serve [MODEL] [options]",
        description="Start the OpenAI-compatible HTTP server. Engine arguments are those of "
        "`vllm serve`.",
    )
    serve.add_argument(
        "model_tag", nargs="?", default=None, help="The model to serve (same as --model)."
    )
    add_server_args(serve)
    make_arg_parser(serve)
    return parser


def _fail(code: int, message: str) -> NoReturn:
    print(f"tessera serve: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """The `tessera` console script."""
    args = make_parser().parse_args(argv)
    if args.command == "serve":
        sys.exit(run_serve(args))


# ---- serve --------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    _take_model_tag(args)
    _check_server_args(args)
    chat_template = _chat_template(args.chat_template)
    try:
        config = resolve_config(EngineArgs.from_cli(args))
    except ValueError as error:  # ConfigError: one line naming the argument
        _fail(2, str(error))
    served = config.model.served_model_names or [config.model.model]
    options = _server_options(args, served, chat_template)
    sock = _bind(args.host, args.port)
    runner_loop = _event_loop_runner()
    return runner_loop(_serve(config, options, sock, args.host))


def _setup_logging(level: str) -> None:
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(
        level=numeric, format="%(levelname)s %(asctime)s [%(name)s] %(message)s", force=True
    )


def _take_model_tag(args: argparse.Namespace) -> None:
    """The positional MODEL stands for --model; the two must not disagree."""
    if args.model_tag is None:
        return
    if args.model != default_of("model") and args.model != args.model_tag:
        _fail(2, f"--model={args.model}: the positional MODEL ({args.model_tag}) says otherwise")
    args.model = args.model_tag


def _check_server_args(args: argparse.Namespace) -> None:
    if args.enable_auto_tool_choice or args.tool_call_parser:
        flag = "--enable-auto-tool-choice" if args.enable_auto_tool_choice else "--tool-call-parser"
        _fail(2, f"{flag}: tool calling is not supported yet")
    if args.distributed_executor_backend == "external_launcher":
        _fail(
            2,
            "--distributed-executor-backend=external_launcher: it runs the offline LLM in "
            "each torchrun rank; a server needs mp or uni",
        )
    if args.port < 0 or args.port > 65535:
        _fail(2, f"--port={args.port}: must be in [0, 65535]")
    if args.max_log_len is not None and args.max_log_len < 0:
        _fail(2, f"--max-log-len={args.max_log_len}: must be >= 0")
    if args.disable_frontend_multiprocessing:
        logger.info(
            "--disable-frontend-multiprocessing: the front end is always one process here "
            "(the engine core runs in its own process either way)"
        )


def _chat_template(value: str | None) -> str | None:
    """The --chat-template text, read once at startup (a file path or the template)."""
    if value is None:
        return None
    from engine_core.tokenizer import resolve_chat_template

    try:
        return resolve_chat_template(value)
    except ValueError as error:
        _fail(2, str(error))


def _server_options(
    args: argparse.Namespace, served_names: list[str], chat_template: str | None
) -> ServerOptions:
    return ServerOptions(
        served_names=list(served_names),
        response_role=args.response_role,
        chat_template=chat_template,
        max_log_len=args.max_log_len,
        log_requests=not args.disable_log_requests,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        api_key=args.api_key or os.environ.get("TESSERA_API_KEY") or None,
        allowed_origins=args.allowed_origins,
        root_path=args.root_path,
    )


class _TokenizerError(Exception):
    pass


def _load_tokenizer(config: Any) -> Any | None:
    # In a thread while the engine cores start (AsyncEngineClient.start): importing
    # transformers and reading the tokenizer take seconds.
    m = config.model
    if m.skip_tokenizer_init or m.tokenizer is None:
        return None
    from engine_core.tokenizer import Tokenizer

    gguf = m.gguf_file if m.tokenizer == m.model_path else None
    start = time.perf_counter()
    try:
        tokenizer = Tokenizer.load(m.tokenizer, gguf, m.tokenizer_mode, m.trust_remote_code)
    except (OSError, ValueError) as error:
        raise _TokenizerError(f"cannot load the tokenizer: {error}") from None
    # With transformers' (and torch's) import, this can outlast the engine's own start:
    # the log says which of the two the server waited for.
    logger.info("tokenizer loaded in %.1f s", time.perf_counter() - start)
    return tokenizer


def _bind(host: str | None, port: int) -> socket.socket:
    """Reserve the port now, so that a busy port fails before the model loads. The socket
    starts listening only once the engine is ready: until then connections are refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        _fail(1, f"cannot listen on {host or '0.0.0.0'}:{port}: {error}")
    sock.setblocking(False)
    return sock


def _event_loop_runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # uvloop has no Windows build
        return asyncio.run


async def _serve(
    config: Any,
    options: ServerOptions,
    sock: socket.socket,
    host: str | None,
) -> int:
    from engine_core.async_client import AsyncEngineClient

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await _start_engine(AsyncEngineClient, config, stop)
    if client is None:
        return 0 if stop.is_set() else 1
    freeze_startup_heap("api server")
    try:
        await _run_http(client, config, client.tokenizer, options, sock, host, stop)
    finally:
        await client.shutdown()
        thaw_heap()
        logger.info("shut down")
    return 0


async def _run_http(
    client: Any,
    config: Any,
    tokenizer: Any | None,
    options: ServerOptions,
    sock: socket.socket,
    host: str | None,
    stop: asyncio.Event,
) -> None:
    """Serve HTTP until `stop` is set; then stop accepting and end the open requests."""
    metrics = ServerMetrics(options.served_names[0], client.core_num_blocks)
    client.stats_listeners.append(metrics.on_engine_outputs)
    state = ServerState(client, tokenizer, config, options, metrics)
    runner = web.AppRunner(
        build_app(state),
        handler_cancellation=True,  # a client that leaves aborts its request at once
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=logging.getLogger("api_server.access"),
    )
    await runner.setup()
    stats_task = None
    try:
        await web.SockSite(runner, sock, shutdown_timeout=SHUTDOWN_GRACE_S).start()
        if not config.observability.disable_log_stats:
            stats_task = asyncio.create_task(StatsLogger(metrics).run())
        port = sock.getsockname()[1]
        url = f"http://{host or '0.0.0.0'}:{port}"
        print(f"Tessera API server ready at {url} (model: {options.served_names[0]})", flush=True)
        await stop.wait()
        logger.info("shutting down")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal cuts the grace short
            loop.add_signal_handler(sig, _exit_now)
    finally:
        if stats_task is not None:
            stats_task.cancel()
        await runner.cleanup()


async def _start_engine(cls: Any, config: Any, stop: asyncio.Event) -> Any:
    """The started engine client; None when startup failed or a signal came first."""
    start = asyncio.ensure_future(
        cls.start(config, load_tokenizer=partial(_load_tokenizer, config))
    )
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not start.done():
        logger.info("stopped while the engine was starting")
        _close_starting_cores()
        try:
            client = await start
        except Exception:
            return None
        await client.shutdown()
        return None
    try:
        return start.result()
    except _TokenizerError as error:
        print(f"tessera serve: error: {error}", file=sys.stderr, flush=True)
        return None
    except Exception as error:
        logger.error("the engine failed to start: %s", error)
        return None


def _close_starting_cores() -> None:
    # The handshake blocks a thread until the core is ready; ending the core process
    # makes that thread return at once.
    from engine_core import client

    client.close_live_cores()


def _exit_now() -> None:
    logger.warning("second signal: exiting now")
    from engine_core import client

    client.close_live_cores()
    os._exit(0)


if __name__ == "__main__":
    main()
