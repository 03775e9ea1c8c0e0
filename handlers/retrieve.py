"""C-MOVE and C-GET SCP: send stored instances, as stored, to a known destination or back to the caller.

The instances to send are matched with the C-FIND matcher (``handlers.query.where_clause``) at the IMAGE
level, so a retrieve identifier may carry a single UID or a list of UIDs at its level. Each instance goes
as a C-STORE sub-operation of the encoded dataset exactly as it is in the file store (no decode, no
re-encode): the handler yields a ``StoredInstance`` marker and the association's ``send_c_store`` is
wrapped (``handlers.transport``) to send the file's bytes after its file meta. When the peer accepted no
presentation context with the stored transfer syntax, the file is decoded once and pynetdicom converts it.

A C-MOVE destination must be a configured destination (``[[destinations]]``) known by its AE title; any
other is refused with 0xA801. A cancel request stops the sub-operations at the next instance.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from handlers.peer import Peer
from handlers.permissions import NOT_AUTHORIZED, Permissions, Service
from handlers.query import PATIENT_ROOT, STUDY_ROOT, UNIQUE_KEYS, BadIdentifier, query_level, where_clause
from handlers.transport import StoredInstance, prepare_store_association, send_stored_files, thin_pending_responses
from storage.files import FileStore
from storage.index import Index

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PROCESS = 0xC000
MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8 9.3.2.2: odd IDs 1..255)

RETRIEVE_ROOTS = {
    str(PatientRootQueryRetrieveInformationModelMove): PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): STUDY_ROOT,
    str(PatientRootQueryRetrieveInformationModelGet): PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): STUDY_ROOT,
}

# The query/retrieve SOP classes the node offers as SCP (C-FIND, C-MOVE, C-GET; both information models).
QR_SOP_CLASSES: tuple[str, ...] = (
    str(PatientRootQueryRetrieveInformationModelFind),
    str(StudyRootQueryRetrieveInformationModelFind),
    *RETRIEVE_ROOTS,
)


def retrieve_instances(index: Index, identifier: Dataset, root: str) -> list[dict[str, Any]]:
    """The stored instances a retrieve identifier names (newest version of each), in series order.

    Raises
    ------
    BadIdentifier
        The level is invalid for the model or the level's unique key is missing.
    """
    level = query_level(identifier, root)
    key = UNIQUE_KEYS[level]
    if not str(identifier.get(key, "") or "").strip():
        raise BadIdentifier(f"a {level} level retrieve needs {key}")
    where, params = where_clause(identifier, "IMAGE", index.dialect)
    sql = (
        "SELECT i.path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid FROM instances i"
        " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
        " JOIN series se ON se.series_instance_uid = i.series_instance_uid"
        f"{where} ORDER BY i.series_instance_uid, i.instance_number, i.sop_instance_uid"
    )
    return index.query(sql, tuple(params))


def _store_contexts(rows: list[dict[str, Any]]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) of the instances to send, at most 128."""
    pairs = sorted({(r["sop_class_uid"], r["transfer_syntax_uid"] or ExplicitVRLittleEndian) for r in rows})
    if len(pairs) > MAX_CONTEXTS:
        log.warning("%d SOP class/transfer syntax pairs to send: only %d proposed", len(pairs), MAX_CONTEXTS)
    return [build_context(sop, [ts]) for sop, ts in pairs[:MAX_CONTEXTS]]


def _sub_operations(
    event: evt.Event, rows: list[dict[str, Any]], files: FileStore
) -> Iterator[tuple[int, Dataset | None]]:
    for n, row in enumerate(rows):
        if event.is_cancelled:
            log.info("retrieve cancelled by %s after %d of %d", event.assoc.requestor.ae_title, n, len(rows))
            yield CANCEL, None
            return
        path = files.abspath(row["path"])
        syntax = row["transfer_syntax_uid"] or ExplicitVRLittleEndian
        yield PENDING, StoredInstance(path, row["sop_class_uid"], row["sop_instance_uid"], syntax)


