"""WADO-RS (PS3.18 10.4): studies, series and instances as stored, their metadata, frames and bulk data.

The instances of a resource are listed by the C-FIND matcher at the IMAGE level (``handlers.query``), as
C-MOVE and C-GET list theirs, so all three send the same instances (the newest version of each). An
instance goes out as its stored file when the client accepts its transfer syntax, else transcoded
(``syntax``). Metadata is the stored header as dicom+json, pixel data as a BulkDataURI, the stored
transfer syntax as Available Transfer Syntax UID (0008,3002).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from handlers.query import where_clause
from node.web.dicomweb import syntax
from node.web.dicomweb.media import DICOM, MULTIPART, OCTET_STREAM, MediaRange
from storage.files import FileStore
from storage.index import Index

log = logging.getLogger(__name__)

_NO_PIXELS = ("SR", "Key Object", "Presentation State", "Report")
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class StoredInstance:
    """One instance a WADO-RS resource names: where its file is and how it is encoded."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str

    @property
    def has_pixels(self) -> bool:
        """Whether the SOP class carries pixel data (SR, KOS and presentation states do not)."""
        name = UID(self.sop_class_uid).name
        return not any(word in name for word in _NO_PIXELS)


def instances(
    index: Index, files: FileStore, study_uid: str, series_uid: str = "", sop_uid: str = ""
) -> list[StoredInstance]:
    """The stored instances of a study, series or instance (newest versions, in series order)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE" if sop_uid else "SERIES" if series_uid else "STUDY"
    identifier.StudyInstanceUID = study_uid
    if series_uid:
        identifier.SeriesInstanceUID = series_uid
    if sop_uid:
        identifier.SOPInstanceUID = sop_uid
    where, params = where_clause(identifier, "IMAGE")
    rows = index.query(
        "SELECT i.path, i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,"
        " i.transfer_syntax_uid FROM instances i"
        " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
        " JOIN series se ON se.series_instance_uid = i.series_instance_uid"
        f"{where} ORDER BY se.series_number, i.series_instance_uid, i.instance_number, i.sop_instance_uid",
        tuple(params),
    )
    return [
        StoredInstance(
            files.abspath(r["path"]),
            r["study_instance_uid"],
            r["series_instance_uid"],
            r["sop_instance_uid"],
            r["sop_class_uid"],
            r["transfer_syntax_uid"] or syntax.DEFAULT_SYNTAX,
        )
        for r in rows
    ]


def wanted_syntaxes(ranges: list[MediaRange], part_type: str) -> tuple[list[str], bool]:
    """The transfer syntaxes the Accept ranges ask for parts of ``part_type``, and whether one part may be bare.

    ``*/*`` and ``multipart/*`` accept the stored syntax; a multipart range of the right type without a
    ``transfer-syntax`` asks for the default (Explicit VR Little Endian, uncompressed for frames).
    """
    out: list[str] = []
    single = False
    for r in ranges:
        if r.media_type in ("*/*", "multipart/*"):
            out.append(syntax.AS_STORED if part_type == DICOM else syntax.DEFAULT_SYNTAX)
        elif r.media_type == MULTIPART and r.part_type in ("", part_type, "*/*", "application/*"):
            out.append(r.transfer_syntax or syntax.DEFAULT_SYNTAX)
        elif r.media_type == MULTIPART and part_type == OCTET_STREAM and r.part_type.startswith("image/"):
            out.append(r.transfer_syntax or syntax.AS_STORED)
        elif r.media_type == part_type:
            out.append(r.transfer_syntax or (syntax.AS_STORED if part_type == DICOM else syntax.DEFAULT_SYNTAX))
            single = True
    return out, single


def instance_parts(items: list[StoredInstance], wanted: list[str], base_url: str) -> Iterator[tuple[str, bytes, str]]:
    """(Content-Type, Part 10 bytes, Content-Location) of each instance, as stored where the client accepts it."""
    for item in items:
        target = syntax.choose(item.transfer_syntax, wanted, item.has_pixels)
        data = item.path.read_bytes()
        if target != item.transfer_syntax:
            data = syntax.transcode(data, target)
        yield f"{DICOM}; transfer-syntax={target}", data, instance_url(base_url, item)


def check_deliverable(items: list[StoredInstance], wanted: list[str]) -> None:
    """Raise ``syntax.NotAcceptable`` before an answer starts if one of ``items`` cannot be sent."""
    for item in items:
        syntax.choose(item.transfer_syntax, wanted, item.has_pixels)


def instance_url(base_url: str, item: StoredInstance) -> str:
    """The WADO-RS URL of one instance."""
    return f"{base_url}/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"


def metadata(item: StoredInstance, base_url: str) -> dict[str, Any]:
    """The stored header of an instance as dicom+json, pixel data as a BulkDataURI."""
    ds = dcmread(item.path, stop_before_pixels=True)
    body = ds.to_json_dict(suppress_invalid_tags=True)
    body["00083002"] = {"vr": "UI", "Value": [item.transfer_syntax]}
    if item.has_pixels and "Rows" in ds:
        compressed = UID(item.transfer_syntax).is_compressed
        vr = "OW" if not compressed and int(ds.get("BitsAllocated", 8) or 8) > 8 else "OB"
        body[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"{instance_url(base_url, item)}/bulk/{PIXEL_DATA:08X}"}
    return dict(sorted(body.items()))


def parse_frame_numbers(text: str) -> list[int]:
    """``1,3,5`` as frame numbers (1-based).

    Raises
    ------
    ValueError
        Not a comma-separated list of positive integers.
    """
    numbers = [int(p) for p in text.split(",") if p.strip()]
    if not numbers or any(n < 1 for n in numbers):
        raise ValueError("frame numbers are positive integers separated by commas")
    return numbers


def frame_parts(item: StoredInstance, numbers: list[int], wanted: list[str]) -> list[tuple[str, bytes, str]]:
    """(Content-Type, frame bytes, "") of each frame asked for.

    Raises
    ------
    IndexError
        A frame number past the last frame.
    syntax.NotAcceptable
        The stored frames are compressed and the client accepts neither them nor uncompressed ones.
    """
    stored = item.transfer_syntax
    compressed_ok = syntax.AS_STORED in wanted or stored in wanted
    if not compressed_ok and not any(w in syntax.UNCOMPRESSED for w in wanted):
        raise syntax.NotAcceptable(f"frames are stored as {stored}; the accepted syntaxes cannot be produced")
    ds = dcmread(item.path)
    if "PixelData" not in ds:
        raise IndexError(numbers[0])
    count = syntax.frame_count(ds)
    if max(numbers) > count:
        raise IndexError(max(numbers))
    parts = []
    for n in numbers:
        data, ts = syntax.frame_bytes(ds, n, compressed_ok)
        parts.append((f"{OCTET_STREAM}; transfer-syntax={ts}", data, ""))
    return parts


def bulk_value(item: StoredInstance, tag: int) -> bytes:
    """A top-level binary value of an instance; pixel data as its frames, uncompressed, one after the other.

    Raises
    ------
    KeyError
        The instance has no such element.
    """
    ds = dcmread(item.path)
    if tag == PIXEL_DATA:
        if "PixelData" not in ds:
            raise KeyError(tag)
        if not UID(item.transfer_syntax).is_compressed and item.transfer_syntax in syntax.UNCOMPRESSED:
            return bytes(ds.PixelData)
        return b"".join(syntax.frame_bytes(ds, n, False)[0] for n in range(1, syntax.frame_count(ds) + 1))
    element = ds[tag]
    value = element.value
    if not isinstance(value, bytes | bytearray):
        raise KeyError(tag)
    return bytes(value)
