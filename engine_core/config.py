"""Resolve parsed engine arguments into the one frozen `EngineConfig`.

`resolve_config` is the only place where an "auto" becomes a value. It runs once,
in the process the user starts; the result is encoded once and sent to every
process that needs it (the Structs live in `executor.config`).

The rules, in the order they are applied:

* Every argument is first checked against `RULES`, one entry per engine argument:
  its type, its range, and whether this build carries out the value given. A
  value this build does not carry out fails with one line,
  `--arg-name=value: reason` (`ConfigError`), before any file is read. The
  status table of the README (`render_status_table`) is generated from `RULES`.
* Model: a local HF folder (with config.json), a .gguf file, the alias
  `tessera/smollm2-135m-instruct` (see `engine_core.models_alias`), a folder
  under --download-dir, or a model already in the local Hugging Face cache.
  Nothing is downloaded.
* dtype auto: float16 for float32/float16 checkpoints and bfloat16 for bfloat16
  ones on CUDA; float32 on the CPU, where half precision is slow and imprecise.
* max_model_len: the model's max_position_embeddings (or n_positions, ...),
  times the RoPE factor for linear/dynamic/yarn scaling, capped at the sliding
  window with --disable-sliding-window.
* Scheduler (`default_budgets`): on CUDA vLLM's defaults, which depend on the GPU
  and the entry point: a GPU of at least 70 GiB that is not an A100 (H100, H200)
  takes 1024 sequences and 16384 tokens a step offline (the LLM class), 8192
  behind the server; a smaller one 256 sequences and 8192 / 2048 tokens. On the
  CPU 128 sequences (fewer, larger steps are no faster there) and 8192 tokens.
  Without chunked prefill the token budget is at least max_model_len.
* CPU KV cache: TESSERA_CPU_KVCACHE_SPACE GiB (default 4); the number of blocks
  is that space divided by the bytes of one block (all layers, K and V).
* Executor backend (auto): mp while TP x PP fits this machine's GPUs (on the CPU
  there is no such limit), else ray when it is installed (a multi-node cluster),
  else an error. --ray-workers-use-nsight needs the ray executor and nsys on PATH.
* seed: vLLM's default is None; it resolves to 0 so that dummy weights and
  sampling are reproducible run to run.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_core.args import (
    APPEND,
    BOOL_PAIR,
    FLAG,
    ONE_OR_MORE,
    OPTIONAL_BOOL,
    OPTIONAL_VALUE,
    EngineArgs,
    arg_spec,
    default_of,
    engine_arg_names,
    flag_of,
    parse_compilation_config,
    parse_float_list,
    parse_human_int,
    parse_json_dict,
    parse_mm_limits,
    parse_optional_str,
)
from engine_core.config_cache import folder_hf_config, generation_config, gguf_hf_config
from engine_core.cuda_devices import cuda_device_count, first_device_info
from engine_core.hf_overrides import CONTEXT_LENGTH_KEYS, ROPE_KEYS, override_problem
from engine_core.models_alias import AliasNotInstalledError, is_alias, resolve_alias
from engine_core.sampling_params import generation_defaults_problem, seed_fits
from executor.config import (
    DEFAULT_ADMISSION_HORIZON,
    ArgumentError,
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    EngineConfig,
    LoadConfig,
    LoRAConfig,
    ModelConfig,
    ObservabilityConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from executor.rope_config import rope_problem

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "OPTForCausalLM",
    "GPT2LMHeadModel",
)
# transformers leaves `architectures` empty for GGUF files; the model type names it.
ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
NO_ROPE_ARCHITECTURES = ("OPTForCausalLM", "GPT2LMHeadModel")
DEFAULT_CONTEXT_LENGTH = 2048  # when the config names no length at all
CPU_KVCACHE_ENV = "TESSERA_CPU_KVCACHE_SPACE"
ADMISSION_HORIZON_ENV = "TESSERA_ADMISSION_HORIZON"
DEFAULT_CPU_KVCACHE_GIB = 4.0
DEFAULT_BLOCK_SIZE = 16
MAX_CUDA_BLOCK_SIZE = 128
DEFAULT_IGNORE_PATTERNS = ["original/**/*"]
# --scheduler-cls values that name the built-in scheduler: ours, and vLLM's defaults.
DEFAULT_SCHEDULER_CLASSES = (
    "engine_core.scheduler.Scheduler",
    "engine_core.scheduler.scheduler.Scheduler",
    "vllm.core.scheduler.Scheduler",
    "vllm.v1.core.sched.scheduler.Scheduler",
)


class ConfigError(ValueError):
    """An engine argument this build cannot carry out: `--arg-name=value: reason`."""

    def __init__(self, arg_name: str, value: Any, reason: str) -> None:
        # Field names become flags; flags and environment variables stay as given.
        if not arg_name.startswith("-") and not arg_name.isupper():
            arg_name = flag_of(arg_name)
        self.arg_name = arg_name
        self.value = value
        self.reason = reason
        super().__init__(f"{arg_name}={_show(value)}: {reason}")


def _show(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# ---------------------------------------------------------------------------
# The rules: what this build carries out, one entry per engine argument.

WORKS = "works"
REFUSED = "refused"


@dataclass(frozen=True)
class Rule:
    """What this build does with one argument.

    status: WORKS or REFUSED (any value but the default is refused).
    allowed / accepts: for a working argument, the values carried out (the default
    always is); any other value is refused with `reason`. `scope` words `accepts`
    for the status table. check: a range check, returning the problem or None.
    """

    status: str
    reason: str = ""
    allowed: tuple[Any, ...] | None = None
    accepts: Callable[[Any], bool] | None = None
    scope: str = ""
    check: Callable[[Any], str | None] | None = None

    def problem(self, value: Any, default: Any) -> str | None:
        """Why `value` cannot be carried out, or None when it can."""
        if value is None or value == default:
            return None
        if self.check is not None and (trouble := self.check(value)):
            return trouble
        if self.status == REFUSED:
            return self.reason
        if self.allowed is not None and value not in self.allowed:
            return f"{self.reason} (this build carries out: {_join(self.allowed)})"
        if self.accepts is not None and not self.accepts(value):
            return f"{self.reason} (this build carries out: {self.scope})"
        return None

    def describe(self) -> str:
        """The status cell of the README table."""
        if self.status == REFUSED:
            return f"refused: {self.reason}"
        scope = _join(self.allowed) if self.allowed is not None else self.scope
        if scope:
            return f"{self.status} for {scope}; other values refused: {self.reason}"
        return f"{self.status}{': ' + self.reason if self.reason else ''}"


def _join(values: tuple[Any, ...]) -> str:
    return ", ".join(str(value) for value in values)


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _positive_finite(value: Any) -> str | None:
    return None if 0 < value < math.inf else "must be a positive, finite number"


def _fits_64_bits(value: Any) -> str | None:
    return None if seed_fits(value) else "must fit in 64 bits"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be zero or more"


def _fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be above 0 and at most 1"


def _nsys_on_path(value: Any) -> str | None:
    if value and shutil.which("nsys") is None:
        return "needs nsys (NVIDIA Nsight Systems) on PATH, and it is not there"
    return None


def _names(value: Any) -> str | None:
    names = [value] if isinstance(value, str) else value
    return None if names and all(names) else "needs at least one non-empty name"


def _level(value: Any) -> dict[str, Any]:
    # Python callers may pass the level as an int, as the command line's -O3 does.
    return {"level": value} if isinstance(value, int) else value


COMPILATION_KEYS = ("level", "cudagraph_capture_sizes")


def _compilation_problem(value: Any) -> str | None:
    config = _level(value)
    unknown = sorted(set(config) - set(COMPILATION_KEYS))
    if unknown:
        return f"unknown key {unknown[0]!r} (this build reads: {', '.join(COMPILATION_KEYS)})"
    level = config.get("level", 0)
    if isinstance(level, bool) or not (isinstance(level, int) and 0 <= level <= 3):
        return "level must be 0-3"
    sizes = config.get("cudagraph_capture_sizes")
    if sizes is not None and not (
        isinstance(sizes, list) and all(isinstance(n, int) and n > 0 for n in sizes)
    ):
        return "cudagraph_capture_sizes must be a list of positive integers"
    return None


def _refused(reason: str, check: Callable[[Any], str | None] | None = None) -> Rule:
    return Rule(REFUSED, reason, check=check)


def _works(note: str = "", check: Callable[[Any], str | None] | None = None) -> Rule:
    return Rule(WORKS, note, check=check)


def _only(allowed: tuple[Any, ...], reason: str, **kwargs: Any) -> Rule:
    return Rule(kwargs.pop("status", WORKS), reason, allowed=allowed, **kwargs)


_HUB_ONLY = "this build loads local paths only; a revision applies to hub downloads"
_NO_MM = "multimodal inputs are not in this build"
_NO_LORA = "LoRA adapters are not in this build yet"
_NO_PROMPT_ADAPTERS = "prompt adapters are not in this build"
_NO_POOL = "there is no tokenizer pool (the API server process tokenizes)"
_NO_SPEC = "speculative decoding is not in this build yet"
_NO_TRACING = "OpenTelemetry tracing is not in this build"
_NO_REASONING = "reasoning parsers are not in this build"
_ROPE_NOTE = "refused for OPT and GPT-2, which have no rotary embeddings"

RULES: dict[str, Rule] = {
    # Model and tokenizer
    "model": _works(),
    "task": _only(("auto", "generate"), "this build serves text generation only"),
    "tokenizer": _works(),
    "hf_config_path": _works(),
    "skip_tokenizer_init": _works(),
    "revision": _refused(_HUB_ONLY),
    "code_revision": _refused(_HUB_ONLY),
    "tokenizer_revision": _refused(_HUB_ONLY),
    "tokenizer_mode": _only(
        ("auto", "slow"), "mistral_common and custom tokenizers are not in this build"
    ),
    "trust_remote_code": _works(
        "accepted; no remote code ever runs, every model is the engine's own implementation"
    ),
    "allowed_local_media_path": _refused(_NO_MM),
    "download_dir": _works("a folder the model is looked for in"),
    "load_format": _only(
        ("auto", "pt", "safetensors", "gguf", "dummy"),
        "the loaders read safetensors, PyTorch bin and GGUF files, or make dummy weights",
    ),
    "config_format": _only(("auto", "hf"), "only Hugging Face configs are read"),
    "dtype": _works(),
    "kv_cache_dtype": _works(
        "fp8 = fp8_e4m3; per-layer scales from the checkpoint, else 1.0, "
        "or computed with --calculate-kv-scales"
    ),
    "max_model_len": _works(check=_positive),
    "model_impl": _only(
        ("auto", "vllm"),
        "there is no Transformers fallback; every supported architecture has its own "
        "implementation",
    ),
    "generation_config": _works(),
    "override_generation_config": _works(),
    "hf_token": _refused("this build loads local paths only; there is no hub access"),
    "hf_overrides": _works(),
    "rope_scaling": _works(_ROPE_NOTE),
    "rope_theta": _works(_ROPE_NOTE, check=_positive_finite),
    "disable_sliding_window": _works(),
    "served_model_name": _works(check=_names),
    "qlora_adapter_name_or_path": _refused(_NO_LORA),
    # Parallelism and executor
    "distributed_executor_backend": _works(
        "default: mp while TP x PP fits the local GPUs, else ray when installed"
    ),
    "pipeline_parallel_size": _works(
        "contiguous runs of layers per stage, one worker process per rank (mp); up to PP "
        "micro-batches in flight; no CUDA graphs with PP > 1",
        check=_positive,
    ),
    "tensor_parallel_size": _works(
        "one worker process (mp), Ray actor (ray) or torchrun process (external_launcher) "
        "per rank; gloo on the CPU, NCCL on CUDA; attention heads that do not divide are "
        "padded with zero heads",
        check=_positive,
    ),
    "data_parallel_size": _works(
        "one engine-core process (with its own workers and devices) per rank; each request "
        "goes to the least-loaded core",
        check=_positive,
    ),
    "enable_expert_parallel": _refused(
        "expert parallelism splits the experts of MoE layers, and no MoE architecture is "
        "supported in this build yet"
    ),
    "max_parallel_loading_workers": _works(
        "local ranks load in waves of at most N (a barrier between waves); a rank reads "
        "one tensor (safetensors, GGUF) or one file (.bin) at a time and keeps only its shard",
        check=_positive,
    ),
    "ray_workers_use_nsight": _works(
        "each Ray actor runs under nsys profile; refused when nsys is not on PATH or the "
        "executor is not ray",
        check=_nsys_on_path,
    ),
    "worker_cls": _works("a subclass of executor.worker.Worker (module.Class)"),
    "worker_extension_cls": _works(
        "a class (module.Class) mixed into the worker; its methods are called through "
        "collective_rpc"
    ),
    "disable_custom_all_reduce": _works(
        "changes nothing, since there is no custom all-reduce: every all-reduce goes "
        "through torch.distributed (NCCL on CUDA, gloo on the CPU)"
    ),
    "device": _only(
        ("auto", "cpu", "cuda"), "this build runs on the CPU and on NVIDIA GPUs (CUDA)"
    ),
    # KV cache and memory
    "block_size": _works(),
    "enable_prefix_caching": _works(),
    "prefix_caching_hash_algo": _works(),
    "use_v2_block_manager": _works("deprecated, no effect (a warning is logged)"),
    "num_lookahead_slots": _refused(_NO_SPEC, check=_non_negative),
    "seed": _works(check=_fits_64_bits),
    "swap_space": _only(
        (0,),
        "no CPU swap space is used: preempted requests are recomputed (swap preemption "
        "is not in this build)",
        check=_non_negative,
    ),
    "cpu_offload_gb": _refused(
        "weight offloading to the CPU is not in this build yet", check=_non_negative
    ),
    "gpu_memory_utilization": _works(
        "on CUDA this instance's share of the device's memory (per instance: other "
        "processes do not shrink it, but it must be free at startup); the KV cache takes "
        "the share less the weights, the peak of a profiled step (a forward at the token "
        "budget, then the widest sampling) and this process's memory outside torch (as "
        "the driver counts it per process, so instances starting together do not count "
        "each other's); on the CPU the cache size comes from TESSERA_CPU_KVCACHE_SPACE",
        check=_fraction,
    ),
    "num_gpu_blocks_override": _works(check=_positive),
    "calculate_kv_scales": _works(
        "with an fp8 --kv-cache-dtype (refused otherwise): per layer, from the first step's "
        "keys and values, largest magnitude at half the FP8 range; CUDA graphs are "
        "captured after that step"
    ),
    "enable_sleep_mode": _refused("sleep mode is not in this build yet"),
    # Scheduler
    "max_num_batched_tokens": _works(check=_positive),
    "max_num_seqs": _works(check=_positive),
    "max_num_partial_prefills": _works(check=_positive),
    "max_long_partial_prefills": _works(check=_positive),
    "long_prefill_token_threshold": _works(check=_non_negative),
    "enable_chunked_prefill": _works(),
    "num_scheduler_steps": _only(
        (1,), "multi-step scheduling is not in this build", check=_positive
    ),
    "multi_step_stream_outputs": _refused(
        "it applies to multi-step scheduling, which is not in this build"
    ),
    "scheduler_delay_factor": _works(check=_non_negative),
    "preemption_mode": _only(("recompute",), "swap preemption is not in this build yet"),
    "scheduling_policy": _works(),
    "scheduler_cls": _only(
        DEFAULT_SCHEDULER_CLASSES,
        "custom scheduler classes are not supported; the built-in scheduler's paths are accepted",
    ),
    "max_logprobs": _works(check=_non_negative),
    "disable_async_output_proc": _works(
        "turns off async scheduling: the engine core then waits for each step's output "
        "before it schedules the next (otherwise, with the mp executor, step N+1 is "
        "scheduled and sent while step N runs)"
    ),
    "disable_cascade_attn": _works(
        "on CUDA, decode-only steps of at least 8 sequences whose contexts share at least "
        "256 cached tokens attend to those once per tile of sequences (cascade attention); "
        "this flag turns that off"
    ),
    "disable_chunked_mm_input": _refused(_NO_MM),
    # Execution and compilation
    "enforce_eager": _works(
        "no CUDA graphs: decode and small prompt steps run eagerly too (the CPU always runs eagerly)"
    ),
    "max_seq_len_to_capture": _works(
        "steps whose longest context is over it run eagerly, outside the CUDA graphs",
        check=_positive,
    ),
    "compilation_config": Rule(
        WORKS,
        "levels 1-3 torch.compile the model forward in pieces between attention layers "
        "(the three levels are the same here), under the CUDA graphs unless --enforce-eager; "
        "JSON keys: level, cudagraph_capture_sizes",
        check=_compilation_problem,
    ),
    "additional_config": _refused("this build has no platform-specific settings"),
    # Quantization
    "quantization": _only(("gguf",), "quantized weights are read from .gguf files only"),
    # Tokenizer pool, multimodal
    "tokenizer_pool_size": _refused(_NO_POOL, check=_non_negative),
    "tokenizer_pool_type": _refused(_NO_POOL),
    "tokenizer_pool_extra_config": _refused(_NO_POOL),
    "limit_mm_per_prompt": _refused(_NO_MM),
    "mm_processor_kwargs": _refused(_NO_MM),
    "disable_mm_preprocessor_cache": _refused(_NO_MM),
    # LoRA and prompt adapters
    "enable_lora": _refused(_NO_LORA),
    "enable_lora_bias": _refused(_NO_LORA),
    "max_loras": _refused(_NO_LORA, check=_positive),
    "max_lora_rank": _refused(_NO_LORA, check=_positive),
    "lora_extra_vocab_size": _refused(_NO_LORA, check=_non_negative),
    "lora_dtype": _refused(_NO_LORA),
    "long_lora_scaling_factors": _refused(_NO_LORA),
    "max_cpu_loras": _refused(_NO_LORA, check=_positive),
    "fully_sharded_loras": _refused(_NO_LORA),
    "enable_prompt_adapter": _refused(_NO_PROMPT_ADAPTERS),
    "max_prompt_adapters": _refused(_NO_PROMPT_ADAPTERS, check=_positive),
    "max_prompt_adapter_token": _refused(_NO_PROMPT_ADAPTERS, check=_non_negative),
    # Speculative decoding, structured output, logits
    "speculative_config": _refused(_NO_SPEC),
    "guided_decoding_backend": _refused("guided decoding is not in this build yet"),
    "logits_processor_pattern": _refused("custom logits processors are not supported"),
    "enable_reasoning": _refused(_NO_REASONING),
    "reasoning_parser": _refused(_NO_REASONING),
    # Observability and distributed KV
    "disable_log_stats": _works(),
    "disable_log_requests": _works(),
    "show_hidden_metrics_for_version": _refused("this build has no hidden (deprecated) metrics"),
    "otlp_traces_endpoint": _refused(_NO_TRACING),
    "collect_detailed_traces": _refused(_NO_TRACING),
    "use_tqdm_on_load": _works(),
    "kv_transfer_config": _refused("distributed KV transfer is not in this build"),
    "override_neuron_config": _refused("Neuron devices are not supported"),
    "override_pooler_config": _refused("pooling models are not in this build (generation only)"),
    "model_loader_extra_config": _refused("the loaders of this build take no extra settings"),
    "ignore_patterns": _works(),
}


def _check_rules_cover_arguments() -> None:
    # A new argument without a rule (or a stale rule) is a programming error:
    # fail at import, not when a user happens to set it.
    names = set(engine_arg_names())
    if names != set(RULES):
        raise RuntimeError(
            f"RULES and EngineArgs differ: missing {sorted(names - set(RULES))}, "
            f"extra {sorted(set(RULES) - names)}"
        )


_check_rules_cover_arguments()


def render_status_table() -> str:
    """The `| argument | status |` table of every engine argument, for the README."""
    lines = ["| argument | status |", "| --- | --- |"]
    for name in engine_arg_names():
        lines.append(f"| `{flag_of(name)}` | {RULES[name].describe()} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Argument checks: type (Python callers bypass argparse), range, refusal.

# The Python types a value of each command-line parser may have.
_PYTHON_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    parse_human_int: (int,),
    parse_json_dict: (dict,),
    parse_compilation_config: (dict, int),
    parse_mm_limits: (dict,),
    parse_float_list: (list,),
    parse_optional_str: (str,),
}


def _type_problem(name: str, value: Any) -> str | None:
    """Why `value` is not a value of argument `name` at all, or None."""
    spec = arg_spec(name)
    if value is None:
        return None if default_of(name) is None else "must be set (None is not a value here)"
    if spec.choices is not None:
        return None if value in spec.choices else f"not one of {_join(spec.choices)}"
    if spec.kind in (FLAG, BOOL_PAIR, OPTIONAL_BOOL):
        return None if isinstance(value, bool) else "must be true or false"
    if spec.kind == OPTIONAL_VALUE:
        return None if isinstance(value, str | bool) else "must be a string"
    if spec.kind in (ONE_OR_MORE, APPEND):
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        )
        return None if ok else "must be a list of strings"
    expected = _PYTHON_TYPES.get(spec.type, (object,))
    if isinstance(value, bool) or not isinstance(value, expected):
        return f"must be of type {' or '.join(kind.__name__ for kind in expected)}"
    return None


def check_arguments(args: EngineArgs) -> None:
    """Raise ConfigError for the first argument that this build cannot carry out."""
    for name in engine_arg_names():
        value = getattr(args, name)
        problem = _type_problem(name, value) or RULES[name].problem(value, default_of(name))
        if problem:
            raise ConfigError(name, value, problem)


# ---------------------------------------------------------------------------
# Finding the model, its tokenizer and its config on the local disk.


@dataclass(frozen=True)
class ModelFiles:
    """A model on disk: an HF folder (with config.json) or a .gguf file."""

    path: Path  # absolute folder or .gguf file
    is_gguf: bool

    @property
    def folder(self) -> Path:
        return self.path.parent if self.is_gguf else self.path


def find_local(name: str, flag: str, download_dir: str | None) -> Path:
    """The existing local path `name` stands for: an alias, a path, a folder under
    `download_dir`, or a snapshot in the Hugging Face cache. Never downloads."""
    if is_alias(name):
        try:
            return resolve_alias(name)
        except AliasNotInstalledError as error:
            raise ConfigError(flag, name, str(error)) from None
    candidates = [Path(name).expanduser()]
    if download_dir:
        candidates.append(Path(download_dir).expanduser() / name)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    cached = _hf_cache_snapshot(name, download_dir)
    if cached is not None:
        return cached
    tried = ", ".join(str(candidate.absolute()) for candidate in candidates)
    raise ConfigError(
        flag,
        name,
        f"not found locally (tried {tried} and the Hugging Face cache); this build never "
        "downloads: give a local model folder or .gguf file, or use the embedded model "
        "tessera/smollm2-135m-instruct",
    )


def _hf_cache_snapshot(name: str, download_dir: str | None) -> Path | None:
    """The folder of a model already in a local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for cache_dir in (download_dir, None):
        try:
            found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
        except Exception:  # an invalid repo id: not a hub name either
            return None
        if isinstance(found, str):
            return Path(found).parent.resolve()
    return None


