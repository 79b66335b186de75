"""Every engine argument, declared once, and the parser built from that declaration.

`EngineArgs` is the table: each field is one argument of `vllm serve`, with its
default, its command-line flags, its help group, its choices and its help text
(in the field's metadata). The argparse parser, `EngineArgs.from_cli` and the
status table of the README are all generated from these fields, so none of them
can drift from the others. `engine_core.config.resolve_config` turns an
`EngineArgs` into the frozen `EngineConfig`; nothing is resolved here.

Usage from Python (the offline `LLM` class):

    EngineArgs(model="tessera/smollm2-135m-instruct", max_model_len=2048)

Unknown keyword arguments raise TypeError naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

# The help groups, in the order of shared/ENGINE_ARGS.md.
MODEL = "Model and tokenizer"
PARALLEL = "Parallelism and executor"
CACHE = "KV cache and memory"
SCHEDULER = "Scheduler"
EXECUTION = "Execution and compilation"
QUANT = "Quantization"
TOKENIZER_POOL = "Tokenizer pool, multimodal"
LORA = "LoRA and prompt adapters"
SPECULATIVE = "Speculative decoding, structured output, logits"
OBSERVABILITY = "Observability and distributed KV"
GROUPS = (
    MODEL,
    PARALLEL,
    CACHE,
    SCHEDULER,
    EXECUTION,
    QUANT,
    TOKENIZER_POOL,
    LORA,
    SPECULATIVE,
    OBSERVABILITY,
)

# How an argument reads its value(s) from the command line.
VALUE = "value"  # --flag VALUE, converted by `type`
FLAG = "flag"  # --flag (store_true)
BOOL_PAIR = "bool_pair"  # --flag / --no-flag (BooleanOptionalAction)
OPTIONAL_BOOL = "optional_bool"  # --flag [true|false]; the bare flag means true
OPTIONAL_VALUE = "optional_value"  # --flag [VALUE]; the bare flag means True
ONE_OR_MORE = "one_or_more"  # --flag A [B ...]
APPEND = "append"  # --flag A --flag B

TASKS = ("auto", "generate", "embedding", "embed", "classify", "score", "reward", "transcription")
LOAD_FORMATS = (
    "auto",
    "pt",
    "safetensors",
    "npcache",
    "dummy",
    "tensorizer",
    "sharded_state",
    "gguf",
    "bitsandbytes",
    "mistral",
    "runai_streamer",
    "fastsafetensors",
)
QUANTIZATION_METHODS = (
    "aqlm",
    "awq",
    "deepspeedfp",
    "tpu_int8",
    "fp8",
    "ptpc_fp8",
    "fbgemm_fp8",
    "modelopt",
    "nvfp4",
    "marlin",
    "gguf",
    "gptq_marlin_24",
    "gptq_marlin",
    "awq_marlin",
    "gptq",
    "compressed-tensors",
    "bitsandbytes",
    "qqq",
    "hqq",
    "experts_int8",
    "neuron_quant",
    "ipex",
    "quark",
    "moe_wna16",
    "torchao",
    None,
)
DEVICES = ("auto", "cuda", "neuron", "cpu", "tpu", "xpu", "hpu")
BLOCK_SIZES = (8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------
# Value parsers (argparse `type=` functions). They raise ArgumentTypeError, so
# argparse reports "argument --flag: <message>", naming the flag.


def parse_human_int(text: str) -> int:
    """An integer, optionally with a suffix: k/m/g = x1000^n, K/M/G = x1024^n.

    "1k" -> 1000, "1K" -> 1024, "1.5k" -> 1500, "2M" -> 2097152. Decimals are only
    allowed with the decimal suffixes (a binary fraction is rarely what was meant).
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid length {text!r}: use an integer, optionally with a suffix "
            "k/m/g (x1000) or K/M/G (x1024), e.g. 4096, 8k, 32K"
        )
    number, suffix = match.groups()
    exponent = "kmg".find(suffix.lower()) + 1 if suffix else 0
    base = 1024 if suffix.isupper() else 1000
    if "." in number and (not suffix or base == 1024):
        raise argparse.ArgumentTypeError(
            f"invalid length {text!r}: a decimal number needs a k/m/g suffix, e.g. 1.5k"
        )
    value = Decimal(number) * base**exponent
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: not a whole number")
    return int(value)


