"""What the node writes to its audit trail (``storage.audit``), and when.

- an association that stored instances, when it closes: *DICOM Instances Transferred* (110104), the calling
  AE as source, the node as destination, each study received by its UID;
- a login, right or wrong: *User Authentication* / *Login* (110114 / 110122), outcome 0 or 4;
- a rule activated or dead letters resent from the console or API: *Security Alert* / *Software
  Configuration* (110113 / 110131) and *Application Activity* (110100);
- a C-FIND: *Query* (110112), the query named by its information model, level and key names (never their
  values: a query by patient name does not put the name in the trail), with the studies it matched;
- a C-GET or C-MOVE: *DICOM Instances Transferred* (110104, action R), the node as source, the caller (C-GET)
  or the move destination (C-MOVE) as destination, each study sent;
- a result delivered by the dispatcher: *DICOM Instances Transferred* (110104, R) to the destination's AE;
- a series analysed: *DICOM Instances Accessed* (110103, action C: the node read the series and created its
  results), the node as the requesting participant;
- feedback (the console's buttons, the CLI, an assessment SR): written by ``handlers.feedback`` itself
  (110103, action U) through the trail it is given.

The C-STORE path only appends a SOP Instance UID to its association's list; the studies are looked up and
the message written when the association ends. The query and retrieve handlers are wrapped
(``audited_find``, ``audited_retrieve``): the wrapper passes every yield through and writes one message
when the handler's generator ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from storage.audit import (
    APPLICATION,
    APPLICATION_ACTIVITY,
    DESTINATION_ROLE,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    LOGIN,
    QUERY,
    SECURITY_ALERT,
    SOFTWARE_CONFIGURATION,
    SOURCE_ROLE,
    USER_AUTHENTICATION,
    AuditTrail,
    Outcome,
    Participant,
    query_object,
)
from storage.index import Index

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_FAILURE_FIRST_NIBBLE = (0xA, 0xC)  # 0xA700, 0xA900, 0xC000..: a failure status
MATCHED_STUDIES_AUDITED = 100  # a query that matches more names the first this many


class NodeAudit:
    """The node's audit hooks over one ``AuditTrail``."""

    def __init__(
        self, trail: AuditTrail, index: Index, ae_title: str, destinations: Mapping[str, tuple[str, str]] = {}
    ) -> None:
        """``destinations``: each result destination's name to its (AE title, host), for delivery messages."""
        self.trail = trail
        self.index = index
        self.ae_title = ae_title
        self.destinations = dict(destinations)
        self._lock = threading.Lock()
        self._received: dict[int, list[str]] = {}

    def _node(self, requestor: bool = False, role: Any = None) -> Participant:
        return Participant(self.ae_title, requestor, role=role or APPLICATION)

    # -- DICOM ----------------------------------------------------------------------------------------
    def stored(self, assoc: Any, sop_instance_uid: str) -> None:
        """Note one instance stored over ``assoc`` (the hot path: one list append)."""
        with self._lock:
            self._received.setdefault(id(assoc), []).append(sop_instance_uid)

    def association_closed(self, event: evt.Event) -> None:
        """EVT_RELEASED / EVT_ABORTED: one message for the instances the association stored."""
        with self._lock:
            uids = self._received.pop(id(event.assoc), [])
        if not uids:
            return
        try:
            marks = ",".join("?" for _ in uids[:900])
            rows = self.index.query(
                f"SELECT DISTINCT study_instance_uid FROM instances WHERE sop_instance_uid IN ({marks})",
                tuple(uids[:900]),
            )
            requestor = event.assoc.requestor
            self.trail.record(
                INSTANCES_TRANSFERRED,
                "C",
                Outcome.SUCCESS,
                [
                    Participant(requestor.ae_title, True, requestor.address, SOURCE_ROLE),
                    self._node(role=DESTINATION_ROLE),
                ],
                studies=[r["study_instance_uid"] for r in rows],
            )
        except Exception:  # the audit never breaks the association's handling
            log.exception("audit: an association's transfer could not be recorded")

    def _studies_of(self, sop_instance_uids: list[str]) -> list[str]:
        studies: list[str] = []
        for start in range(0, len(sop_instance_uids), 900):
            chunk = sop_instance_uids[start : start + 900]
            marks = ",".join("?" for _ in chunk)
            rows = self.index.query(
                f"SELECT DISTINCT study_instance_uid FROM instances WHERE sop_instance_uid IN ({marks})", tuple(chunk)
            )
            studies.extend(r["study_instance_uid"] for r in rows)
        return list(dict.fromkeys(studies))

    def queried(self, event: evt.Event, identifier: Dataset | None, studies: list[str], ok: bool) -> None:
        """One C-FIND answered: the query (model, level, key names) and the studies it matched."""
        keys = sorted(e.keyword or str(e.tag) for e in identifier) if identifier is not None else []
        level = str(identifier.get("QueryRetrieveLevel", "")) if identifier is not None else ""
        model = str(getattr(event.request, "AffectedSOPClassUID", "") or "") or "1.2.840.10008.5.1.4.1.2.2.1"
        requestor = event.assoc.requestor
        self.trail.record(
            QUERY,
            "E",
            Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
            [Participant(requestor.ae_title, True, requestor.address, SOURCE_ROLE), self._node(role=DESTINATION_ROLE)],
            studies=studies[:MATCHED_STUDIES_AUDITED],
            objects=[query_object(model, f"level={level}; keys={','.join(keys)}")],
        )

    def retrieved(self, event: evt.Event, sop_instance_uids: list[str], ok: bool) -> None:
        """One C-GET or C-MOVE finished: the node sent ``sop_instance_uids`` to the caller or the move destination."""
        requestor = event.assoc.requestor
        caller = Participant(requestor.ae_title, True, requestor.address)
        destination = str(getattr(event, "move_destination", "") or "").strip() if event.event == evt.EVT_C_MOVE else ""
        if destination:
            participants = [
                Participant(requestor.ae_title, True, requestor.address),
                self._node(role=SOURCE_ROLE),
                Participant(destination, False, role=DESTINATION_ROLE),
            ]
        else:
            participants = [
                Participant(caller.user_id, True, caller.address, DESTINATION_ROLE),
                self._node(role=SOURCE_ROLE),
            ]
        self.trail.record(
            INSTANCES_TRANSFERRED,
            "R",
            Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
            participants,
            studies=self._studies_of(sop_instance_uids),
        )

    def delivered(self, destination: str, sop_instance_uid: str) -> None:
        """A result object sent to ``destination`` (a configured destination's name) by the dispatcher."""
        ae_title, host = self.destinations.get(destination, (destination, ""))
        self.trail.record(
            INSTANCES_TRANSFERRED,
            "R",
            Outcome.SUCCESS,
            [self._node(requestor=True, role=SOURCE_ROLE), Participant(ae_title or "?", False, host, DESTINATION_ROLE)],
            studies=self._studies_of([sop_instance_uid]),
        )

    def analysed(self, series_instance_uid: str) -> None:
        """A series analysed (``done``): the node read its images and created its result objects."""
        row = self.index.series(series_instance_uid)
        if row is None or row.get("state") != "done":
            return
        self.trail.record(
            INSTANCES_ACCESSED,
            "C",
            Outcome.SUCCESS,
            [self._node(requestor=True)],
            studies=[str(row["study_instance_uid"])],
        )

    # -- the console ----------------------------------------------------------------------------------
    def login(self, user: str, ok: bool, address: str = "") -> None:
        """A login attempt (form or HTTP Basic)."""
        self.trail.record(
            USER_AUTHENTICATION,
            "E",
            Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
            [Participant(user[:64] or "?", True, address), self._node()],
            event_type=LOGIN,
        )

    def changed(self, user: str, what: str) -> None:
        """A change of the node's configuration by a user (a rule activated)."""
        log.info("audit: %s by %s", what, user)
        self.trail.record(
            SECURITY_ALERT, "E", Outcome.SUCCESS, [Participant(user, True), self._node()], SOFTWARE_CONFIGURATION
        )

    def acted(self, user: str, what: str) -> None:
        """An action of a user on the node's work (dead letters resent)."""
        log.info("audit: %s by %s", what, user)
        self.trail.record(APPLICATION_ACTIVITY, "E", Outcome.SUCCESS, [Participant(user, True), self._node()])

    def record(self, event: str, **details: Any) -> None:
        """The web server's events by name (``login``, ``resend``, ``rule-activated``)."""
        user = str(details.get("user", "?"))
        if event == "login":
            self.login(user, details.get("outcome") == "success", str(details.get("address", "")))
        elif event == "rule-activated":
            self.changed(user, f"rule {details.get('rule')} activated")
        elif event == "resend":
            self.acted(user, f"{details.get('count')} dead delivery job(s) to {details.get('destination')} resent")


