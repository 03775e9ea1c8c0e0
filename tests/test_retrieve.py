"""C-MOVE and C-GET from the node with DCMTK movescu/getscu: the files that arrive are byte-identical."""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from builders import Populated, dataset_bytes, populated_node
from handlers.retrieve import handle_get
from node.config import Destination
from peers import free_port, peer_env, run_tool, system_tool, wait_until

STORESCP_AE = "STORESCP"


@pytest.fixture(scope="module")
def storescp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory, storescp_port: int) -> Iterator[Populated]:
    dest = Destination(name="viewer", ae_title=STORESCP_AE, host="127.0.0.1", port=storescp_port, send_results=False)
    yield from populated_node(tmp_path_factory.mktemp("rt") / "node", destinations=[dest])


@pytest.fixture
def storescp(tmp_path: Path, storescp_port: int) -> Iterator[Path]:
    """DCMTK storescp, bit-preserving, on the configured destination's port; yields its output folder."""
    out = tmp_path / "received"
    out.mkdir()
    cmd = [system_tool("storescp"), "-aet", STORESCP_AE, "+B", "-od", str(out), str(storescp_port)]
    proc = subprocess.Popen(cmd, env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", storescp_port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_until(listening, timeout=20, what="storescp to listen")
    yield out
    proc.terminate()
    proc.wait(timeout=10)


def stored_files(populated: Populated, uids: set[str]) -> dict[str, Path]:
    """SOP Instance UID → stored file, for the instances in ``uids``."""
    rows = populated.node.index.query("SELECT sop_instance_uid, path FROM instances")
    return {
        r["sop_instance_uid"]: populated.node.files.abspath(r["path"]) for r in rows if r["sop_instance_uid"] in uids
    }


def assert_identical(received_dir: Path, populated: Populated, expected_uids: set[str]) -> None:
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received_dir.iterdir()}
    assert set(received) == expected_uids
    for uid, stored in stored_files(populated, expected_uids).items():
        assert dataset_bytes(received[uid]) == dataset_bytes(stored)


@pytest.mark.peers
def test_movescu_study_to_storescp_byte_identical(qr: Populated, storescp: Path) -> None:
    study = qr.specs[0].study_uid  # a CT series (Explicit VR) and an MR series (Implicit VR)
    proc = run_tool(
        ["movescu", "-v", "-aec", "HARMONODE", "-aem", STORESCP_AE, "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(qr.node.port)],
        timeout=60,
    )  # fmt: skip
    expected = {str(d.SOPInstanceUID) for d in qr.sent if d.StudyInstanceUID == study}
    assert len(expected) == 5
    log = proc.stdout + proc.stderr
    assert "Received Move Response 1 (Pending)" in log  # the first pending response; the rest are thinned
    assert "Received Final Move Response (Success)" in log
    assert_identical(storescp, qr, expected)


@pytest.mark.peers
def test_getscu_list_of_series(qr: Populated, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """CT (stored Explicit VR) arrives byte-identical; MR (stored Implicit VR) converted to the accepted syntax."""
    caplog.set_level(logging.DEBUG, logger="handlers.transport")
    wanted = [qr.specs[0].series_uid, qr.specs[1].series_uid, qr.specs[2].series_uid]
    out = tmp_path / "got"
    out.mkdir()
    run_tool(
        ["getscu", "-aec", "HARMONODE", "-S", "+B", "-od", str(out), "-k", "QueryRetrieveLevel=SERIES",
         "-k", "SeriesInstanceUID=" + "\\".join(wanted), "127.0.0.1", str(qr.node.port)],
        timeout=60,
    )  # fmt: skip
    expected = {str(d.SOPInstanceUID) for d in qr.sent if d.SeriesInstanceUID in wanted}
    ct = {str(d.SOPInstanceUID) for d in qr.sent if d.SeriesInstanceUID in wanted and d.Modality == "CT"}
    assert len(expected) == 7 and len(ct) == 5
    paths = {str(dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    received = {uid: dcmread(p) for uid, p in paths.items()}
    assert set(received) == expected
    for uid in expected - ct:
        sent = next(d for d in qr.sent if d.SOPInstanceUID == uid)
        assert received[uid].PixelData == sent.PixelData and received[uid].PatientID == sent.PatientID
    for uid, stored in stored_files(qr, ct).items():
        assert dataset_bytes(paths[uid]) == dataset_bytes(stored)
    assert sum("sending converted" in r.getMessage() for r in caplog.records) == 2  # the MR ones only


def _move(port: int, identifier: Dataset, destination: str, model=StudyRootQueryRetrieveInformationModelMove):  # noqa: ANN001, ANN202
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    rsps = [st for st, _ in assoc.send_c_move(identifier, destination, model) if st]
    assoc.release()
    return rsps


def test_unknown_move_destination_is_refused(qr: Populated) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", qr.specs[0].study_uid
    assert [int(s.Status) for s in _move(qr.node.port, ds, "NOBODY")] == [0xA801]


def test_move_to_a_down_destination_fails_cleanly(qr: Populated) -> None:
    ds = Dataset()  # nothing listens on the storescp port outside the storescp fixture
    ds.QueryRetrieveLevel, ds.PatientID = "PATIENT", "P3"
    assert [
        int(s.Status) for s in _move(qr.node.port, ds, STORESCP_AE, PatientRootQueryRetrieveInformationModelMove)
    ] == [0xA801]


@pytest.mark.parametrize(
    "keys",
    [
        {"QueryRetrieveLevel": "STUDY"},
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
        {"QueryRetrieveLevel": "X"},
    ],
)
def test_bad_retrieve_identifier_gets_a_failure(qr: Populated, keys: dict[str, str]) -> None:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", qr.node.port, ae_title="HARMONODE")
    statuses = [int(st.Status) for st, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet) if st]
    assoc.release()
    assert statuses == [0xA900]


def test_get_cancel_stops_sub_operations(qr: Populated) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", qr.specs[0].study_uid
    event = SimpleNamespace(
        identifier=ds,
        request=SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelGet),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="TESTSCU"), send_c_store=lambda *a, **k: None),
    )
    results = []
    for item in handle_get(_Cancelling(event, after=2), qr.node.index, qr.node.files):
        results.append(item if isinstance(item, int) else item[0])
    assert results == [5, 0xFF00, 0xFF00, 0xFE00]


class _Cancelling:
    """Wraps a fake event; ``is_cancelled`` turns True after ``after`` looks."""

    def __init__(self, event: SimpleNamespace, after: int) -> None:
        self._event, self._after, self._looks = event, after, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._event, name)

    @property
    def is_cancelled(self) -> bool:
        self._looks += 1
        return self._looks > self._after
