"""Time to ready of `tessera serve`: from launch to the first 200 from /health (W5).

    python bench/startup.py [--port 8765] [--timeout 600] [--output-json F] -- SERVE ARGS
    python bench/startup.py --wait-for PID [--port 8765] [--timeout 600]

The first form launches `python -m api_server.cli serve SERVE ARGS --port PORT`, prints
the seconds to ready as JSON, and stops the server (SIGTERM, then SIGKILL). The second
only waits for the server of process PID (started by the caller) to answer 200: exit 0,
or 1 when it died or the timeout passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def launch(serve_args: list[str], port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "api_server.cli", "serve", *serve_args, "--port", str(port)]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def is_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_ready(port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll /health every 50 ms until 200; False when `alive()` turns False or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_ready(port):
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    proc.terminate()  # the server stops its engine core and workers on SIGTERM
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()  # its workers die with it (die-with-parent)
        proc.wait()


def time_to_ready(serve_args: list[str], port: int, timeout: float, log_path: str) -> float:
    """Seconds from launch to the first 200 from /health; raises when it never comes."""
    t0 = time.perf_counter()
    proc = launch(serve_args, port, log_path)
    try:
        if not wait_ready(port, timeout, lambda: proc.poll() is None):
            with open(log_path) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"server not ready (exit code {proc.poll()}):\n{tail}")
        return time.perf_counter() - t0
    finally:
        stop(proc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--wait-for", type=int, default=None, metavar="PID")
    parser.add_argument("--log", default=os.path.join(os.environ.get("OUT", "/tmp"), "server.log"))
    parser.add_argument("--output-json", default=None)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    # a SIGTERM (from `timeout`, say) unwinds through time_to_ready's finally: the server stops
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.wait_for is not None:
        sys.exit(0 if wait_ready(args.port, args.timeout, lambda: _pid_alive(args.wait_for)) else 1)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    seconds = time_to_ready(serve_args, args.port, args.timeout, args.log)
    result = {"serve_args": serve_args, "seconds_to_ready": round(seconds, 2)}
    print(json.dumps(result), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
