"""C-MOVE and C-GET when the destination refuses some instances: counts, statuses and the failed UID list.

The node's sub-operations go through its tuned send path (P-DATA from the sending thread, a reactor that
parks for sure, pending responses thinned): these tests prove every sub-operation's status still reaches
the final response, through DCMTK movescu/getscu and a pynetdicom SCU, over real associations.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation as Role
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from builders import Populated, populated_node
from node.config import Destination
from peers import free_port, run_tool

DEST_AE = "PICKY"
OUT_OF_RESOURCES = 0xA700


@pytest.fixture(scope="module")
def dest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory, dest_port: int) -> Iterator[Populated]:
    dest = Destination(name="picky", ae_title=DEST_AE, host="127.0.0.1", port=dest_port, send_results=False)
    yield from populated_node(tmp_path_factory.mktemp("rf") / "node", destinations=[dest])


def _picky_scp(port: int, refuse_mr: bool, accept_mr: bool = True) -> tuple[object, list[str]]:
    """A storage SCP: CT stored (status 0), MR refused with 0xA700 (or its SOP class not accepted at all)."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if refuse_mr and event.request.AffectedSOPClassUID == MRImageStorage:
            return OUT_OF_RESOURCES
        received.append(uid)
        return 0x0000

    ae = AE(ae_title=DEST_AE)
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if accept_mr:
        ae.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, received


def _study(qr: Populated) -> tuple[Dataset, set[str], set[str]]:
    """Study 0's identifier, its CT and its MR SOP Instance UIDs."""
    study = qr.specs[0].study_uid
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study
    ct = {str(d.SOPInstanceUID) for d in qr.sent if d.StudyInstanceUID == study and d.Modality == "CT"}
    mr = {str(d.SOPInstanceUID) for d in qr.sent if d.StudyInstanceUID == study and d.Modality == "MR"}
    assert len(ct) == 3 and len(mr) == 2
    return ds, ct, mr


def _final_move(port: int, identifier: Dataset) -> tuple[Dataset, Dataset | None, int]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    rsps = [(st, ident) for st, ident in assoc.send_c_move(identifier, DEST_AE, MOVE) if st]
    assoc.release()
    return rsps[-1][0], rsps[-1][1], len(rsps)


@pytest.mark.parametrize("accept_mr", [True, False], ids=["mr-refused-0xA700", "mr-context-rejected"])
def test_move_counts_the_instances_the_destination_refuses(qr: Populated, dest_port: int, accept_mr: bool) -> None:
    identifier, ct, mr = _study(qr)
    server, received = _picky_scp(dest_port, refuse_mr=True, accept_mr=accept_mr)
    try:
        final, ident, _ = _final_move(qr.node.port, identifier)
    finally:
        server.shutdown()
    assert int(final.Status) == 0xB000  # some sub-operations failed (PS3.4 C.4.2.1.5)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 2)
    assert final.NumberOfWarningSuboperations == 0
    failed = ident.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == mr
    assert set(received) == ct


@pytest.mark.peers
def test_movescu_sees_the_warning_and_the_counts(qr: Populated, dest_port: int) -> None:
    identifier, ct, mr = _study(qr)
    server, received = _picky_scp(dest_port, refuse_mr=True)
    try:
        proc = run_tool(
            ["movescu", "-v", "-aec", "HARMONODE", "-aem", DEST_AE, "-S", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={identifier.StudyInstanceUID}", "127.0.0.1", str(qr.node.port)],
            timeout=60,
            check=False,  # movescu exits non-zero on a warning
        )  # fmt: skip
    finally:
        server.shutdown()
    log = proc.stdout + proc.stderr
    assert "Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in log, log
    assert set(received) == ct


def test_move_to_a_destination_that_is_down_is_0xA801(qr: Populated) -> None:
    identifier, _, _ = _study(qr)  # nothing listens on the destination's port here
    final, _, n = _final_move(qr.node.port, identifier)
    assert (int(final.Status), n) == (0xA801, 1)


def test_many_sub_operations_all_reach_the_final_response(qr: Populated, dest_port: int) -> None:
    """Every CT of every study 20 times over one association: the counts add up, no response is lost."""
    server, received = _picky_scp(dest_port, refuse_mr=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", qr.node.port, ae_title="HARMONODE")
    try:
        for _ in range(20):
            for spec in qr.specs:
                ds = Dataset()
                ds.QueryRetrieveLevel, ds.SeriesInstanceUID, ds.StudyInstanceUID = (
                    "SERIES",
                    spec.series_uid,
                    spec.study_uid,
                )
                final = [st for st, _ in assoc.send_c_move(ds, DEST_AE, MOVE) if st][-1]
                done = (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations)
                assert done == ((spec.count, 0) if spec.modality == "CT" else (0, spec.count)), final
        assoc.release()
    finally:
        server.shutdown()
    assert len(received) == 20 * sum(s.count for s in qr.specs if s.modality == "CT")


@pytest.mark.parametrize("tool", ["pynetdicom", "getscu"])
def test_get_counts_the_instances_the_caller_refuses(qr: Populated, tool: str, tmp_path) -> None:  # noqa: ANN001
    identifier, ct, mr = _study(qr)
    if tool == "getscu":  # DCMTK getscu stores everything: the counts are all completed
        out = tmp_path / "got"
        out.mkdir()
        proc = run_tool(
            ["getscu", "-v", "-aec", "HARMONODE", "-S", "+B", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={identifier.StudyInstanceUID}", "127.0.0.1", str(qr.node.port)],
            timeout=60,
        )  # fmt: skip
        log = proc.stdout + proc.stderr
        assert "Received C-GET Response (Success)" in log and "Number of Completed Suboperations : 5" in log, log
        assert len(list(out.iterdir())) == 5
        return
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        if event.request.AffectedSOPClassUID == MRImageStorage:
            return OUT_OF_RESOURCES
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop, syntax in ((CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ImplicitVRLittleEndian)):
        ae.add_requested_context(sop, syntax)
    roles = []
    for sop in (CTImageStorage, MRImageStorage):
        role = Role()
        role.sop_class_uid, role.scu_role, role.scp_role = sop, False, True
        roles.append(role)
    assoc = ae.associate(
        "127.0.0.1", qr.node.port, ae_title="HARMONODE", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert assoc.is_established
    rsps = [(st, ident) for st, ident in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet) if st]
    assoc.release()
    final, ident = rsps[-1]
    assert int(final.Status) == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 2)
    failed = ident.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == mr
    assert set(received) == ct