def _failed(status: Any) -> bool:
    code = int(status) if isinstance(status, int) else int(getattr(status, "Status", 0) or 0)
    return code >> 12 in _FAILURE_FIRST_NIBBLE or code == 0xFE00  # failures and cancel


def audited_find(handler: Callable[..., Iterator[Any]], audit: NodeAudit) -> Callable[..., Iterator[Any]]:
    """``handler`` (an EVT_C_FIND generator) passing every answer through, one Query message at its end."""

    def find(event: evt.Event, *args: Any) -> Iterator[Any]:
        studies: list[str] = []
        ok = True
        try:
            for answer in handler(event, *args):
                status, identifier = answer
                if _failed(status):
                    ok = False
                elif isinstance(identifier, Dataset) and identifier.get("StudyInstanceUID"):
                    studies.append(str(identifier.StudyInstanceUID))
                yield answer
        finally:
            try:
                request = getattr(event, "identifier", None)
            except Exception:  # an identifier that does not decode: the handler answered a failure
                request, ok = None, False
            try:
                audit.queried(event, request, list(dict.fromkeys(studies)), ok)
            except Exception:
                log.exception("audit: a C-FIND could not be recorded")

    return find


def audited_retrieve(handler: Callable[..., Iterator[Any]], audit: NodeAudit) -> Callable[..., Iterator[Any]]:
    """``handler`` (EVT_C_GET or EVT_C_MOVE) passing every yield through, one Instances Transferred at its end."""

    def retrieve(event: evt.Event, *args: Any) -> Iterator[Any]:
        sent: list[str] = []
        ok = True
        try:
            for item in handler(event, *args):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Dataset):
                    if item[1].get("SOPInstanceUID") and not _failed(item[0]):
                        sent.append(str(item[1].SOPInstanceUID))
                    elif _failed(item[0]):
                        ok = False
                elif isinstance(item, tuple) and len(item) == 2 and item[1] is None and isinstance(item[0], int):
                    ok = ok and not _failed(item[0])
                yield item
        finally:
            if sent or not ok:
                try:
                    audit.retrieved(event, sent, ok)
                except Exception:
                    log.exception("audit: a retrieve could not be recorded")

    return retrieve
