"""A worker: one device, its model, its KV cache and its model runner."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from executor.config import ArgumentError, EngineConfig, ParallelConfig
from executor.messages import StepInput, StepOutput
from executor.model_runner import Launched, ModelRunner
from executor.profiler import WorkerProfiler

if TYPE_CHECKING:
    from executor.profiling import MemorySnapshot

logger = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        rank: int = 0,
        local_rank: int = 0,
        dist_init_method: str | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.local_rank = local_rank
        self.dist_init_method = dist_init_method
        self.device = self._pick_device()
        self.runner: ModelRunner | None = None
        self._profiler: WorkerProfiler | None = None

    def _pick_device(self) -> torch.device:
        if self.config.device.device == "cuda":
            index = self.config.parallel.first_device + self.local_rank
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
            self._memory_at_start = self._check_memory_share(device)
            return device
        _share_cpu_threads(self.config)
        return torch.device("cpu")

    def load_model(self) -> None:
        """Join the process group, then load this rank's shard of the weights in its
        turn (--max-parallel-loading-workers bounds how many local ranks load at once)."""
        from executor.distributed import in_loading_waves, init_distributed

        init_distributed(self.config, self.rank, self.dist_init_method)
        # Same seed on every rank: all ranks sample the same tokens in lockstep.
        torch.manual_seed(self.config.model.seed)
        par = self.config.parallel
        in_loading_waves(
            self.load_weights, self.local_rank, par.max_parallel_loading_workers, par.world_size
        )

    def load_weights(self) -> None:
        """Build the model and fill this rank's shard of its weights, tensor by tensor."""
        from executor.loader import load_model

        start = time.monotonic()
        model = load_model(self.config, self.device)
        dp_rank = self.config.parallel.data_parallel_rank
        if dp_rank:
            # After the (dummy) weights, which every engine core must draw alike: the
            # unseeded sampling of each data-parallel core gets its own random stream.
            torch.manual_seed(self.config.model.seed + dp_rank)
        self.runner = ModelRunner(self.config, model, self.device)
        logger.info("rank %d loaded its weights in %.2f s", self.rank, time.monotonic() - start)

    def _cache_shape(self) -> tuple[int, int, int]:
        from executor.models.registry import kv_cache_shape_info

        return kv_cache_shape_info(
            self.config.model.hf_config, self.config.parallel.tensor_parallel_size
        )

    def bytes_per_block(self) -> int:
        assert self.runner is not None
        _, kv_heads, head_dim = self._cache_shape()
        layers = self.runner.model.end_layer - self.runner.model.start_layer  # this stage's
        elem = torch.empty((), dtype=self.runner.kv_cache_dtype()).element_size()
        return 2 * layers * self.config.cache.block_size * kv_heads * head_dim * elem

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit: the override, else the memory rule of the device."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if self.device.type == "cpu":
            # CPU rule: TESSERA_CPU_KVCACHE_SPACE GiB (default 4) of KV cache
            return int(cache.cpu_kv_cache_space_gib * (1 << 30)) // self.bytes_per_block()
        return self._profile_cuda_blocks()

    def _check_memory_share(self, device: torch.device) -> MemorySnapshot:
        """The device's memory now, before this worker holds any; with the KV cache to
        be sized by profiling, first a check that this instance's share is free."""
        from executor.profiling import check_share_is_free, memory_snapshot

        snapshot = memory_snapshot(device)
        if self.config.cache.num_gpu_blocks_override is None:
            check_share_is_free(self.config.cache.gpu_memory_utilization, snapshot)
        return snapshot

    def _profile_cuda_blocks(self) -> int:
        from executor.profiling import GIB, available_kv_bytes

        assert self.runner is not None
        free_bytes = available_kv_bytes(self.runner, self.config, self._memory_at_start)
        blocks = free_bytes // self.bytes_per_block()
        logger.info("KV cache: %d blocks (%.2f GiB)", blocks, free_bytes / GIB)
        return int(blocks)

    def init_cache(self, num_blocks: int) -> None:
        assert self.runner is not None
        self.runner.allocate_kv_cache(num_blocks, *self._cache_shape())
        if self.device.type == "cuda":
            graphs = not self.config.model.enforce_eager
            if graphs and self.config.parallel.pipeline_parallel_size > 1:
                # a graph cannot hold the send/recv between stages
                logger.info("pipeline parallelism: decode runs eagerly, no CUDA graphs")
                graphs = False
            self.runner.warm_up(graphs)

    def execute(self, step: StepInput) -> StepOutput:
        assert self.runner is not None
        return self.runner.execute(step)

    def launch(self, step: StepInput, between: Callable[[], None] | None = None) -> Launched:
        """Queue the step on the device; `finish` gives its output (see model_runner.py).
        `between` runs after its forward is queued, before its sampling is."""
        assert self.runner is not None
        return self.runner.launch(step, between)

    def finish(self, launched: Launched) -> StepOutput:
        assert self.runner is not None
        return self.runner.finish(launched)

    @property
    def overlaps_steps(self) -> bool:
        """Whether the worker process may launch a step before it finishes the previous.

        Only on CUDA, where a launch returns at once: on the CPU the forward runs in the
        launch, so answering after the next launch would only delay each output by a
        step. Not with PP (the stages take the sampled tokens from the engine core), nor
        for a --worker-cls that overrides execute (it would be bypassed).
        """
        pp = self.config.parallel.pipeline_parallel_size
        return self.device.type == "cuda" and pp == 1 and type(self).execute is Worker.execute

    @property
    def answers_steps(self) -> bool:
        """Whether this rank's StepOutputs go to the engine core (the others' are empty)."""
        return self.rank == self.config.parallel.output_rank

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        from executor.distributed import destroy_distributed

        destroy_distributed()

    def profile_start(self) -> None:
        """Start the torch profiler in this worker (TESSERA_TORCH_PROFILER_DIR must be set)."""
        if self._profiler is None:
            self._profiler = WorkerProfiler(self.rank, self.device)
        self._profiler.start()

    def profile_stop(self) -> list[str]:
        """Stop it; the paths of the Chrome trace and the table it wrote."""
        if self._profiler is None:
            raise RuntimeError("the profiler is not running")
        return self._profiler.stop()

    def kv_cache_dtype_name(self) -> str:
        assert self.runner is not None
        return str(self.runner.kv_caches[0].dtype)

    def kv_scales(self) -> list[list[float]]:
        """(k_scale, v_scale) of each attention layer of this rank's model."""
        from executor.loader.kv_scales import attention_layers

        assert self.runner is not None
        return [[a.k_scale, a.v_scale] for a in attention_layers(self.runner.model)]

    def has_cuda_graphs(self) -> bool:
        assert self.runner is not None
        return self.runner.graphs is not None

    def allocator_stats(self) -> dict[str, int]:
        """The CUDA caching allocator's counters ({} off CUDA). A step whose tensors do
        not fit the cached blocks makes it free its cache and retry (num_alloc_retries);
        each cudaFree there waits for the device, which shows as host time in a step's
        launch (bench/throughput.py reports the counts of its run)."""
        if self.device.type != "cuda":
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}

    def get_timing(self) -> dict[str, float]:
        """Model-forward seconds and steps so far (what bench/overhead.py subtracts)."""
        assert self.runner is not None
        runner = self.runner
        return {
            "forward_s": runner.forward_time_s,
            "execute_s": runner.execute_time_s,
            "steps": runner.num_steps,
        }


