"""Query/retrieve as SCU: find studies on a source PACS, have it C-MOVE them to the node, re-run stored ones.

The source is a :class:`handlers.peer.Peer`; the node is named only by its AE title, which calls the source
and is the move destination, so the source must know that AE title with the node's host and port, and the
node (or a listener started for the pull) must be listening when the move runs. ``reprocess_study`` puts
every received series of a stored study back on the queue.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove

from handlers.peer import Peer, associate
from storage.files import check_uid
from storage.index import SERIES_COMPLETE, Index
from storage.queue import ANALYZE_SERIES, JobQueue

log = logging.getLogger(__name__)

_DATE_RANGE_RE = re.compile(r"^(\d{8})?-(\d{8})?$|^\d{8}$")
#: DICOM keyword in a PACS query → the ``find_studies`` argument it sets.
PACS_QUERY_KEYS = {"StudyDate": "date_range", "PatientID": "patient_id", "StudyInstanceUID": "study_uid"}


class PullError(RuntimeError):
    """The source could not be reached or refused a query or a move."""


def parse_pacs_query(text: str) -> dict[str, str]:
    """``find_studies`` arguments from ``KEY=VALUE`` terms separated by spaces, commas or ``&``.

    Keys are the DICOM keywords ``StudyDate`` (``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, either end open),
    ``PatientID`` and ``StudyInstanceUID``; each at most once.

    Raises
    ------
    ValueError
        Empty query, a term without ``=``, an unknown or repeated key, an empty value.
    """
    terms = [t for t in re.split(r"[\s,&]+", text.strip()) if t]
    if not terms:
        raise ValueError(f"empty PACS query; use e.g. StudyDate=20260101-20261231 ({', '.join(PACS_QUERY_KEYS)})")
    out: dict[str, str] = {}
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep or not value:
            raise ValueError(f"query term {term!r} is not KEY=VALUE")
        if key not in PACS_QUERY_KEYS:
            raise ValueError(f"query key {key!r} is not one of {', '.join(PACS_QUERY_KEYS)}")
        if PACS_QUERY_KEYS[key] in out:
            raise ValueError(f"query key {key} given twice")
        out[PACS_QUERY_KEYS[key]] = value
    return out


def is_listening(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on ``host:port`` (a wildcard host means loopback).

    Used to tell whether the node's own port is served (a running ``harmonode serve``) before a pull.
    """
    host = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"  # noqa: S104 - a comparison, not a bind
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _associate(source: Peer, ae_title: str, model: str, timeout: float) -> Association:
    assoc = associate(source, ae_title, [build_context(model)], timeout)
    if not assoc.is_established:
        raise PullError(f"{source.name} ({source.ae_title}@{source.host}:{source.port}) refused the association")
    return assoc


def find_studies(
    source: Peer,
    ae_title: str,
    patient_id: str = "",
    date_range: str = "",
    study_uid: str = "",
    timeout: float = 60.0,
) -> list[str]:
    """Study Instance UIDs matching a study-level query (Study Root C-FIND) on ``source``.

    Parameters
    ----------
    source
        The PACS to query.
    ae_title
        The node's AE title (the calling AE).
    patient_id, date_range, study_uid
        Matching keys; ``date_range`` is ``YYYYMMDD-YYYYMMDD`` (either end may be open) or one date.
    timeout
        ACSE, DIMSE and network timeout in seconds.

    Returns
    -------
    list[str]
        The matching studies' UIDs, in the order the source answered.

    Raises
    ------
    ValueError
        ``date_range`` is malformed.
    PullError
        The source refused the association or answered the query with a failure.
    """
    if date_range and not _DATE_RANGE_RE.match(date_range):
        raise ValueError(f"date range {date_range!r} is not YYYYMMDD-YYYYMMDD")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.PatientID = patient_id
    query.StudyDate = date_range
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(source, ae_title, model, timeout)
    uids: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            code = int(status.get("Status", 0xC000)) if status else 0xC000
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid:
                    uids.append(uid)
            elif code != 0x0000:
                raise PullError(f"{source.name} answered the query with status 0x{code:04X}")
    finally:
        assoc.release()
    return uids


def pull_study(source: Peer, ae_title: str, study_uid: str, timeout: float = 60.0) -> int:
    """Ask ``source`` to C-MOVE one study to ``ae_title`` (the node itself); return the instances it sent.

    Parameters
    ----------
    source
        The PACS holding the study.
    ae_title
        The node's AE title: it calls the source and is the move destination.
    study_uid
        The Study Instance UID.
    timeout
        ACSE, DIMSE and network timeout in seconds (the DIMSE one bounds the wait between sub-operations).

    Raises
    ------
    InvalidUID
        ``study_uid`` is not a UID.
    PullError
        The source refused, or reported failed sub-operations.
    """
    uid = check_uid(study_uid, "StudyInstanceUID")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    model = StudyRootQueryRetrieveInformationModelMove
    started = time.monotonic()
    assoc = _associate(source, ae_title, model, timeout)
    completed = failed = 0
    final = None
    try:
        for status, _ in assoc.send_c_move(query, ae_title, model):
            if not status:
                continue
            final = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
    finally:
        assoc.release()
    if final is None:
        raise PullError(f"{source.name} sent no answer to the move request")
    if final not in (0x0000, 0xB000) or failed:
        raise PullError(
            f"{source.name} answered the move with status 0x{final:04X} ({failed} failed, {completed} sent)"
        )
    log.info(
        "pulled study %s from %s: %d instance(s) in %.1f s", uid, source.name, completed, time.monotonic() - started
    )
    return completed


def pull_studies(
    source: Peer,
    ae_title: str,
    patient_id: str = "",
    date_range: str = "",
    study_uid: str = "",
    timeout: float = 60.0,
    receiving: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> dict[str, int]:
    """Find the studies matching a study-level query on ``source`` and pull each to ``ae_title``.

    Parameters
    ----------
    source, ae_title, timeout
        As :func:`pull_study`.
    patient_id, date_range, study_uid
        The query, as :func:`find_studies` (``parse_pacs_query`` makes them from text).
    receiving
        Entered around the moves, only when something matched: whatever must listen for the node's AE title
        while they run (a listener started for the pull when the node is not running); nothing by default.

    Returns
    -------
    dict[str, int]
        Study UID → instances moved, in the order the source answered the query (empty: nothing matched).

    Raises
    ------
    ValueError, PullError
        As :func:`find_studies` and :func:`pull_study`.
    """
    found = find_studies(source, ae_title, patient_id, date_range, study_uid, timeout)
    if not found:
        return {}
    with receiving():
        return {uid: pull_study(source, ae_title, uid, timeout) for uid in found}


def reprocess_study(index: Index, queue: JobQueue, study_uid: str) -> list[str]:
    """Queue an ``analyze-series`` job for every received series of a stored study and mark it complete.

    The job is queued before the state changes, as the series watcher does: a crash in between leaves a
    job, never a complete series without one.

    Returns
    -------
    list[str]
        The Series Instance UIDs queued (empty when the study is not stored).
    """
    rows = index.query(
        "SELECT series_instance_uid FROM series WHERE study_instance_uid = ? AND origin = 'received'"
        " ORDER BY series_number, series_instance_uid",
        (study_uid,),
    )
    uids = [r["series_instance_uid"] for r in rows]
    for uid in uids:
        queue.enqueue(ANALYZE_SERIES, uid, {"series_instance_uid": uid})
        index.update_series(uid, state=SERIES_COMPLETE, completed_at=time.time(), error="")
    return uids
