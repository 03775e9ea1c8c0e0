"""Beyond one machine: the node's jobs as Celery tasks on RabbitMQ, PostgreSQL the truth of their state.

The job row in PostgreSQL (``storage.queue``) is the job; a Celery message only says "job N may run now".
Three parts make that hold when processes, hosts and the broker die:

- **The relay** (every role's process runs one): the outbox pattern. A job is written to the database in the
  transaction that makes it (a series completes, a result is stored); the relay publishes each due job that
  has no message for its current attempt, marking the row first so that two relays publish it once. It also
  is the reconciler: a job still ``ready`` ``lost_after_s`` after its message went out while its broker queue
  holds no message lost its message (a broker restarted without its disk, a purge) and is published again;
  a ``running`` job whose worker fell silent (no heartbeat for ``stale_after_s``) or whose lease ran out is
  put back to ``ready`` and published again.
- **The task** ``harmonode.run_job(job_id)``: acknowledged late (``task_acks_late``), rejected back to the
  queue when the worker process dies (``task_reject_on_worker_lost``), one message at a time
  (``worker_prefetch_multiplier = 1``, one pool thread). It claims *that* row (``JobQueue.claim_job``); a message
  for a job that is done, not due, or held by a live worker is acknowledged and does nothing. A job that
  runs twice produces nothing twice: result UIDs derive from the source series and the model, and delivery
  is keyed per result object and destination (``storage.deliveries``).
- **The heartbeat**: each consuming process writes its beat to the ``workers`` table; ``harmonode status``
  reads who is alive and the queue depths from the database, never from the broker.

Queues by resource: ``gpu`` (a series' load, key, rule, harmonization with the residual network and
detection, up to its findings), ``cpu`` (the results of those findings: ``node.handoff``; feedback),
``send`` (deliveries and export records).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from celery import Celery
from kombu import Queue

from node.config import ClusterConfig
from storage.queue import JobKind, JobQueue

log = logging.getLogger(__name__)

TASK_NAME = "harmonode.run_job"

#: The broker queue each job kind travels on (its resource).
QUEUE_OF_KIND: dict[str, str] = {
    JobKind.ANALYZE_SERIES: "gpu",
    JobKind.SERIES_RESULTS: "cpu",
    JobKind.FEEDBACK: "cpu",
    JobKind.SEND: "send",
    JobKind.EXPORT: "send",
}
#: The broker queues each consuming role takes by default (``harmonode work --queues`` narrows them).
ROLE_QUEUES: dict[str, tuple[str, ...]] = {"work": ("cpu", "gpu"), "dispatch": ("send",)}

#: How often the relay asks the broker how many messages a queue holds (a lost message waits this long more).
DEPTH_EVERY_S = 5.0

#: The job runner of this process (set by ``consume`` before its worker starts; the pool's one thread runs
#: tasks in this very process, so the task finds it here).
_RUNNER: Callable[[int], str] | None = None


def broker_queue(settings: ClusterConfig, resource: str) -> str:
    """The broker's name of a resource queue (``[cluster] name`` keeps several nodes apart on one broker)."""
    return f"{settings.name}.{resource}"


def kinds_of(resources: Iterable[str]) -> tuple[str, ...]:
    """The job kinds that travel on these resource queues."""
    wanted = set(resources)
    return tuple(str(kind) for kind, queue in QUEUE_OF_KIND.items() if queue in wanted)


def celery_app(settings: ClusterConfig) -> Celery:
    """The Celery application of a cluster config: RabbitMQ, durable queues, late acks, one message at a time."""
    app = Celery(settings.name, broker=settings.broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged after the job ran: a worker that dies leaves the message queued
        task_reject_on_worker_lost=True,  # a child killed under the task requeues it (prefork pools)
        worker_prefetch_multiplier=1,  # no message waits inside a busy worker
        task_queues=[Queue(broker_queue(settings, r), durable=True) for r in ("cpu", "gpu", "send")],
        task_default_queue=broker_queue(settings, "cpu"),
        task_default_delivery_mode="persistent",
        task_ignore_result=True,  # the job row holds the outcome
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker that restarts is waited for, never given up on
        broker_heartbeat=10,  # served by the consumer's loop while the task runs in the pool's thread
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )

    @app.task(name=TASK_NAME, ignore_result=True)
    def run_job(job_id: int) -> str:
        if _RUNNER is None:
            raise RuntimeError("this process runs no jobs")
        return _RUNNER(int(job_id))

    return app


@dataclass
class RelayReport:
    """What one relay tick did."""

    published: int = 0
    republished: int = 0  # ready jobs whose message was lost
    released: int = 0  # running jobs of silent workers or ended leases, put back


