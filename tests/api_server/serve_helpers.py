"""Start `tessera serve` as a subprocess on a free port, and stop it without orphans.

The `server` fixture (module scope: one server per test file) is exported by conftest.py.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
import requests

from tests.helpers.processes import alive, wait_gone  # noqa: F401 (the api tests import them here)

MODEL = "tessera/smollm2-135m-instruct"
API_KEY = "test-key"
# Two names: requests may use either; the first is the one reported.
SERVED_NAMES = ["smollm2", "tiny-chat"]
STARTUP_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(extra_args: list[str], env: dict[str, str] | None = None, model: str = MODEL) -> Server:
    """Start the server process; it is not waited for (see wait_ready)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="tessera-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "api_server.cli", "serve", model, "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--max-model-len", "1024"] + extra_args
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    log.close()
    atexit.register(_remove, log.name)  # tests read the log after stop(); it goes at exit
    return Server(proc, port, log.name)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def wait_ready(server: Server, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {server.proc.returncode}:\n{server.log_tail()}"
            )
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout} s:\n{server.log_tail()}")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(server: Server, sig: int = signal.SIGTERM) -> int:
    """Signal the server and wait for it; kill whatever is left of its tree after the
    timeout. Returns the exit code (negative: killed by that signal)."""
    tree = process_tree(server.proc.pid)
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
    try:
        code = server.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = -9
    finally:
        kill_all(tree)
    return code


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server for the module: API key, two served names, prompt token details."""
    srv = launch(
        [
            "--api-key",
            API_KEY,
            "--served-model-name",
            *SERVED_NAMES,
            "--enable-prompt-tokens-details",
            "--max-log-len",
            "100",
        ]
    )
    try:
        wait_ready(srv)
        yield srv
    finally:
        tree = process_tree(srv.proc.pid)
        code = stop(srv)
        left = wait_gone(tree)
        kill_all(left)
        assert code == 0, f"exit code {code} after SIGTERM:\n{srv.log_tail()}"
        assert not left, f"processes left after the server stopped: {left}"
        os.unlink(srv.log_path)
