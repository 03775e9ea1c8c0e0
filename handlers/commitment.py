"""Storage commitment, push model (1.2.840.10008.1.20.1; IHE RAD-10) as SCP: N-ACTION in, N-EVENT-REPORT out.

A peer (a modality, a PACS) asks with N-ACTION (Action Type 1: a Transaction UID and the Referenced SOP
Sequence of the instances it sent) whether the node has taken responsibility for them. The handler checks
the request, keeps it durably (``storage.commitments``) and answers the N-ACTION at once; the answer
itself comes later, as an N-EVENT-REPORT from ``CommitmentReporter``: Event Type 1 when every instance is
committed, 2 with a Failed SOP Sequence (Failure Reason 0x0112 never stored, 0x0119 stored with another
SOP class, 0x0110 indexed but its file gone) when any is not. "Committed" is answered from the index
(``storage.commitments.judge``): the store fsyncs a file before indexing it.

The report goes on the requester's association when it is still open a moment after the N-ACTION
response (``same_association_grace_s``: a peer that releases at once, as Orthanc does, is not raced),
otherwise on a new association to the requester's AE (``reply_peer``: its ``[[peers]]`` entry's port, or
the ``[[destinations]]`` entry of that AE title), proposing the node as SCP of the SOP class (PS3.4 J.3.3).
A report not answered is retried with backoff, across restarts: a transaction acknowledged by N-ACTION is
kept until its report is delivered or its attempts are spent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from pynetdicom import build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from handlers.peer import Peer, associate
from handlers.permissions import NOT_AUTHORIZED, Permissions, Service
from storage.commitments import Commitments, Outcome, SopReference, Transaction, judge
from storage.index import Index

log = logging.getLogger(__name__)

COMMITMENT_SOP_CLASS = UID(StorageCommitmentPushModel)
COMMITMENT_INSTANCE = UID(StorageCommitmentPushModelInstance)  # the well-known SOP instance
REQUEST_COMMITMENT = 1  # the one Action Type ID of the push model

# N-ACTION statuses (PS3.7 C.4.4, PS3.4 J.3.2)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

MAX_REFERENCES = 100_000  # instances one transaction may name


class BadRequest(ValueError):
    """An N-ACTION the node cannot accept; ``status`` is its DICOM status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _valid_uid(value: Any) -> bool:
    text = str(value or "")
    return bool(text) and UID(text).is_valid


