"""Beyond one machine, for real: PostgreSQL, RabbitMQ, a listener, two workers and a dispatcher as separate
processes, Orthanc as the PACS, DCMTK's storescu as the scanners.

- 20 small studies pushed at once; one worker SIGKILLed in the middle of a series; every study's results
  reach Orthanc exactly once (Orthanc logs every C-STORE it receives, duplicates included) and no job is
  left pending.
- A broker of the test's own killed in the middle of a run and started again without its disk: every job
  whose message it lost is published again by the relay (the reconciler), and every study still gets its
  results exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusternode import ROOT, push, results_exactly_once, running_cluster, settled, studies
from peers import running_orthanc, wait_until
from pg import scratch_database
from rabbit import Broker, broker_or_start

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


def test_two_workers_one_killed_mid_series_every_study_gets_its_results_once(tmp_path: Path, pg_url: str) -> None:
    broker, own = broker_or_start(tmp_path / "rabbit")
    study_uids, folder = studies(tmp_path, 20, first_seed=300)
    try:
        with (
            running_orthanc(tmp_path / "orthanc", count_receptions=True) as orthanc,
            running_cluster(tmp_path, broker, pg_url, orthanc.dicom_port, workers=2) as cluster,
        ):
            store, worker_a = cluster.store, cluster.workers[0]
            push(cluster.port, folder)

            def a_is_mid_series() -> bool:
                rows = store.queue.jobs(("running",))
                return any(r["kind"] == "analyze-series" and f":{worker_a.pid}:" in r.get("worker", "") for r in rows)

            wait_until(a_is_mid_series, timeout=180, interval=0.02, what="worker A to hold a series")
            held = [r["key"] for r in store.queue.jobs(("running",)) if f":{worker_a.pid}:" in r.get("worker", "")]
            os.kill(worker_a.pid, signal.SIGKILL)
            worker_a.wait(timeout=10)
            wait_until(lambda: settled(store, 20), timeout=420, interval=0.5, what="every study analysed and sent")
            results_jobs = [j for j in store.queue.jobs() if j["kind"] == "series-results"]
            assert len({j["key"] for j in results_jobs}) == 20, "each analysis hands its results to the CPU queue"
            taken_over = [j for j in store.queue.jobs() if j["kind"] == "analyze-series" and j["key"] in held]
            assert taken_over and all(j["state"] == "done" and j["attempts"] >= 2 for j in taken_over), taken_over
            wait_until(lambda: len(orthanc.receptions()) >= 1, timeout=30, what="Orthanc's log")
            results_exactly_once(orthanc, store, study_uids)
            status = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "node.cli", "status", "--json", "--config", str(cluster.config)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    check=True,
                ).stdout
            )
            alive = {w["pid"]: w["alive"] for w in status["cluster"]["workers"]}
            assert alive.get(worker_a.pid) is False and any(alive.values()), status["cluster"]
    finally:
        if own is not None:
            own.stop()


def test_a_broker_restarted_without_its_disk_loses_no_job(tmp_path: Path, pg_url: str) -> None:
    broker = Broker(tmp_path / "rabbit").start()
    study_uids, folder = studies(tmp_path, 6, first_seed=400)
    try:
        with (
            running_orthanc(tmp_path / "orthanc", count_receptions=True) as orthanc,
            running_cluster(tmp_path, broker.url, pg_url, orthanc.dicom_port) as cluster,
        ):
            store = cluster.store
            push(cluster.port, folder)

            def in_the_broker() -> list[tuple[int, str, float]]:
                """Analysis jobs whose message went out and waits in the broker (not those not yet published)."""
                return store.queue.published_waiting(("analyze-series",), 0.0, time.time())

            wait_until(lambda: len(in_the_broker()) >= 2, timeout=120, interval=0.05, what="messages in the broker")
            waiting = {job_id for job_id, _, _ in in_the_broker()}
            broker.stop()
            broker.wipe()
            time.sleep(1.0)
            broker.start()
            wait_until(lambda: settled(store, 6), timeout=420, interval=0.5, what="every study analysed and sent")
            done = {j["id"]: j["state"] for j in store.queue.jobs() if j["id"] in waiting}
            assert set(done.values()) == {"done"}, done
            relayed = "".join(cluster.procs.log(n) for n in cluster.procs.procs)
            assert "its message was lost" in relayed, "the relay never published a lost job again"
            results_exactly_once(orthanc, store, study_uids)
    finally:
        broker.stop()