ALLOCATOR_COUNTERS = (
    "num_alloc_retries",
    "num_ooms",
    "num_device_alloc",
    "num_device_free",
    "num_sync_all_streams",
)


def import_class(qualname: str, flag: str) -> type:
    """The class `module.Class` names; ArgumentError naming `flag` if there is none."""
    module, _, name = qualname.rpartition(".")
    if not module:
        raise ArgumentError(flag, qualname, "not a qualified class name (module.Class)")
    try:
        found = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ArgumentError(flag, qualname, f"cannot import {module}: {error}") from None
    except AttributeError:
        raise ArgumentError(flag, qualname, f"{module} has no {name}") from None
    if not isinstance(found, type):
        raise ArgumentError(flag, qualname, f"{name} is not a class")
    return found


def _share_cpu_threads(config: EngineConfig) -> None:
    """On the CPU the ranks of every engine core share this machine's cores: each worker
    takes its part, unless OMP_NUM_THREADS says otherwise. Oversubscribed, TP=4 on two
    cores ran about ten times slower than with one thread per rank."""
    par = config.parallel
    ranks = par.world_size * par.data_parallel_size
    if ranks == 1 or "OMP_NUM_THREADS" in os.environ:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cpus or 1) // ranks))


def worker_class(par: ParallelConfig) -> type[Worker]:
    """The worker class (--worker-cls), with --worker-extension-cls mixed in."""
    cls: type = Worker
    if par.worker_cls not in ("auto", ""):
        cls = import_class(par.worker_cls, "--worker-cls")
        if not issubclass(cls, Worker):
            raise ArgumentError(
                "--worker-cls", par.worker_cls, "must subclass executor.worker.Worker"
            )
    if par.worker_extension_cls:
        ext = import_class(par.worker_extension_cls, "--worker-extension-cls")
        _check_no_overrides(ext, cls, par.worker_extension_cls)
        cls = type(f"{ext.__name__}{cls.__name__}", (ext, cls), {})
    return cls


def _check_no_overrides(ext: type, cls: type, qualname: str) -> None:
    # An extension adds methods; one that replaced a worker method would change how the
    # engine drives the worker without saying so (that is what --worker-cls is for).
    for name in vars(ext):
        if not name.startswith("__") and hasattr(cls, name):
            raise ArgumentError(
                "--worker-extension-cls",
                qualname,
                f"its attribute {name!r} would replace the worker's own (use --worker-cls "
                "to subclass the worker)",
            )


def make_worker(
    config: EngineConfig, rank: int = 0, local_rank: int = 0, dist_init_method: str | None = None
) -> Worker:
    """A worker of the configured class."""
    return worker_class(config.parallel)(config, rank, local_rank, dist_init_method)
