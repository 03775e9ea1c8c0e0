"""The queue's side of the cluster's relay (``node.cluster.Relay``), on SQLite and PostgreSQL: each attempt of a
job gets one message, a lost one is found, a silent worker's job comes back, a live worker's lease is renewed.
The relay against a real broker is tested in ``tests/test_cluster.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pg
from node.config import ClusterConfig, ConfigError, load_config
from storage.queue import READY, RUNNING, JobQueue, QueueSettings

KINDS = ("analyze-series", "send")


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobQueue]:
    if request.param == "sqlite":
        q = JobQueue(tmp_path / "queue.sqlite", QueueSettings(lease_seconds=60, backoff_base_s=10))
        yield q
        q.close()
        return
    with pg.scratch_database() as url:
        q = JobQueue(url, QueueSettings(lease_seconds=60, backoff_base_s=10))
        yield q
        q.close()


def test_each_attempt_is_published_once_and_a_retry_again_when_due(queue: JobQueue) -> None:
    job_id = queue.enqueue("analyze-series", "1.2.3")
    t = job_id_time(queue, job_id)
    [(found, kind, published)] = queue.to_publish(KINDS, now=t + 1)
    assert (found, kind, published) == (job_id, "analyze-series", 0.0)
    assert queue.swap_published(job_id, 0.0, t + 1) is True
    assert queue.swap_published(job_id, 0.0, t + 2) is False  # a second relay lost the race
    assert queue.to_publish(KINDS, now=t + 3) == []
    job = queue.claim_job(job_id, now=t + 3)
    assert job is not None
    queue.fail(job, "peer down", now=t + 4)  # ready again at t + 14
    assert queue.to_publish(KINDS, now=t + 10) == []  # not due: no message yet
    assert [j for j, _, _ in queue.to_publish(KINDS, now=t + 15)] == [job_id]


def test_a_published_job_still_waiting_is_a_candidate_for_a_lost_message(queue: JobQueue) -> None:
    job_id = queue.enqueue("send", "r1 -> pacs")
    [(_, _, _)] = queue.to_publish(KINDS, now=1e12)
    row = queue.jobs()[0]
    queue.swap_published(job_id, 0.0, row["next_attempt_at"] + 1)
    published = row["next_attempt_at"] + 1
    assert queue.published_waiting(KINDS, 30.0, now=published + 10) == []
    assert [j for j, _, _ in queue.published_waiting(KINDS, 30.0, now=published + 31)] == [job_id]


def test_a_silent_workers_job_is_released_and_a_beating_one_keeps_its_job(queue: JobQueue) -> None:
    queue.stale_after_s = 5.0
    first = queue.enqueue("analyze-series", "a")
    job = queue.claim_job(first)
    assert job is not None
    queue.workers.beat(queue.worker_id, ["gpu"], "host", 1, now=job_id_time(queue, first), current_job=first)
    assert queue.release_stale(now=job_id_time(queue, first) + 1) == 0
    queue.extend_lease(first, now=job_id_time(queue, first) + 50)  # a heartbeat renews the lease
    lease = {j["id"]: j for j in queue.jobs()}[first]
    assert lease["state"] == RUNNING
    assert queue.release_stale(now=job_id_time(queue, first) + 6) == 1  # no beat for 6 s > 5 s
    assert {j["id"]: j["state"] for j in queue.jobs()}[first] == READY
    assert [j for j, _, _ in queue.to_publish(KINDS, now=job_id_time(queue, first) + 7)] == [first]


def job_id_time(queue: JobQueue, job_id: int) -> float:
    """When the job was last changed (the tests' clock starts there)."""
    return float({j["id"]: j for j in queue.jobs()}[job_id]["created_at"])


def test_depths_count_waiting_and_running_jobs_per_kind(queue: JobQueue) -> None:
    a = queue.enqueue("analyze-series", "a")
    queue.enqueue("analyze-series", "b")
    queue.enqueue("send", "c")
    queue.claim_job(a)
    assert queue.depths() == {"analyze-series": {"ready": 1, "running": 1}, "send": {"ready": 1, "running": 0}}


def test_cluster_config_needs_both_urls_and_takes_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both"):
        ClusterConfig(broker="amqp://guest:guest@127.0.0.1:5672//")
    with pytest.raises(ConfigError, match="RabbitMQ"):
        ClusterConfig(broker="redis://127.0.0.1", database="postgresql://x@y/z")
    env = {
        "HARMONODE_CLUSTER_BROKER": "amqp://guest:guest@127.0.0.1:5672//",
        "HARMONODE_CLUSTER_DATABASE": "postgresql://postgres@127.0.0.1/harmonode",
    }
    cfg = load_config(None, env=env)
    assert cfg.cluster.enabled and cfg.store_settings.database == env["HARMONODE_CLUSTER_DATABASE"]
    assert cfg.has_node_data
    assert not load_config(None, env={}).cluster.enabled


def test_a_dropped_postgresql_connection_fails_one_statement_and_the_next_reconnects() -> None:
    import psycopg

    from storage.index import Index

    with pg.scratch_database() as url:
        index = Index(url)
        queue = JobQueue(url)
        try:
            for conn in (index.db.conn, queue.db.conn):
                pid = conn.raw.execute("SELECT pg_backend_pid()").fetchone()[0]
                with psycopg.connect(url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # as a server restart does
            with pytest.raises(psycopg.OperationalError):
                index.query("SELECT COUNT(*) AS n FROM series")
            assert index.query("SELECT COUNT(*) AS n FROM series") == [{"n": 0}]
            with pytest.raises(psycopg.OperationalError):
                queue.enqueue("send", "a")
            assert queue.enqueue("send", "a") >= 1 and queue.depths()["send"]["ready"] == 1
        finally:
            index.close()
            queue.close()


def test_a_worker_that_lost_its_job_does_not_overwrite_the_one_that_took_it(queue: JobQueue) -> None:
    job_id = queue.enqueue("analyze-series", "slow")
    mine = queue.claim_job(job_id)
    assert mine is not None
    other = JobQueue.__new__(JobQueue)  # a second process's view of the same queue: its own worker id
    other.__dict__.update(queue.__dict__)
    other.worker_id = "another-host:4242:1"
    later = time.time() + queue.lease_seconds + 1
    assert queue.release_stale(now=later) == 1  # this worker's lease ran out (a long pause)
    theirs = other.claim_job(job_id, now=later)
    assert theirs is not None and theirs.attempts == 2
    assert queue.fail(mine, "late error") == "taken over"  # the row stays the other worker's
    assert queue.complete(mine) is False
    row = {j["id"]: j for j in queue.jobs()}[job_id]
    assert row["state"] == RUNNING and row["worker"] == other.worker_id and row["last_error"] == ""
    assert other.complete(theirs) is True
    assert {j["id"]: j for j in queue.jobs()}[job_id]["state"] == "done"