def find_model(name: str, flag: str, download_dir: str | None) -> ModelFiles:
    """The model folder or .gguf file `name` stands for."""
    path = find_local(name, flag, download_dir)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(flag, name, f"{path} is a file but not a .gguf file")
        return ModelFiles(path, is_gguf=True)
    if not (path / "config.json").is_file():
        raise ConfigError(flag, name, f"the folder {path} has no config.json")
    return ModelFiles(path, is_gguf=False)


def load_hf_config(files: ModelFiles, flag: str, name: str) -> dict[str, Any]:
    """The model's Hugging Face config as a plain dict (a fresh copy)."""
    stamp = files.path.stat().st_mtime_ns
    try:
        raw = _read_hf_config(str(files.path), files.is_gguf, stamp)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ConfigError(flag, name, f"cannot read the model config: {first_line}") from None
    return copy.deepcopy(raw)


@functools.lru_cache(maxsize=8)
def _read_hf_config(path: str, is_gguf: bool, mtime_ns: int) -> dict[str, Any]:
    # Cached per file version: tests and the offline LLM may resolve the same model
    # many times in one process; and on disk, across processes (config_cache.py).
    if is_gguf:
        return gguf_hf_config(path)
    return folder_hf_config(path)


def _plain(value: Any) -> Any:
    """JSON-normalized: str keys, lists for tuples, so the config survives msgpack
    round trips unchanged (EngineConfig.decode(cfg.encode()) == cfg)."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------
# Model config resolution.


def apply_hf_overrides(
    hf_config: dict[str, Any],
    overrides: dict[str, Any] | None,
    rope_scaling: dict[str, Any] | None,
    rope_theta: float | None,
) -> dict[str, Any]:
    """The config with --hf-overrides merged in (nested dicts merge key by key) and
    --rope-scaling / --rope-theta written into `rope_parameters` (transformers' form:
    rope_type, rope_theta and the scaling keys in one dict)."""
    merged = copy.deepcopy(hf_config)
    rest = dict(_plain(overrides or {}))
    # vLLM's legacy spellings inside --hf-overrides mean the same as the flags.
    scaling = rope_scaling if rope_scaling is not None else rest.pop("rope_scaling", None)
    theta = rope_theta if rope_theta is not None else rest.pop("rope_theta", None)
    rest.pop("rope_scaling", None)
    rest.pop("rope_theta", None)
    _merge(merged, rest)
    if scaling is not None or theta is not None:
        rope = dict(merged.get("rope_parameters") or {})
        if scaling is not None:
            scaling = dict(scaling)
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            rope.update(_plain(scaling))
        if theta is not None:
            rope["rope_theta"] = float(theta)
        merged["rope_parameters"] = rope
    return merged


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def resolve_architecture(hf_config: dict[str, Any], name: str) -> str:
    """The model class name; refuses architectures this build has no model for."""
    architectures = hf_config.get("architectures") or []
    if architectures:
        architecture = architectures[0]
    else:
        model_type = hf_config.get("model_type", "")
        architecture = ARCHITECTURE_BY_MODEL_TYPE.get(model_type, f"model_type {model_type!r}")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            "--model",
            name,
            f"architecture {architecture} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    return architecture


def checkpoint_dtype(hf_config: dict[str, Any]) -> str | None:
    """The dtype the checkpoint was saved in, e.g. "bfloat16", if the config says."""
    value = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def resolve_dtype(requested: str, saved_dtype: str | None, device: str) -> str:
    """float32 | float16 | bfloat16 for --dtype on `device`."""
    named = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16"}
    named |= {"float": "float32", "float32": "float32"}
    if requested in named:
        return named[requested]
    if device == "cpu":
        return "float32"  # half precision on the CPU is slow and imprecise
    return "bfloat16" if saved_dtype == "bfloat16" else "float16"


def model_context_length(hf_config: dict[str, Any], disable_sliding_window: bool) -> int:
    """The longest context the model supports, from its config."""
    lengths = [
        hf_config[key]
        for key in CONTEXT_LENGTH_KEYS
        if isinstance(hf_config.get(key), int) and not isinstance(hf_config.get(key), bool)
    ]
    length = min(lengths) if lengths else DEFAULT_CONTEXT_LENGTH
    length = _scaled_by_rope(length, hf_config.get("rope_parameters") or {})
    window = sliding_window(hf_config)
    if disable_sliding_window and window is not None:
        length = min(length, window)
    return length


def _scaled_by_rope(length: int, rope: dict[str, Any]) -> int:
    # linear/dynamic/yarn stretch the trained positions by `factor`; llama3 and
    # longrope configs already state the stretched length.
    rope_type = rope.get("rope_type") or rope.get("type")
    factor = rope.get("factor")
    if rope_type not in ("linear", "dynamic", "yarn") or not isinstance(factor, int | float):
        return length
    if rope_type == "yarn":
        length = rope.get("original_max_position_embeddings") or length
    return int(length * factor)


def sliding_window(hf_config: dict[str, Any]) -> int | None:
    """The attention window, when the model uses one."""
    window = hf_config.get("sliding_window")
    if not isinstance(window, int) or hf_config.get("use_sliding_window") is False:
        return None
    return window


def resolve_max_model_len(requested: int | None, model_length: int) -> int:
    """--max-model-len, or the model's length; never above the model's length."""
    if requested is None:
        return model_length
    if requested > model_length:
        raise ConfigError(
            "--max-model-len",
            requested,
            f"larger than the model's maximum length {model_length} (from its config)",
        )
    return requested


def load_generation_config(
    setting: str, files: ModelFiles, override: dict[str, Any] | None
) -> dict[str, Any]:
    """The generation defaults (the non-default fields of generation_config.json),
    with --override-generation-config merged over them."""
    if setting == "vllm":
        base: dict[str, Any] = {}
    elif setting == "auto":
        # For a .gguf file, a generation_config.json next to it counts.
        base = _read_generation_config(files.folder, required=False)
    else:
        folder = Path(setting).expanduser()
        if not folder.is_dir():
            raise ConfigError("--generation-config", setting, "no such folder")
        base = _read_generation_config(folder, required=True)
    _check_generation_defaults("--generation-config", setting, base)
    merged = {**base, **_plain(override or {})}
    _check_generation_defaults("--override-generation-config", override, merged)
    return merged


def _check_generation_defaults(flag: str, value: Any, defaults: dict[str, Any]) -> None:
    # Checked once here: a bad default would otherwise fail every request.
    problem = generation_defaults_problem(defaults)
    if problem:
        raise ConfigError(flag, value, problem)


def _read_generation_config(folder: Path, required: bool) -> dict[str, Any]:
    if not (folder / "generation_config.json").is_file():
        if required:
            raise ConfigError(
                "--generation-config", str(folder), "no generation_config.json in that folder"
            )
        return {}
    try:
        return generation_config(folder)
    except (OSError, ValueError) as error:
        raise ConfigError(
            "--generation-config", str(folder), f"cannot read generation_config.json: {error}"
        ) from None


# ---------------------------------------------------------------------------
# Device, cache and scheduler resolution.


def resolve_device(requested: str) -> str:
    """cpu | cuda."""
    if requested == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    if requested == "cuda" and cuda_device_count() == 0:
        raise ConfigError("--device", requested, "no CUDA device is visible to torch")
    return requested


def cpu_kv_cache_space_gib() -> float:
    """GiB of KV cache on the CPU: TESSERA_CPU_KVCACHE_SPACE, default 4."""
    text = os.environ.get(CPU_KVCACHE_ENV, "").strip()
    if not text:
        return DEFAULT_CPU_KVCACHE_GIB
    try:
        space = float(text)
    except ValueError:
        space = math.nan
    if not (space > 0 and math.isfinite(space)):
        raise ConfigError(CPU_KVCACHE_ENV, text, "must be a positive number of GiB")
    return space


def resolve_block_size(requested: int | None, device: str) -> int:
    block_size = requested or DEFAULT_BLOCK_SIZE
    if device == "cuda" and block_size > MAX_CUDA_BLOCK_SIZE:
        raise ConfigError(
            "--block-size", block_size, f"CUDA supports blocks of at most {MAX_CUDA_BLOCK_SIZE}"
        )
    return block_size


def default_budgets(device: str, offline: bool) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) when neither is given. On CUDA, vLLM's
    table: a GPU of 70 GiB or more (not an A100) takes 16384 tokens offline and 8192
    behind the server, with 1024 sequences; a smaller one 8192 offline and 2048 served,
    with 256. The offline budget is larger because only throughput counts there."""
    if device != "cuda":
        return 8192, 128
    info = first_device_info()
    large = info is not None and info.total_memory >= 70 << 30 and "a100" not in info.name.lower()
    if large:
        return (16384 if offline else 8192), 1024
    return (8192 if offline else 2048), 256


