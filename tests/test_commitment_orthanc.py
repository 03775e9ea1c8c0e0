"""Storage commitment with Orthanc as the SCU: Orthanc sends instances to the node, asks it (REST
``POST /modalities/{id}/storage-commitment``) whether it has committed them, and receives the node's
N-EVENT-REPORT on a new association to its own DICOM port (Orthanc releases right after the N-ACTION)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage

from builders import encoded, make_ct_series, post_instance
from conftest import make_config
from handlers.permissions import PeerPermission
from node.app import Node
from peers import running_orthanc, wait_until

pytestmark = pytest.mark.peers


def finished_report(orthanc, transaction_uid: str) -> dict | None:  # noqa: ANN001
    """Orthanc's record of a storage commitment it asked for, once the node's report arrived."""
    report = orthanc.get(f"/storage-commitment/{transaction_uid}")
    return report if report.get("Status") != "Pending" else None


def test_orthanc_asks_the_node_for_storage_commitment(tmp_path: Path):
    config = make_config(tmp_path / "node")
    modalities = {"harmonode": ["HARMONODE", "127.0.0.1", config.node.port]}
    with running_orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        orthanc_peer = PeerPermission.of("ORTHANC", ["echo", "store", "commitment"], ["127.0.0.1"],
                                         port=orthanc.dicom_port)  # fmt: skip
        # Orthanc releases right after the N-ACTION response: wait for that even on a loaded machine (the
        # wait ends as soon as the association closes), so the report always takes the new association.
        grace = {"same_association_grace_s": 5.0}
        node = Node(
            make_config(tmp_path / "node", node={"port": config.node.port}, peers=[orthanc_peer], commitment=grace)
        )
        node.start(("listen",))
        try:
            series = make_ct_series(seed=210, slices=2)
            ids = [post_instance(orthanc.url, encoded(ds))["ID"] for ds in series]
            orthanc.post("/modalities/harmonode/store", {"Resources": ids, "Synchronous": True})
            stored = [{"SOPClassUID": str(ds.SOPClassUID), "SOPInstanceUID": str(ds.SOPInstanceUID)} for ds in series]

            asked = orthanc.post("/modalities/harmonode/storage-commitment", {"DicomInstances": stored})
            report = wait_until(lambda: finished_report(orthanc, asked["ID"]), timeout=20, what="Orthanc's report")
            assert report["Status"] == "Success", report
            assert {s["SOPInstanceUID"] for s in report["Success"]} == {str(ds.SOPInstanceUID) for ds in series}
            assert report["Failures"] == []

            unknown = generate_uid()
            mixed = [*stored, {"SOPClassUID": CTImageStorage, "SOPInstanceUID": unknown}]
            asked = orthanc.post("/modalities/harmonode/storage-commitment", {"DicomInstances": mixed})
            report = wait_until(lambda: finished_report(orthanc, asked["ID"]), timeout=20, what="Orthanc's report")
            assert report["Status"] == "Failure", report
            assert len(report["Success"]) == len(series)
            assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in report["Failures"]] == [(unknown, 0x0112)]
            assert node.commitments.get(asked["ID"])["via"] == "new-association"
        finally:
            node.stop()
