"""The frozen engine configuration every process receives as one message.

These Structs are plain data. `engine_core.config.resolve_config` builds them from
the parsed engine arguments (resolving every "auto"); the engine core encodes the
result once and sends the bytes to each worker. They live in `executor` (the lower
package) so that workers can decode them without importing the engine core.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ArgumentError(ValueError):
    """An engine argument that the executor cannot carry out: `--flag=value: reason`.

    Raised where only the executor can tell (a worker class, the launcher's ranks);
    `engine_core.config` turns it into its ConfigError.
    """

    def __init__(self, flag: str, value: Any, reason: str) -> None:
        self.flag = flag
        self.value = value
        self.reason = reason
        super().__init__(f"{flag}={value}: {reason}")


class _Frozen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str  # the name given by the user (or the embedded alias)
    model_path: str  # resolved local folder or .gguf file
    gguf_file: str | None = None  # the .gguf file when loading from GGUF
    tokenizer: str | None = None  # resolved tokenizer folder/file; None with skip_tokenizer_init
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    code_revision: str | None = None
    dtype: str = "float32"  # resolved: float32 | float16 | bfloat16
    seed: int = 0
    max_model_len: int = 2048
    architecture: str = "LlamaForCausalLM"
    task: str = "generate"
    hf_config: dict[str, Any] = msgspec.field(default_factory=dict)  # with overrides applied
    generation_config: dict[str, Any] = msgspec.field(default_factory=dict)
    served_model_names: list[str] = msgspec.field(default_factory=list)
    max_logprobs: int = 20
    disable_sliding_window: bool = False
    disable_cascade_attn: bool = False
    enforce_eager: bool = False
    max_seq_len_to_capture: int = 8192
    quantization: str | None = None
    model_impl: str = "auto"

    @property
    def served_name(self) -> str:
        return self.served_model_names[0] if self.served_model_names else self.model


class CacheConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    block_size: int = 16
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "builtin"
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_offload_gb: float = 0.0
    cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    enable_sleep_mode: bool = False
    # On the CPU the KV cache takes this many GiB (TESSERA_CPU_KVCACHE_SPACE, default 4).
    cpu_kv_cache_space_gib: float = 4.0


class ParallelConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    # Which engine core (data-parallel rank) this config was sent to: its workers use
    # the devices [rank * world_size, (rank + 1) * world_size).
    data_parallel_rank: int = 0
    distributed_executor_backend: str = "uni"
    enable_expert_parallel: bool = False
    max_parallel_loading_workers: int | None = None
    disable_custom_all_reduce: bool = False
    worker_cls: str = "auto"
    worker_extension_cls: str = ""
    ray_workers_use_nsight: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def first_device(self) -> int:
        """The device index of this engine core's rank-0 worker."""
        return self.data_parallel_rank * self.world_size

    @property
    def output_rank(self) -> int:
        """The rank that answers steps: the first rank of the last pipeline stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


DEFAULT_ADMISSION_HORIZON = 256


class SchedulerConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0
    scheduler_delay_factor: float = 0.0
    policy: str = "fcfs"
    preemption_mode: str = "recompute"
    num_scheduler_steps: int = 1
    num_lookahead_slots: int = 0
    scheduler_cls: str = ""
    # schedule step N+1 while step N runs (off: --disable-async-output-proc)
    async_scheduling: bool = True
    # tokens of growth kept free per running request when admitting a prompt
    # (engine_core.scheduler.headroom; TESSERA_ADMISSION_HORIZON)
    admission_horizon: int = DEFAULT_ADMISSION_HORIZON


class DeviceConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device: str = "cpu"  # resolved: cpu | cuda


class LoadConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    load_format: str = "auto"
    download_dir: str | None = None
    use_tqdm_on_load: bool = True
    ignore_patterns: list[str] = msgspec.field(default_factory=lambda: ["original/**/*"])
    model_loader_extra_config: dict[str, Any] = msgspec.field(default_factory=dict)


class LoRAConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16


class SpeculativeConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    config: dict[str, Any] | None = None


class ObservabilityConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    disable_log_stats: bool = False
    disable_log_requests: bool = False  # the API server logs no requests
    otlp_traces_endpoint: str | None = None
    collect_detailed_traces: str | None = None


class CompilationConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: int = 0
    cudagraph_capture_sizes: list[int] | None = None


class EngineConfig(_Frozen, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    parallel: ParallelConfig = ParallelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    device: DeviceConfig = DeviceConfig()
    load: LoadConfig = LoadConfig()
    lora: LoRAConfig = LoRAConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    compilation: CompilationConfig = CompilationConfig()

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def decode(data: bytes) -> EngineConfig:
        return msgspec.msgpack.decode(data, type=EngineConfig)