def resolve_scheduler(
    args: EngineArgs, max_model_len: int, device: str, offline: bool = False
) -> SchedulerConfig:
    """Token and sequence budgets and chunked-prefill settings."""
    chunked = True if args.enable_chunked_prefill is None else args.enable_chunked_prefill
    tokens, seqs = default_budgets(device, offline)
    max_num_seqs = args.max_num_seqs or seqs
    max_tokens = args.max_num_batched_tokens
    if max_tokens is None:
        max_tokens = tokens if chunked else max(tokens, max_model_len)
    elif not chunked and max_tokens < max_model_len:
        raise ConfigError(
            "--max-num-batched-tokens",
            max_tokens,
            f"smaller than --max-model-len={max_model_len} while chunked prefill is off: a "
            "whole prompt must fit one step (raise it, lower --max-model-len, or enable "
            "--enable-chunked-prefill)",
        )
    if max_tokens < max_num_seqs:
        raise ConfigError(
            "--max-num-batched-tokens",
            max_tokens,
            f"must be at least --max-num-seqs={max_num_seqs} (one token per sequence per step)",
        )
    _check_partial_prefills(args, chunked, max_model_len)
    threshold = args.long_prefill_token_threshold
    if threshold == 0 and args.max_num_partial_prefills > 1:
        threshold = int(max_model_len * 0.04)
    return SchedulerConfig(
        max_num_batched_tokens=max_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        max_num_partial_prefills=args.max_num_partial_prefills,
        max_long_partial_prefills=args.max_long_partial_prefills,
        long_prefill_token_threshold=threshold,
        scheduler_delay_factor=float(args.scheduler_delay_factor),
        policy=args.scheduling_policy,
        preemption_mode=args.preemption_mode or "recompute",
        num_scheduler_steps=args.num_scheduler_steps,
        num_lookahead_slots=args.num_lookahead_slots,
        scheduler_cls=args.scheduler_cls,
        async_scheduling=not args.disable_async_output_proc,
        admission_horizon=admission_horizon(),
    )


