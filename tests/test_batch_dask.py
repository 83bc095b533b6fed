"""`run_tasks` on a Dask cluster: a `LocalCluster` of 2 worker processes, state on S3 (moto).

Dask runs each task through ``Client.get_executor()``; the engine's leases
keep its reschedules (after a worker dies) from running any stage twice.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batch_factories import LOG_ENV, Pipeline, expected_pairs, runs, set_env
from conftest import make_io
from distributed import Client, LocalCluster

from checkmate import LocalTaskIO, StageStatus, TaskIO, TaskOutcome, run_tasks

pytestmark = pytest.mark.emulator

TESTS_DIR = Path(__file__).resolve().parent
TIMEOUT = 120


@pytest.fixture(scope="module")
def client(s3_emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A LocalCluster of 2 worker processes with 1 thread each (started after moto)."""
    del s3_emulator  # started first: the workers inherit its environment
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        local_directory=str(tmp_path_factory.mktemp("dask")),  # not shared with other runs
    )
    dask = Client(cluster)
    try:
        yield dask
    finally:
        dask.close()
        cluster.close()


@pytest.fixture
def s3(s3_emulator: Any, tmp_path: Path) -> TaskIO:
    del s3_emulator
    return make_io("s3", tmp_path)


def ids(n: int) -> list[str]:
    return [f"d{i:04d}" for i in range(n)]


def test_200_tasks_on_a_dask_cluster_with_state_on_s3(
    client: Client, s3: TaskIO, tmp_path: Path
) -> None:
    log = tmp_path / "stages.log"
    tasks = ids(200)
    factory = Pipeline(log_path=str(log), lock_ttl=5, lock_skew=1)
    summary = run_tasks(factory, tasks, s3, executor=client.get_executor(), progress=False)
    assert list(summary.results) == tasks
    assert summary.all_complete, summary.describe()
    assert {r.status for r in summary} == {StageStatus.COMPLETE}
    done = runs(log)
    assert set(done) == expected_pairs(tasks)
    assert set(done.values()) == {1}
    assert runs(log, "start") == done
    workers = {r.worker for r in summary}
    assert len(workers) == 2  # both Dask workers took part
    assert set(client.run(os.getpid).values()) == {int(w.rsplit(":", 1)[1]) for w in workers}


def test_a_killed_dask_worker_costs_no_double_run(
    client: Client, s3: TaskIO, tmp_path: Path
) -> None:
    """SIGKILL the worker process running a stage: Dask reschedules, the lease fences."""
    client.wait_for_workers(2, timeout=TIMEOUT)
    log = tmp_path / "stages.log"
    fifo = tmp_path / "victim.fifo"
    os.mkfifo(fifo)
    tasks = ids(60)
    victim = tasks[5]
    factory = Pipeline(
        log_path=str(log),
        lock_ttl=2,
        lock_skew=1,
        retry_policy="STAGE",
        max_attempts=3,
        block_task=victim,
        block_fifo=str(fifo),
    )
    killed: dict[str, int] = {}
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def kill_the_victims_worker() -> None:
        ready, _, _ = select.select([reader], [], [], TIMEOUT)
        if not ready:
            return
        pid = int(os.read(reader, 64).decode().split()[0])
        worker_pids = client.run(os.getpid)  # {worker address: pid}
        if pid in worker_pids.values():
            killed["pid"] = pid
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_victims_worker, daemon=True)
    killer.start()
    try:
        summary = run_tasks(
            factory, tasks, s3, executor=client.get_executor(), strict_recovery=True
        )
    finally:
        killer.join(TIMEOUT)
        os.close(reader)
    assert "pid" in killed, "the victim's stage never ran in a Dask worker"
    assert killed["pid"] not in client.run(os.getpid).values()  # the nanny replaced it
    assert summary.all_complete, summary.describe()
    result = summary[victim]
    assert result.outcome is TaskOutcome.COMPLETE
    assert result.stage_attempts == 4  # s1's first attempt died with its worker
    done = runs(log)
    assert set(done) == expected_pairs(tasks)
    assert set(done.values()) == {1}, [p for p, n in done.items() if n != 1]
    started = runs(log, "start")
    assert started[(victim, "s1")] == 2
    del started[(victim, "s1")]
    assert set(started.values()) == {1}
    with factory(victim, s3) as engine:
        assert [s.state.attempts for s in engine.stages] == [1, 2, 1]
        assert "interrupted" in engine.stages[1].state.history[-3].message


def test_cli_run_on_a_dask_cluster(client: Client, tmp_path: Path) -> None:
    log = tmp_path / "stages.log"
    tasks = ids(20)
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(tasks) + "\n")
    store = tmp_path / "store"
    # The factory runs in the Dask workers: its configuration must be there.
    client.wait_for_workers(2, timeout=TIMEOUT)  # a worker killed before is back
    client.run(set_env, LOG_ENV, str(log))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkmate",
            "run",
            "batch_factories:cli_pipeline",
            "--store",
            str(store),
            "--tasks",
            str(tasks_file),
            "--dask",
            client.scheduler.address,
            "--json",
        ],
        cwd=TESTS_DIR,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [(r["task_id"], r["status"]) for r in results] == [(t, "COMPLETE") for t in tasks]
    workers = {r["worker"] for r in results}
    assert {int(w.rsplit(":", 1)[1]) for w in workers} <= set(client.run(os.getpid).values())
    assert set(runs(log).values()) == {1}
    assert len(runs(log)) == 60
    assert LocalTaskIO(store).list("")
