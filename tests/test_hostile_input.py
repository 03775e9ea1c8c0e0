"""Hostile input at the door: real-world odd files, path traversal in UIDs, garbage and oversized PDUs.

Whatever arrives, the node answers with a status (or refuses the context), quarantines refused data with
the reason, and keeps answering C-ECHO.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

REAL_WORLD = [
    # compressed transfer syntaxes, enhanced CT, broken sequences, UN VRs (pydicom-data and pydicom)
    "bad_sequence.dcm",
    "explicit_VR-UN.dcm",
    "eCT_Supplemental.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_RLE.dcm",
    "emri_small_big_endian.dcm",
    "JPEG-LL.dcm",
    "JPEG2000_UNC.dcm",
    "MR2_J2KI.dcm",
    "MR2_J2KR.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_rle.dcm",
    "JPEGLSNearLossless_16.dcm",
    "JPGExtended.dcm",
    "MR_small_deflate.dcm",
    "image_dfl.dcm",
    "liver.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "MR_truncated.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm",
]


def data_store_file(name: str) -> Path | None:
    """A file from pydicom-data's data_store or pydicom's own test files."""
    try:
        import data_store

        p = Path(data_store.__file__).parent / "data" / name
        if p.exists():
            return p
    except ImportError:
        pass
    try:
        return Path(get_testdata_file(name))
    except (ValueError, TypeError):
        return None


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture
def raw_sending():
    """Send files as they are on disk (no decode/re-encode on our side either)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def test_real_world_files_are_stored_or_refused(node, raw_sending):
    if os.environ.get("CI") and data_store_file("693_J2KR.dcm") is None:
        pytest.fail("pydicom-data is not installed")
    outcomes = {}
    for name in REAL_WORLD:
        path = data_store_file(name)
        if path is None:
            continue
        try:
            header = dcmread(path, stop_before_pixels=True, force=True)
            sop_class = str(header.get("SOPClassUID", "")) or str(header.file_meta.MediaStorageSOPClassUID)
            ts = str(header.file_meta.TransferSyntaxUID)
        except Exception:
            outcomes[name] = "client cannot read"
            continue
        ae = AE(ae_title="HOSTILE")
        ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
        if not assoc.is_established:
            outcomes[name] = "association refused"
            continue
        if not assoc.accepted_contexts:
            outcomes[name] = "context refused"
            assoc.release()
            continue
        try:
            status = assoc.send_c_store(path)
            code = int(status.Status) if "Status" in status else None
        except Exception as exc:  # the client library refusing to send is not the node's doing
            code = f"client error {type(exc).__name__}"
        if assoc.is_established:
            assoc.release()
        outcomes[name] = code
        if code == 0:
            sop = str(header.SOPInstanceUID)
            assert node.index.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop,)), name
        elif isinstance(code, int):
            assert code >= 0xA000 or code == 0x0122 or code == 0x0110, (name, hex(code))
        assert echo_ok(node.port), f"node stopped answering after {name}"
    stored = [n for n, c in outcomes.items() if c == 0]
    refused = [n for n, c in outcomes.items() if isinstance(c, int) and c != 0]
    assert len(stored) >= 10, outcomes  # the compressed syntaxes and enhanced CT are accepted
    assert "eCT_Supplemental.dcm" in stored and "emri_small_jpeg_2k_lossless.dcm" in stored
    assert "rtplan.dcm" not in stored  # not a class this node serves
    # every refusal left a quarantined copy with its reason
    assert len(node.files.quarantined()) >= len(refused)


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_path_traversal_uid_is_refused_and_nothing_written_outside(node, tmp_path, raw_sending):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = "../../../../tmp/evil"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "evil.dcm"
    path.write_bytes(_dataset_bytes(ds))
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA900
    assert not Path("/tmp/evil").exists()
    reasons = [q["reason"] for q in node.files.quarantined()]
    assert any("StudyInstanceUID" in r for r in reasons)
    # the reason file holds no patient identity
    for f in node.files.quarantine_dir.glob("*.json"):
        assert str(ds.PatientName) not in f.read_text()
    assert echo_ok(node.port)


def test_garbage_dataset_under_a_valid_meta_is_refused(node, tmp_path, raw_sending):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    raw = _dataset_bytes(ds)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    path = tmp_path / "garbage.dcm"
    path.write_bytes(raw[:meta_end] + b"\x08\x00\x05\x00CS\xff\xff" + os.urandom(3000))
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
    status = assoc.send_c_store(path)
    if assoc.is_established:
        assoc.release()
    assert status.Status >= 0xA000
    q = node.files.quarantined()
    assert q and json.dumps(q[-1])
    assert echo_ok(node.port)


@pytest.mark.parametrize(
    "payload",
    [
        os.urandom(4096),  # noise
        b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0) + os.urandom(65536),  # A-ASSOCIATE-RQ claiming 4 GiB
        b"\x04\x00" + struct.pack(">L", 10) + b"\x00" * 10,  # P-DATA before any association
        b"\x09\x00\x00\x00\x00\x00",  # unknown PDU type
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["noise", "oversized-assoc-rq", "pdata-first", "unknown-type", "http"],
)
def test_garbage_pdus_are_refused_and_node_keeps_serving(node, payload):
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            while s.recv(4096):
                pass
        except OSError:
            pass  # the node closing on us is the expected answer
    assert echo_ok(node.port)