def admission_horizon() -> int:
    """Tokens of growth kept free per running request when a prompt is admitted:
    TESSERA_ADMISSION_HORIZON, default 256 (0: admit while any block is free)."""
    text = os.environ.get(ADMISSION_HORIZON_ENV, "").strip()
    if not text:
        return DEFAULT_ADMISSION_HORIZON
    if not text.isdigit():
        raise ConfigError(
            ADMISSION_HORIZON_ENV, text, "must be a whole number of tokens, 0 or more"
        )
    return int(text)


def _check_partial_prefills(args: EngineArgs, chunked: bool, max_model_len: int) -> None:
    if args.max_num_partial_prefills > 1 and not chunked:
        raise ConfigError(
            "--max-num-partial-prefills", args.max_num_partial_prefills, "needs chunked prefill"
        )
    if args.max_long_partial_prefills > args.max_num_partial_prefills:
        raise ConfigError(
            "--max-long-partial-prefills",
            args.max_long_partial_prefills,
            f"must not exceed --max-num-partial-prefills={args.max_num_partial_prefills}",
        )
    if args.long_prefill_token_threshold > max_model_len:
        raise ConfigError(
            "--long-prefill-token-threshold",
            args.long_prefill_token_threshold,
            f"must not exceed the context length {max_model_len}",
        )


