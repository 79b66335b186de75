"""The external_launcher backend: torchrun starts the ranks, each runs its own engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine_core import LLM, SamplingParams
from engine_core.args import EngineArgs
from engine_core.config import ConfigError, resolve_config
from tests.helpers.tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "torchrun_tp.py"
MAX_TOKENS = 8
LAUNCHER_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("llama-launcher"), "llama"))


def example_prompts() -> list[str]:
    namespace: dict = {}
    exec(compile(EXAMPLE.read_text(), str(EXAMPLE), "exec"), namespace)  # not a package
    return namespace["PROMPTS"]


def tp1_tokens(model: str, monkeypatch) -> list[list[int]]:
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model, max_model_len=512, distributed_executor_backend="uni") as llm:
        outs = llm.generate(example_prompts(), params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def run_torchrun(model: str, out_dir: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(EXAMPLE), "--model", model, "--max-tokens", str(MAX_TOKENS), "--ignore-eos"]
    cmd += ["--output-dir", str(out_dir), *extra]
    scratch = out_dir / "tmp"  # torchrun leaves its log folders in the temp folder
    scratch.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TMPDIR=str(scratch))
    # Its own session: on a timeout the whole tree (agent and ranks) is killed.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("user_group", [False, True], ids=["engine-group", "user-group"])
def test_torchrun_ranks_agree_with_tp1(model, tmp_path, monkeypatch, user_group):
    run_torchrun(model, tmp_path, *(["--init-process-group"] if user_group else []))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    tokens = [result["token_ids"] for result in ranks[0]]
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert tokens == tp1_tokens(model, monkeypatch)


def test_one_rank_runs_in_process(model, monkeypatch):
    # A world of one needs no process group: the executor path alone, without torchrun.
    for name, value in LAUNCHER_ENV.items():
        monkeypatch.setenv(name, value)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model, max_model_len=512, distributed_executor_backend="external_launcher") as llm:
        assert type(llm.engine).__name__ == "InprocClient"  # no core process under torchrun
        outs = llm.generate(example_prompts(), params, use_tqdm=False)
        assert llm.collective_rpc("kv_cache_dtype_name") == ["torch.float32"]
    assert [list(o.outputs[0].token_ids) for o in outs] == tp1_tokens(model, monkeypatch)


def test_world_size_must_equal_tp_times_pp(model, monkeypatch):
    for name, value in dict(LAUNCHER_ENV, WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"^--tensor-parallel-size=2: .*4 ranks .*2 x 1 = 2"):
        resolve_config(
            EngineArgs(
                model=model,
                tensor_parallel_size=2,
                distributed_executor_backend="external_launcher",
            )
        )


def test_needs_the_launcher_environment(model, monkeypatch):
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        ConfigError, match="^--distributed-executor-backend=external_launcher: RANK"
    ):
        resolve_config(EngineArgs(model=model, distributed_executor_backend="external_launcher"))


def test_clock_based_scheduling_is_refused(model, monkeypatch):
    for name, value in LAUNCHER_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="^--scheduler-delay-factor=0.5: .*clock"):
        resolve_config(
            EngineArgs(
                model=model,
                scheduler_delay_factor=0.5,
                distributed_executor_backend="external_launcher",
            )
        )
