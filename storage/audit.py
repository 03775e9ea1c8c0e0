"""The audit trail: DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA record) in an append-only file.

Each line of ``<data_dir>/audit/audit.log`` is one JSON record ``{"seq", "prev", "sha256", "message"}``
where ``message`` is the XML ``AuditMessage`` and ``sha256`` hashes ``prev`` and the message together: a
changed, removed or inserted line breaks the chain from there on (``verify_chain``). Studies are named by
their UID, as the standard asks; no patient name or ID is written (a query is recorded by its level and the
names of its keys, never their values).

Several processes may append to one trail (``harmonode serve`` and a ``harmonode feedback`` beside it): each
append takes an exclusive ``fcntl`` lock on the file and reads the chain's last record under it, so the
chain stays whole whoever writes. The messages validate against the standard's RELAX NG schema
(``tests/schemas/audit-message.rnc``, checked by ``tests/test_audit_schema.py``).
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any
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
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
LOGIN = Code("110122", "DCM", "Login")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
APPLICATION = Code("110150", "DCM", "Application")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")


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


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study (``study_object``) or a query (``query_object``).

    The schema asks for either a ``name`` or a ``query`` (base64 in the message); ``type_code`` and
    ``role`` are A.5.1's ParticipantObjectTypeCode and ParticipantObjectTypeCodeRole.
    """

    object_id: str
    id_type: Code
    type_code: str = "2"  # system object
    role: str = "3"  # report
    name: str = ""
    query: bytes = b""

    def __post_init__(self) -> None:
        if not self.object_id:
            raise ValueError("a participant object needs its ParticipantObjectID")
        if bool(self.name) == bool(self.query):
            raise ValueError("a participant object has either a name or a query, not both or neither")


def study_object(uid: str) -> ParticipantObject:
    """A study, by its Study Instance UID (which is also its name in the node)."""
    return ParticipantObject(uid, STUDY_INSTANCE_UID, name=uid)


def query_object(sop_class_uid: str, description: str) -> ParticipantObject:
    """A query of ``sop_class_uid`` (its information model); ``description`` names its level and keys."""
    return ParticipantObject(sop_class_uid, SOP_CLASS_UID, role="24", query=description.encode("utf-8"))


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
    objects: Sequence[ParticipantObject] = (),
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
    objects
        More participant objects (a query), written before the studies.

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
    for item in [*objects, *(study_object(uid) for uid in dict.fromkeys(u for u in studies if u))]:
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": item.object_id,
                "ParticipantObjectTypeCode": item.type_code,
                "ParticipantObjectTypeCodeRole": item.role,
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", item.id_type)
        if item.query:
            ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(item.query).decode("ascii")
        else:
            ET.SubElement(obj, "ParticipantObjectName").text = item.name
    return ET.tostring(root, encoding="unicode")


def _chain(prev: str, message: str) -> str:
    return hashlib.sha256((prev + "\n" + message).encode()).hexdigest()


def _last_record(fd: int) -> dict | None:
    """The last JSON record of the open trail file (read backwards from its end), or None when empty."""
    size = os.lseek(fd, 0, os.SEEK_END)
    tail, pos = b"", size
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        lines = tail.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            last = lines[-1].strip()
            return json.loads(last) if last else None
    return None


class AuditTrail:
    """An append-only, hash-chained file of audit messages (one JSON record per line, fsynced).

    Safe to share between threads and between processes: ``append`` holds an exclusive ``flock`` on the
    file while it reads the last record and writes the next.
    """

    def __init__(self, path: str | Path, source_id: str, forward: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.source_id = source_id
        self.forward = forward  # a storage.syslog.SyslogTarget (or anything with send(message, ok)), or None
        self._lock = threading.Lock()

    def append(self, message: str) -> int:
        """Write one message at the end of the chain; return its sequence number."""
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
                last = _last_record(fd)
                seq, prev = (int(last["seq"]), str(last["sha256"])) if last else (0, GENESIS)
                digest = _chain(prev, message)
                record = {"seq": seq + 1, "prev": prev, "sha256": digest, "message": message}
                os.write(fd, (json.dumps(record) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return seq + 1

    def record(
        self,
        event: Code,
        action: str,
        outcome: Outcome,
        participants: Sequence[Participant],
        event_type: Code | None = None,
        studies: Iterable[str] = (),
        objects: Sequence[ParticipantObject] = (),
    ) -> None:
        """Build one message with this node as its source, append it, and copy it to syslog when configured."""
        message = audit_message(
            event, action, outcome, participants, self.source_id, event_type, studies, objects=objects
        )
        self.append(message)
        if self.forward is not None:
            self.forward.send(message, outcome == Outcome.SUCCESS)


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
