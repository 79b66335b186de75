"""Starting and stopping `tessera serve`: signals end every process, a busy port fails fast."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from tests.api_server.serve_helpers import (
    MODEL,
    alive,
    kill_all,
    launch,
    process_tree,
    stop,
    wait_gone,
    wait_ready,
)


@pytest.mark.slow
def test_sigterm_with_a_stream_in_flight_ends_every_process():
    server = launch([])
    tree = []
    try:
        wait_ready(server)
        tree = process_tree(server.proc.pid)
        assert len(tree) >= 2  # the server and the engine core (and its workers)
        received: list[bytes] = []
        body = {"prompt": "Count:", "max_tokens": 900, "ignore_eos": True, "stream": True}

        def stream() -> None:
            try:
                with requests.post(
                    server.api_url + "/completions", json=body, stream=True, timeout=120
                ) as response:
                    for line in response.iter_lines():
                        received.append(line)
            except requests.RequestException:
                pass  # cut off by the shutdown: expected

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert received, "the stream never started"
        code = stop(server, signal.SIGTERM)
        reader.join(60)
        assert code == 0, server.log_tail()
        assert not wait_gone(tree), "processes outlived the server"
        assert not reader.is_alive()
    finally:
        kill_all(alive(tree) + alive(process_tree(server.proc.pid)))


@pytest.mark.slow
def test_sigint_during_startup_exits_0_without_orphans():
    server = launch([])
    tree = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(process_tree(server.proc.pid)) < 2:
            time.sleep(0.1)  # until the engine core process exists
        tree = process_tree(server.proc.pid)
        assert len(tree) >= 2, server.log_tail()
        code = stop(server, signal.SIGINT)
        assert code == 0, server.log_tail()
        assert not wait_gone(tree)
    finally:
        kill_all(alive(tree))


def test_busy_port_fails_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "api_server.cli", "serve", MODEL]
        result = subprocess.run(
            [*cmd, "--max-model-len", "1024", "--port", str(port), "--host", "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Loading" not in result.stderr + result.stdout  # refused before the model loads


@pytest.mark.slow
def test_engine_death_gives_503_and_ends_streams():
    server = launch([])
    tree = []
    try:
        wait_ready(server)
        tree = process_tree(server.proc.pid)
        body = {"prompt": "Count:", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with requests.post(
            server.api_url + "/completions", json=body, stream=True, timeout=120
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith(b"data: ")
            engine_core(server).kill()
            rest = [line for line in lines if line]
        assert rest[-1] == b"data: [DONE]"
        error = json.loads(rest[-2][len(b"data: ") :])["error"]
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
        health = requests.get(server.url + "/health", timeout=30)
        assert health.status_code == 503
        reply = requests.post(server.api_url + "/completions", json={"prompt": "x"}, timeout=30)
        assert reply.status_code == 503
        assert reply.json()["error"]["type"] == "ServiceUnavailableError"
        assert stop(server, signal.SIGTERM) == 0, server.log_tail()
        assert not wait_gone(tree)
    finally:
        kill_all(alive(tree))


def engine_core(server) -> psutil.Process:
    """The engine-core process: the server's child started by multiprocessing's spawn."""
    for child in psutil.Process(server.proc.pid).children():
        if "spawn_main" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no engine-core process")


def test_a_broken_tokenizer_fails_the_start_without_orphans(tmp_path):
    # The tokenizer loads while the engine core starts: its failure must still end the
    # server with the error, and stop the engine processes already started.
    from tests.helpers.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", "llama")
    (model / "tokenizer.json").write_text("{not json")
    server = launch(["--max-model-len", "256"], model=str(model))
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        while server.proc.poll() is None and time.monotonic() < deadline:
            seen.update((p.pid, p) for p in process_tree(server.proc.pid))
            time.sleep(0.05)
        tree = list(seen.values())
        assert len(tree) >= 2, "the engine core never started: nothing to clean up"
        assert server.proc.returncode == 1, server.log_tail()
        assert "error: cannot load the tokenizer" in server.log_tail()
        assert not wait_gone(tree), "engine processes outlived the server"
    finally:
        kill_all(alive(list(seen.values())))
        if server.proc.poll() is None:
            server.proc.kill()