def resolve_compilation(value: Any) -> CompilationConfig:
    config = _level(value) if value is not None else {}
    return CompilationConfig(
        level=config.get("level", 0), cudagraph_capture_sizes=config.get("cudagraph_capture_sizes")
    )


def _check_compile_with_stages(args: EngineArgs) -> None:
    level = resolve_compilation(args.compilation_config).level
    if level > 0 and args.pipeline_parallel_size > 1:
        raise ConfigError(
            "compilation_config",
            level,
            "torch.compile of a pipeline stage (a forward that takes the previous stage's "
            "hidden states) is not verified yet; use -O 0 with --pipeline-parallel-size > 1",
        )


def _check_kv_scales(args: EngineArgs) -> None:
    if args.calculate_kv_scales and not args.kv_cache_dtype.startswith("fp8"):
        raise ConfigError(
            "--calculate-kv-scales",
            True,
            f"scales only apply to an fp8 KV cache (--kv-cache-dtype is {args.kv_cache_dtype})",
        )


def _check_formats(args: EngineArgs, files: ModelFiles) -> tuple[str, str | None]:
    """The load format and quantization, checked against the model's files."""
    load_format = args.load_format
    if files.is_gguf and load_format in ("pt", "safetensors"):
        raise ConfigError("--load-format", load_format, f"the model {files.path} is a .gguf file")
    if not files.is_gguf and load_format == "gguf":
        raise ConfigError("--load-format", load_format, "the model is not a .gguf file")
    if args.quantization == "gguf" and not files.is_gguf:
        raise ConfigError("--quantization", "gguf", "the model is not a .gguf file")
    if files.is_gguf:
        return ("dummy" if load_format == "dummy" else "gguf"), "gguf"
    return load_format, None


