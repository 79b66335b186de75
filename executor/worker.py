"""A worker: one device, its model, its KV cache and its model runner."""

from __future__ import annotations

import logging

import torch

from executor.config import EngineConfig
from executor.messages import StepInput, StepOutput
from executor.model_runner import ModelRunner

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

    def _pick_device(self) -> torch.device:
        if self.config.device.device == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def load_model(self) -> None:
        from executor.distributed import init_distributed
        from executor.loader import load_model

        init_distributed(self.config, self.rank, self.dist_init_method)
        # Same seed on every rank: all ranks sample the same tokens in lockstep.
        torch.manual_seed(self.config.model.seed)
        model = load_model(self.config, self.device)
        self.runner = ModelRunner(self.config, model, self.device)

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

    def _profile_cuda_blocks(self) -> int:
        from executor.profiling import available_kv_bytes

        assert self.runner is not None
        free_bytes = available_kv_bytes(self.runner, self.config)
        blocks = free_bytes // self.bytes_per_block()
        logger.info("KV cache: %d blocks (%.2f GiB)", blocks, free_bytes / (1 << 30))
        return int(blocks)

    def init_cache(self, num_blocks: int) -> None:
        assert self.runner is not None
        self.runner.allocate_kv_cache(num_blocks, *self._cache_shape())
        if self.device.type == "cuda" and not self.config.model.enforce_eager:
            if self.config.parallel.pipeline_parallel_size > 1:
                # a graph cannot hold the send/recv between stages
                logger.info("pipeline parallelism: decode runs eagerly, no CUDA graphs")
            else:
                self.runner.capture_cuda_graphs()

    def execute(self, step: StepInput) -> StepOutput:
        assert self.runner is not None
        return self.runner.execute(step)

    @property
    def answers_steps(self) -> bool:
        """Whether this rank's StepOutputs go to the engine core (the others' are empty)."""
        return self.rank == self.config.parallel.output_rank

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        from executor.distributed import destroy_distributed

        destroy_distributed()

    def kv_cache_dtype_name(self) -> str:
        assert self.runner is not None
        return str(self.runner.kv_caches[0].dtype)

    def get_timing(self) -> dict[str, float]:
        """Model-forward seconds and steps so far (what bench/overhead.py subtracts)."""
        assert self.runner is not None
        return {"forward_s": self.runner.forward_time_s, "steps": self.runner.num_steps}


def _import_class(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    if not module:
        raise ValueError(f"{qualname!r} is not a qualified class name (module.Class)")
    import importlib

    return getattr(importlib.import_module(module), name)


def make_worker(
    config: EngineConfig, rank: int = 0, local_rank: int = 0, dist_init_method: str | None = None
) -> Worker:
    """The worker class (--worker-cls), with --worker-extension-cls mixed in."""
    par = config.parallel
    cls: type = Worker if par.worker_cls in ("auto", "") else _import_class(par.worker_cls)
    if par.worker_extension_cls:
        ext = _import_class(par.worker_extension_cls)
        cls = type(f"{ext.__name__}{cls.__name__}", (ext, cls), {})
    return cls(config, rank, local_rank, dist_init_method)