class Relay:
    """Publishes due jobs from the database to the broker, and is the reconciler of lost ones."""

    def __init__(self, app: Celery, queue: JobQueue, settings: ClusterConfig) -> None:
        self.app = app
        self.queue = queue
        self.settings = settings
        self.kinds = tuple(QUEUE_OF_KIND)
        self._depths: dict[str, tuple[float, int | None]] = {}  # resource -> (when asked, depth)

    def tick(self, now: float | None = None) -> RelayReport:
        """Release stale claims, publish due jobs without a message, publish again the lost ones."""
        now = time.time() if now is None else now
        report = RelayReport()
        report.released = self.queue.release_stale(now)
        for job_id, kind, published_at in self.queue.to_publish(self.kinds, now):
            report.published += self._publish(job_id, kind, published_at, now)
        waiting = self.queue.published_waiting(self.kinds, self.settings.lost_after_s, now)
        if waiting:
            empty = {q for q in {QUEUE_OF_KIND[k] for _, k, _ in waiting} if self.depth(q) == 0}
            for job_id, kind, published_at in waiting:
                if QUEUE_OF_KIND[kind] in empty:
                    log.warning(
                        "job %d (%s): its message was lost (its queue is empty); publishing again", job_id, kind
                    )
                    report.republished += self._publish(job_id, kind, published_at, now)
        return report

    def _publish(self, job_id: int, kind: str, published_at: float, now: float) -> int:
        if not self.queue.swap_published(job_id, published_at, now):
            return 0  # another relay published it
        try:
            self.app.send_task(TASK_NAME, args=[job_id], queue=broker_queue(self.settings, QUEUE_OF_KIND[kind]))
        except Exception as exc:  # the broker is down: the row says unpublished again, the next tick retries
            self.queue.swap_published(job_id, now, published_at)
            log.warning("job %d not published (%s: %s); retrying", job_id, type(exc).__name__, exc)
            return 0
        return 1

    def depth(self, resource: str, now: float | None = None) -> int | None:
        """Messages waiting in a resource's broker queue (0 when it does not exist, None when unknown).

        Asked of the broker at most every ``DEPTH_EVERY_S`` per queue: in a long backlog every tick has jobs
        waiting, and each question is a connection of its own.
        """
        now = time.monotonic() if now is None else now
        asked = self._depths.get(resource)
        if asked is not None and now - asked[0] < DEPTH_EVERY_S:
            return asked[1]
        depth = self._ask_depth(resource)
        self._depths[resource] = (now, depth)
        return depth

    def _ask_depth(self, resource: str) -> int | None:
        try:
            with self.app.connection_for_write() as conn:
                ok = conn.default_channel.queue_declare(queue=broker_queue(self.settings, resource), passive=True)
                return int(ok.message_count)
        except Exception as exc:
            if "NOT_FOUND" in str(exc) or "404" in str(exc):
                return 0
            log.warning("broker queue %s: depth unknown (%s)", resource, exc)
            return None

    def run(self, stop: threading.Event) -> None:
        """Tick every ``relay_seconds`` until ``stop`` is set; a failing tick is logged, not fatal."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("relay tick failed; retrying")
            stop.wait(self.settings.relay_seconds)


class Heartbeat:
    """A consuming process's beat in the ``workers`` table (who is alive, which queues, which job).

    Each beat also renews the lease of the job the process runs, so a long series is never taken over
    from a live worker; a silent one's job is (``JobQueue.release_stale``, ``JobQueue.claim_job``).
    """

    def __init__(self, queue: JobQueue, queues: Iterable[str], settings: ClusterConfig) -> None:
        self.queue = queue
        self.queues = list(queues)
        self.settings = settings
        self.current: int | None = None

    def beat(self) -> None:
        """Write one beat now."""
        current = self.current
        if current is not None:
            self.queue.extend_lease(current)
        self.queue.workers.beat(
            self.queue.worker_id, self.queues, socket.gethostname(), os.getpid(), current_job=current
        )

    def run(self, stop: threading.Event) -> None:
        """Beat every ``heartbeat_seconds`` until ``stop``."""
        while not stop.is_set():
            try:
                self.beat()
            except Exception:
                log.exception("heartbeat failed; retrying")
            stop.wait(self.settings.heartbeat_seconds)


def consume(
    app: Celery,
    settings: ClusterConfig,
    resources: Iterable[str],
    runner: Callable[[int], str],
    hostname: str,
) -> None:
    """Run a Celery worker in this process on ``resources``' queues until it is told to stop (SIGTERM, ^C).

    One pool thread runs each task in this process, one at a time: a SIGKILL takes the process, its broker
    connection closes, and RabbitMQ hands the unacknowledged message to another worker. A thread, not the
    solo pool: the solo pool runs the task in the consumer's own loop, which then sends no AMQP heartbeat,
    and RabbitMQ drops the connection of a worker busy longer than two heartbeats (a series on a CPU) and
    hands its message on while it still runs (measured: a 35 s task with a 5 s heartbeat ran twice).
    """
    global _RUNNER
    _RUNNER = runner
    queues = [broker_queue(settings, r) for r in resources]
    worker = app.Worker(
        queues=queues,
        concurrency=1,
        pool="threads",
        hostname=hostname,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel="WARNING",
        quiet=True,
    )
    log.info("consuming %s as %s", ", ".join(queues), hostname)
    worker.start()