def _failure(status: int) -> Iterator[Any]:
    """Yields that make pynetdicom answer ``status`` (after one announced sub-operation)."""
    yield 1
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = ""
    yield status, failed


def handle_move(
    event: evt.Event,
    destinations: Sequence[Peer],
    index: Index,
    files: FileStore,
    permissions: Permissions | None = None,
) -> Iterator[Any]:
    """EVT_C_MOVE handler: the destination, the number of sub-operations, then one yield per instance.

    Parameters
    ----------
    event
        The C-MOVE event.
    destinations
        The known move destinations (the configured destinations), found by AE title.
    index, files
        The node's index and file store.

    Yields
    ------
    Any
        ``(host, port, kwargs)`` of the destination (``(None, None)`` when unknown: 0xA801), the number
        of sub-operations, then ``(status, dataset)`` pairs as pynetdicom expects.
    """
    move_ae = event.move_destination
    move_ae = (move_ae.decode("ascii", "replace") if isinstance(move_ae, bytes) else str(move_ae)).strip()
    dest = next((peer for peer in destinations if peer.ae_title == move_ae), None)
    caller = event.assoc.requestor.ae_title
    if dest is None:
        log.warning("C-MOVE from %s refused: move destination %r is not configured", caller, move_ae)
        yield None, None
        return
    if permissions is not None and not (
        permissions.check(event, Service.MOVE)
        and permissions.may_move_to(caller, event.assoc.requestor.address, dest.ae_title)
    ):
        # pynetdicom takes the destination before anything else and associates with it before a failure
        # status could be yielded: a destination the caller may not use is, to it, an unknown one (0xA801).
        log.warning("C-MOVE from %s to %s refused: not authorized", caller, dest.name)
        yield None, None
        return
    root = RETRIEVE_ROOTS.get(str(event.request.AffectedSOPClassUID), STUDY_ROOT)
    try:
        rows = retrieve_instances(index, event.identifier, root)
    except BadIdentifier as exc:
        log.warning("C-MOVE from %s refused: %s", caller, exc)
        yield dest.host, dest.port
        yield from _failure(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        return
    except Exception as exc:
        log.error("C-MOVE from %s failed: %s", caller, type(exc).__name__)
        yield dest.host, dest.port
        yield from _failure(UNABLE_TO_PROCESS)
        return
    log.info("C-MOVE from %s: %d instance(s) to %s", caller, len(rows), dest.name)
    thin_pending_responses(event.assoc)
    kwargs = {"contexts": _store_contexts(rows), "evt_handlers": [(evt.EVT_CONN_OPEN, prepare_store_association)]}
    yield dest.host, dest.port, kwargs
    yield len(rows)
    yield from _sub_operations(event, rows, files)


def handle_get(
    event: evt.Event, index: Index, files: FileStore, permissions: Permissions | None = None
) -> Iterator[Any]:
    """EVT_C_GET handler: the number of sub-operations, then one yield per instance (sent to the caller).

    Parameters
    ----------
    event
        The C-GET event.
    index, files
        The node's index and file store.

    Yields
    ------
    Any
        The number of sub-operations, then ``(status, dataset)`` pairs as pynetdicom expects.
    """
    caller = event.assoc.requestor.ae_title
    if permissions is not None and not permissions.check(event, Service.GET):
        yield from _failure(NOT_AUTHORIZED)
        return
    root = RETRIEVE_ROOTS.get(str(event.request.AffectedSOPClassUID), STUDY_ROOT)
    try:
        rows = retrieve_instances(index, event.identifier, root)
    except BadIdentifier as exc:
        log.warning("C-GET from %s refused: %s", caller, exc)
        yield from _failure(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        return
    except Exception as exc:
        log.error("C-GET from %s failed: %s", caller, type(exc).__name__)
        yield from _failure(UNABLE_TO_PROCESS)
        return
    send_stored_files(event.assoc)  # once per association (several C-GETs)
    thin_pending_responses(event.assoc)
    log.info("C-GET from %s: %d instance(s)", caller, len(rows))
    yield len(rows)
    yield from _sub_operations(event, rows, files)
