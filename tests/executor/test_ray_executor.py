"""The ray executor: on a local Ray cluster on the CPU (gloo), TP=2 gives the greedy
tokens of TP=1 and leaves nothing behind; the automatic choice of the backend; the
--ray-workers-use-nsight rules."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import engine_core.config as config_module
from engine_core import LLM
from engine_core.args import EngineArgs
from engine_core.config import ConfigError, auto_backend, resolve_config
from tests.helpers.generate import greedy_tokens, random_prompts
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture
def ray_cluster():
    """A local Ray cluster of 2 CPUs in a temp folder; stopped and removed after the
    test, whatever its outcome."""
    ray = pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="tessera-ray-")  # short: Ray's socket paths live here
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until(condition: Any, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_ray_tp2_equals_tp1_and_cleans_up(ray_cluster, tmp_path, monkeypatch):
    from executor.mp import WorkerDiedError

    ray = ray_cluster
    path = str(make_tiny_model(tmp_path / "llama", "llama"))
    ps = random_prompts(4, seed=3)
    monkeypatch.setenv("TESSERA_ENABLE_MULTIPROCESSING", "0")  # the executor in this process
    with LLM(path, max_model_len=256, distributed_executor_backend="uni") as llm:
        reference = greedy_tokens(llm, ps, 12)

    with LLM(
        path, max_model_len=256, tensor_parallel_size=2, distributed_executor_backend="ray"
    ) as llm:
        assert greedy_tokens(llm, ps, 12) == reference
        assert llm.collective_rpc("kv_cache_dtype_name") == ["torch.float32"] * 2
        executor = llm.engine.core.executor
        executor.check_health()
        pg = executor._pg
        pids = [ray.get(a.__ray_call__.remote(lambda _: os.getpid())) for a in executor._actors]
        assert len(set(pids)) == 2 and all(psutil.pid_exists(pid) for pid in pids)

        # a dead actor is reported at once, by name, and shutdown still cleans up
        deaths: list[str] = []
        executor.on_worker_death = deaths.append
        ray.kill(executor._actors[1])
        assert wait_until(lambda: deaths)
        assert "rank 1 died" in deaths[0]
        with pytest.raises(WorkerDiedError, match="rank 1 died"):
            executor.check_health()

    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids))
    assert ray.is_initialized()  # the test's cluster: the executor leaves it running


def test_auto_backend_is_ray_beyond_the_local_gpus(monkeypatch):
    monkeypatch.setattr(config_module, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(config_module, "ray_installed", lambda: True)
    assert auto_backend(2, 2, "cuda") == "mp"
    assert auto_backend(4, 4, "cuda") == "ray"
    assert auto_backend(8, 8, "cpu") == "mp"  # the CPU sets no limit on ranks
    monkeypatch.setattr(config_module, "ray_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size=4: .*Ray .*not installed"):
        auto_backend(4, 4, "cuda")


def test_ray_backend_needs_ray(tmp_path, monkeypatch):
    path = str(make_tiny_model(tmp_path / "llama", "llama"))
    monkeypatch.setattr(config_module, "ray_installed", lambda: False)
    with pytest.raises(ConfigError, match="--distributed-executor-backend=ray: Ray is not"):
        resolve_config(EngineArgs(model=path, distributed_executor_backend="ray"))


def test_nsight_needs_nsys_and_the_ray_executor(tmp_path, monkeypatch):
    path = str(make_tiny_model(tmp_path / "llama", "llama"))
    args = dict(model=path, distributed_executor_backend="ray", ray_workers_use_nsight=True)
    monkeypatch.setattr(config_module, "ray_installed", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="--ray-workers-use-nsight=True: needs nsys"):
        resolve_config(EngineArgs(**args))

    nsys = Path(tmp_path / "bin" / "nsys")  # a stand-in: only its presence on PATH matters
    nsys.parent.mkdir()
    nsys.write_text("#!/bin/sh\n")
    nsys.chmod(0o755)
    monkeypatch.setenv("PATH", str(nsys.parent))
    with pytest.raises(ConfigError, match="--ray-workers-use-nsight=True: .*executor is mp"):
        resolve_config(EngineArgs(**dict(args, distributed_executor_backend="mp")))
    config = resolve_config(EngineArgs(**args))
    assert config.parallel.ray_workers_use_nsight

    pytest.importorskip("ray")
    from executor.ray_executor import actor_options

    assert actor_options(config, None, 0)["runtime_env"] == {"nsight": "default"}  # type: ignore[arg-type]
    plain = resolve_config(EngineArgs(model=path, distributed_executor_backend="ray"))
    assert "runtime_env" not in actor_options(plain, None, 0)  # type: ignore[arg-type]


def test_rank_order_and_local_placement():
    pytest.importorskip("ray")
    from executor.ray_executor import local_placement, rank_order

    places = [
        ("other", "10.0.0.2", ["1"]),
        ("here", "10.0.0.9", ["10"]),
        ("other", "10.0.0.2", ["0"]),
        ("here", "10.0.0.9", ["2"]),
    ]
    order = rank_order(places, driver_node="here")
    assert order == [3, 1, 2, 0]  # this node first (rank 0 hosts the store), GPUs numerically
    ranked = [places[i] for i in order]
    assert local_placement(ranked, cuda=True) == [(0, "2,10"), (1, "2,10"), (0, "0,1"), (1, "0,1")]
    assert local_placement(ranked, cuda=False) == [(0, None), (1, None), (0, None), (1, None)]
