"""The record stays true: no acknowledged instance hidden, no patient misfiled (DCMTK findscu/getscu as the viewer)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from builders import SeriesSpec, encoded, findscu, study_uids, synthetic_instance
from conftest import make_config
from handlers.store import OUT_OF_RESOURCES, StoreLimits, StoreRefused, store_encoded
from node.app import Node
from peers import run_tool
from storage.index import ConflictKind
from storage.store import open_store

pytestmark = pytest.mark.peers


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(make_config(tmp_path / "node"))
    n.start(("listen",))
    yield n
    n.stop()


def spec(patient_id: str, name: str, study_uid: str | None = None) -> SeriesSpec:
    return SeriesSpec(
        patient_id, name, study_uid or generate_uid(), "20240115", "101500", "A1", generate_uid(), "CT", 1
    )


def send(port: int, *datasets: Dataset) -> list[int]:
    """C-STORE each dataset over one association (as a scanner would); return the statuses."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def getscu(port: int, out: Path, study_uid: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    run_tool(
        ["getscu", "-aec", "HARMONODE", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k",
         f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
        timeout=30,
    )  # fmt: skip
    return sorted(out.iterdir())


def test_a_sop_uid_seen_in_a_second_study_is_found_and_retrieved_there(node: Node, tmp_path: Path) -> None:
    first = synthetic_instance(spec("P1", "ONE^FIRST"), 1)
    second = synthetic_instance(spec("P2", "TWO^SECOND"), 1)
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert send(node.port, first, second) == [0x0000, 0x0000]
    for ds in (first, second):
        keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ds.StudyInstanceUID}", "SOPInstanceUID"]
        rsps = findscu(node.port, tmp_path / "find", keys)
        assert [str(r.SOPInstanceUID) for r in rsps] == [first.SOPInstanceUID]
        assert len(getscu(node.port, tmp_path / f"get-{ds.PatientID}", ds.StudyInstanceUID)) == 1
    (conflict,) = node.index.conflicts()
    assert conflict["kind"] == ConflictKind.SOP_UID_ELSEWHERE
    assert conflict["study_instance_uid"] == second.StudyInstanceUID and conflict["detail"] == "sop_instance_uid"


def test_a_sop_uid_in_two_studies_survives_the_loss_of_the_index(tmp_path: Path) -> None:
    first = synthetic_instance(spec("P1", "ONE^FIRST"), 1)
    second = synthetic_instance(spec("P2", "TWO^SECOND"), 1)
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    config = make_config(tmp_path / "node")
    node = Node(config)
    node.start(("listen",))
    assert send(node.port, first, second) == [0x0000, 0x0000]
    node.stop()
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "node" / name).unlink(missing_ok=True)
    node = Node(config)
    node.start(("listen",))  # recovery indexes the stored files again
    try:
        assert node.recovery is not None and node.recovery.reindexed == 2
        for ds in (first, second):
            rsps = findscu(node.port, tmp_path / "find", ["QueryRetrieveLevel=IMAGE",
                           f"StudyInstanceUID={ds.StudyInstanceUID}", "SOPInstanceUID"])  # fmt: skip
            assert len(rsps) == 1
    finally:
        node.stop()


