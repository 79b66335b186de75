"""Workers on the CPU split this machine's cores between the ranks of every engine core
(executor/worker.py): the suite sets OMP_NUM_THREADS, so the split is checked here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import executor.worker as worker


@pytest.fixture
def threads_set(monkeypatch) -> list[int]:
    """torch.set_num_threads calls, on a machine of 8 cores and no OMP_NUM_THREADS."""
    calls: list[int] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    monkeypatch.setattr(worker.torch, "set_num_threads", calls.append)
    return calls


def config(tp: int, dp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(parallel=SimpleNamespace(world_size=tp, data_parallel_size=dp))


@pytest.mark.parametrize(
    ("tp", "dp", "want"), [(2, 1, 4), (4, 1, 2), (2, 2, 2), (3, 1, 2), (16, 1, 1)]
)
def test_each_rank_takes_its_share_of_the_cores(threads_set, tp, dp, want) -> None:
    worker._share_cpu_threads(config(tp, dp))  # type: ignore[arg-type]
    assert threads_set == [want]


def test_one_rank_keeps_torchs_default(threads_set) -> None:
    worker._share_cpu_threads(config(1))  # type: ignore[arg-type]
    assert threads_set == []


def test_omp_num_threads_wins(threads_set, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    worker._share_cpu_threads(config(4))  # type: ignore[arg-type]
    assert threads_set == []
