"""The audit trail: DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA record) in an append-only file.

Each line of ``<data_dir>/audit/audit.log`` is one JSON record ``{"seq", "prev", "sha256", "message"}``
where ``message`` is the XML ``AuditMessage`` and ``sha256`` hashes ``prev`` and the message together: a
changed, removed or inserted line breaks the chain from there on (``verify_chain``). Studies are named by
their UID, as the standard asks; no patient name or ID is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from xml.etree import ElementTree as ET

GENESIS = "0" * 64


@dataclass(frozen=True)
class Code:
    """A coded value as A.5 writes it (``csd-code``, ``codeSystemName``, ``originalText``)."""

    code: str
    system: str
    meaning: str


# PS3.15 A.5.3 events and PS3.16 CID 400-series codes the node writes
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
LOGIN = Code("110122", "DCM", "Login")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
APPLICATION = Code("110150", "DCM", "Application")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user or an application entity."""

    user_id: str
    requestor: bool
    address: str = ""
    role: Code | None = None


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning})


def audit_message(
    event: Code,
    action: str,
    outcome: Outcome,
    participants: Sequence[Participant],
    source_id: str,
    event_type: Code | None = None,
    studies: Iterable[str] = (),
    when: dt.datetime | None = None,
) -> str:
    """One ``AuditMessage`` as XML text (PS3.15 A.5.1).

    Parameters
    ----------
    event
        EventID (``INSTANCES_TRANSFERRED``, ``USER_AUTHENTICATION``, …).
    action
        EventActionCode: C(reate), R(ead), U(pdate), D(elete), E(xecute).
    outcome
        EventOutcomeIndicator.
    participants
        The ActiveParticipants (at least one).
    source_id
        AuditSourceID: the node's AE title.
    event_type
        An EventTypeCode (``LOGIN``, ``SOFTWARE_CONFIGURATION``), when the event has one.
    studies
        Study Instance UIDs, each a ParticipantObjectIdentification.

    Raises
    ------
    ValueError
        No participant, or an action code A.5 does not know.
    """
    if not participants:
        raise ValueError("an audit message needs at least one ActiveParticipant")
    if action not in ("C", "R", "U", "D", "E"):
        raise ValueError(f"EventActionCode {action!r} is not one of C, R, U, D, E")
    when = when or dt.datetime.now(dt.UTC)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": when.isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(int(outcome)),
        },
    )
    _code(ident, "EventID", event)
    if event_type is not None:
        _code(ident, "EventTypeCode", event_type)
    for p in participants:
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.address:
            attrs.update(NetworkAccessPointID=p.address, NetworkAccessPointTypeCode="2")  # 2: IP address
        part = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _code(part, "RoleIDCode", p.role)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # 4: application server process
    for uid in dict.fromkeys(studies):
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"},
        )
        _code(obj, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    return ET.tostring(root, encoding="unicode")


def _chain(prev: str, message: str) -> str:
    return hashlib.sha256((prev + "\n" + message).encode()).hexdigest()


class AuditTrail:
    """An append-only, hash-chained file of audit messages (one JSON record per line, fsynced)."""

    def __init__(self, path: str | Path, source_id: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.source_id = source_id
        self._lock = threading.Lock()
        self._seq, self._prev = 0, GENESIS
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._seq, self._prev = int(record["seq"]), str(record["sha256"])

    def append(self, message: str) -> None:
        """Write one message at the end of the chain."""
        with self._lock:
            digest = _chain(self._prev, message)
            record = {"seq": self._seq + 1, "prev": self._prev, "sha256": digest, "message": message}
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq, self._prev = self._seq + 1, digest

    def record(
        self,
        event: Code,
        action: str,
        outcome: Outcome,
        participants: Sequence[Participant],
        event_type: Code | None = None,
        studies: Iterable[str] = (),
    ) -> None:
        """Build one message with this node as its source and append it."""
        self.append(audit_message(event, action, outcome, participants, self.source_id, event_type, studies))


def read_messages(path: str | Path) -> list[str]:
    """The messages of an audit file, oldest first."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["message"] for line in lines if line.strip()]


def verify_chain(path: str | Path) -> int:
    """The number of messages if the chain is whole; ``ValueError`` naming the first broken line otherwise."""
    prev, n = GENESIS, 0
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = record["prev"] == prev and record["sha256"] == _chain(prev, record["message"])
            ok = ok and int(record["seq"]) == n + 1
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"audit chain broken at line {number}")
        prev, n = record["sha256"], n + 1
    return n
