"""STOW-RS (PS3.18 10.5): each application/dicom part stored through the C-STORE SCP's own durable path.

A part is a Part 10 file (one without a preamble or a file meta group length gets them, as the C-STORE SCP
frames what it receives; ``framed``). Its file meta plays the C-STORE request's part: the transfer syntax is the
negotiated one, Media Storage SOP Class and Instance UID are the presentation context's SOP class and the
request's Affected SOP Instance UID. ``handlers.store.store_encoded`` then checks, writes (fsync, rename,
directory fsync) and indexes the bytes exactly as uploaded, with the same refusals; a refused part is
quarantined with its reason as a refused C-STORE is, and under disk back-pressure every part gets 0xA700
before a byte is written. Stored instances are indexed as received, so the series watcher completes their
series and the pipeline analyses them like C-STORE'd ones.

The answer (PS3.18 10.5.3): 200 when every part was stored, 202 when some were, 409 when none was, with a
dicom+json body of ReferencedSOPSequence and FailedSOPSequence (Failure Reason per part).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from handlers.encoding import PREAMBLE_AND_PREFIX, EncodingRefused, dataset_offset
from handlers.store import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    StoreLimits,
    StoreRefused,
    read_header,
    store_encoded,
)
from node.web.dicomweb.media import DICOM
from storage.files import FileStore, InvalidUID, check_uid
from storage.index import Index

log = logging.getLogger(__name__)

TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 Table 10.5.3-1 (Referenced Transfer Syntax not supported)


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part: its DICOM status and the UIDs it named (when readable)."""

    status: int
    reason: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    nbytes: int = 0

    @property
    def stored(self) -> bool:
        """Whether the instance is durable and indexed."""
        return self.status == SUCCESS


@dataclass
class StowResult:
    """The outcome of one STOW-RS request, part by part."""

    parts: list[PartOutcome] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        """200 when every part was stored, 409 when none was, 202 otherwise."""
        stored = sum(p.stored for p in self.parts)
        if stored == len(self.parts):
            return 200
        return 409 if stored == 0 else 202

    def body(self, base_url: str, study_uid: str = "") -> dict[str, Any]:
        """The dicom+json answer: Retrieve URL, ReferencedSOPSequence and FailedSOPSequence."""
        ds = Dataset()
        studies = {p.study_uid for p in self.parts if p.stored}
        study = study_uid or (studies.pop() if len(studies) == 1 else "")
        if study:
            ds.RetrieveURL = f"{base_url}/studies/{study}"
        referenced, failed = [], []
        for p in self.parts:
            item = Dataset()
            if p.sop_class_uid:
                item.ReferencedSOPClassUID = p.sop_class_uid
            if p.sop_instance_uid:
                item.ReferencedSOPInstanceUID = p.sop_instance_uid
            if p.stored:
                item.RetrieveURL = (
                    f"{base_url}/studies/{p.study_uid}/series/{p.series_uid}/instances/{p.sop_instance_uid}"
                )
                referenced.append(item)
            else:
                item.FailureReason = p.status
                failed.append(item)
        if referenced:
            ds.ReferencedSOPSequence = referenced
        if failed:
            ds.FailedSOPSequence = failed
        return ds.to_json_dict()


def _uid_or_blank(value: object) -> str:
    try:
        return check_uid(value)
    except InvalidUID:
        return ""