def _check_unquantized(hf_config: dict[str, Any], name: str) -> None:
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method:
        raise ConfigError(
            "--model",
            name,
            f"quantized checkpoints ({method}) are not supported; use a .gguf file or "
            "unquantized weights",
        )


def _as_list(value: str | list[str] | None, default: list[str]) -> list[str]:
    if value is None:
        return list(default)
    return [value] if isinstance(value, str) else list(value)


def _log_accepted_notes(args: EngineArgs) -> None:
    if args.use_v2_block_manager:
        logger.warning("--use-v2-block-manager is deprecated and has no effect")
    if args.trust_remote_code:
        logger.info(
            "--trust-remote-code accepted: no remote code runs, every model is the "
            "engine's own implementation"
        )


# ---------------------------------------------------------------------------
# The one entry point.


def _check_tp_split(hf: dict[str, Any], tp: int) -> None:
    """Refuse a model whose layers cannot split over `tp` ranks; log head padding."""
    from executor.layers.heads import head_layout  # here: executor.layers imports torch

    heads = hf.get("num_attention_heads") or hf.get("n_head")
    if heads:
        kv_heads = hf.get("num_key_value_heads") or heads
        try:
            layout = head_layout(int(heads), int(kv_heads), tp)
        except ValueError as e:
            raise ConfigError("tensor_parallel_size", tp, str(e)) from None
        if layout.padded:
            logger.info("attention heads: %s; the zero heads add no output", layout.describe())
    # The MLP is split evenly, unpadded: its width must divide.
    width = hf.get("intermediate_size") or hf.get("ffn_dim") or hf.get("n_inner")
    if width is None and hf.get("n_embd"):
        width = 4 * hf["n_embd"]  # GPT-2's default MLP width
    if width and width % tp:
        raise ConfigError(
            "tensor_parallel_size", tp, f"the model's MLP width {width} does not split evenly"
        )