def parse_json_dict(text: str) -> dict[str, Any]:
    """A JSON object, e.g. '{"temperature": 0.5}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_compilation_config(text: str) -> dict[str, Any]:
    """An optimisation level 0-3 (`-O3`), or a JSON object with the full config."""
    if text.strip().isdigit():
        level = int(text)
        if level > 3:
            raise argparse.ArgumentTypeError(f"invalid level {text!r}: choose 0, 1, 2 or 3")
        return {"level": level}
    return parse_json_dict(text)


def parse_bool(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case)."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def parse_optional_str(text: str) -> str | None:
    """A string, where "None" means no value (as in vLLM's `--quantization None`)."""
    return None if text in ("None", "none", "") else text


def parse_mm_limits(text: str) -> dict[str, int]:
    """Per-modality limits, e.g. "image=16,video=2" -> {"image": 16, "video": 2}."""
    limits: dict[str, int] = {}
    for item in text.split(","):
        name, sep, count = item.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"invalid limit {item!r} in {text!r}: use modality=count, e.g. image=16,video=2"
            )
        limits[name.strip()] = int(count)
    return limits


def parse_float_list(text: str) -> list[float]:
    """Comma-separated floats, e.g. "4.0,8.0"."""
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}: use comma-separated numbers, e.g. 4.0,8.0"
        ) from None


# ---------------------------------------------------------------------------
# The declaration of one argument, kept in the field's metadata.


@dataclass(frozen=True)
class ArgSpec:
    """How one EngineArgs field appears on the command line."""

    group: str
    help: str
    kind: str = VALUE
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()  # short forms: -tp, -pp, -dp, -q, -O
    metavar: str | None = None


