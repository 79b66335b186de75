"""The `ray` executor: one Ray actor per rank, placed by a placement group.

The cluster: inside a Ray driver that already called `ray.init`, that connection is
used and left open. Otherwise the engine joins a running cluster
(`ray.init(address="auto")`: the RAY_ADDRESS variable, else the cluster that
`ray start` left on this machine) and disconnects at shutdown; when there is none
it starts a local cluster of its own, in a private temp folder, and stops it and
removes the folder at shutdown (see `ray_temp_dir`). On a multi-node cluster, tessera and the model path
must exist on every node.

Placement: one bundle per rank, {"GPU": 1} on CUDA and {"CPU": 1} on the CPU;
STRICT_PACK (one node) when one node has room for every rank, else PACK (as few
nodes as fit). Ranks go to the driver node's actors first, so that rank 0, which
hosts torch.distributed's TCP store, is on this node whenever any actor is.

Steps and RPCs go to every actor as msgspec bytes (see ray_worker.py); the driver
rank returns the StepOutput. A watcher thread learns at once when an actor dies. If
the engine dies without shutting down, Ray removes the actors and the placement
group of its job.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from executor.base import Executor
from executor.config import EngineConfig
from executor.ipc import IPC_ROOT_ENV
from executor.messages import StepInput, StepOutput, WorkerRpc, WorkerRpcResult
from executor.mp import WorkerDiedError
from executor.ray_worker import RayWorker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 5.0
MAX_TEMP_ROOT_CHARS = 28

# (node id, node IP, GPU ids) of one actor, as RayWorker.placement reports it
Place = tuple[str, str, list[str]]


class RayExecutor(Executor):
    on_worker_death: Callable[[str], None] | None = None

    def initialize(self) -> int:
        self.world_size = self.config.parallel.world_size
        self._dead: str | None = None
        self._closing = False
        self._call_ids = 0
        self._actors: list[Any] = []
        self._pg: PlacementGroup | None = None
        self._watcher: threading.Thread | None = None
        self._enc = msgspec.msgpack.Encoder()
        self._connect()
        try:
            return self._start()
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up -----------------------------------------------------------------
    def _connect(self) -> None:
        """Use, join or start a Ray cluster (see the module docstring)."""
        self._ray_init_here = False
        self._ray_temp_dir: str | None = None
        if ray.is_initialized():
            return
        try:
            ray.init(address="auto")
            self._ray_init_here = True
            return
        except ConnectionError:
            logger.info("no running Ray cluster found: starting a local one")
        temp_dir = ray_temp_dir()
        try:
            ray.init(num_cpus=self._local_cpus(), include_dashboard=False, _temp_dir=temp_dir)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        self._ray_init_here = True
        self._ray_temp_dir = temp_dir

    def _local_cpus(self) -> int | None:
        # On the CPU each rank takes a {"CPU": 1} bundle: a small machine still runs TP.
        if self.config.device.device == "cuda":
            return None
        return max(os.cpu_count() or 1, self.world_size)

    def _start(self) -> int:
        resource = "GPU" if self.config.device.device == "cuda" else "CPU"
        self._pg = make_placement_group(self.world_size, resource)
        actors = self._create_actors(self._pg)
        places = self._gather([a.placement.remote() for a in actors], "report its node")
        order = rank_order(places, ray.get_runtime_context().get_node_id())
        self._actors = [actors[i] for i in order]
        places = [places[i] for i in order]
        dist_init = self._dist_init_address(places[0][1])
        refs = [
            actor.start.remote(rank, local_rank, visible, dist_init)
            for rank, (actor, (local_rank, visible)) in enumerate(
                zip(self._actors, local_placement(places, resource == "GPU"), strict=True)
            )
        ]
        num_blocks = min(self._gather(refs, "load the model"))
        self._start_watcher()
        self.collective_rpc("init_cache", (num_blocks,))
        return num_blocks

    def _create_actors(self, pg: PlacementGroup) -> list[Any]:
        # (Ray takes concurrency groups here only, and its type stubs omit them)
        remote_cls = ray.remote(concurrency_groups={"watch": 1})(RayWorker)  # type: ignore[call-overload]
        data = self.config.encode()
        level = logging.getLogger().getEffectiveLevel()
        return [
            remote_cls.options(**actor_options(self.config, pg, bundle)).remote(data, level)
            for bundle in range(self.world_size)
        ]

    def _dist_init_address(self, rank0_ip: str) -> str:
        (port,) = self._gather([self._actors[0].free_port.remote()], "find a free port")
        host = f"[{rank0_ip}]" if ":" in rank0_ip else rank0_ip  # IPv6
        return f"tcp://{host}:{port}"

    # ---- results and liveness -----------------------------------------------------
    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every rank's result in rank order; raises as soon as one rank fails or dies."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rank = rank_of[ready[0]]
            try:
                results[rank] = ray.get(ready[0])
            except RayActorError as error:
                raise WorkerDiedError(self._record_death(rank, error)) from None
            except RayTaskError as error:
                raise RuntimeError(f"rank {rank} failed to {what}:\n{error}") from None
        return results

    def _record_death(self, rank: int, error: BaseException) -> str:
        if self._dead is None:
            self._dead = f"the Ray actor of rank {rank} died: {' '.join(str(error).split())}"
        return self._dead

    def _start_watcher(self) -> None:
        refs = [actor.wait_forever.remote() for actor in self._actors]
        self._watcher = threading.Thread(
            target=self._watch, args=(refs,), daemon=True, name="ray-actor-monitor"
        )
        self._watcher.start()

    def _watch(self, refs: list[Any]) -> None:
        # wait_forever never returns: a ready ref means that actor is gone.
        ready, _ = ray.wait(refs, num_returns=1)
        if self._closing:
            return
        try:
            ray.get(ready[0])
        except Exception as error:
            reason = self._record_death(refs.index(ready[0]), error)
            logger.error(reason)
            if self.on_worker_death is not None:
                self.on_worker_death(reason)

    # ---- the interface ------------------------------------------------------------
    def execute(self, step: StepInput) -> StepOutput:
        data = self._enc.encode(step)
        answers = self._gather([a.execute.remote(data) for a in self._actors], "run a step")
        outputs = [msgspec.msgpack.decode(raw, type=StepOutput) for raw in answers if raw]
        failed = [out for out in outputs if out.error is not None]
        return failed[0] if failed else outputs[0]

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self._call_ids += 1
        data = self._enc.encode(WorkerRpc(self._call_ids, method, list(args)))
        answers = self._gather([a.rpc.remote(data) for a in self._actors], f"run {method}")
        results = [msgspec.msgpack.decode(raw, type=WorkerRpcResult) for raw in answers]
        errors = [f"rank {r.rank}: {r.error}" for r in results if r.error]
        if errors:
            raise RuntimeError(f"collective_rpc({method}) failed: " + "; ".join(errors))
        return [r.result for r in results]

    def check_health(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        refs = [actor.ping.remote() for actor in self._actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=HEALTH_TIMEOUT_S)
        if pending:
            ranks = [refs.index(ref) for ref in pending]
            raise WorkerDiedError(
                f"Ray actors of ranks {ranks} did not answer within {HEALTH_TIMEOUT_S:.0f} s"
            )
        self._gather(refs, "answer a health check")

    def shutdown(self) -> None:
        self._closing = True
        if not hasattr(self, "_actors"):
            return  # never initialized
        self._stop_actors()
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if self._watcher is not None:
            self._watcher.join(timeout=SHUTDOWN_TIMEOUT_S)
            self._watcher = None
        if self._ray_init_here:
            ray.shutdown()
            self._ray_init_here = False
        if self._ray_temp_dir is not None:
            shutil.rmtree(self._ray_temp_dir, ignore_errors=True)
            self._ray_temp_dir = None

    def _stop_actors(self) -> None:
        # A clean exit from the process group first, then the actors go for sure.
        refs = [actor.shutdown.remote() for actor in self._actors]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


def ray_temp_dir() -> str:
    """A new folder for a local cluster. Inside the engine client's ipc folder when
    there is one, so that the client's cleanup removes it even if this process is
    killed (Ray stops the cluster itself then: its processes die with their parent).
    Ray's socket paths reach about 66 characters below the folder, and AF_UNIX paths
    stop at 107: a long root is not used."""
    root = os.environ.get(IPC_ROOT_ENV)
    if root is not None and len(root) <= MAX_TEMP_ROOT_CHARS:
        return tempfile.mkdtemp(prefix="ray-", dir=root)
    return tempfile.mkdtemp(prefix="tessera-ray-")


def make_placement_group(world: int, resource: str) -> PlacementGroup:
    """One {resource: 1} bundle per rank, on one node when one node has room."""
    total = ray.cluster_resources().get(resource, 0)
    if total < world:
        raise RuntimeError(
            f"the Ray cluster has {total:g} {resource} in all, fewer than the {world} ranks "
            "of TP x PP"
        )
    per_node = [node["Resources"].get(resource, 0) for node in ray.nodes() if node["Alive"]]
    strategy = "STRICT_PACK" if max(per_node, default=0) >= world else "PACK"
    pg = placement_group([{resource: 1} for _ in range(world)], strategy=strategy)
    if not pg.wait(PLACEMENT_TIMEOUT_S):
        remove_placement_group(pg)
        raise TimeoutError(
            f"the Ray cluster found no room for {world} bundles of {{{resource!r}: 1}} "
            f"({strategy}) within {PLACEMENT_TIMEOUT_S:.0f} s: other jobs hold them"
        )
    return pg


def actor_options(config: EngineConfig, pg: PlacementGroup, bundle: int) -> dict[str, Any]:
    """Where actor `bundle` runs and what it holds; nsight profiling when asked."""
    cuda = config.device.device == "cuda"
    options: dict[str, Any] = {
        "num_cpus": 0 if cuda else 1,
        "num_gpus": 1 if cuda else 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle
        ),
    }
    if config.parallel.ray_workers_use_nsight:
        options["runtime_env"] = {"nsight": "default"}  # each actor runs under `nsys profile`
    return options


def _gpu_key(gpu: str) -> tuple[int, str]:
    return len(gpu), gpu  # numeric ids in numeric order ("2" before "10")


def rank_order(places: list[Place], driver_node: str) -> list[int]:
    """Actor indexes in rank order: the driver node's first, then by node and GPU."""

    def key(i: int) -> tuple[Any, ...]:
        node, ip, gpus = places[i]
        return node != driver_node, ip, node, [_gpu_key(g) for g in gpus], i

    return sorted(range(len(places)), key=key)


def local_placement(places: list[Place], cuda: bool) -> list[tuple[int, str | None]]:
    """Per rank: its local rank on its node and, on CUDA, the node's engine GPUs
    (CUDA_VISIBLE_DEVICES for every rank there; the local rank indexes it)."""
    ranks_of: dict[str, list[int]] = {}
    for rank, (node, _, _) in enumerate(places):
        ranks_of.setdefault(node, []).append(rank)
    result: list[tuple[int, str | None]] = []
    for rank, (node, _, _) in enumerate(places):
        peers = ranks_of[node]
        visible = ",".join(places[peer][2][0] for peer in peers) if cuda else None
        result.append((peers.index(rank), visible))
    return result
