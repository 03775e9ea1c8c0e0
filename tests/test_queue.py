"""The durable job queue: atomic claim, lease expiry, backoff, dead letters, retry of dead jobs."""

from __future__ import annotations

import time

from storage.queue import DEAD, DONE, READY, JobQueue, QueueSettings


def test_claim_is_exclusive_and_complete_finishes(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    jid = q.enqueue("k", "a", {"x": 1})
    job = q.claim(("k",))
    assert job is not None and job.id == jid and job.payload == {"x": 1} and job.attempts == 1
    assert q.claim(("k",)) is None  # leased
    q.complete(job)
    assert q.jobs()[0]["state"] == DONE


def test_enqueue_dedupes_ready_jobs_but_not_running_ones(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    a = q.enqueue("k", "s1")
    assert q.enqueue("k", "s1") == a
    job = q.claim(("k",))
    b = q.enqueue("k", "s1")  # work arrived while it ran: a twin, not lost
    assert b != a and job is not None


def test_expired_lease_is_claimed_again(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite", QueueSettings(lease_seconds=10))
    q.enqueue("k", "a")
    first = q.claim(("k",))
    assert q.claim(("k",), now=time.time() + 5) is None
    again = q.claim(("k",), now=time.time() + 11)  # the first worker died
    assert again is not None and again.id == first.id and again.attempts == 2


def test_failures_back_off_then_dead_letter_then_retry(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite", QueueSettings(max_attempts=3, backoff_base_s=10))
    q.enqueue("k", "a")
    job = q.claim(("k",))
    assert q.fail(job, "peer down") == READY
    assert q.claim(("k",)) is None  # backing off
    job = q.claim(("k",), now=time.time() + 11)
    assert q.fail(job, "peer down") == READY
    job = q.claim(("k",), now=time.time() + 100)
    assert q.fail(job, "peer down") == DEAD
    assert q.jobs((DEAD,))[0]["last_error"] == "peer down"
    assert q.retry_dead("k") == 1
    assert q.claim(("k",)) is not None


def test_queue_survives_reopen(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    q.enqueue("k", "a")
    q.close()
    q2 = JobQueue(tmp_path / "q.sqlite")
    assert q2.pending_count() == 1 and q2.claim(("k",)) is not None
