"""ZMQ plumbing shared by every process: typed sockets, ipc paths, process hygiene.

`Sender[T]` / `Receiver[T]` wrap one ZMQ socket and one msgspec (msgpack) codec, so
each channel carries exactly one message type (a tagged union where several kinds
share a channel). No pickle anywhere.
"""

from __future__ import annotations

import ctypes
import logging
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


class IpcDir:
    """A private folder for this engine's ipc socket files, removed on close."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="tessera-")

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


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        logger.debug("prctl unavailable; relying on the parent watchdog only")


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid
