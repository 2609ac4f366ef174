"""gpt.threads and the grid's worker pool: each worker gets cores // workers threads in every pool."""

from __future__ import annotations

import os

import pytest

from gpt.ablation.workers import worker_pool
from gpt.threads import THREAD_VARIABLES, available_cores, thread_environment, thread_settings, worker_threads


@pytest.mark.parametrize(("workers", "cores", "threads"), [(1, 8, 8), (2, 8, 4), (3, 8, 2), (4, 2, 1), (8, 2, 1)])
def test_workers_share_the_cores_and_get_at_least_one_thread(workers, cores, threads):
    assert worker_threads(workers, cores) == threads


def test_available_cores_are_the_affinity_mask():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == expected
    assert worker_threads(1) == expected, "a single process uses every core"


def test_thread_environment_sets_the_variables_and_restores_them(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with thread_environment(3):
        assert [os.environ[name] for name in THREAD_VARIABLES] == ["3", "3", "3"]
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "MKL_NUM_THREADS" not in os.environ


def test_a_spawned_worker_gets_its_share_in_every_pool():
    threads, before = worker_threads(2), {name: os.environ.get(name) for name in THREAD_VARIABLES}
    with worker_pool(2) as pool:
        settings = pool.submit(thread_settings).result(timeout=120)
    assert settings == {**dict.fromkeys(THREAD_VARIABLES, str(threads)), "intra_op": threads, "inter_op": threads}
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == before, "the parent's variables come back"