def parse_request(action_information: Dataset | None) -> tuple[str, list[SopReference]]:
    """The Transaction UID and the instances of a storage commitment request.

    Raises
    ------
    BadRequest
        0x0115 when the Transaction UID or the Referenced SOP Sequence is missing or holds an item without
        valid SOP class and instance UIDs; 0x0213 above ``MAX_REFERENCES`` instances.
    """
    if action_information is None:
        raise BadRequest(INVALID_ARGUMENT_VALUE, "no Action Information")
    transaction_uid = str(action_information.get("TransactionUID", "") or "")
    if not _valid_uid(transaction_uid):
        raise BadRequest(INVALID_ARGUMENT_VALUE, "Transaction UID missing or not a valid UID")
    items = action_information.get("ReferencedSOPSequence")
    if not items:
        raise BadRequest(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence missing or empty")
    if len(items) > MAX_REFERENCES:
        raise BadRequest(RESOURCE_LIMITATION, f"{len(items)} instances in one request (limit {MAX_REFERENCES})")
    references = []
    for n, item in enumerate(items, 1):
        sop_class, sop_instance = item.get("ReferencedSOPClassUID"), item.get("ReferencedSOPInstanceUID")
        if not (_valid_uid(sop_class) and _valid_uid(sop_instance)):
            raise BadRequest(INVALID_ARGUMENT_VALUE, f"Referenced SOP Sequence item {n} lacks valid UIDs")
        references.append(SopReference(str(sop_class), str(sop_instance)))
    return transaction_uid, references


def event_information(transaction_uid: str, outcome: Outcome, retrieve_ae: str) -> Dataset:
    """The Event Information of the N-EVENT-REPORT (PS3.4 Table J.3-2) for one transaction's outcome."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.RetrieveAETitle = retrieve_ae
    if outcome.committed:
        ds.ReferencedSOPSequence = DicomSequence([_reference_item(ref) for ref in outcome.committed])
    if outcome.failed:
        failed = []
        for ref, reason in outcome.failed:
            item = _reference_item(ref)
            item.FailureReason = int(reason)
            failed.append(item)
        ds.FailedSOPSequence = DicomSequence(failed)
    return ds


def _reference_item(ref: SopReference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def handle_commitment_request(
    event: evt.Event, commitments: Commitments, reporter: CommitmentReporter, permissions: Permissions | None = None
) -> tuple[int, None]:
    """EVT_N_ACTION handler: keep a storage commitment request and acknowledge it; the report follows.

    Returns
    -------
    tuple
        ``(status, None)``: 0x0000 once the transaction is durably kept; a failure status otherwise
        (0x0124 not authorized, 0x0118 / 0x0112 / 0x0123 not the push model's class, instance or action,
        0x0115 / 0x0213 a malformed or oversized request, 0x0110 the transaction could not be kept).
    """
    request = event.request
    requestor = event.assoc.requestor
    if permissions is not None and not permissions.check(event, Service.COMMITMENT):
        return NOT_AUTHORIZED, None
    if str(request.RequestedSOPClassUID) != COMMITMENT_SOP_CLASS:
        return NO_SUCH_SOP_CLASS, None
    if str(request.RequestedSOPInstanceUID) != COMMITMENT_INSTANCE:
        log.warning("storage commitment from %s names SOP instance %s, not the well-known one",
                    requestor.ae_title, request.RequestedSOPInstanceUID)  # fmt: skip
        return NO_SUCH_SOP_INSTANCE, None
    if request.ActionTypeID != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION, None
    try:
        transaction_uid, references = parse_request(event.action_information)
    except BadRequest as exc:
        log.warning("storage commitment request from %s refused (0x%04X): %s", requestor.ae_title, exc.status, exc)
        return exc.status, None
    except Exception as exc:  # an Action Information that does not decode
        log.warning("storage commitment request from %s unreadable: %s", requestor.ae_title, type(exc).__name__)
        return INVALID_ARGUMENT_VALUE, None
    try:
        commitments.record_request(transaction_uid, requestor.ae_title, requestor.address, references)
    except Exception:
        log.exception("storage commitment transaction %s could not be kept", transaction_uid)
        return PROCESSING_FAILURE, None
    log.info("storage commitment transaction %s from %s: %d instance(s)", transaction_uid, requestor.ae_title,
             len(references))  # fmt: skip
    reporter.requested(transaction_uid, event.assoc)
    return SUCCESS, None


# -- the reports -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplyAddress:
    """Where a peer that asked for storage commitment listens, by AE title (for a report on a new association).

    ``ports``: AE title → port of ``[[peers]]`` entries that give one (the host is the address the request
    came from); ``destinations``: ``[[destinations]]`` peers, used when their AE title asked.
    """

    ports: dict[str, int]
    destinations: tuple[Peer, ...] = ()

    def __call__(self, ae_title: str, address: str) -> Peer | None:
        """The peer to call back, or None when the node does not know where ``ae_title`` listens."""
        ae = ae_title.strip()
        if ae in self.ports and address:
            return Peer(name=ae, ae_title=ae, host=address, port=self.ports[ae])
        for dest in self.destinations:
            if dest.ae_title == ae:
                return dest
        return None


class ReportNotDelivered(RuntimeError):
    """The peer could not be reached or did not answer the N-EVENT-REPORT with success."""


class CommitmentReporter:
    """Sends the N-EVENT-REPORT of every pending transaction (one thread: ``run``).

    Parameters
    ----------
    commitments
        The durable transactions.
    index
        The node's index (``judge`` answers from it).
    stored
        Whether an indexed relative path is in the file store.
    calling_ae
        The node's AE title (the report's Retrieve AE Title, and the calling AE of a new association).
    reply_peer
        Where an AE title that asked listens (``ReplyAddress``).
    timeout
        ACSE, DIMSE and network timeout of a report, in seconds.
    same_association_grace_s
        How long after the request its association must still be open for the report to go on it.
    """

    def __init__(
        self,
        commitments: Commitments,
        index: Index,
        stored: Callable[[str], bool],
        calling_ae: str,
        reply_peer: Callable[[str, str], Peer | None],
        timeout: float = 30.0,
        same_association_grace_s: float = 0.25,
        poll_seconds: float = 1.0,
    ) -> None:
        self.commitments = commitments
        self.index = index
        self.stored = stored
        self.calling_ae = calling_ae
        self.reply_peer = reply_peer
        self.timeout = timeout
        self.same_association_grace_s = same_association_grace_s
        self.poll_seconds = poll_seconds
        self._open: dict[str, tuple[Association, float]] = {}  # transaction → its requester's association
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def requested(self, transaction_uid: str, assoc: Association) -> None:
        """A transaction was just acknowledged on ``assoc``: report it soon, on that association if it stays."""
        with self._lock:
            self._open[transaction_uid] = (assoc, time.monotonic())
        self._wake.set()

    def wake(self) -> None:
        """Look for due reports now (and notice a stop at once)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Report every due transaction until ``stop`` is set; a failure becomes a retry, never an exit."""
        while not stop.is_set():
            self._wake.clear()
            try:
                self.report_due()
            except Exception:
                log.exception("storage commitment reports failed; trying again")
            self._wake.wait(self.poll_seconds)

    def report_due(self) -> int:
        """Try the report of every transaction that is due now; return how many were delivered."""
        delivered = 0
        for transaction in self.commitments.due():
            if self.report(transaction):
                delivered += 1
        return delivered

    def report(self, transaction: Transaction) -> bool:
        """Judge one transaction and deliver its report; record what happened. True when delivered."""
        with self._lock:
            assoc, since = self._open.pop(transaction.transaction_uid, (None, 0.0))
        try:
            outcome = judge(self.index, transaction.references, self.stored)
            info = event_information(transaction.transaction_uid, outcome, self.calling_ae)
            via = ""
            if assoc is not None and self._stays_open(assoc, since):
                try:
                    _send_report(assoc, info, outcome, "the requester's association")
                    via = "same-association"
                except ReportNotDelivered as exc:
                    log.info("transaction %s: %s; calling back instead", transaction.transaction_uid, exc)
            if not via:
                self._report_on_new_association(transaction, info, outcome)
                via = "new-association"
        except Exception as exc:
            error = str(exc) if isinstance(exc, ReportNotDelivered) else f"{type(exc).__name__}: {exc}"
            state = self.commitments.attempt_failed(transaction.transaction_uid, error)
            log.warning("storage commitment report %s to %s not delivered (%s): %s", transaction.transaction_uid,
                        transaction.calling_ae, state, error)  # fmt: skip
            return False
        self.commitments.reported(transaction.transaction_uid, outcome, via)
        log.info("storage commitment report %s to %s (%s): %d committed, %d failed", transaction.transaction_uid,
                 transaction.calling_ae, via, len(outcome.committed), len(outcome.failed))  # fmt: skip
        return True

    def _stays_open(self, assoc: Association, since: float) -> bool:
        """Whether ``assoc`` is still established ``same_association_grace_s`` after the request."""
        deadline = since + self.same_association_grace_s
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(assoc.is_established)

    def _report_on_new_association(self, transaction: Transaction, info: Dataset, outcome: Outcome) -> None:
        peer = self.reply_peer(transaction.calling_ae, transaction.address)
        if peer is None:
            raise ReportNotDelivered(
                f"the requester's association is closed and no port is known for {transaction.calling_ae}"
                " (give its [[peers]] entry a port, or list it in [[destinations]])"
            )
        role = build_role(COMMITMENT_SOP_CLASS, scp_role=True)  # the node is the SCP; it sends the event
        assoc = associate(peer, self.calling_ae, [build_context(COMMITMENT_SOP_CLASS)], self.timeout,
                          ext_neg=[role])  # fmt: skip
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "unreachable or aborted"
            raise ReportNotDelivered(f"association with {peer} failed ({why})")
        try:
            _send_report(assoc, info, outcome, str(peer))
        finally:
            if assoc.is_established:
                assoc.release()


def _send_report(assoc: Association, info: Dataset, outcome: Outcome, where: str) -> None:
    """Send one N-EVENT-REPORT on ``assoc`` and check its answer.

    Raises
    ------
    ReportNotDelivered
        No presentation context for the SOP class, no answer, or a failure status.
    """
    try:
        status, _reply = assoc.send_n_event_report(
            info, int(outcome.event_type), COMMITMENT_SOP_CLASS, COMMITMENT_INSTANCE
        )
    except (ValueError, RuntimeError) as exc:  # no context for the class, association gone
        raise ReportNotDelivered(f"{where}: {exc}") from exc
    code = getattr(status, "Status", None) if status else None
    if code is None:
        raise ReportNotDelivered(f"{where}: no answer to the N-EVENT-REPORT")
    if int(code) != SUCCESS:
        raise ReportNotDelivered(f"{where}: N-EVENT-REPORT answered 0x{int(code):04X}")


def reply_address(peer_ports: Iterable[tuple[str, int]], destinations: Sequence[Peer] = ()) -> ReplyAddress:
    """A ``ReplyAddress`` from ``(AE title, port)`` pairs (``[[peers]]`` with a port) and the destinations."""
    return ReplyAddress({ae.strip(): int(port) for ae, port in peer_ports if port}, tuple(destinations))
