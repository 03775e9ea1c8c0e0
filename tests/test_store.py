"""C-ECHO and C-STORE over real associations: pynetdicom and DCMTK push, the node stores byte-identical."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from peers import run_tool


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta: what the wire carries and the node must keep."""
    raw = Path(path).read_bytes()
    ds = dcmread(BytesIO(raw), stop_before_pixels=True)
    meta_len = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_len:]


def associate(port: int, contexts, ae_title: str = "HARMONODE"):  # noqa: ANN001, ANN201
    ae = AE(ae_title="TESTSCU")
    for c in contexts:
        ae.add_requested_context(*c) if isinstance(c, tuple) else ae.add_requested_context(c)
    return ae.associate("127.0.0.1", port, ae_title=ae_title)


def test_echo_with_pynetdicom(node):
    assoc = associate(node.port, [Verification])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@pytest.mark.peers
def test_echo_with_dcmtk(node):
    run_tool(["echoscu", "-aec", "HARMONODE", "127.0.0.1", str(node.port)])


def test_wrong_called_ae_is_rejected(node):
    assoc = associate(node.port, [Verification], ae_title="SOMEONE")
    assert assoc.is_rejected
    assoc = associate(node.port, [Verification])
    assert assoc.is_established  # still serving
    assoc.release()


def test_store_ct_slice_is_stored_byte_identical_and_indexed(node):
    src = get_testdata_file("CT_small.dcm")
    ds = dcmread(src)
    assoc = associate(node.port, [(CTImageStorage, [ds.file_meta.TransferSyntaxUID])])
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    rows = node.index.instances_of_series(ds.SeriesInstanceUID)
    assert len(rows) == 1
    stored = node.files.abspath(rows[0]["path"])
    assert dataset_bytes(stored) == dataset_bytes(src)
    assert node.index.series(ds.SeriesInstanceUID)["instance_count"] == 1


@pytest.mark.peers
def test_storescu_pushes_a_series(node, tmp_path):
    src = dcmread(get_testdata_file("CT_small.dcm"))
    del src[0xFFFCFFFC]  # DCMTK drops dataset trailing padding on the wire, by design
    series_uid = generate_uid()
    paths = []
    for i in range(5):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.SeriesInstanceUID = series_uid
        src.InstanceNumber = i + 1
        p = tmp_path / f"{i}.dcm"
        src.save_as(p, enforce_file_format=True)
        paths.append(p)
    run_tool(["storescu", "-aec", "HARMONODE", "127.0.0.1", str(node.port), *map(str, paths)])
    rows = node.index.instances_of_series(series_uid)
    assert len(rows) == 5
    by_sop = {r["sop_instance_uid"]: r for r in rows}
    for p in paths:
        d = dcmread(p, stop_before_pixels=True)
        assert dataset_bytes(node.files.abspath(by_sop[d.SOPInstanceUID]["path"])) == dataset_bytes(p)


def test_duplicate_identical_is_noop_and_different_is_new_version(node):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ctx = [(CTImageStorage, [ExplicitVRLittleEndian])]
    assoc = associate(node.port, ctx)
    assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000
    ds.SeriesDescription = "changed"
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    rows = node.index.query("SELECT version FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,))
    assert sorted(r["version"] for r in rows) == [1, 2]
    assert node.index.series(ds.SeriesInstanceUID)["instance_count"] == 2


@pytest.mark.parametrize(
    ("sop_instance", "syntax"),
    [("1.2.3.4", "1.2.840.10008.1.2.1"), ("1.2.3.45", "1.2.840.10008.1.2"), ("1.2.3 ", "1.2.840.10008.1.2.1")],
)
def test_received_part10_is_what_pynetdicom_encodes(sop_instance: str, syntax: str) -> None:
    # handlers.store.received_part10 stands for Event.encoded_dataset(include_meta=True).
    from io import BytesIO
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.presentation import build_context

    from handlers.store import received_part10

    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID = 1, "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = sop_instance
    req.DataSet = BytesIO(b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00" + bytes(range(256)) * 40)
    context = build_context(req.AffectedSOPClassUID, syntax)
    event = Event(SimpleNamespace(), evt.EVT_C_STORE, {"request": req, "context": context})
    assert received_part10(event) == event.encoded_dataset(include_meta=True)
