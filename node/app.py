"""Wiring: the node's services (listen, work, dispatch) over one file store, index and queue.

``Node`` owns the storage objects and starts the roles asked for, each in its own thread(s):

- listen: the pynetdicom AE (C-ECHO, C-STORE, the query/retrieve services, storage commitment), the
  series-completion watcher and the storage commitment reporter;
- work: claims ``analyze-series`` jobs and runs the pipeline (the only role that touches the GPU);
- dispatch: claims ``send`` jobs and delivers results to their destinations;
- web: the console, the API, /metrics, /healthz and /readyz (``node.web``), when ``[web] enabled``.

Each loop survives any single failure: an exception becomes a job state and a log line.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification
from starlette.routing import BaseRoute

from handlers.commitment import COMMITMENT_SOP_CLASS, CommitmentReporter, handle_commitment_request, reply_address
from handlers.echo import handle_echo
from handlers.permissions import Permissions
from handlers.query import handle_find
from handlers.retrieve import QR_SOP_CLASSES, handle_get, handle_move
from handlers.store import STORAGE_SOP_CLASSES, StoreLimits
from handlers.transport import (
    DEFAULT_MAX_PDU_BYTES,
    Door,
    DoorPolicy,
    answer_invalid_requests,
    bound_datasets,
    enable_raw_sending,
    hand_over_connections,
    start_handed_over_server,
    tune_socket,
)
from node.cluster import Heartbeat, Relay, celery_app, consume
from node.config import Config
from node.jobs import ROLE_JOBS, JobBinding, job_bindings
from node.listeners import ConnectionDispatcher
from node.pipeline import DetectorSlot, ResidualSlot
from node.series import SeriesWatcher
from node.web.auditing import NodeAudit, audited_find, audited_retrieve
from node.web.intake import guarded_store, observed_job
from node.web.metrics import NodeMetrics, StateCollector
from node.web.server import WebServer
from node.web.space import GB, DiskSpace
from storage.commitments import Commitments
from storage.queue import GiveUp, Job, RetryLater
from storage.recovery import RecoveryReport, recover
from storage.store import open_store

log = logging.getLogger(__name__)

JobHandler = Callable[[Job], None]

ROLES = ("listen", "work", "dispatch")
WEB_ROLE = "web"  # started beside the DICOM roles by `harmonode serve` and `harmonode listen`


def _log_rejected(event: evt.Event) -> None:
    log.warning(
        "association from %s (calling AE %r, called AE %r) rejected",
        event.assoc.requestor.address,
        event.assoc.requestor.primitive.calling_ae_title if event.assoc.requestor.primitive else "?",
        event.assoc.requestor.primitive.called_ae_title if event.assoc.requestor.primitive else "?",
    )


def ssl_context_from(config: Config) -> ssl.SSLContext | None:
    """The server TLS context of the config, or None when TLS is off."""
    tls = config.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if not tls.ca_file:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Node:
    """One harmonode: storage plus the roles started in this process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        enable_raw_sending()  # objects the node sends go out as their stored bytes (process-wide switch)
        self.store = open_store(config.data_path, config.store_settings)
        self.files, self.index, self.queue = self.store.files, self.store.index, self.store.queue
        self.queue.stale_after_s = config.cluster.stale_after_s
        self.detector = DetectorSlot(config.pipeline.device, models_dir=config.models_path)
        self.residual = ResidualSlot(config.pipeline.device)
        self.permissions = Permissions(config.peers)
        commitment = config.commitment
        self.commitments = Commitments(
            config.cluster.database or config.data_path / "commitments.sqlite",
            commitment.report_attempts,
            commitment.backoff_base_s,
            commitment.backoff_max_s,
        )
        self.commitment_reporter = CommitmentReporter(
            self.commitments,
            self.index,
            lambda relpath: self.files.abspath(relpath).is_file(),
            config.node.ae_title,
            reply_address(((p.ae_title, p.port) for p in config.peers), config.destinations),
            timeout=config.node.dimse_timeout_s,
            same_association_grace_s=commitment.same_association_grace_s,
        )
        node = config.node
        self.door = Door(
            DoorPolicy(
                allowed_addresses=node.allowed_addresses,
                max_associations=node.max_associations,
                max_connections=node.max_connections,
                max_per_address=node.max_connections_per_address,
                max_negotiating=node.max_negotiating,
                max_negotiating_per_address=node.max_negotiating_per_address,
            )
        )
        self.job_handlers: dict[str, JobHandler] = {}
        space = config.storage
        self.disk = DiskSpace(config.data_path, int(space.min_free_gb * GB), int(space.resume_free_gb * GB))
        self.metrics = NodeMetrics()
        self.dispatcher: ConnectionDispatcher | None = None  # set when extra listeners take connections
        self.metrics.add_collector(
            StateCollector(self.store, self.disk, self._associations_open, self._listener_connections)
        )
        self.web: WebServer | None = None
        self.audit = NodeAudit(
            config.audit_trail(),
            self.index,
            node.ae_title,
            {d.name: (d.ae_title, d.host) for d in config.destinations},
        )
        self.roles: tuple[str, ...] = ()
        self.server: Any = None
        self.port: int | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.recovery: RecoveryReport | None = None
        self.celery: Any = None  # the Celery app in cluster mode (``node.cluster``)

    # -- listen -------------------------------------------------------------------------------------
    def build_ae(self) -> AE:
        """The application entity with every service the node offers as SCP."""
        cfg = self.config.node
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu_size
        ae.maximum_associations = self.door.policy.pynetdicom_limit
        ae.network_timeout = cfg.network_timeout_s
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.require_called_aet = cfg.require_called_ae
        ae.require_calling_aet = list(cfg.allowed_calling_aes)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # Explicit VR first: a peer proposing several syntaxes in one context sends (C-STORE) or gets (C-GET)
        # the common stored form as is. SCP role too: C-GET sends them back over the caller's association.
        syntaxes = [ExplicitVRLittleEndian, *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian)]
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
        for uid in QR_SOP_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(COMMITMENT_SOP_CLASS)  # uncompressed syntaxes: it carries no pixels
        return ae

    @property
    def store_limits(self) -> StoreLimits:
        """What one C-STORE may cost, from ``[node]``."""
        cfg = self.config.node
        return StoreLimits(max_versions=cfg.max_versions, max_inflated_bytes=cfg.max_inflated_mb * 1024 * 1024)

    def event_handlers(self) -> list[tuple[Any, ...]]:
        """Events bound to handlers with their collaborators."""
        cfg = self.config.node
        max_pdu = max(cfg.max_pdu_size, 1024 * 1024) + 6 if cfg.max_pdu_size else DEFAULT_MAX_PDU_BYTES
        handlers: list[tuple[Any, ...]] = [
            (evt.EVT_CONN_OPEN, tune_socket, [max_pdu, cfg.acse_timeout_s]),
            (evt.EVT_CONN_OPEN, answer_invalid_requests, [self.files.quarantine]),
            (evt.EVT_CONN_OPEN, bound_datasets, [cfg.max_dataset_mb * 1024 * 1024]),
            (evt.EVT_REQUESTED, self.door.requested),
            (evt.EVT_ESTABLISHED, self.door.established),
            (evt.EVT_REQUESTED, self.permissions.admit),
            (evt.EVT_C_ECHO, handle_echo, [self.permissions]),
            (
                evt.EVT_C_STORE,
                guarded_store,
                [self.files, self.index, self.store_limits, self.permissions, self.disk, self.metrics, self.audit],
            ),
            (evt.EVT_RELEASED, self.audit.association_closed),
            (evt.EVT_ABORTED, self.audit.association_closed),
            (evt.EVT_C_FIND, audited_find(handle_find, self.audit), [self.index, cfg.ae_title, self.permissions]),
            (
                evt.EVT_C_MOVE,
                audited_retrieve(handle_move, self.audit),
                [self.config.destinations, self.index, self.files, self.permissions],
            ),
            (evt.EVT_C_GET, audited_retrieve(handle_get, self.audit), [self.index, self.files, self.permissions]),
            (
                evt.EVT_N_ACTION,
                handle_commitment_request,
                [self.commitments, self.commitment_reporter, self.permissions],
            ),
            (evt.EVT_REJECTED, _log_rejected),
        ]
        return handlers

    def _start_server(self, handoff: socket.socket | None = None) -> int:
        """Start the SCP's server in background threads; return the port.

        ``handoff``: this is an extra listener of ``[node] listeners``, its connections come from the parent
        over this Unix socket (``handlers.transport``, item 7).
        """
        cfg = self.config.node
        ae = self.build_ae()
        address, context = (cfg.host, cfg.port), ssl_context_from(self.config)
        if handoff is not None:
            self.server = start_handed_over_server(ae, address, self.event_handlers(), handoff, context)
        else:
            self.server = ae.start_server(address, block=False, evt_handlers=self.event_handlers(), ssl_context=context)
        self.door.install(self.server)
        self.port = int(self.server.server_address[1])
        log.info("listening as %s on %s:%d (pid %d)", cfg.ae_title, cfg.host, self.port, os.getpid())
        return self.port

    def start_extra_listener(self, handoff: socket.socket) -> int:
        """Serve the connections the parent passes over ``handoff`` (``node.listeners``): no recovery, watcher,
        reporter, jobs or web."""
        self.roles = ("listen",)
        return self._start_server(handoff)

    def hand_over_connections(self) -> ConnectionDispatcher:
        """From now on, pass each admitted connection to the least busy extra listener (``[node] listeners``)."""
        dispatcher = ConnectionDispatcher(self.door.open_count)
        hand_over_connections(self.server, self.door, dispatcher.pass_connection)
        self.dispatcher = dispatcher
        return dispatcher

    def start_listening(self) -> int:
        """Start the SCP, the series watcher and the commitment reporter in background threads; return the port."""
        self._start_server()
        watcher = SeriesWatcher(self.index, self.queue, self.config.pipeline)
        self._spawn("series-watcher", lambda: watcher.run(self._stop))
        self._spawn("commitment-reporter", lambda: self.commitment_reporter.run(self._stop))
        return self.port

    # -- work and dispatch --------------------------------------------------------------------------
    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def run_jobs(self, kinds: tuple[str, ...], poll_seconds: float = 0.2) -> None:
        """Claim and run jobs of ``kinds`` until stopped; every outcome becomes a job state."""
        while not self._stop.is_set():
            job = self.queue.claim(kinds)
            if job is None:
                self._stop.wait(poll_seconds)
                continue
            self.run_one(job)

    def run_one(self, job: Job) -> None:
        """Run one claimed job with its handler and record the outcome."""
        handler = self.job_handlers.get(job.kind)
        if handler is None:
            self.queue.fail(job, f"no handler for job kind {job.kind!r} in this process")
            return
        try:
            handler(job)
        except GiveUp as exc:
            log.error("job %d (%s) failed for good: %s", job.id, job.kind, exc)
            self.queue.fail(job, str(exc), retry=False)
        except RetryLater as exc:
            state = self.queue.fail(job, str(exc))
            log.warning("job %d (%s) will be retried (%s): %s", job.id, job.kind, state, exc)
        except Exception as exc:
            state = self.queue.fail(job, f"{type(exc).__name__}: {exc}")
            log.exception("job %d (%s) failed (%s)", job.id, job.kind, state)
        else:
            if not self.queue.complete(job):
                log.warning("job %d (%s) finished here after another worker took it over", job.id, job.kind)

    def start(self, roles: tuple[str, ...] = ROLES) -> None:
        """Recover, then start the roles asked for."""
        if "listen" in roles or not self.config.cluster.enabled:  # a cluster's listener owns what arrives
            self.recovery = recover(self.files, self.index)
        released = self.queue.release_orphans()
        if released:
            log.warning("recovery: %d job(s) a dead process of this host had claimed are ready again", released)
        binding: JobBinding
        self.roles = roles
        trail = self.audit.trail
        for binding in job_bindings(self.config, self.store, roles, self.detector, self.residual, trail):
            self.job_handlers[binding.kind] = observed_job(binding.kind, binding, self.index, self.metrics, self.audit)
        if "listen" in roles:
            self.start_listening()
        if self.config.cluster.enabled:  # jobs come from the broker (``consume``); every process relays
            self.celery = celery_app(self.config.cluster)
            self._spawn("relay", lambda: Relay(self.celery, self.queue, self.config.cluster).run(self._stop))
        else:
            if "work" in roles:
                for i in range(max(1, self.config.pipeline.workers)):
                    self._spawn(f"worker-{i}", lambda: self.run_jobs(ROLE_JOBS["work"]))
            if "dispatch" in roles:
                self._spawn("dispatcher", lambda: self.run_jobs(ROLE_JOBS["dispatch"]))
        if WEB_ROLE in roles and self.config.web.enabled:
            try:
                self.start_web()
            except (OSError, RuntimeError) as exc:  # the console is not worth refusing scanners for
                web = self.config.web
                log.error("web console not started on %s:%d (%s): DICOM roles keep serving", web.host, web.port, exc)
                self.web = None

    # -- the cluster ----------------------------------------------------------------------------------
    def consume(self, resources: Sequence[str]) -> None:
        """Run this process's jobs from the broker's ``resources`` queues until stopped (cluster mode only).

        Blocks in a Celery worker (one pool thread: the task runs here, with this node's handlers); a heartbeat
        thread tells the others this process is alive and which job it holds.
        """
        cluster = self.config.cluster
        beat = Heartbeat(self.queue, resources, cluster)
        self._spawn("heartbeat", lambda: beat.run(self._stop))

        def run_job(job_id: int) -> str:
            job = self.queue.claim_job(job_id)
            if job is None:
                return "not claimable (done, not due, or held by a live worker)"
            beat.current = job.id
            try:
                self.run_one(job)
            finally:
                beat.current = None
            return "ran"

        hostname = f"{cluster.name}-{'-'.join(resources)}@{self.queue.worker_id.replace(':', '.')}"
        try:
            consume(self.celery, cluster, resources, run_job, hostname)
        finally:
            self.stop()

    # -- web ----------------------------------------------------------------------------------------
    def _listener_connections(self) -> dict[int, int] | None:
        return self.dispatcher.serving() if self.dispatcher is not None else None

    def _associations_open(self) -> int | None:
        server = self.server
        return len(server.active_associations) if server is not None else None

    def roles_alive(self) -> dict[str, bool]:
        """Each DICOM role this process runs, and whether its thread(s) are alive."""
        alive = {t.name for t in self._threads if t.is_alive()}
        checks = {
            "listen": self.server is not None and "series-watcher" in alive,
            "work": any(name.startswith("worker-") for name in alive) or "heartbeat" in alive,
            "dispatch": "dispatcher" in alive or "heartbeat" in alive,
        }
        return {role: checks[role] for role in self.roles if role in checks}

    def start_web(self, mounts: Sequence[BaseRoute] = ()) -> int:
        """Start the HTTP server (console, API, metrics, health, DICOMweb) with ``mounts`` added; return its port."""
        from handlers.feedback import FeedbackDesk
        from node.web.app import WebContext, build_app
        from node.web.dicomweb import PREFIX as DICOMWEB_PREFIX
        from node.web.dicomweb import node_dicomweb

        cfg = self.config
        context = WebContext(
            store=self.store,
            settings=cfg.web,
            identity={"ae_title": cfg.node.ae_title, "host": cfg.node.host, "port": self.port or cfg.node.port},
            metrics=self.metrics,
            disk=self.disk,
            destinations=cfg.destinations,
            roles_alive=self.roles_alive,
            audit=self.audit,
            feedback=FeedbackDesk(
                self.files,
                self.index,
                self.queue,
                cfg.result_destinations,
                cfg.learning.export_settings,
                cfg.node.ae_title,
                self.audit.trail,
            ),
        )
        dicomweb = node_dicomweb(
            self.files,
            self.index,
            self.store_limits,
            cfg.node.ae_title,
            max(cfg.node.max_dataset_mb, 1) * 1024 * 1024,
            self.disk,
            self.metrics,
            self.audit.trail,
        )
        own = [dicomweb] if all(getattr(m, "path", "") != DICOMWEB_PREFIX for m in mounts) else []  # theirs wins
        self.web = WebServer(build_app(context, [*mounts, *own]), cfg.web)
        return self.web.start()

    def stop(self) -> None:
        """Stop every role and close storage."""
        self._stop.set()
        self.commitment_reporter.wake()
        if self.server is not None:
            log.info("pid %d stored %d instance(s) from C-STORE", os.getpid(), self.metrics.instances_stored())
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        for t in self._threads:
            t.join(timeout=10)
        self.commitments.close()
        self.store.close()

    def wait(self) -> None:
        """Block until stopped (KeyboardInterrupt stops)."""
        try:
            while not self._stop.is_set():
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.info("stopping")
            self.stop()

    @property
    def data_dir(self) -> Path:
        """Where this node keeps its files, index and queue."""
        return self.config.data_path