def _meta_end(part: bytes, start: int) -> int:
    """Where the (explicit VR little endian) group 0002 elements that begin at ``start`` end."""
    position = start
    while len(part) >= position + 8 and part[position : position + 2] == b"\x02\x00":
        vr = part[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            position += 12 + int.from_bytes(part[position + 8 : position + 12], "little")
        else:
            position += 8 + int.from_bytes(part[position + 6 : position + 8], "little")
    return position


def framed(part: bytes) -> tuple[bytes, str, str, str]:
    """A part as the C-STORE SCP frames what it receives, and its file meta's three UIDs.

    A Part 10 file with a preamble and a file meta group length is kept byte for byte; a part without
    the preamble or the group length (pydicom's ``dcmwrite`` of a dataset, as dicomweb-client sends
    it) gets both, in front of its dataset bytes exactly as sent.

    Returns
    -------
    tuple[bytes, str, str, str]
        The bytes to store, the transfer syntax, Media Storage SOP Class UID and SOP Instance UID.

    Raises
    ------
    StoreRefused
        0xC000 when the part has no readable file meta, 0xC122 for an unknown transfer syntax.
    """
    try:
        try:
            offset = dataset_offset(part)
            encoded = part
        except EncodingRefused:
            start = PREAMBLE_AND_PREFIX if part[128:132] == b"DICM" else 0
            end = _meta_end(part, start)
            if end == start:
                raise StoreRefused(CANNOT_UNDERSTAND, "part has no file meta (not a Part 10 file)") from None
            head = BytesIO()
            head.write(b"\0" * 128 + b"DICM")
            parsed = dcmread(BytesIO(b"\0" * 128 + b"DICM" + part[start:end]), force=False).file_meta
            write_file_meta_info(head, parsed, enforce_standard=True)
            offset = head.tell()
            encoded = head.getvalue() + part[end:]
        meta = dcmread(BytesIO(encoded[:offset]), force=False).file_meta
        ts = str(meta.TransferSyntaxUID)
        sop_class, sop_uid = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
    except StoreRefused:
        raise
    except Exception as exc:  # pydicom raises many types on a corrupt file meta
        raise StoreRefused(CANNOT_UNDERSTAND, f"file meta cannot be read: {type(exc).__name__}") from exc
    if not UID(ts).is_transfer_syntax:
        raise StoreRefused(TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {_uid_or_blank(ts)!r} is not known")
    return encoded, ts, sop_class, sop_uid


class Stow:
    """Stores STOW-RS parts with the node's file store, index and store limits (the C-STORE path)."""

    def __init__(self, files: FileStore, index: Index, limits: StoreLimits, accepting: Any = None) -> None:
        self.files = files
        self.index = index
        self.limits = limits
        self.accepting = accepting or (lambda: True)

    def store_part(self, headers: dict[str, str], part: bytes, study_uid: str, source: str) -> PartOutcome:
        """Store one part; a refused one is quarantined with its reason. Never raises."""
        if not self.accepting():
            return PartOutcome(OUT_OF_RESOURCES, "disk back-pressure")
        content_type = headers.get("content-type", DICOM).split(";")[0].strip().lower()
        meta: tuple[str, str, str] = ("", "", "")
        try:
            if content_type != DICOM:
                raise StoreRefused(CANNOT_UNDERSTAND, f"part of type {content_type[:64]!r} is not {DICOM}")
            part, ts, sop_class, sop_uid = framed(part)
            meta = (ts, sop_class, sop_uid)
            header = read_header(part, ts, self.limits)
            if study_uid and header.study_instance_uid != study_uid:
                raise StoreRefused(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS, "instance's Study Instance UID differs from the request's"
                )
            status, what = store_encoded(part, ts, sop_class, sop_uid, self.files, self.index, source, self.limits)
        except StoreRefused as refused:
            self._quarantine(part, refused.status, refused.reason, source, meta)
            return PartOutcome(refused.status, refused.reason, _uid_or_blank(meta[1]), _uid_or_blank(meta[2]))
        except Exception as exc:  # a part never takes the request (or the node) down
            log.exception("STOW-RS from %s: unexpected failure (%s)", source, type(exc).__name__)
            self._quarantine(part, PROCESSING_FAILURE, f"unexpected failure: {type(exc).__name__}", source, meta)
            return PartOutcome(PROCESSING_FAILURE, type(exc).__name__, _uid_or_blank(meta[1]), _uid_or_blank(meta[2]))
        log.debug("STOW-RS from %s: %s (%s)", source, what, sop_uid)
        return PartOutcome(
            status,
            what,
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_instance_uid,
            header.series_instance_uid,
            len(part),
        )

    def _quarantine(self, part: bytes, status: int, reason: str, source: str, meta: tuple[str, str, str]) -> None:
        try:
            path = self.files.quarantine(
                part,
                reason,
                {
                    "source": source,
                    "status": f"0x{status:04X}",
                    "transfer_syntax": _uid_or_blank(meta[0]),
                    "sop_instance_uid": _uid_or_blank(meta[2]) or "<invalid>",
                },
            )
        except OSError:
            log.error("STOW-RS from %s: quarantine failed too, the disk may be full", source)
            return
        log.warning("STOW-RS from %s refused with 0x%04X: %s (quarantined as %s)", source, status, reason, path.name)

    def store(self, parts: list[tuple[dict[str, str], bytes]], study_uid: str, source: str) -> StowResult:
        """Store every part of a request, in order."""
        return StowResult([self.store_part(headers, part, study_uid, source) for headers, part in parts])
