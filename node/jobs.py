"""The job kinds a process runs, each bound to its handler and the collaborators it is given.

As ``Node.event_handlers`` binds DICOM events to handlers with their arguments (pynetdicom's way), this
table binds each job kind of the durable queue: a handler is called as ``handler(job, **collaborators)``
and never sees the node or its config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from handlers.export import export_job
from handlers.feedback import FeedbackDesk, feedback_job
from handlers.peer import Peer
from handlers.send import send_job
from node.config import Config
from node.handoff import hand_off_to, series_results
from node.pipeline import DetectorSlot, Worker, analyze_series
from storage.maps import MapCache
from storage.queue import Job, JobKind
from storage.store import Store

#: Which role runs which job kinds.
ROLE_JOBS: dict[str, tuple[JobKind, ...]] = {
    "work": (JobKind.ANALYZE_SERIES, JobKind.SERIES_RESULTS, JobKind.FEEDBACK),
    "dispatch": (JobKind.SEND, JobKind.EXPORT),
}


@dataclass(frozen=True)
class JobBinding:
    """One job kind, its handler and the keyword arguments it is given."""

    kind: JobKind
    handler: Callable[..., None]
    collaborators: Mapping[str, Any]

    def __call__(self, job: Job) -> None:
        self.handler(job, **self.collaborators)


def job_bindings(
    config: Config,
    store: Store,
    roles: tuple[str, ...],
    detector: DetectorSlot,
    residual: DetectorSlot | None = None,
    audit: Any = None,
) -> list[JobBinding]:
    """The job kinds of ``roles``, bound to their handlers and collaborators.

    Parameters
    ----------
    config
        The node's config (pipeline settings, destinations, AE title).
    store
        The node's file store, index and queue.
    roles
        The roles this process runs (``work`` and/or ``dispatch`` bind jobs).
    detector
        The worker's detector slot (loaded on the first series).
    residual
        The worker's residual-model slot (loaded on the first series whose rule has a residual stage).
    audit
        The node's audit trail (``storage.audit.AuditTrail``) feedback is recorded in; None: the log only.
    """
    bindings = []
    if "work" in roles:
        worker = Worker(
            store.files,
            store.index,
            store.queue,
            config.pipeline,
            config.result_destinations,
            detector,
            residual,
            MapCache(store.root / "cache" / "residual", int(config.pipeline.residual_cache_gb * 1024**3)),
            config.learning.export_settings,
            # in a cluster the analysis stops at the findings; their results are a task of the CPU queue
            hand_off_to(store.queue, store.root / "handoff", config.pipeline.write_harmonized_series)
            if config.cluster.enabled
            else None,
        )
        bindings.append(JobBinding(JobKind.ANALYZE_SERIES, analyze_series, {"worker": worker}))
        bindings.append(JobBinding(JobKind.SERIES_RESULTS, series_results, {"worker": worker}))
        desk = FeedbackDesk(
            store.files,
            store.index,
            store.queue,
            config.result_destinations,
            config.learning.export_settings,
            config.node.ae_title,
            audit,
        )
        bindings.append(JobBinding(JobKind.FEEDBACK, feedback_job, {"desk": desk}))
    if "dispatch" in roles:
        peers: dict[str, Peer] = {d.name: d for d in config.destinations}
        bindings.append(
            JobBinding(
                JobKind.SEND,
                send_job,
                {"peers": peers, "files": store.files, "index": store.index, "calling_ae": config.node.ae_title},
            )
        )
    if "dispatch" in roles:
        settings = config.learning.export_settings
        bindings.append(JobBinding(JobKind.EXPORT, export_job, {"index": store.index, "settings": settings}))
    return bindings