def test_another_patients_study_under_the_same_id_does_not_overwrite_the_first(node: Node, tmp_path: Path) -> None:
    alice, mallory = spec("P100", "ALICE^ANNA"), spec("P100", "MALLORY^MIX")
    a, m = synthetic_instance(alice, 1), synthetic_instance(mallory, 1)
    a.PatientBirthDate, m.PatientBirthDate = "19700101", "19990909"
    assert send(node.port, a, m) == [0x0000, 0x0000]
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientBirthDate"]
    by_study = {str(r.StudyInstanceUID): r for r in findscu(node.port, tmp_path / "f1", keys)}
    assert str(by_study[alice.study_uid].PatientName) == "ALICE^ANNA"
    assert by_study[alice.study_uid].PatientBirthDate == "19700101"
    assert str(by_study[mallory.study_uid].PatientName) == "MALLORY^MIX"
    assert study_uids(findscu(node.port, tmp_path / "f2", [*keys[:2], "PatientName=ALICE*"])) == {alice.study_uid}
    assert study_uids(findscu(node.port, tmp_path / "f3", [*keys[:2], "PatientName=MALLORY*"])) == {mallory.study_uid}
    # The patient level keeps what it first saw; the disagreement is recorded, without the values.
    (patient,) = findscu(node.port, tmp_path / "f4", ["QueryRetrieveLevel=PATIENT", "PatientID=P100", "PatientName"],
                         model="-P")  # fmt: skip
    assert str(patient.PatientName) == "ALICE^ANNA"
    (conflict,) = node.index.conflicts()
    assert conflict["kind"] == ConflictKind.PATIENT_DEMOGRAPHICS
    assert conflict["detail"] == "patient_name,patient_birth_date" and "MALLORY" not in str(conflict)


def test_patients_without_an_id_are_never_merged(node: Node, tmp_path: Path) -> None:
    one, two = spec("", "NOID^ONE"), spec("", "NOID^TWO")
    assert send(node.port, synthetic_instance(one, 1), synthetic_instance(two, 1)) == [0x0000, 0x0000]
    patients = findscu(node.port, tmp_path / "p", ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                       "NumberOfPatientRelatedStudies"], model="-P")  # fmt: skip
    assert sorted(str(p.PatientName) for p in patients) == ["NOID^ONE", "NOID^TWO"]
    assert [int(p.NumberOfPatientRelatedStudies) for p in patients] == [1, 1]
    assert node.index.conflicts() == []


def test_an_instance_that_names_another_patient_than_its_study_is_recorded(node: Node, tmp_path: Path) -> None:
    first = spec("P7", "SEVEN^FIRST")
    intruder = SeriesSpec("P8", "EIGHT^OTHER", first.study_uid, "20240115", "101500", "A1", generate_uid(), "CT", 1)
    assert send(node.port, synthetic_instance(first, 1), synthetic_instance(intruder, 1)) == [0x0000, 0x0000]
    (study,) = findscu(node.port, tmp_path / "s", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={first.study_uid}",
                       "PatientID", "PatientName"])  # fmt: skip
    assert (study.PatientID, str(study.PatientName)) == ("P7", "SEVEN^FIRST")
    (conflict,) = node.index.conflicts()
    assert conflict["kind"] == ConflictKind.STUDY_PATIENT and conflict["detail"] == "patient_id,patient_name"


def test_versions_are_found_by_the_index_and_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = synthetic_instance(spec("P1", "V^ONE"), 1)
    with open_store(tmp_path / "node") as store:
        for n in range(5):
            ds.InstanceNumber = n + 1
            status, _ = store_encoded(encoded(ds), ExplicitVRLittleEndian, "", "", store.files, store.index)
            assert status == 0x0000
        # Storing again, and storing an old version again: the index knows both, no old file is read back.
        import storage.files

        def no_reading(path: Path) -> str:
            raise AssertionError(f"{path.name} was read back")

        monkeypatch.setattr(storage.files, "file_sha256", no_reading)
        ds.InstanceNumber = 3
        assert store_encoded(encoded(ds), ExplicitVRLittleEndian, "", "", store.files, store.index) == (
            0x0000,
            "duplicate of version 3, not stored again",
        )
        ds.InstanceNumber = 6
        with pytest.raises(StoreRefused) as refused:
            store_encoded(encoded(ds), ExplicitVRLittleEndian, "", "", store.files, store.index, "", StoreLimits(5))
        assert refused.value.status == OUT_OF_RESOURCES and "5 versions" in refused.value.reason
        assert len(store.index.instances_of_series(ds.SeriesInstanceUID, latest_only=False)) == 5
