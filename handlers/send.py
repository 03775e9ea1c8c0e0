"""Delivery of result objects to their destinations: the C-STORE SCU and the ``send`` job.

A ``send`` job (``storage.deliveries``: one per destination and object) proposes only the SOP class and
transfer syntax of its object, reads the stored file and sends it as stored. A peer that is down or
answers a failure raises ``DeliveryError`` (a ``RetryLater``): the queue retries with exponential backoff
and dead-letters the job after its maximum attempts. A retry first asks the destination (C-FIND) whether
an earlier, interrupted attempt already delivered the object, so the PACS receives each object once. The
handler is given what it needs — the peers by
name, the file store, the index and the node's AE title — never the node or its config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from handlers.peer import Peer, associate
from storage.deliveries import DeliveryState, SendPayload, delivery_state, set_delivery
from storage.files import FileStore
from storage.index import Index
from storage.queue import GiveUp, Job, RetryLater

log = logging.getLogger(__name__)

# C-STORE statuses that mean "stored": success and the three warnings of PS3.4 B.2.3.
STORED_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)


class DeliveryError(RetryLater):
    """The destination refused the association or the object; the queue will try again later."""


def c_store(
    path: Path, sop_class_uid: str, transfer_syntax_uid: str, peer: Peer, calling_ae: str, timeout: float = 30.0
) -> None:
    """Send one Part 10 file to ``peer`` over a new association proposing only its SOP class and syntax.

    Raises
    ------
    DeliveryError
        The association failed or was rejected, or the peer answered no or a failure status.
    """
    assoc = associate(peer, calling_ae, [build_context(sop_class_uid, [transfer_syntax_uid])], timeout)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "peer unreachable or aborted"
        raise DeliveryError(f"association with {peer} failed ({why})")
    try:
        status = assoc.send_c_store(path)  # the stored file as encoded, no decode/re-encode
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None) if status else None
    if code is None:
        raise DeliveryError(f"{peer.name}: no C-STORE response (association aborted or timed out)")
    if int(code) not in STORED_STATUSES:
        raise DeliveryError(f"{peer.name}: C-STORE failed with status 0x{int(code):04X}")


def already_stored(path: Path, sop_instance_uid: str, peer: Peer, calling_ae: str, timeout: float = 30.0) -> bool:
    """Whether ``peer`` already holds the stored object at ``path`` (C-FIND at IMAGE level, Study Root).

    Asked before sending again what an interrupted attempt may have delivered, so a PACS receives an object
    once even when the node died between its transfer and the record of it. A peer that offers no C-FIND,
    refuses or fails the query counts as not holding it (the object is then sent).
    """
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    except Exception:
        return False
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = header.get("StudyInstanceUID", "")
    query.SeriesInstanceUID = header.get("SeriesInstanceUID", "")
    query.SOPInstanceUID = sop_instance_uid
    assoc = associate(peer, calling_ae, [build_context(StudyRootQueryRetrieveInformationModelFind)], timeout)
    if not assoc.is_established:
        return False
    try:
        held = False
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status and int(status.Status) in (0xFF00, 0xFF01) and identifier is not None:
                held = held or str(identifier.get("SOPInstanceUID", "")) == sop_instance_uid
        return held
    except Exception as exc:  # a peer that answers C-FIND badly: send the object
        log.info("%s could not say whether it holds %s (%s)", peer.name, sop_instance_uid, type(exc).__name__)
        return False
    finally:
        if assoc.is_established:
            assoc.release()


def send_job(job: Job, peers: Mapping[str, Peer], files: FileStore, index: Index, calling_ae: str) -> None:
    """Deliver one result object to one destination (the ``send`` job); safe to run twice.

    Parameters
    ----------
    job
        A claimed ``send`` job whose payload is a ``SendPayload``.
    peers
        The destinations results may go to, by name.
    files, index
        The node's file store and index (the deliveries table lives in the index).
    calling_ae
        The node's AE title.

    Raises
    ------
    RetryLater
        The destination is down, refused the association or answered a failure status.
    GiveUp
        The payload is malformed, the destination is no longer configured or the stored file is gone.
    """
    try:
        payload = SendPayload.from_json(job.payload)
    except ValueError as exc:
        raise GiveUp(f"malformed send job: {exc}") from exc
    peer = peers.get(payload.destination)
    if peer is None:
        raise GiveUp(f"destination {payload.destination!r} is not configured")
    result = payload.result
    if delivery_state(index, peer.name, result.sop_instance_uid) == DeliveryState.SENT:
        log.info("job %d: %s already delivered to %s", job.id, result.sop_instance_uid, peer.name)
        return
    path = Path(result.path)
    if not path.is_absolute():
        path = files.abspath(result.path)
    if not path.is_file():
        set_delivery(index, payload, DeliveryState.DEAD, job.attempts, f"stored file {result.path} is missing")
        raise GiveUp(f"stored file {result.path} is missing")
    if job.attempts > 1 and already_stored(path, result.sop_instance_uid, peer, calling_ae):
        # An earlier attempt delivered it and was cut short (a crash, a lost response): do not send twice.
        set_delivery(index, payload, DeliveryState.SENT, job.attempts)
        log.info("%s already held by %s (asked after attempt %d): not sent again", result.sop_instance_uid,
                 peer.name, job.attempts - 1)  # fmt: skip
        return
    try:
        c_store(path, result.sop_class_uid, result.transfer_syntax_uid, peer, calling_ae)
    except Exception as exc:  # a refusal, a malformed file, a bug: recorded, then retried by the queue
        state = DeliveryState.DEAD if job.attempts >= job.max_attempts else DeliveryState.FAILED
        error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
        set_delivery(index, payload, state, job.attempts, error)
        if isinstance(exc, DeliveryError):
            log.warning("delivery to %s failed (attempt %d/%d): %s", peer.name, job.attempts, job.max_attempts, exc)
        raise
    set_delivery(index, payload, DeliveryState.SENT, job.attempts)
    log.info("delivered %s to %s (attempt %d)", result.sop_instance_uid, peer.name, job.attempts)
