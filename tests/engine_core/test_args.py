"""The engine-argument parser, EngineArgs, and the README status table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from engine_core.args import (
    GROUPS,
    EngineArgs,
    arg_spec,
    default_of,
    engine_arg_names,
    flag_of,
    make_arg_parser,
    parse_human_int,
)
from engine_core.config import RULES, render_status_table

REPO = Path(__file__).resolve().parents[2]
STATUS_MARKER = "<!-- engine-args-status -->"

# One valid, non-default command line per argument, and the value it parses to.
VALID: dict[str, tuple[list[str], Any]] = {
    "model": (["--model", "/models/m"], "/models/m"),
    "task": (["--task", "generate"], "generate"),
    "tokenizer": (["--tokenizer", "tok"], "tok"),
    "hf_config_path": (["--hf-config-path", "cfg"], "cfg"),
    "skip_tokenizer_init": (["--skip-tokenizer-init"], True),
    "revision": (["--revision", "v1"], "v1"),
    "code_revision": (["--code-revision", "v2"], "v2"),
    "tokenizer_revision": (["--tokenizer-revision", "v3"], "v3"),
    "tokenizer_mode": (["--tokenizer-mode", "slow"], "slow"),
    "trust_remote_code": (["--trust-remote-code"], True),
    "allowed_local_media_path": (["--allowed-local-media-path", "/media"], "/media"),
    "download_dir": (["--download-dir", "/dl"], "/dl"),
    "load_format": (["--load-format", "safetensors"], "safetensors"),
    "config_format": (["--config-format", "hf"], "hf"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "kv_cache_dtype": (["--kv-cache-dtype", "fp8"], "fp8"),
    "max_model_len": (["--max-model-len", "4k"], 4000),
    "model_impl": (["--model-impl", "vllm"], "vllm"),
    "generation_config": (["--generation-config", "vllm"], "vllm"),
    "override_generation_config": (
        ["--override-generation-config", '{"temperature": 0.5}'],
        {"temperature": 0.5},
    ),
    "hf_token": (["--hf-token"], True),
    "hf_overrides": (["--hf-overrides", '{"num_hidden_layers": 2}'], {"num_hidden_layers": 2}),
    "rope_scaling": (
        ["--rope-scaling", '{"rope_type":"dynamic","factor":2.0}'],
        {"rope_type": "dynamic", "factor": 2.0},
    ),
    "rope_theta": (["--rope-theta", "500000"], 500000.0),
    "disable_sliding_window": (["--disable-sliding-window"], True),
    "served_model_name": (["--served-model-name", "a", "b"], ["a", "b"]),
    "qlora_adapter_name_or_path": (["--qlora-adapter-name-or-path", "q"], "q"),
    "distributed_executor_backend": (["--distributed-executor-backend", "mp"], "mp"),
    "pipeline_parallel_size": (["-pp", "2"], 2),
    "tensor_parallel_size": (["-tp", "4"], 4),
    "data_parallel_size": (["-dp", "2"], 2),
    "enable_expert_parallel": (["--enable-expert-parallel"], True),
    "max_parallel_loading_workers": (["--max-parallel-loading-workers", "2"], 2),
    "ray_workers_use_nsight": (["--ray-workers-use-nsight"], True),
    "worker_cls": (["--worker-cls", "my.Worker"], "my.Worker"),
    "worker_extension_cls": (["--worker-extension-cls", "my.Ext"], "my.Ext"),
    "disable_custom_all_reduce": (["--disable-custom-all-reduce"], True),
    "device": (["--device", "cpu"], "cpu"),
    "block_size": (["--block-size", "32"], 32),
    "enable_prefix_caching": (["--enable-prefix-caching"], True),
    "prefix_caching_hash_algo": (["--prefix-caching-hash-algo", "sha256"], "sha256"),
    "use_v2_block_manager": (["--use-v2-block-manager"], True),
    "num_lookahead_slots": (["--num-lookahead-slots", "2"], 2),
    "seed": (["--seed", "7"], 7),
    "swap_space": (["--swap-space", "1.5"], 1.5),
    "cpu_offload_gb": (["--cpu-offload-gb", "2"], 2.0),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "num_gpu_blocks_override": (["--num-gpu-blocks-override", "100"], 100),
    "calculate_kv_scales": (["--calculate-kv-scales"], True),
    "enable_sleep_mode": (["--enable-sleep-mode"], True),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "2048"], 2048),
    "max_num_seqs": (["--max-num-seqs", "8"], 8),
    "max_num_partial_prefills": (["--max-num-partial-prefills", "2"], 2),
    "max_long_partial_prefills": (["--max-long-partial-prefills", "2"], 2),
    "long_prefill_token_threshold": (["--long-prefill-token-threshold", "100"], 100),
    "enable_chunked_prefill": (["--enable-chunked-prefill", "false"], False),
    "num_scheduler_steps": (["--num-scheduler-steps", "4"], 4),
    "multi_step_stream_outputs": (["--multi-step-stream-outputs", "false"], False),
    "scheduler_delay_factor": (["--scheduler-delay-factor", "0.5"], 0.5),
    "preemption_mode": (["--preemption-mode", "swap"], "swap"),
    "scheduling_policy": (["--scheduling-policy", "priority"], "priority"),
    "scheduler_cls": (["--scheduler-cls", "my.Sched"], "my.Sched"),
    "max_logprobs": (["--max-logprobs", "5"], 5),
    "disable_async_output_proc": (["--disable-async-output-proc"], True),
    "disable_cascade_attn": (["--disable-cascade-attn"], True),
    "disable_chunked_mm_input": (["--disable-chunked-mm-input"], True),
    "enforce_eager": (["--enforce-eager"], True),
    "max_seq_len_to_capture": (["--max-seq-len-to-capture", "1024"], 1024),
    "compilation_config": (["-O3"], {"level": 3}),
    "additional_config": (["--additional-config", '{"a": 1}'], {"a": 1}),
    "quantization": (["-q", "awq"], "awq"),
    "tokenizer_pool_size": (["--tokenizer-pool-size", "2"], 2),
    "tokenizer_pool_type": (["--tokenizer-pool-type", "custom"], "custom"),
    "tokenizer_pool_extra_config": (["--tokenizer-pool-extra-config", '{"x": 1}'], {"x": 1}),
    "limit_mm_per_prompt": (
        ["--limit-mm-per-prompt", "image=16,video=2"],
        {"image": 16, "video": 2},
    ),
    "mm_processor_kwargs": (["--mm-processor-kwargs", '{"num_crops": 4}'], {"num_crops": 4}),
    "disable_mm_preprocessor_cache": (["--disable-mm-preprocessor-cache"], True),
    "enable_lora": (["--enable-lora"], True),
    "enable_lora_bias": (["--enable-lora-bias"], True),
    "max_loras": (["--max-loras", "2"], 2),
    "max_lora_rank": (["--max-lora-rank", "8"], 8),
    "lora_extra_vocab_size": (["--lora-extra-vocab-size", "128"], 128),
    "lora_dtype": (["--lora-dtype", "bfloat16"], "bfloat16"),
    "long_lora_scaling_factors": (["--long-lora-scaling-factors", "4.0,8.0"], [4.0, 8.0]),
    "max_cpu_loras": (["--max-cpu-loras", "4"], 4),
    "fully_sharded_loras": (["--fully-sharded-loras"], True),
    "enable_prompt_adapter": (["--enable-prompt-adapter"], True),
    "max_prompt_adapters": (["--max-prompt-adapters", "2"], 2),
    "max_prompt_adapter_token": (["--max-prompt-adapter-token", "16"], 16),
    "speculative_config": (
        ["--speculative-config", '{"num_speculative_tokens": 2}'],
        {"num_speculative_tokens": 2},
    ),
    "guided_decoding_backend": (["--guided-decoding-backend", "guidance"], "guidance"),
    "logits_processor_pattern": (["--logits-processor-pattern", "my\\..*"], "my\\..*"),
    "enable_reasoning": (["--enable-reasoning"], True),
    "reasoning_parser": (["--reasoning-parser", "deepseek_r1"], "deepseek_r1"),
    "disable_log_stats": (["--disable-log-stats"], True),
    "disable_log_requests": (["--disable-log-requests"], True),
    "show_hidden_metrics_for_version": (["--show-hidden-metrics-for-version", "0.7"], "0.7"),
    "otlp_traces_endpoint": (["--otlp-traces-endpoint", "http://h:4317"], "http://h:4317"),
    "collect_detailed_traces": (["--collect-detailed-traces", "model,worker"], "model,worker"),
    "use_tqdm_on_load": (["--no-use-tqdm-on-load"], False),
    "kv_transfer_config": (
        ["--kv-transfer-config", '{"kv_connector": "x"}'],
        {"kv_connector": "x"},
    ),
    "override_neuron_config": (["--override-neuron-config", '{"a": "b"}'], {"a": "b"}),
    "override_pooler_config": (
        ["--override-pooler-config", '{"pooling_type": "mean"}'],
        {"pooling_type": "mean"},
    ),
    "model_loader_extra_config": (["--model-loader-extra-config", '{"a": 1}'], {"a": 1}),
    "ignore_patterns": (
        ["--ignore-patterns", "*.pt", "--ignore-patterns", "x/*"],
        ["*.pt", "x/*"],
    ),
}

JSON_ARGS = [
    "override_generation_config",
    "hf_overrides",
    "rope_scaling",
    "compilation_config",
    "speculative_config",
    "kv_transfer_config",
    "additional_config",
    "model_loader_extra_config",
    "override_pooler_config",
    "mm_processor_kwargs",
    "tokenizer_pool_extra_config",
    "override_neuron_config",
]


def parse(argv: list[str]) -> argparse.Namespace:
    return make_arg_parser().parse_args(argv)


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's error message for a command line that must fail."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def engine_options(parser: argparse.ArgumentParser) -> set[str]:
    """The long flag of every engine argument the parser has (not -h/--help)."""
    names = set(engine_arg_names())
    return {action.option_strings[0] for action in parser._actions if action.dest in names}


# --- every argument parses


def test_every_argument_has_a_valid_example() -> None:
    assert set(VALID) == set(engine_arg_names())


@pytest.mark.parametrize("name", sorted(VALID))
def test_argument_parses(name: str) -> None:
    argv, expected = VALID[name]
    namespace = parse(argv)
    assert getattr(namespace, name) == expected
    assert expected != default_of(name)  # the example really exercises the flag
    assert getattr(EngineArgs.from_cli(namespace), name) == expected


def test_no_arguments_give_the_defaults() -> None:
    assert EngineArgs.from_cli(parse([])) == EngineArgs()
    assert EngineArgs().model == "facebook/opt-125m"


def test_defaults_match_vllm() -> None:
    args = EngineArgs()
    assert (args.tensor_parallel_size, args.max_logprobs, args.swap_space) == (1, 20, 4)
    assert (args.gpu_memory_utilization, args.max_seq_len_to_capture) == (0.9, 8192)
    assert (args.enable_prefix_caching, args.seed, args.max_model_len) == (None, None, None)
    assert (args.use_tqdm_on_load, args.multi_step_stream_outputs) == (True, True)
    assert (args.guided_decoding_backend, args.tokenizer_pool_type) == ("xgrammar", "ray")


def test_every_argument_is_in_its_group() -> None:
    parser = make_arg_parser()
    titles = [group.title for group in parser._action_groups]
    assert all(title in titles for title in GROUPS)
    for group in parser._action_groups:
        for action in group._group_actions:
            if action.dest in VALID:
                assert group.title == arg_spec(action.dest).group, action.dest


def test_help_lists_every_flag() -> None:
    text = make_arg_parser().format_help()
    for name in engine_arg_names():
        assert flag_of(name) in text


def test_adds_to_an_existing_parser() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    make_arg_parser(parser)
    namespace = parser.parse_args(["--port", "9000", "-tp", "2"])
    assert (namespace.port, namespace.tensor_parallel_size) == (9000, 2)
    assert EngineArgs.from_cli(namespace).tensor_parallel_size == 2


# --- special forms


@pytest.mark.parametrize(
    "argv, level",
    [
        (["-O3"], 3),
        (["-O", "3"], 3),
        (["-O0"], 0),
        (["--compilation-config", "2"], 2),
        (["--compilation-config", '{"level": 1}'], 1),
    ],
)
def test_optimisation_level(argv: list[str], level: int) -> None:
    assert parse(argv).compilation_config == {"level": level}


@pytest.mark.parametrize(
    "argv, expected",
    [([], None), (["--enable-prefix-caching"], True), (["--no-enable-prefix-caching"], False)],
)
def test_prefix_caching_pair(argv: list[str], expected: bool | None) -> None:
    assert parse(argv).enable_prefix_caching is expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),
        (["--enable-chunked-prefill"], True),
        (["--enable-chunked-prefill", "true"], True),
        (["--enable-chunked-prefill", "False"], False),
    ],
)
def test_chunked_prefill_optional_bool(argv: list[str], expected: bool | None) -> None:
    assert parse(argv).enable_chunked_prefill is expected


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("1k", 1000),
        ("1K", 1024),
        ("2m", 2_000_000),
        ("2M", 2 * 1024**2),
        ("1g", 1_000_000_000),
        ("1G", 1024**3),
        ("1.5k", 1500),
        ("32K", 32768),
    ],
)
def test_max_model_len_suffixes(text: str, value: int) -> None:
    assert parse_human_int(text) == value
    assert parse(["--max-model-len", text]).max_model_len == value


def test_hf_token_with_a_value() -> None:
    assert parse(["--hf-token", "abc"]).hf_token == "abc"


def test_quantization_none_means_unset() -> None:
    assert parse(["-q", "None"]).quantization is None
    assert parse(["--quantization", "gguf"]).quantization == "gguf"


# --- bad values name the argument


@pytest.mark.parametrize("text", ["1x", "k", "1.5K", "1.5", "-1", "1.0001k", ""])
def test_bad_max_model_len(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --max-model-len" in parse_error(["--max-model-len", text], capsys)


@pytest.mark.parametrize("name", JSON_ARGS)
@pytest.mark.parametrize("text", ["{bad json", "[1, 2]", '"text"'])
def test_bad_json(name: str, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"argument {flag_of(name)}" in parse_error([flag_of(name), text], capsys)


@pytest.mark.parametrize("name", [n for n in engine_arg_names() if arg_spec(n).choices])
def test_bad_choice(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = "7" if arg_spec(name).type is int else "bogus"
    error = parse_error([flag_of(name), bogus], capsys)
    assert f"argument {flag_of(name)}" in error
    assert "invalid choice" in error


@pytest.mark.parametrize(
    "name", [n for n in engine_arg_names() if arg_spec(n).type in (int, float)]
)
def test_bad_number(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"argument {flag_of(name)}" in parse_error([flag_of(name), "abc"], capsys)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["-O", "5"], "--compilation-config"),
        (["--enable-chunked-prefill", "maybe"], "--enable-chunked-prefill"),
        (["--limit-mm-per-prompt", "image"], "--limit-mm-per-prompt"),
        (["--long-lora-scaling-factors", "4,x"], "--long-lora-scaling-factors"),
        (["--block-size", "7"], "--block-size"),
    ],
)
def test_bad_special_values(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"argument {flag}" in parse_error(argv, capsys)


# --- EngineArgs from Python


def test_engine_args_from_kwargs() -> None:
    args = EngineArgs(model="m", tensor_parallel_size=2, enforce_eager=True)
    assert (args.model, args.tensor_parallel_size, args.enforce_eager) == ("m", 2, True)
    assert args.non_default() == {"model": "m", "tensor_parallel_size": 2, "enforce_eager": True}


def test_engine_args_rejects_unknown_kwargs() -> None:
    with pytest.raises(TypeError) as error:
        EngineArgs(model="m", tensor_paralel_size=2, foo=1)
    message = str(error.value)
    assert "foo" in message
    assert "tensor_paralel_size (did you mean tensor_parallel_size?)" in message


def test_list_defaults_are_not_shared() -> None:
    first, second = EngineArgs(), EngineArgs()
    assert first.ignore_patterns is None and second.served_model_name is None


# --- the status table of the README cannot drift


def status_table_source() -> Path:
    """README.md: the table sits there under its marker."""
    return REPO / "README.md"


def read_status_rows(path: Path) -> dict[str, str]:
    """flag -> status of the first table after the marker line."""
    lines = path.read_text().splitlines()
    start = lines.index(STATUS_MARKER) + 1
    rows: dict[str, str] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        match = re.match(r"\|\s*`(--[a-z0-9-]+)`\s*\|\s*(.*?)\s*\|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_status_table_lists_exactly_the_parser_options() -> None:
    rows = read_status_rows(status_table_source())
    assert set(rows) == engine_options(make_arg_parser())


def test_status_table_matches_the_rules() -> None:
    rows = read_status_rows(status_table_source())
    generated = read_status_rows_from_text(render_status_table())
    assert rows == generated


def read_status_rows_from_text(table: str) -> dict[str, str]:
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\|\s*`(--[a-z0-9-]+)`\s*\|\s*(.*?)\s*\|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_status_has_a_known_form() -> None:
    for flag, status in read_status_rows_from_text(render_status_table()).items():
        assert status.startswith(("works", "refused: ")), flag
        assert "|" not in status


def test_rules_cover_every_argument() -> None:
    assert set(RULES) == set(engine_arg_names())
