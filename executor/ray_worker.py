"""The Ray actor of the `ray` executor: one per rank, wrapping one worker.

What crosses into and out of the actor is msgspec-encoded bytes (the EngineConfig,
each StepInput, each StepOutput and RPC result), the wire format of the mp
executor; Ray only carries the bytes. The actor has a second concurrency group,
"watch", whose one call (`wait_forever`) never returns: the executor waits on it to
learn at once when the actor's process dies.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import msgspec
import ray

from executor.config import EngineConfig
from executor.messages import StepInput, WorkerRpc
from executor.worker_proc import run_rpc, run_step

logger = logging.getLogger(__name__)


class RayWorker:
    def __init__(self, config_data: bytes, log_level: int) -> None:
        self.config = EngineConfig.decode(config_data)
        self.log_level = log_level
        self.rank = -1
        self.worker: Any = None
        self._enc = msgspec.msgpack.Encoder()

    def placement(self) -> tuple[str, str, list[str]]:
        """(node id, node IP, the GPU ids Ray gave this actor)."""
        node_id = ray.get_runtime_context().get_node_id()
        return node_id, ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        """A free TCP port on this actor's node (rank 0 hosts torch.distributed's store)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def start(self, rank: int, local_rank: int, visible_gpus: str | None, dist_init: str) -> int:
        """Join the process group, load the model; returns how many KV blocks fit."""
        from executor.worker import make_worker

        self.rank = rank
        logging.basicConfig(
            level=self.log_level, format=f"%(asctime)s worker{rank} %(levelname)s %(message)s"
        )
        if visible_gpus is not None:
            # Every rank of a node sees all of that node's engine GPUs and picks its own
            # by local rank (Ray shows an actor only its own); set before CUDA starts.
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
        self.worker = make_worker(self.config, rank, local_rank, dist_init)
        self.worker.load_model()
        return self.worker.determine_num_blocks()

    def execute(self, data: bytes) -> bytes | None:
        """Run one step; the driver rank returns the StepOutput, others only an error."""
        out = run_step(self.worker, msgspec.msgpack.decode(data, type=StepInput))
        if self.worker.answers_steps or out.error is not None:
            return self._enc.encode(out)
        return None

    def rpc(self, data: bytes) -> bytes:
        call = msgspec.msgpack.decode(data, type=WorkerRpc)
        return self._enc.encode(run_rpc(self.worker, self.rank, call))

    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group="watch")
    def wait_forever(self) -> None:
        threading.Event().wait()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