def _arg(default: Any, group: str, help: str, **spec: Any) -> Any:
    """A dataclass field carrying its ArgSpec; lists get a fresh copy per instance."""
    metadata = {"cli": ArgSpec(group=group, help=help, **spec)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _json(group: str, help: str) -> Any:
    return _arg(None, group, help, type=parse_json_dict, metavar="JSON")


def _flag(group: str, help: str) -> Any:
    return _arg(False, group, help, kind=FLAG)


@dataclass
class EngineArgs:
    """Every engine argument of `vllm serve`, with vLLM's names and defaults.

    None means "auto" (resolved by `engine_core.config.resolve_config`) or "unset".
    """

    # --- Model and tokenizer
    model: str = _arg(
        "facebook/opt-125m",
        MODEL,
        "Hugging Face model name or local path: a model folder, a .gguf file, or the "
        "embedded alias tessera/smollm2-135m-instruct.",
        type=str,
    )
    task: str = _arg(
        "auto",
        MODEL,
        "The task of this instance; one task per instance. 'auto' picks the model's "
        "only task, else it must be named.",
        choices=TASKS,
    )
    tokenizer: str | None = _arg(
        None, MODEL, "Tokenizer name or path; default: the model.", type=str
    )
    hf_config_path: str | None = _arg(
        None, MODEL, "Where to read the Hugging Face config; default: the model.", type=str
    )
    skip_tokenizer_init: bool = _flag(
        MODEL,
        "Skip tokenizer and detokenizer initialization: requests must give "
        "prompt_token_ids, and outputs carry token ids.",
    )
    revision: str | None = _arg(
        None, MODEL, "Model revision: a branch, tag or commit id.", type=str
    )
    code_revision: str | None = _arg(
        None, MODEL, "Revision of the model code on the Hugging Face hub.", type=str
    )
    tokenizer_revision: str | None = _arg(None, MODEL, "Revision of the tokenizer.", type=str)
    tokenizer_mode: str = _arg(
        "auto",
        MODEL,
        "auto: the fast tokenizer when there is one; slow: always the slow one; "
        "mistral: mistral_common; custom: a registered tokenizer named by --tokenizer.",
        choices=("auto", "slow", "mistral", "custom"),
    )
    trust_remote_code: bool = _flag(MODEL, "Trust remote code from the Hugging Face hub.")
    allowed_local_media_path: str | None = _arg(
        None,
        MODEL,
        "Directory from which API requests may read local images or videos. A security "
        "risk: trusted setups only.",
        type=str,
    )
    download_dir: str | None = _arg(
        None, MODEL, "Directory to download and load the weights from.", type=str
    )
    load_format: str = _arg(
        "auto",
        MODEL,
        "Format of the weights. auto: safetensors, else PyTorch bin; pt; safetensors; "
        "npcache; dummy: random weights (profiling); tensorizer; sharded_state: "
        "pre-sharded per-rank checkpoints; gguf; bitsandbytes; mistral: consolidated "
        "safetensors of Mistral models; runai_streamer; fastsafetensors.",
        choices=LOAD_FORMATS,
    )
    config_format: str = _arg(
        "auto",
        MODEL,
        "Format of the model config. auto: hf if present, else mistral.",
        choices=("auto", "hf", "mistral"),
    )
    dtype: str = _arg(
        "auto",
        MODEL,
        "Data type of weights and activations. auto: FP16 for FP32 and FP16 models, "
        "BF16 for BF16 models (FP32 on the CPU); half = float16; float = float32.",
        choices=("auto", "half", "float16", "bfloat16", "float", "float32"),
    )
    kv_cache_dtype: str = _arg(
        "auto",
        MODEL,
        "Data type of the KV cache. auto: the model dtype; fp8 = fp8_e4m3.",
        choices=("auto", "fp8", "fp8_e5m2", "fp8_e4m3"),
    )
    max_model_len: int | None = _arg(
        None,
        MODEL,
        "Model context length; default: from the model config. Accepts k/m/g "
        "(x1000) and K/M/G (x1024): 1k = 1000, 1K = 1024.",
        type=parse_human_int,
    )
    model_impl: str = _arg(
        "auto",
        MODEL,
        "Model implementation. auto: the engine's own, else Transformers; vllm: the "
        "engine's own; transformers: the Transformers-backed fallback.",
        choices=("auto", "vllm", "transformers"),
    )
    generation_config: str = _arg(
        "auto",
        MODEL,
        "auto: load generation_config.json from the model; vllm: engine defaults; a "
        "folder path: load from there. Its max_new_tokens caps every request.",
        type=str,
    )
    override_generation_config: dict[str, Any] | None = _json(
        MODEL, "JSON merged over the generation config, e.g. '{\"temperature\": 0.5}'."
    )
    hf_token: str | bool | None = _arg(
        None,
        MODEL,
        "Bearer token for remote files; the bare flag uses the token saved by the "
        "Hugging Face login.",
        kind=OPTIONAL_VALUE,
        type=str,
    )
    hf_overrides: dict[str, Any] | None = _json(
        MODEL, "JSON object merged into the Hugging Face config."
    )
    rope_scaling: dict[str, Any] | None = _json(
        MODEL, 'RoPE scaling as JSON, e.g. \'{"rope_type": "dynamic", "factor": 2.0}\'.'
    )
    rope_theta: float | None = _arg(
        None, MODEL, "RoPE theta; used with --rope-scaling.", type=float
    )
    disable_sliding_window: bool = _flag(
        MODEL, "Disable the sliding window; the length is capped at the window size."
    )
    served_model_name: list[str] | None = _arg(
        None,
        MODEL,
        "Names the API answers to; the first is returned in responses and used as the "
        "metrics label. Default: --model.",
        kind=ONE_OR_MORE,
        type=str,
    )
    qlora_adapter_name_or_path: str | None = _arg(
        None, MODEL, "Name or path of a QLoRA adapter.", type=str
    )

    # --- Parallelism and executor
    distributed_executor_backend: str | None = _arg(
        None,
        PARALLEL,
        "Backend of the workers. Default: mp when PP x TP fits the local devices, "
        "else ray when installed, else an error.",
        choices=("ray", "mp", "uni", "external_launcher"),
    )
    pipeline_parallel_size: int = _arg(
        1, PARALLEL, "Number of pipeline stages.", type=int, aliases=("-pp",)
    )
    tensor_parallel_size: int = _arg(
        1, PARALLEL, "Number of tensor-parallel replicas.", type=int, aliases=("-tp",)
    )
    data_parallel_size: int = _arg(
        1,
        PARALLEL,
        "Number of data-parallel replicas; MoE layers shard over TP x DP.",
        type=int,
        aliases=("-dp",),
    )
    enable_expert_parallel: bool = _flag(
        PARALLEL, "Expert parallelism instead of tensor parallelism for MoE layers."
    )
    max_parallel_loading_workers: int | None = _arg(
        None,
        PARALLEL,
        "Load the model in sequential batches, to avoid running out of host RAM with "
        "tensor parallelism and large models.",
        type=int,
    )
    ray_workers_use_nsight: bool = _flag(PARALLEL, "Profile Ray workers with nsight.")
    worker_cls: str = _arg("auto", PARALLEL, "Worker class for distributed execution.", type=str)
    worker_extension_cls: str = _arg(
        "", PARALLEL, "A class mixed into the worker class to add methods.", type=str
    )
    disable_custom_all_reduce: bool = _flag(
        PARALLEL, "Use the communication library's all-reduce only."
    )
    device: str = _arg("auto", PARALLEL, "Device type.", choices=DEVICES)

    # --- KV cache and memory
    block_size: int | None = _arg(
        None,
        CACHE,
        "Tokens per KV cache block (default 16). CUDA supports up to 32.",
        type=int,
        choices=BLOCK_SIZES,
    )
    enable_prefix_caching: bool | None = _arg(
        None,
        CACHE,
        "Automatic prefix caching (default: on for generation).",
        kind=BOOL_PAIR,
    )
    prefix_caching_hash_algo: str = _arg(
        "builtin",
        CACHE,
        "Hash of prefix blocks: builtin (Python's hash) or sha256 (collision-resistant, slower).",
        choices=("builtin", "sha256"),
    )
    use_v2_block_manager: bool = _flag(CACHE, "[Deprecated] No effect.")
    num_lookahead_slots: int = _arg(
        0, CACHE, "Experimental scheduling slots for speculative decoding.", type=int
    )
    seed: int | None = _arg(None, CACHE, "Random seed (default: 0).", type=int)
    swap_space: float = _arg(4, CACHE, "CPU swap space per GPU, in GiB.", type=float)
    cpu_offload_gb: float = _arg(
        0,
        CACHE,
        "GiB of weights per GPU kept in CPU memory and streamed in at each forward pass.",
        type=float,
    )
    gpu_memory_utilization: float = _arg(
        0.9,
        CACHE,
        "Fraction of the device memory this instance may use, between 0 and 1.",
        type=float,
    )
    num_gpu_blocks_override: int | None = _arg(
        None,
        CACHE,
        "Use this many KV cache blocks instead of profiling (to test preemption).",
        type=int,
    )
    calculate_kv_scales: bool = _flag(
        CACHE,
        "Compute k/v scales dynamically for an fp8 KV cache; else from the checkpoint, else 1.0.",
    )
    enable_sleep_mode: bool = _flag(
        CACHE, "Sleep mode (CUDA only): release weights and KV memory, wake up later."
    )

    # --- Scheduler
    max_num_batched_tokens: int | None = _arg(
        None, SCHEDULER, "Most tokens per iteration (default: derived).", type=int
    )
    max_num_seqs: int | None = _arg(
        None, SCHEDULER, "Most sequences per iteration (default: derived).", type=int
    )
    max_num_partial_prefills: int = _arg(
        1, SCHEDULER, "Most concurrent partial prefills, with chunked prefill.", type=int
    )
    max_long_partial_prefills: int = _arg(
        1,
        SCHEDULER,
        "Most concurrent partial prefills of prompts longer than "
        "--long-prefill-token-threshold; lower lets short prompts jump ahead.",
        type=int,
    )
    long_prefill_token_threshold: int = _arg(
        0,
        SCHEDULER,
        "Prompt length above which a request counts as long (0: 4 percent of the "
        "context length when --max-num-partial-prefills > 1).",
        type=int,
    )
    enable_chunked_prefill: bool | None = _arg(
        None,
        SCHEDULER,
        "Chunk prefills by --max-num-batched-tokens (default: on).",
        kind=OPTIONAL_BOOL,
    )
    num_scheduler_steps: int = _arg(
        1, SCHEDULER, "Most forward steps per scheduler call.", type=int
    )
    multi_step_stream_outputs: bool = _arg(
        True,
        SCHEDULER,
        "With multi-step scheduling, stream outputs at every step (false: at the end).",
        kind=OPTIONAL_BOOL,
    )
    scheduler_delay_factor: float = _arg(
        0.0,
        SCHEDULER,
        "Delay before scheduling the next prompt, as a factor of the previous prompt's latency.",
        type=float,
    )
    preemption_mode: str | None = _arg(
        None,
        SCHEDULER,
        "How preempted requests come back: recompute, or swap their blocks to the CPU "
        "(default: recompute).",
        choices=("recompute", "swap"),
    )
    scheduling_policy: str = _arg(
        "fcfs",
        SCHEDULER,
        "fcfs: first come, first served; priority: lower priority value first, ties by "
        "arrival time.",
        choices=("fcfs", "priority"),
    )
    scheduler_cls: str = _arg(
        "engine_core.scheduler.Scheduler",
        SCHEDULER,
        "Scheduler class, as module.Class.",
        type=str,
    )
    max_logprobs: int = _arg(20, SCHEDULER, "Most logprobs a request may ask for.", type=int)
    disable_async_output_proc: bool = _flag(SCHEDULER, "Disable async output processing (slower).")
    disable_cascade_attn: bool = _flag(
        SCHEDULER,
        "Disable cascade attention (it is used only where a heuristic says it helps).",
    )
    disable_chunked_mm_input: bool = _arg(
        False,
        SCHEDULER,
        "Never split one multimodal item across steps.",
        kind=OPTIONAL_BOOL,
    )

    # --- Execution and compilation
    enforce_eager: bool = _flag(
        EXECUTION, "Always eager PyTorch; otherwise eager mixed with CUDA graphs."
    )
    max_seq_len_to_capture: int = _arg(
        8192,
        EXECUTION,
        "Longest context covered by CUDA graphs; longer ones run eagerly.",
        type=int,
    )
    compilation_config: dict[str, Any] | None = _arg(
        None,
        EXECUTION,
        "torch.compile config: a number 0-3 is an optimisation level (0 is the default, "
        "3 for production); JSON for the full config. -O3 is the same as -O 3.",
        type=parse_compilation_config,
        aliases=("-O",),
        metavar="LEVEL_OR_JSON",
    )
    additional_config: dict[str, Any] | None = _json(
        EXECUTION, "Platform-specific settings as JSON."
    )

    # --- Quantization
    quantization: str | None = _arg(
        None,
        QUANT,
        "Weight quantization method. None: read quantization_config from the model "
        "config, else unquantized.",
        type=parse_optional_str,
        choices=QUANTIZATION_METHODS,
        aliases=("-q",),
    )

    # --- Tokenizer pool, multimodal
    tokenizer_pool_size: int = _arg(
        0, TOKENIZER_POOL, "Size of the async tokenization pool; 0: synchronous.", type=int
    )
    tokenizer_pool_type: str = _arg(
        "ray",
        TOKENIZER_POOL,
        "Type of the tokenization pool, when its size is above 0.",
        type=str,
    )
    tokenizer_pool_extra_config: dict[str, Any] | None = _json(
        TOKENIZER_POOL, "Extra config of the tokenization pool, as JSON."
    )
    limit_mm_per_prompt: dict[str, int] | None = _arg(
        None,
        TOKENIZER_POOL,
        "Most multimodal items per prompt and modality, e.g. image=16,video=2 (default: 1 each).",
        type=parse_mm_limits,
    )
    mm_processor_kwargs: dict[str, Any] | None = _json(
        TOKENIZER_POOL,
        "Overrides for the multimodal processor as JSON, e.g. '{\"num_crops\": 4}'.",
    )
    disable_mm_preprocessor_cache: bool = _flag(
        TOKENIZER_POOL, "Do not cache processed multimodal inputs."
    )

    # --- LoRA and prompt adapters
    enable_lora: bool = _flag(LORA, "Serve LoRA adapters.")
    enable_lora_bias: bool = _flag(LORA, "LoRA adapters with biases.")
    max_loras: int = _arg(1, LORA, "Most LoRAs in one batch.", type=int)
    max_lora_rank: int = _arg(16, LORA, "Highest LoRA rank.", type=int)
    lora_extra_vocab_size: int = _arg(
        256, LORA, "Most extra vocabulary a LoRA adapter may add.", type=int
    )
    lora_dtype: str = _arg(
        "auto",
        LORA,
        "Data type of LoRA weights; auto: the base model's dtype.",
        choices=("auto", "float16", "bfloat16"),
    )
    long_lora_scaling_factors: list[float] | None = _arg(
        None,
        LORA,
        "Several scaling factors (comma-separated), for adapters trained with other "
        "scalings (Long LoRA).",
        type=parse_float_list,
    )
    max_cpu_loras: int | None = _arg(
        None, LORA, "Most LoRAs kept in CPU memory; at least --max-loras.", type=int
    )
    fully_sharded_loras: bool = _flag(LORA, "Shard all LoRA computation with tensor parallelism.")
    enable_prompt_adapter: bool = _flag(LORA, "Serve prompt adapters.")
    max_prompt_adapters: int = _arg(1, LORA, "Most prompt adapters in a batch.", type=int)
    max_prompt_adapter_token: int = _arg(0, LORA, "Most prompt-adapter tokens.", type=int)

    # --- Speculative decoding, structured output, logits
    speculative_config: dict[str, Any] | None = _json(
        SPECULATIVE, "Config of speculative decoding, as JSON."
    )
    guided_decoding_backend: str = _arg(
        "xgrammar",
        SPECULATIVE,
        "Default engine for guided decoding (JSON mode, regex, ...): xgrammar, "
        "guidance, or auto (chosen per request).",
        type=str,
    )
    logits_processor_pattern: str | None = _arg(
        None,
        SPECULATIVE,
        "Regex of the qualified names of logits processors a request may pass; "
        "default: none allowed.",
        type=str,
    )
    enable_reasoning: bool = _flag(SPECULATIVE, "Return reasoning_content.")
    reasoning_parser: str | None = _arg(
        None,
        SPECULATIVE,
        "Parser that splits the reasoning out into the OpenAI format; needs --enable-reasoning.",
        choices=("deepseek_r1", "granite"),
    )

    # --- Observability and distributed KV
    disable_log_stats: bool = _flag(OBSERVABILITY, "No periodic stats logging.")
    disable_log_requests: bool = _flag(OBSERVABILITY, "No request logging (server).")
    show_hidden_metrics_for_version: str | None = _arg(
        None,
        OBSERVABILITY,
        "Show the Prometheus metrics hidden since that version, e.g. 0.7.",
        type=str,
    )
    otlp_traces_endpoint: str | None = _arg(
        None, OBSERVABILITY, "Target URL of OpenTelemetry traces.", type=str
    )
    collect_detailed_traces: str | None = _arg(
        None,
        OBSERVABILITY,
        "Collect detailed traces of these modules: model, worker, all (costly); needs "
        "--otlp-traces-endpoint.",
        type=str,
    )
    use_tqdm_on_load: bool = _arg(
        True, OBSERVABILITY, "Progress bar while loading weights.", kind=BOOL_PAIR
    )
    kv_transfer_config: dict[str, Any] | None = _json(
        OBSERVABILITY, "Distributed KV cache transfer (disaggregated prefill), as JSON."
    )
    override_neuron_config: dict[str, Any] | None = _json(
        OBSERVABILITY, "Neuron device settings, as JSON."
    )
    override_pooler_config: dict[str, Any] | None = _json(
        OBSERVABILITY,
        'Pooling method of pooling models as JSON, e.g. \'{"pooling_type": "mean"}\'.',
    )
    model_loader_extra_config: dict[str, Any] | None = _json(
        OBSERVABILITY, "Extra config of the chosen model loader, as JSON."
    )
    ignore_patterns: list[str] | None = _arg(
        None,
        OBSERVABILITY,
        "File patterns skipped when loading (repeatable; default: original/**/*).",
        kind=APPEND,
        type=str,
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> EngineArgs:
        # The offline LLM passes user kwargs straight through: name every unknown
        # one (with a close match) instead of the dataclass's first-only message.
        unknown = sorted(set(kwargs) - FIELD_NAMES)
        if unknown:
            raise TypeError(f"unknown engine arguments: {_describe_unknown(unknown)}")
        return super().__new__(cls)

    @classmethod
    def from_cli(cls, namespace: argparse.Namespace) -> EngineArgs:
        """Take the engine arguments out of a parsed namespace (other keys are ignored)."""
        return cls(**{name: getattr(namespace, name) for name in FIELD_NAMES})

    def non_default(self) -> dict[str, Any]:
        """The arguments whose value differs from the default, by field name."""
        return {
            spec.name: getattr(self, spec.name)
            for spec in dataclasses.fields(self)
            if getattr(self, spec.name) != default_of(spec.name)
        }


FIELD_NAMES = frozenset(spec.name for spec in dataclasses.fields(EngineArgs))


def _describe_unknown(names: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return ", ".join(parts)


def arg_spec(name: str) -> ArgSpec:
    """The command-line declaration of one EngineArgs field."""
    return EngineArgs.__dataclass_fields__[name].metadata["cli"]


def default_of(name: str) -> Any:
    """The default value of one EngineArgs field."""
    spec = EngineArgs.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def flag_of(name: str) -> str:
    """The long flag of a field: tensor_parallel_size -> --tensor-parallel-size."""
    return "--" + name.replace("_", "-")


def engine_arg_names() -> list[str]:
    """Every engine argument's field name, in declaration (= help) order."""
    return [spec.name for spec in dataclasses.fields(EngineArgs)]


# ---------------------------------------------------------------------------
# The parser.


def make_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add every engine argument to `parser` (a new one if None), in its help group."""
    if parser is None:
        parser = argparse.ArgumentParser(description="Tessera engine arguments.")
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for name in engine_arg_names():
        spec = arg_spec(name)
        flags = (flag_of(name), *spec.aliases)
        groups[spec.group].add_argument(*flags, dest=name, **_add_argument_kwargs(name, spec))
    return parser


add_engine_args = make_arg_parser


def _add_argument_kwargs(name: str, spec: ArgSpec) -> dict[str, Any]:
    """The keyword arguments of `add_argument` for one field."""
    default = default_of(name)
    kwargs: dict[str, Any] = {"default": default, "help": _help_text(spec.help, default)}
    if spec.kind == FLAG:
        kwargs["action"] = "store_true"
    elif spec.kind == BOOL_PAIR:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.kind == OPTIONAL_BOOL:
        kwargs.update(nargs="?", const=True, type=parse_bool, metavar="{true,false}")
    elif spec.kind == OPTIONAL_VALUE:
        kwargs.update(nargs="?", const=True, type=spec.type)
    elif spec.kind == ONE_OR_MORE:
        kwargs.update(nargs="+", type=spec.type)
    elif spec.kind == APPEND:
        kwargs.update(action="append", type=spec.type)
    else:
        kwargs["type"] = spec.type or str
    if spec.choices is not None:
        kwargs["choices"] = spec.choices
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    return kwargs


def _help_text(text: str, default: Any) -> str:
    # argparse %-formats help strings; "%(default)s" shows the default, and stops
    # BooleanOptionalAction from appending it a second time.
    escaped = text.replace("%", "%%")
    if default is None or default is False or default == "":
        return escaped
    return f"{escaped} Default: %(default)s."
