"""ZMQ plumbing shared by every process: typed sockets, ipc paths, process hygiene.

`Sender[T]` / `Receiver[T]` wrap one ZMQ socket and one msgspec (msgpack) codec, so
each channel carries exactly one message type (a tagged union where several kinds
share a channel). No pickle anywhere.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import uuid
from typing import Any, Generic, TypeVar

import msgspec
import zmq

logger = logging.getLogger(__name__)

T = TypeVar("T")


IPC_ROOT_ENV = "TESSERA_IPC_ROOT"


C = TypeVar("C", bound=zmq.Context)


def make_context(cls: type[C]) -> C:
    """A ZMQ context for the side that may be garbage-collected (clients, executors):
    its sockets drop unsent messages on close. With the default (wait forever), a
    context collected while a peer is dead blocked the whole process in its __del__.
    Explicit shutdowns already close with linger 0; this covers the implicit ones."""
    ctx = cls()
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


class IpcDir:
    """A private folder for this engine's ipc socket files, removed on close.

    A process started by an engine client creates its folders inside the client's
    (TESSERA_IPC_ROOT), so that the client's cleanup removes them even when that
    process was killed.
    """

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="tessera-", dir=os.environ.get(IPC_ROOT_ENV))

    def address(self, name: str) -> str:
        return f"ipc://{os.path.join(self.path, name)}-{uuid.uuid4().hex[:8]}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Sender(Generic[T]):
    def __init__(self, ctx: zmq.Context, kind: int, addr: str, bind: bool) -> None:
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        (self.sock.bind if bind else self.sock.connect)(addr)
        self._enc = msgspec.msgpack.Encoder()

    def send(self, msg: T) -> None:
        self.sock.send(self._enc.encode(msg), copy=False)

    def send_bytes(self, data: bytes) -> None:
        self.sock.send(data, copy=False)

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)


class Receiver(Generic[T]):
    def __init__(self, ctx: zmq.Context, kind: int, addr: str, bind: bool, typ: Any) -> None:
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        (self.sock.bind if bind else self.sock.connect)(addr)
        self._dec = msgspec.msgpack.Decoder(typ)

    def recv(self, timeout_ms: int | None = None) -> T:
        """Next message; TimeoutError after timeout_ms; a malformed frame raises DecodeError."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            raise TimeoutError
        return self._dec.decode(self.sock.recv(copy=False).buffer)

    def decode(self, data: bytes | memoryview) -> T:
        return self._dec.decode(data)

    def close(self) -> None:
        self.sock.close(linger=0)


def spawn_process(target: Any, args: tuple, name: str) -> Any:
    """Start `target(*args)` in a fresh (spawned) interpreter and return the Process.

    Spawn normally re-imports the parent's __main__ in the child, so a user script
    without an `if __name__ == "__main__"` guard would run again there. Our targets
    are plain module functions that need nothing from __main__, so it is hidden while
    the child starts.
    """
    import multiprocessing
    import sys

    main = sys.modules["__main__"]
    saved: dict[str, Any] = {
        k: main.__dict__.pop(k) for k in ("__file__", "__spec__") if k in main.__dict__
    }
    main.__spec__ = None
    try:
        proc = multiprocessing.get_context("spawn").Process(target=target, args=args, name=name)
        proc.start()
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
    return proc


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans).

    A parent that died before the request (a server stopped while this process was
    still starting: spawn takes a second or more) sends no signal: the process is
    already someone else's child then, and exits at once.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        logger.debug("prctl unavailable; relying on the parent watchdog only")
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid
