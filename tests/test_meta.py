"""The indexed header: read from the raw bytes where that is certain, equal to pydicom's conversion everywhere.

Every file pydicom and pydicom-data ship offline (odd vendors, character sets, implicit VR, big endian,
deflated, multi-valued, padded with nulls or spaces) is read both ways; each attribute must come out the same.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from builders import shipped_dicom_files
from storage import meta
from storage.meta import instance_meta_from_dataset


def read(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, defer_size=4096, force=False)
    except Exception:  # noqa: BLE001 - not DICOM, or not readable: not a case here
        return None


def test_the_raw_path_gives_what_pydicom_gives_for_every_shipped_file(monkeypatch) -> None:
    files = [(p, ds) for p in shipped_dicom_files() if (ds := read(p)) is not None]
    assert len(files) > 200  # the whole corpus, not a handful
    fast = {p: instance_meta_from_dataset(ds) for p, ds in files}
    monkeypatch.setattr(meta, "_raw_text", lambda ds, keyword: None)  # pydicom's conversion for every value
    differ = []
    for path, _ in files:
        slow = instance_meta_from_dataset(read(path))
        if slow != fast[path]:
            fields = [k for k in vars(slow) if getattr(slow, k) != getattr(fast[path], k)]
            differ.append(f"{path.name}: {fields}")
    assert not differ, differ[:10]


def test_the_raw_path_serves_the_common_attributes_and_steps_aside_for_the_rest() -> None:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID = "1.2.3"
    raw = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"), defer_size=4096)
    assert meta._raw_text(raw, "StudyInstanceUID") == str(raw.StudyInstanceUID)  # still raw: read from bytes
    assert meta._raw_text(raw, "PatientName") is None  # PN: pydicom's
    assert meta._raw_text(ds, "SOPInstanceUID") is None  # a converted element: its value is already there


@pytest.mark.parametrize(
    ("vr", "raw", "expected"),
    [
        ("CS", b"ORIGINAL\\PRIMARY\\AXIAL ", "ORIGINAL\\PRIMARY\\AXIAL"),
        ("LO", b"HEAD \\NECK ", "HEAD\\NECK"),
        ("UI", b"1.2.840.10008.1.2\x00", "1.2.840.10008.1.2"),
        ("SH", b" PADDED ", "PADDED"),
        ("LO", b"caf\xe9", None),  # not ASCII: the character set decides
        ("LO", b"\x1b$B", None),  # an ISO 2022 escape
        ("DS", b"1.50", None),
    ],
)
def test_raw_values_are_stripped_and_split_as_pydicom_does(vr: str, raw: bytes, expected: str | None) -> None:
    from pydicom.dataelem import RawDataElement

    ds = pydicom.Dataset()
    tag = pydicom.datadict.tag_for_keyword("BodyPartExamined")
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)  # noqa: SLF001 - as dcmread leaves it
    assert meta._raw_text(ds, "BodyPartExamined") == expected
    if expected is not None:
        assert meta._converted_text(ds, "BodyPartExamined") == expected
