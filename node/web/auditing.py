"""What the node writes to its audit trail (``storage.audit``), and when.

- an association that stored instances, when it closes: *DICOM Instances Transferred* (110104), the calling
  AE as source, the node as destination, each study received by its UID;
- a login, right or wrong: *User Authentication* / *Login* (110114 / 110122), outcome 0 or 4;
- a rule activated or dead letters resent from the console or API: *Security Alert* / *Software
  Configuration* (110113 / 110131) and *Application Activity* (110100).

The C-STORE path only appends a SOP Instance UID to its association's list; the studies are looked up and
the message written when the association ends.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pynetdicom import evt

from storage.audit import (
    APPLICATION,
    APPLICATION_ACTIVITY,
    DESTINATION_ROLE,
    INSTANCES_TRANSFERRED,
    LOGIN,
    SECURITY_ALERT,
    SOFTWARE_CONFIGURATION,
    SOURCE_ROLE,
    USER_AUTHENTICATION,
    AuditTrail,
    Outcome,
    Participant,
)
from storage.index import Index

log = logging.getLogger(__name__)


class NodeAudit:
    """The node's audit hooks over one ``AuditTrail``."""

    def __init__(self, trail: AuditTrail, index: Index, ae_title: str) -> None:
        self.trail = trail
        self.index = index
        self.ae_title = ae_title
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
