"""resolve_config: every "auto" resolved, every unsupported value refused by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig

from engine_core import config as config_module
from engine_core.args import EngineArgs, default_of, engine_arg_names, flag_of
from engine_core.config import (
    ADMISSION_HORIZON_ENV,
    CPU_KVCACHE_ENV,
    DEFAULT_SCHEDULER_CLASSES,
    REFUSED,
    RULES,
    ConfigError,
    apply_hf_overrides,
    default_budgets,
    resolve_config,
    resolve_dtype,
    resolve_scheduler,
)
from engine_core.cuda_devices import DeviceInfo
from engine_core.models_alias import resolve_alias
from executor.config import EngineConfig

ALIAS = "tessera/smollm2-135m-instruct"
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
)
GENERATION = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "eos_token_id": 2}


# --- factories


def write_llama(folder: Path, **overrides: Any) -> Path:
    """A Llama config folder (no weights: resolution never reads them)."""
    settings = {**TINY, "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", **overrides}
    LlamaConfig(**settings).save_pretrained(folder)
    return folder


def write_generation_config(folder: Path, values: dict[str, Any]) -> None:
    # Written as plain JSON, as real checkpoints ship it (transformers' own writer
    # refuses sampling keys without do_sample).
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(values))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_llama(tmp_path_factory.mktemp("llama"))
    write_generation_config(folder, GENERATION)
    return folder


def resolve(model: Path | str, **kwargs: Any) -> EngineConfig:
    """Resolve on the CPU whatever the machine has, so expectations do not vary."""
    return resolve_config(EngineArgs(model=str(model), **{"device": "cpu", **kwargs}))


def refusal(model: Path | str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        resolve(model, **kwargs)
    return error.value


# --- a tiny HF folder


def test_tiny_folder_resolves(llama: Path) -> None:
    config = resolve(llama)
    model = config.model
    assert model.model == str(llama)
    assert model.model_path == str(llama.resolve())
    assert model.gguf_file is None
    assert model.tokenizer == str(llama.resolve())
    assert model.architecture == "LlamaForCausalLM"
    assert model.dtype == "float32"  # auto on the CPU, whatever the checkpoint
    assert model.max_model_len == 512
    assert model.seed == 0
    assert model.served_model_names == [str(llama)]
    assert model.generation_config == GENERATION
    assert model.hf_config["num_hidden_layers"] == 2
    assert model.enforce_eager is True
    assert model.max_seq_len_to_capture == 512
    assert (model.quantization, model.model_impl, model.task) == (None, "vllm", "generate")
    assert config.device.device == "cpu"
    assert config.parallel.distributed_executor_backend == "mp"  # the worker is its own process
    assert config.load.load_format == "auto"
    assert config.load.ignore_patterns == ["original/**/*"]


def test_engine_config_round_trips(llama: Path) -> None:
    config = resolve(llama, hf_overrides={"id2label": {"0": "a"}}, served_model_name=["a", "b"])
    assert EngineConfig.decode(config.encode()) == config


def test_auto_device_is_cpu_without_cuda(llama: Path) -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_config(EngineArgs(model=str(llama))).device.device == expected


@pytest.mark.parametrize(
    "requested, saved, device, expected",
    [
        ("auto", "bfloat16", "cuda", "bfloat16"),
        ("auto", "float16", "cuda", "float16"),
        ("auto", "float32", "cuda", "float16"),
        ("auto", None, "cuda", "float16"),
        ("auto", "bfloat16", "cpu", "float32"),
        ("auto", "float16", "cpu", "float32"),
        ("half", "bfloat16", "cpu", "float16"),
        ("float16", None, "cuda", "float16"),
        ("bfloat16", "float32", "cpu", "bfloat16"),
        ("float", "bfloat16", "cuda", "float32"),
        ("float32", "float16", "cuda", "float32"),
    ],
)
def test_dtype(requested: str, saved: str | None, device: str, expected: str) -> None:
    assert resolve_dtype(requested, saved, device) == expected


def test_explicit_dtype_and_kv_cache_dtype(llama: Path) -> None:
    config = resolve(llama, dtype="bfloat16")
    assert (config.model.dtype, config.cache.cache_dtype) == ("bfloat16", "bfloat16")
    config = resolve(llama, dtype="bfloat16", kv_cache_dtype="fp8")
    assert config.cache.cache_dtype == "fp8"


# --- max_model_len


def test_max_model_len_below_the_model(llama: Path) -> None:
    config = resolve(llama, max_model_len=256)
    assert (config.model.max_model_len, config.scheduler.max_model_len) == (256, 256)


def test_max_model_len_above_the_model_is_refused(llama: Path) -> None:
    error = refusal(llama, max_model_len=1024)
    assert error.arg_name == "--max-model-len"
    assert str(error).startswith("--max-model-len=1024: ")
    assert "512" in str(error)


def test_gpt2_length_from_n_positions(tmp_path: Path) -> None:
    GPT2Config(n_positions=320, n_embd=64, n_layer=2, n_head=4, vocab_size=128).save_pretrained(
        tmp_path
    )
    config = resolve(tmp_path)
    assert (config.model.architecture, config.model.max_model_len) == ("GPT2LMHeadModel", 320)


def test_sliding_window_caps_when_disabled(tmp_path: Path) -> None:
    MistralConfig(
        **{**TINY, "max_position_embeddings": 1024, "sliding_window": 256}
    ).save_pretrained(tmp_path)
    assert resolve(tmp_path).model.max_model_len == 1024
    config = resolve(tmp_path, disable_sliding_window=True)
    assert (config.model.architecture, config.model.max_model_len) == ("MistralForCausalLM", 256)


# --- HF overrides and RoPE


def test_hf_overrides_applied(llama: Path) -> None:
    config = resolve(llama, hf_overrides={"max_position_embeddings": 300, "num_hidden_layers": 1})
    assert config.model.hf_config["num_hidden_layers"] == 1
    assert config.model.max_model_len == 300


def test_rope_scaling_and_theta(llama: Path) -> None:
    config = resolve(llama, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=50000.0)
    rope = config.model.hf_config["rope_parameters"]
    assert rope == {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    assert config.model.max_model_len == 1024  # 512 positions stretched by 2


def test_legacy_rope_keys_inside_hf_overrides() -> None:
    base = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "a": {"b": 1}}
    merged = apply_hf_overrides(
        base, {"rope_scaling": {"type": "dynamic", "factor": 4.0}, "a": {"c": 2}}, None, None
    )
    assert merged["rope_parameters"] == {
        "rope_theta": 10000.0,
        "rope_type": "dynamic",
        "factor": 4.0,
    }
    assert merged["a"] == {"b": 1, "c": 2}
    assert "rope_scaling" not in merged
    assert base["a"] == {"b": 1}  # the input is not changed


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"num_hidden_layers": "x"}, "num_hidden_layers must be a positive integer"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
        ({"max_position_embeddings": "abc"}, "must be a positive integer"),
        ({"vocab_size": 1000.0}, "vocab_size must be a positive integer"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps must be a number"),
        ({"rms_norm_eps": float("nan")}, "must be a finite number"),
        ({"tie_word_embeddings": 1}, "must be true or false"),
    ],
)
def test_hf_overrides_of_the_wrong_kind_are_refused(
    llama: Path, overrides: dict[str, Any], words: str
) -> None:
    error = refusal(llama, hf_overrides=overrides)
    assert error.arg_name == "--hf-overrides"
    assert words in str(error)


def test_hf_overrides_may_unset_a_nullable_size(llama: Path) -> None:
    assert resolve(llama, hf_overrides={"head_dim": None}).model.hf_config["head_dim"] is None


@pytest.mark.parametrize(
    "scaling, words",
    [
        ({"rope_type": "nonsense", "factor": 2}, "rope type 'nonsense' is not supported"),
        ({"rope_type": "linear", "factor": "x"}, "linear scaling needs a factor >= 1"),
        ({"rope_type": "linear", "factor": 0}, "factor >= 1"),
        ({"rope_type": "dynamic", "factor": -2}, "factor >= 1"),
        ({"rope_type": "dynamic"}, "factor >= 1, got None"),
        ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 0}, "original"),
        ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1}, ">"),
    ],
)
def test_bad_rope_scaling_is_refused_at_startup(
    llama: Path, scaling: dict[str, Any], words: str
) -> None:
    error = refusal(llama, rope_scaling=scaling)
    assert error.arg_name == "--rope-scaling"
    assert words in str(error)
    # the same settings through --hf-overrides name that flag
    assert refusal(llama, hf_overrides={"rope_scaling": scaling}).arg_name == "--hf-overrides"


def test_rope_theta_must_be_finite(llama: Path) -> None:
    assert refusal(llama, rope_theta=float("inf")).arg_name == "--rope-theta"


def test_unsupported_rope_in_the_model_config_names_the_model(tmp_path: Path) -> None:
    config = json.loads((write_llama(tmp_path) / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "su", "rope_theta": 10000.0, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    error = refusal(tmp_path)
    assert error.arg_name == "--model"
    assert "'su'" in str(error)


def test_rope_on_opt_is_refused(tmp_path: Path) -> None:
    OPTConfig(
        hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4
    ).save_pretrained(tmp_path)
    assert resolve(tmp_path).model.architecture == "OPTForCausalLM"
    assert refusal(tmp_path, rope_theta=5000.0).arg_name == "--rope-theta"


# --- generation config


def test_generation_config_vllm_and_override(llama: Path) -> None:
    assert resolve(llama, generation_config="vllm").model.generation_config == {}
    config = resolve(llama, generation_config="vllm", override_generation_config={"top_k": 5})
    assert config.model.generation_config == {"top_k": 5}
    merged = resolve(llama, override_generation_config={"temperature": 0.1})
    assert merged.model.generation_config == {**GENERATION, "temperature": 0.1}


def test_generation_config_from_a_folder(llama: Path, tmp_path: Path) -> None:
    write_generation_config(tmp_path / "gen", {"top_k": 3})
    config = resolve(llama, generation_config=str(tmp_path / "gen"))
    assert config.model.generation_config == {"top_k": 3}
    assert refusal(llama, generation_config=str(tmp_path)).arg_name == "--generation-config"
    missing = refusal(llama, generation_config=str(tmp_path / "nowhere"))
    assert missing.arg_name == "--generation-config"


@pytest.mark.parametrize(
    "override, words",
    [
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"max_new_tokens": -3}, "max_tokens must be >= 1"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_generation_overrides_are_refused_at_startup(
    llama: Path, override: dict[str, Any], words: str
) -> None:
    error = refusal(llama, override_generation_config=override)
    assert error.arg_name == "--override-generation-config"
    assert words in str(error)


def test_a_bad_generation_config_file_names_its_flag(llama: Path, tmp_path: Path) -> None:
    write_generation_config(tmp_path / "gen", {"temperature": -1})
    error = refusal(llama, generation_config=str(tmp_path / "gen"))
    assert error.arg_name == "--generation-config"
    assert "temperature must be >= 0" in str(error)


def test_no_generation_config_file_is_empty(tmp_path: Path) -> None:
    assert resolve(write_llama(tmp_path)).model.generation_config == {}


# --- model, tokenizer and config paths


def test_hub_name_not_found_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    error = refusal("nobody-xyz/no-such-model")
    assert error.arg_name == "--model"
    message = str(error)
    assert "not found locally" in message
    assert str(tmp_path / "nobody-xyz" / "no-such-model") in message
    assert ALIAS in message
    assert "\n" not in message


def test_model_under_download_dir(llama: Path) -> None:
    config = resolve(llama.name, download_dir=str(llama.parent))
    assert config.model.model_path == str(llama.resolve())
    assert config.load.download_dir == str(llama.parent)


def test_folder_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    assert "no config.json" in str(refusal(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "not a .gguf file" in str(refusal(tmp_path / "weights.bin"))


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_llama(tmp_path, architectures=["FalconForCausalLM"])
    error = refusal(tmp_path)
    assert error.arg_name == "--model"
    assert "FalconForCausalLM" in str(error) and "Qwen3ForCausalLM" in str(error)


def test_architecture_from_model_type(tmp_path: Path) -> None:
    write_llama(tmp_path, architectures=None)
    config = resolve(tmp_path)
    assert config.model.architecture == "LlamaForCausalLM"
    assert config.model.hf_config["architectures"] == ["LlamaForCausalLM"]


def test_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    write_llama(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert "awq" in str(refusal(tmp_path))


def test_tokenizer_paths(llama: Path, tmp_path: Path) -> None:
    assert resolve(llama, skip_tokenizer_init=True).model.tokenizer is None
    assert resolve(llama, tokenizer=str(tmp_path)).model.tokenizer == str(tmp_path.resolve())
    assert refusal(llama, tokenizer=str(tmp_path / "nope")).arg_name == "--tokenizer"


def test_hf_config_path(llama: Path, tmp_path: Path) -> None:
    GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4).save_pretrained(tmp_path)
    config = resolve(llama, hf_config_path=str(tmp_path))
    assert (config.model.architecture, config.model.max_model_len) == ("GPT2LMHeadModel", 128)
    assert config.model.model_path == str(llama.resolve())
    assert refusal(llama, hf_config_path=str(tmp_path / "no")).arg_name == "--hf-config-path"


def test_load_format_checked_against_the_files(llama: Path) -> None:
    assert resolve(llama, load_format="dummy").load.load_format == "dummy"
    assert resolve(llama, load_format="pt").load.load_format == "pt"
    assert refusal(llama, load_format="gguf").arg_name == "--load-format"
    assert refusal(llama, quantization="gguf").arg_name == "--quantization"


# --- scheduler, cache, parallel


def test_scheduler_defaults_on_cpu(llama: Path) -> None:
    scheduler = resolve(llama).scheduler
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (128, 8192)
    assert scheduler.enable_chunked_prefill is True
    assert (scheduler.policy, scheduler.preemption_mode) == ("fcfs", "recompute")
    assert scheduler.long_prefill_token_threshold == 0


GIB = 1 << 30


@pytest.mark.parametrize(
    ("info", "offline", "budgets"),
    [
        (DeviceInfo(80 * GIB, "NVIDIA H100 80GB HBM3"), True, (16384, 1024)),
        (DeviceInfo(80 * GIB, "NVIDIA H100 80GB HBM3"), False, (8192, 1024)),
        (DeviceInfo(141 * GIB, "NVIDIA H200"), True, (16384, 1024)),
        (DeviceInfo(80 * GIB, "NVIDIA A100-SXM4-80GB"), True, (8192, 256)),
        (DeviceInfo(80 * GIB, "NVIDIA A100-SXM4-80GB"), False, (2048, 256)),
        (DeviceInfo(24 * GIB, "NVIDIA L4"), False, (2048, 256)),
        (None, True, (8192, 256)),  # NVML could not tell: the smaller GPU's budgets
    ],
)
def test_cuda_budgets_follow_the_gpu_and_the_entry_point(
    monkeypatch: pytest.MonkeyPatch, info: DeviceInfo | None, offline: bool, budgets: tuple
) -> None:
    monkeypatch.setattr(config_module, "first_device_info", lambda: info)
    assert default_budgets("cuda", offline) == budgets
    assert default_budgets("cpu", offline) == (8192, 128)


def test_the_llm_class_resolves_offline_budgets(
    monkeypatch: pytest.MonkeyPatch, llama: Path
) -> None:
    monkeypatch.setattr(config_module, "first_device_info", lambda: DeviceInfo(80 * GIB, "H100"))
    args = EngineArgs(model=str(llama), device="cpu", max_model_len=256)
    served = resolve_scheduler(args, 256, "cuda").max_num_batched_tokens
    assert (served, resolve_scheduler(args, 256, "cuda", offline=True).max_num_batched_tokens) == (
        8192,
        16384,
    )
    # without chunked prefill a whole prompt still fits one step
    whole = EngineArgs(model=str(llama), enable_chunked_prefill=False)
    assert resolve_scheduler(whole, 32768, "cuda").max_num_batched_tokens == 32768


def test_admission_horizon_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, llama: Path
) -> None:
    assert resolve(llama).scheduler.admission_horizon == 256
    monkeypatch.setenv(ADMISSION_HORIZON_ENV, "0")
    assert resolve(llama).scheduler.admission_horizon == 0
    for bad in ("-1", "lots", "1.5"):
        monkeypatch.setenv(ADMISSION_HORIZON_ENV, bad)
        assert refusal(llama).arg_name == ADMISSION_HORIZON_ENV


def test_scheduler_values_carried(llama: Path) -> None:
    scheduler = resolve(
        llama,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        scheduling_policy="priority",
        scheduler_delay_factor=0.5,
        max_num_partial_prefills=2,
    ).scheduler
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (4, 64)
    assert (scheduler.policy, scheduler.scheduler_delay_factor) == ("priority", 0.5)
    assert scheduler.long_prefill_token_threshold == 20  # 4 percent of 512


def test_no_chunked_prefill_needs_room_for_a_prompt(llama: Path) -> None:
    scheduler = resolve(llama, enable_chunked_prefill=False).scheduler
    assert (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens) == (False, 8192)
    error = refusal(llama, enable_chunked_prefill=False, max_num_batched_tokens=256)
    assert error.arg_name == "--max-num-batched-tokens"
    assert "--max-model-len=512" in str(error)
    assert resolve(llama, enable_chunked_prefill=False, max_num_batched_tokens=512)


def test_scheduler_consistency_checks(llama: Path) -> None:
    assert refusal(llama, max_num_batched_tokens=8, max_num_seqs=16).arg_name == (
        "--max-num-batched-tokens"
    )
    assert refusal(llama, max_long_partial_prefills=2).arg_name == "--max-long-partial-prefills"
    error = refusal(llama, max_num_partial_prefills=2, enable_chunked_prefill=False)
    assert error.arg_name == "--max-num-partial-prefills"


def test_cache_config(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_KVCACHE_ENV, raising=False)
    cache = resolve(llama).cache
    assert (cache.block_size, cache.enable_prefix_caching, cache.cpu_kv_cache_space_gib) == (
        16,
        True,
        4.0,
    )
    cache = resolve(
        llama,
        block_size=64,
        enable_prefix_caching=False,
        prefix_caching_hash_algo="sha256",
        num_gpu_blocks_override=12,
        gpu_memory_utilization=0.5,
        swap_space=0,
    ).cache
    assert (cache.block_size, cache.enable_prefix_caching) == (64, False)
    assert (cache.prefix_caching_hash_algo, cache.num_gpu_blocks_override) == ("sha256", 12)
    assert cache.gpu_memory_utilization == 0.5


def test_cpu_kv_cache_space_env(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_KVCACHE_ENV, "2.5")
    assert resolve(llama).cache.cpu_kv_cache_space_gib == 2.5
    monkeypatch.setenv(CPU_KVCACHE_ENV, "lots")
    error = refusal(llama)
    assert str(error) == f"{CPU_KVCACHE_ENV}=lots: must be a positive number of GiB"


def test_other_values_carried(llama: Path) -> None:
    config = resolve(
        llama,
        seed=7,
        served_model_name="name",
        max_logprobs=5,
        disable_log_stats=True,
        disable_log_requests=True,
        use_tqdm_on_load=False,
        ignore_patterns=["*.pt"],
        tokenizer_mode="slow",
        compilation_config=0,
        disable_custom_all_reduce=True,
        trust_remote_code=True,
    )
    assert (config.model.seed, config.model.served_model_names) == (7, ["name"])
    assert (config.model.max_logprobs, config.model.tokenizer_mode) == (5, "slow")
    assert config.observability.disable_log_stats and config.observability.disable_log_requests
    assert (config.load.use_tqdm_on_load, config.load.ignore_patterns) == (False, ["*.pt"])
    assert config.parallel.disable_custom_all_reduce is True
    assert config.compilation.level == 0


def test_compilation_config_json_resolves(llama: Path) -> None:
    config = resolve(llama, compilation_config={"level": 3, "cudagraph_capture_sizes": [1, 4]})
    assert (config.compilation.level, config.compilation.cudagraph_capture_sizes) == (3, [1, 4])
    assert resolve(llama, compilation_config=2).compilation.level == 2


def test_unknown_compilation_key_is_named(llama: Path) -> None:
    with pytest.raises(ConfigError, match="--compilation-config.*unknown key 'backend'"):
        resolve(llama, compilation_config={"level": 3, "backend": "eager"})


def test_deprecated_block_manager_warns(llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine_core.config"):
        resolve(llama, use_v2_block_manager=True)
    assert "--use-v2-block-manager is deprecated" in caplog.text


# --- refusals: every argument this build does not carry out, by name

# A value this build refuses, for every argument that refuses some value.
REFUSED_VALUES: dict[str, Any] = {
    "task": "embed",
    "revision": "v1",
    "code_revision": "v1",
    "tokenizer_revision": "v1",
    "tokenizer_mode": "mistral",
    "allowed_local_media_path": "/media",
    "load_format": "npcache",
    "config_format": "mistral",
    "model_impl": "transformers",
    "hf_token": True,
    "qlora_adapter_name_or_path": "q",
    "enable_expert_parallel": True,
    "device": "tpu",
    "num_lookahead_slots": 1,
    "cpu_offload_gb": 1.0,
    "enable_sleep_mode": True,
    "num_scheduler_steps": 2,
    "multi_step_stream_outputs": False,
    "preemption_mode": "swap",
    "swap_space": 8.0,
    "scheduler_cls": "my.Scheduler",
    "disable_chunked_mm_input": True,
    "additional_config": {"a": 1},
    "quantization": "awq",
    "tokenizer_pool_size": 2,
    "tokenizer_pool_type": "custom",
    "tokenizer_pool_extra_config": {"a": 1},
    "limit_mm_per_prompt": {"image": 2},
    "mm_processor_kwargs": {"num_crops": 4},
    "disable_mm_preprocessor_cache": True,
    "enable_lora": True,
    "enable_lora_bias": True,
    "max_loras": 2,
    "max_lora_rank": 8,
    "lora_extra_vocab_size": 128,
    "lora_dtype": "float16",
    "long_lora_scaling_factors": [4.0],
    "max_cpu_loras": 2,
    "fully_sharded_loras": True,
    "enable_prompt_adapter": True,
    "max_prompt_adapters": 2,
    "max_prompt_adapter_token": 4,
    "speculative_config": {"num_speculative_tokens": 2},
    "guided_decoding_backend": "guidance",
    "logits_processor_pattern": ".*",
    "enable_reasoning": True,
    "reasoning_parser": "granite",
    "show_hidden_metrics_for_version": "0.7",
    "otlp_traces_endpoint": "http://h:4317",
    "collect_detailed_traces": "all",
    "kv_transfer_config": {"kv_connector": "x"},
    "override_neuron_config": {"a": 1},
    "override_pooler_config": {"pooling_type": "mean"},
    "model_loader_extra_config": {"a": 1},
}


def test_refused_values_cover_every_limited_argument() -> None:
    limited = {
        name
        for name, rule in RULES.items()
        if rule.status == REFUSED or rule.allowed is not None or rule.accepts is not None
    }
    assert set(REFUSED_VALUES) == limited


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_refused_argument_names_itself(name: str, llama: Path) -> None:
    value = REFUSED_VALUES[name]
    assert value != default_of(name)
    with pytest.raises(ConfigError) as error:
        resolve_config(EngineArgs(model=str(llama), **{name: value}))
    assert error.value.arg_name == flag_of(name)
    assert error.value.value == value
    message = str(error.value)
    assert message.startswith(f"{flag_of(name)}=")
    assert "\n" not in message and len(message.split(": ", 1)[1]) > 10


def test_config_error_is_a_value_error() -> None:
    error = ConfigError("tensor_parallel_size", 2, "why")
    assert isinstance(error, ValueError)
    assert str(error) == "--tensor-parallel-size=2: why"
    assert (
        str(ConfigError("--rope-scaling", {"factor": 2}, "why"))
        == '--rope-scaling={"factor":2}: why'
    )


@pytest.mark.parametrize(
    "name, value",
    [
        ("gpu_memory_utilization", 0.0),
        ("gpu_memory_utilization", 1.5),
        ("swap_space", -1.0),
        ("max_num_seqs", 0),
        ("max_model_len", -5),
        ("num_gpu_blocks_override", 0),
        ("long_prefill_token_threshold", -1),
        ("rope_theta", 0.0),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("compilation_config", {"level": True}),
        ("tensor_parallel_size", 0),
        ("pipeline_parallel_size", 0),
        ("compilation_config", 7),
        ("compilation_config", {"level": 3, "backend": "eager"}),
        ("compilation_config", {"cudagraph_capture_sizes": [1, 0]}),
        ("served_model_name", []),
        # Python callers bypass argparse: types and choices are checked here too.
        ("block_size", 7),
        ("dtype", "float64"),
        ("tensor_parallel_size", "2"),
        ("enforce_eager", "yes"),
        ("max_num_seqs", 2.5),
        ("hf_overrides", "[1]"),
        ("model", None),
    ],
)
def test_bad_values_from_python(name: str, value: Any, llama: Path) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_config(EngineArgs(**{"model": str(llama), "device": "cpu", name: value}))
    assert error.value.arg_name == flag_of(name)


def test_swap_space_zero_and_the_default_schedulers_are_accepted(llama: Path) -> None:
    resolve(llama, swap_space=0)
    resolve(llama, seed=2**64 - 1)
    for path in DEFAULT_SCHEDULER_CLASSES:
        resolve(llama, scheduler_cls=path)


def test_every_argument_has_a_rule() -> None:
    assert set(RULES) == set(engine_arg_names())


# --- the embedded SmolLM2 alias (reading the GGUF's metadata takes seconds)


@pytest.fixture(scope="module")
def smollm2() -> EngineConfig:
    return resolve(ALIAS)


@pytest.mark.slow
def test_alias_resolves_to_the_packaged_gguf(smollm2: EngineConfig) -> None:
    gguf = str(resolve_alias(ALIAS))
    model = smollm2.model
    assert gguf.endswith(".gguf")
    assert (model.model, model.model_path, model.gguf_file, model.tokenizer) == (
        ALIAS,
        gguf,
        gguf,
        gguf,
    )
    assert model.architecture == "LlamaForCausalLM"
    assert model.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert (model.hf_config["num_hidden_layers"], model.hf_config["hidden_size"]) == (30, 576)
    assert (model.dtype, model.max_model_len, model.quantization) == ("float32", 8192, "gguf")
    assert model.generation_config == {}
    assert model.served_model_names == [ALIAS]
    assert smollm2.load.load_format == "gguf"
    assert EngineConfig.decode(smollm2.encode()) == smollm2


@pytest.mark.slow
def test_alias_with_overrides(smollm2: EngineConfig) -> None:
    config = resolve(
        ALIAS,
        hf_overrides={"max_position_embeddings": 4096},
        max_model_len=2048,
        load_format="dummy",
        override_generation_config={"temperature": 0.2},
    )
    assert (config.model.max_model_len, config.load.load_format) == (2048, "dummy")
    assert config.model.hf_config["max_position_embeddings"] == 4096
    assert config.model.generation_config == {"temperature": 0.2}
    assert refusal(ALIAS, load_format="safetensors").arg_name == "--load-format"