def resolve_parallel(args: EngineArgs, model: ModelConfig, device: str) -> ParallelConfig:
    """The executor backend, and the checks that the model splits over the ranks."""
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    world = tp * pp
    backend = args.distributed_executor_backend or auto_backend(tp, world, device)
    if world > 1 and backend == "uni":
        wants = f"-tp {tp}" if pp == 1 else f"--pipeline-parallel-size {pp}"
        raise ConfigError(
            "distributed_executor_backend",
            backend,
            f"uni runs one worker; {wants} needs mp or ray",
        )
    if backend == "ray" and not ray_installed():
        raise ConfigError(
            "distributed_executor_backend",
            backend,
            "Ray is not installed: pip install 'tessera[ray]'",
        )
    if args.ray_workers_use_nsight and backend != "ray":
        raise ConfigError(
            "ray_workers_use_nsight", True, f"it profiles Ray actors; the executor is {backend}"
        )
    if backend == "external_launcher":
        _check_launcher(args)
    elif backend != "ray" and device == "cuda":  # torchrun and Ray ranks may span nodes
        _check_device_count(tp, args.pipeline_parallel_size, args.data_parallel_size)
    if tp > 1:
        _check_tp_split(model.hf_config, tp)
    hf = model.hf_config
    layers = hf.get("num_hidden_layers") or hf.get("n_layer") or 0
    if pp > layers:
        raise ConfigError(
            "pipeline_parallel_size", pp, f"the model has {layers} layers, fewer than the stages"
        )
    parallel = ParallelConfig(
        tensor_parallel_size=tp,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=backend,
        max_parallel_loading_workers=args.max_parallel_loading_workers,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        ray_workers_use_nsight=args.ray_workers_use_nsight,
        worker_cls=args.worker_cls or "auto",
        worker_extension_cls=args.worker_extension_cls,
    )
    _check_worker_class(parallel)
    return parallel


def local_device_count(device: str) -> int | None:
    """The GPUs of this machine; None on the CPU, which sets no limit on ranks."""
    if device != "cuda":
        return None
    return cuda_device_count()


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def auto_backend(tp: int, world: int, device: str) -> str:
    """mp while TP x PP fits this machine's devices, else ray (a multi-node cluster)."""
    local = local_device_count(device)
    if local is None or world <= local:
        return "mp"
    if ray_installed():
        return "ray"
    raise ConfigError(
        "tensor_parallel_size",
        tp,
        f"TP x PP = {world} ranks exceed the {local} local GPUs, and Ray (for a multi-node "
        "cluster) is not installed: pip install 'tessera[ray]'",
    )


def _check_launcher(args: EngineArgs) -> None:
    """torchrun's ranks are the engine's ranks; all must schedule alike."""
    from executor.external_launcher import check_world_size, launcher_ranks

    try:
        _, _, world = launcher_ranks()
        check_world_size(world, args.tensor_parallel_size, args.pipeline_parallel_size)
    except ArgumentError as error:
        raise ConfigError(error.flag, error.value, error.reason) from None
    if args.pipeline_parallel_size > 1:
        raise ConfigError(
            "pipeline_parallel_size",
            args.pipeline_parallel_size,
            "every external_launcher rank schedules from its own step outputs, and with "
            "pipeline stages only the last stage has them",
        )
    if args.scheduler_delay_factor > 0:
        raise ConfigError(
            "scheduler_delay_factor",
            args.scheduler_delay_factor,
            "it times prompts by each rank's own clock, so the ranks of external_launcher "
            "would schedule apart",
        )


def _check_worker_class(parallel: ParallelConfig) -> None:
    # Imported here too, so that a wrong name fails before any worker starts. (The
    # built-in worker needs no check: importing it would import torch, seconds of the
    # server's start.)
    if parallel.worker_cls == "auto" and not parallel.worker_extension_cls:
        return
    from executor.worker import worker_class

    try:
        worker_class(parallel)
    except ArgumentError as error:
        raise ConfigError(error.flag, error.value, error.reason) from None


def _check_device_count(tp: int, pp: int, dp: int) -> None:
    """Each data-parallel rank runs TP x PP workers, each on its own GPU."""
    visible = cuda_device_count()
    if tp * pp * dp <= visible:
        return
    if dp == 1:
        raise ConfigError("tensor_parallel_size", tp, f"only {visible} GPUs are visible")
    raise ConfigError(
        "data_parallel_size",
        dp,
        f"{dp} ranks of {tp * pp} GPUs each (-tp {tp} x -pp {pp}) need {tp * pp * dp} GPUs; "
        f"only {visible} are visible",
    )


