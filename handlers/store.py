"""C-STORE SCP: store the bytes as received, durably, index them, then answer.

The handler decodes only the header for the index (large values stay deferred on the received bytes) and
checks that the bytes hold what their transfer syntax and image attributes say (``handlers.encoding``); the
file written is the encoded dataset exactly as the peer sent it, behind a Part 10 preamble and file meta.
The success status goes back only after the file is fsynced and renamed into place and the index row is
committed.
Every failure becomes a DICOM status, a quarantined copy with the reason and a log line without patient
identity; the association and the node keep serving.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage as Comprehensive3DSR,
)

from handlers.encoding import (
    EncodingRefused,
    check_explicitness,
    check_inflation,
    check_pixel_data,
    dataset_offset,
)
from handlers.permissions import NOT_AUTHORIZED, Permissions, Service
from storage.files import FileStore, InvalidUID, TooManyVersions, check_uid
from storage.index import Index, InstanceMeta, instance_meta_from_dataset

log = logging.getLogger(__name__)

# DICOM C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(c)
    for c in (
        CTImageStorage,
        EnhancedCTImageStorage,
        MRImageStorage,
        EnhancedMRImageStorage,
        BasicTextSRStorage,
        EnhancedSRStorage,
        ComprehensiveSRStorage,
        Comprehensive3DSR,
        KeyObjectSelectionDocumentStorage,
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        GrayscaleSoftcopyPresentationStateStorage,
        SegmentationStorage,
    )
)


DEFER_BYTES = 4096  # values longer than this are not read into memory by the header parse


@dataclass(frozen=True)
class StoreLimits:
    """What one C-STORE may cost the node."""

    max_versions: int = 100  # versions of one SOP Instance UID in one series (0: no limit)
    max_inflated_bytes: int = 64 * 1024 * 1024  # a deflated dataset inflated further is refused (0: no limit)


class StoreRefused(Exception):
    """An instance is refused: carries the DICOM status and a reason without patient identity."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _safe_uid_for_log(value: object) -> str:
    """A UID for a log line if it is one (UIDs carry no identity); otherwise a placeholder."""
    try:
        return check_uid(value)
    except InvalidUID:
        return "<invalid>"


def read_header(encoded: bytes, transfer_syntax_uid: str, limits: StoreLimits) -> InstanceMeta:
    """The indexed header of received bytes, after checking they hold what their transfer syntax says.

    Raises
    ------
    StoreRefused
        0xC213 for bytes that contradict their encoding, 0xC210-0xC212 for bytes that cannot be parsed.
    """
    try:
        start = dataset_offset(encoded)
        check_inflation(encoded, start, transfer_syntax_uid, limits.max_inflated_bytes)
        check_explicitness(encoded, start, transfer_syntax_uid)
        # Large values stay on the wire bytes (deferred): their position and length are all the checks need.
        ds = dcmread(BytesIO(encoded), defer_size=DEFER_BYTES, force=False)
        ds.SOPInstanceUID  # noqa: B018 - forces parsing up to the UIDs; errors surface here
        check_pixel_data(ds, len(encoded), transfer_syntax_uid)
    except EncodingRefused as exc:
        raise StoreRefused(CANNOT_UNDERSTAND | 0x213, str(exc)) from exc
    except (InvalidDicomError, EOFError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND | 0x210, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise StoreRefused(CANNOT_UNDERSTAND | 0x211, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    try:
        return instance_meta_from_dataset(ds, transfer_syntax_uid)
    except Exception as exc:
        raise StoreRefused(CANNOT_UNDERSTAND | 0x212, f"header cannot be read: {type(exc).__name__}") from exc


def checked_uids(meta: InstanceMeta, context_sop_class_uid: str, command_sop_instance_uid: str) -> tuple[str, str, str]:
    """(study, series, SOP Instance UID) of a header, checked against each other and the request.

    Raises
    ------
    StoreRefused
        A UID that cannot become a path, a SOP class the node does not store or that differs from the
        negotiated one, or a SOP Instance UID that differs from the C-STORE request's.
    """
    try:
        sop_uid = check_uid(meta.sop_instance_uid, "SOPInstanceUID")
        study_uid = check_uid(meta.study_instance_uid, "StudyInstanceUID")
        series_uid = check_uid(meta.series_instance_uid, "SeriesInstanceUID")
        sop_class = check_uid(meta.sop_class_uid, "SOPClassUID")
    except InvalidUID as exc:
        raise StoreRefused(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"required UID refused: {exc}") from exc
    if sop_class not in STORAGE_SOP_CLASSES:
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not stored by this node")
    if context_sop_class_uid and sop_class != context_sop_class_uid:
        raise StoreRefused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOP class {sop_class} differs from the negotiated {context_sop_class_uid}",
        )
    if command_sop_instance_uid and command_sop_instance_uid.strip() != sop_uid:
        raise StoreRefused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset SOP Instance UID differs from the C-STORE request's"
        )
    return study_uid, series_uid, sop_uid