def resolve_config(args: EngineArgs, offline: bool = False) -> EngineConfig:
    """Resolve every "auto" of `args` into the frozen EngineConfig; `offline` for the
    LLM class (vLLM's LLM_CLASS usage context), whose default batches are larger.

    Raises ConfigError (a ValueError) naming the argument, its value and the reason
    for anything this build cannot carry out.
    """
    check_arguments(args)
    _log_accepted_notes(args)
    device = resolve_device(args.device)
    files = find_model(args.model, "--model", args.download_dir)
    load_format, quantization = _check_formats(args, files)
    _check_kv_scales(args)
    _check_compile_with_stages(args)
    model = resolve_model_config(args, files, device, quantization)
    block_size = resolve_block_size(args.block_size, device)
    return EngineConfig(
        model=model,
        cache=CacheConfig(
            block_size=block_size,
            enable_prefix_caching=(
                True if args.enable_prefix_caching is None else args.enable_prefix_caching
            ),
            prefix_caching_hash_algo=args.prefix_caching_hash_algo,
            gpu_memory_utilization=float(args.gpu_memory_utilization),
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            cpu_offload_gb=float(args.cpu_offload_gb),
            # auto = the model dtype; fp8 is e4m3
            cache_dtype=model.dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
            calculate_kv_scales=args.calculate_kv_scales,
            enable_sleep_mode=args.enable_sleep_mode,
            cpu_kv_cache_space_gib=cpu_kv_cache_space_gib(),
        ),
        parallel=resolve_parallel(args, model, device),
        scheduler=resolve_scheduler(args, model.max_model_len, device, offline),
        device=DeviceConfig(device=device),
        load=LoadConfig(
            load_format=load_format,
            download_dir=args.download_dir,
            use_tqdm_on_load=args.use_tqdm_on_load,
            ignore_patterns=_as_list(args.ignore_patterns, DEFAULT_IGNORE_PATTERNS),
        ),
        lora=LoRAConfig(),
        speculative=SpeculativeConfig(),
        observability=ObservabilityConfig(
            disable_log_stats=args.disable_log_stats,
            disable_log_requests=args.disable_log_requests,
        ),
        compilation=resolve_compilation(args.compilation_config),
    )


def resolve_model_config(
    args: EngineArgs, files: ModelFiles, device: str, quantization: str | None
) -> ModelConfig:
    """The model part: paths, HF config with overrides, dtype, length, generation."""
    config_files, config_flag, config_name = files, "--model", args.model
    if args.hf_config_path:
        config_flag, config_name = "--hf-config-path", args.hf_config_path
        config_files = find_model(config_name, config_flag, args.download_dir)
    hf_config = load_hf_config(config_files, config_flag, config_name)
    architecture = resolve_architecture(hf_config, args.model)
    hf_config["architectures"] = [architecture]  # GGUF configs leave it empty
    if architecture in NO_ROPE_ARCHITECTURES:
        _refuse_rope_for(architecture, args)
    hf_config = _with_overrides(hf_config, args)
    if not files.is_gguf:
        _check_unquantized(hf_config, args.model)
    max_model_len = resolve_max_model_len(
        args.max_model_len, model_context_length(hf_config, args.disable_sliding_window)
    )
    return ModelConfig(
        model=args.model,
        model_path=str(files.path),
        gguf_file=str(files.path) if files.is_gguf else None,
        tokenizer=resolve_tokenizer(args, files),
        tokenizer_mode=args.tokenizer_mode,
        skip_tokenizer_init=args.skip_tokenizer_init,
        trust_remote_code=args.trust_remote_code,
        dtype=resolve_dtype(args.dtype, checkpoint_dtype(hf_config), device),
        seed=0 if args.seed is None else args.seed,
        max_model_len=max_model_len,
        architecture=architecture,
        task="generate",
        hf_config=hf_config,
        generation_config=load_generation_config(
            args.generation_config, files, args.override_generation_config
        ),
        served_model_names=_as_list(args.served_model_name, [args.model]),
        max_logprobs=args.max_logprobs,
        disable_sliding_window=args.disable_sliding_window,
        disable_cascade_attn=args.disable_cascade_attn,
        # CUDA graphs exist only on CUDA: elsewhere the model always runs eagerly.
        enforce_eager=args.enforce_eager or device != "cuda",
        max_seq_len_to_capture=min(args.max_seq_len_to_capture, max_model_len),
        quantization=quantization,
        model_impl="vllm",  # auto: every supported architecture has its own implementation
    )


def _with_overrides(hf_config: dict[str, Any], args: EngineArgs) -> dict[str, Any]:
    """The config with --hf-overrides, --rope-scaling and --rope-theta applied, each
    checked first: a bad value is refused here, naming its flag, not in a worker."""
    if args.hf_overrides:
        problem = override_problem(hf_config, _plain(args.hf_overrides))
        if problem:
            raise ConfigError("--hf-overrides", args.hf_overrides, problem)
    merged = apply_hf_overrides(hf_config, args.hf_overrides, args.rope_scaling, args.rope_theta)
    problem = rope_problem(merged)
    if problem:
        raise ConfigError(*_rope_source(args), problem)
    return merged


def _rope_source(args: EngineArgs) -> tuple[str, Any]:
    """The flag (and value) that set the rotary settings, for an error message."""
    if args.rope_scaling is not None:
        return "--rope-scaling", args.rope_scaling
    if ROPE_KEYS & set(args.hf_overrides or {}):
        return "--hf-overrides", args.hf_overrides
    if args.rope_theta is not None:
        return "--rope-theta", args.rope_theta
    return "--model", args.model  # the model's own config


def _refuse_rope_for(architecture: str, args: EngineArgs) -> None:
    overrides = args.hf_overrides or {}
    for flag, value in (
        ("--rope-scaling", args.rope_scaling or overrides.get("rope_scaling")),
        ("--rope-theta", args.rope_theta or overrides.get("rope_theta")),
    ):
        if value is not None:
            raise ConfigError(flag, value, f"{architecture} has no rotary embeddings")


def resolve_tokenizer(args: EngineArgs, files: ModelFiles) -> str | None:
    """The tokenizer folder or .gguf file; None with --skip-tokenizer-init."""
    if args.skip_tokenizer_init:
        return None
    if args.tokenizer:
        return str(find_local(args.tokenizer, "--tokenizer", args.download_dir))
    return str(files.path)


if __name__ == "__main__":
    print(render_status_table())