def store_encoded(
    encoded: bytes,
    transfer_syntax_uid: str,
    context_sop_class_uid: str,
    command_sop_instance_uid: str,
    files: FileStore,
    index: Index,
    calling_ae: str = "",
    limits: StoreLimits | None = None,
) -> tuple[int, str]:
    """Store one encoded Part 10 instance from a peer durably and index it (origin ``received``).

    Parameters
    ----------
    encoded
        Preamble, file meta and dataset exactly as received.
    transfer_syntax_uid, context_sop_class_uid, command_sop_instance_uid
        From the presentation context and the C-STORE request.
    files, index
        The file store and the index.
    calling_ae
        Who sent it (kept in the index for audit).
    limits
        How many versions of one instance are kept and how far a deflated dataset may inflate.

    Returns
    -------
    tuple[int, str]
        The DICOM status and a short description (for the log).

    Raises
    ------
    StoreRefused
        With the failure status; the caller quarantines and answers it.
    """
    limits = limits or StoreLimits()
    meta = read_header(encoded, transfer_syntax_uid, limits)
    study_uid, series_uid, sop_uid = checked_uids(meta, context_sop_class_uid, command_sop_instance_uid)
    try:
        known = index.versions(study_uid, series_uid, sop_uid)
        stored = files.write_instance(
            study_uid, series_uid, sop_uid, encoded, known=known, max_versions=limits.max_versions
        )
    except TooManyVersions as exc:
        raise StoreRefused(OUT_OF_RESOURCES, f"version refused: {exc}") from exc
    except OSError as exc:
        raise StoreRefused(OUT_OF_RESOURCES, f"could not write the file: {exc.strerror or exc}") from exc
    try:
        if stored.duplicate and index.has_instance(study_uid, series_uid, sop_uid, stored.version):
            return SUCCESS, f"duplicate of version {stored.version}, not stored again"
        index.record_instance(meta, stored.relpath, stored.size, stored.sha256, stored.version, calling_ae)
    except Exception as exc:
        # The file is durable; startup recovery will index it. The peer must still hear a failure so it
        # retries (a retry of identical bytes is then a no-op success once indexed).
        raise StoreRefused(OUT_OF_RESOURCES, f"could not index the instance: {type(exc).__name__}") from exc
    return SUCCESS, "stored" if stored.version == 1 else f"stored as version {stored.version}"


_UID_CHARACTERS = frozenset(b"0123456789.")


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """A group 0002 element, explicit VR little endian (short length form), its value padded to even."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _uid(value: object) -> bytes | None:
    encoded = str(value).encode("ascii", "replace")
    return encoded if 0 < len(encoded) <= 64 and set(encoded) <= _UID_CHARACTERS else None


def received_part10(event: evt.Event) -> bytes:
    """``event.encoded_dataset(include_meta=True)``: preamble, file meta and the dataset as received.

    The file meta is the one pynetdicom's ``create_file_meta`` makes (the request's SOP class and instance,
    the context's transfer syntax, pynetdicom's implementation UID and version), encoded here directly
    rather than through a pydicom dataset; a value that is not a plain UID goes through pynetdicom.
    """
    req = event.request
    uids = [_uid(v) for v in (req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, event.context.transfer_syntax)]
    implementation = _uid(PYNETDICOM_IMPLEMENTATION_UID)
    if None in uids or implementation is None or not hasattr(req.DataSet, "getbuffer"):
        return event.encoded_dataset(include_meta=True)
    sop_class, sop_instance, syntax = uids
    body = b"".join((
        struct.pack("<HH2sHL", 2, 0x0001, b"OB", 0, 2) + b"\x00\x01",  # File Meta Information Version
        _meta_element(0x0002, b"UI", sop_class, b"\0"),
        _meta_element(0x0003, b"UI", sop_instance, b"\0"),
        _meta_element(0x0010, b"UI", syntax, b"\0"),
        _meta_element(0x0012, b"UI", implementation, b"\0"),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "),
    ))  # fmt: skip
    group_length = struct.pack("<HH2sHL", 2, 0x0000, b"UL", 4, len(body))
    with req.DataSet.getbuffer() as dataset:
        return b"".join((b"\x00" * 128, b"DICM", group_length, body, dataset))


def handle_store(
    event: evt.Event,
    files: FileStore,
    index: Index,
    limits: StoreLimits | None = None,
    permissions: Permissions | None = None,
) -> int | tuple[int, Any]:
    """EVT_C_STORE handler bound with the file store, the index, the store's limits and the permissions."""
    calling_ae = event.assoc.requestor.ae_title
    try:
        encoded = received_part10(event)
    except Exception as exc:  # malformed file meta from the peer
        log.warning("C-STORE from %s: file meta cannot be encoded (%s)", calling_ae, type(exc).__name__)
        files.quarantine(None, f"file meta cannot be encoded: {type(exc).__name__}", {"calling_ae": calling_ae})
        return CANNOT_UNDERSTAND
    if permissions is not None and not permissions.check(event, Service.STORE):
        files.quarantine(encoded, "C-STORE from a peer not allowed to store", {"calling_ae": calling_ae})
        return NOT_AUTHORIZED
    ts = str(event.context.transfer_syntax)
    req = event.request
    try:
        status, what = store_encoded(
            encoded,
            ts,
            str(event.context.abstract_syntax),
            str(req.AffectedSOPInstanceUID or ""),
            files,
            index,
            calling_ae,
            limits,
        )
    except StoreRefused as refused:
        path = files.quarantine(
            encoded,
            refused.reason,
            {
                "calling_ae": calling_ae,
                "status": f"0x{refused.status:04X}",
                "transfer_syntax": ts,
                "sop_instance_uid": _safe_uid_for_log(str(req.AffectedSOPInstanceUID or "")),
            },
        )
        log.warning(
            "C-STORE from %s refused with 0x%04X: %s (quarantined as %s)",
            calling_ae,
            refused.status,
            refused.reason,
            path.name,
        )
        return refused.status
    except Exception as exc:  # never let an exception escape into pynetdicom's reactor
        log.exception("C-STORE from %s: unexpected failure (%s)", calling_ae, type(exc).__name__)
        try:
            files.quarantine(encoded, f"unexpected failure: {type(exc).__name__}", {"calling_ae": calling_ae})
        except OSError:
            log.error("quarantine failed too: the disk may be full")
        return PROCESSING_FAILURE
    log.debug("C-STORE from %s: %s (%s)", calling_ae, what, _safe_uid_for_log(str(req.AffectedSOPInstanceUID)))
    return status
