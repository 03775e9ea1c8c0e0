"""C-FIND against the node with DCMTK findscu (and pynetdicom for status checks): every level and matching kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from builders import Populated, findscu, populated_node, study_uids
from handlers.query import handle_find


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Populated]:
    yield from populated_node(tmp_path_factory.mktemp("qr") / "node")


@pytest.mark.peers
def test_study_level_wildcard_on_patient_name_is_case_insensitive(qr: Populated, tmp_path: Path) -> None:
    a, b = qr.specs[0].study_uid, qr.specs[2].study_uid
    rsps = findscu(
        qr.node.port,
        tmp_path,
        [
            "QueryRetrieveLevel=STUDY",
            "PatientName=DOE*",
            "StudyInstanceUID",
            "PatientID",
            "StudyDate",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "AccessionNumber",
        ],
    )
    assert study_uids(rsps) == {a, b}
    by_uid = {str(r.StudyInstanceUID): r for r in rsps}
    assert by_uid[a].PatientID == "P1"
    assert list(by_uid[a].ModalitiesInStudy) == ["CT", "MR"]
    assert int(by_uid[a].NumberOfStudyRelatedSeries) == 2
    assert int(by_uid[a].NumberOfStudyRelatedInstances) == 5
    assert by_uid[b].AccessionNumber == "ACC2"
    assert "PatientSex" not in by_uid[a]  # only the keys asked for come back
    assert study_uids(findscu(qr.node.port, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientName=?OE^JANE"])) == {b}


@pytest.mark.peers
@pytest.mark.parametrize(
    ("date", "expected"),
    [("20240101-20240228", [0]), ("20240101-", [0, 2]), ("-20231231", [3]), ("20240301", [2]), ("", [0, 2, 3])],
)
def test_study_date_range_and_single_value(qr: Populated, tmp_path: Path, date: str, expected: list[int]) -> None:
    rsps = findscu(qr.node.port, tmp_path, ["QueryRetrieveLevel=STUDY", f"StudyDate={date}", "StudyInstanceUID"])
    assert study_uids(rsps) == {qr.specs[i].study_uid for i in expected}


@pytest.mark.peers
def test_study_time_range(qr: Populated, tmp_path: Path) -> None:
    rsps = findscu(qr.node.port, tmp_path, ["QueryRetrieveLevel=STUDY", "StudyTime=1000-1015", "StudyInstanceUID"])
    assert study_uids(rsps) == {qr.specs[0].study_uid}


@pytest.mark.peers
def test_list_of_uids(qr: Populated, tmp_path: Path) -> None:
    wanted = {qr.specs[0].study_uid, qr.specs[3].study_uid}
    rsps = findscu(
        qr.node.port, tmp_path, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(sorted(wanted))]
    )
    assert study_uids(rsps) == wanted


@pytest.mark.peers
def test_patient_level_in_patient_root(qr: Populated, tmp_path: Path) -> None:
    rsps = findscu(
        qr.node.port,
        tmp_path,
        ["QueryRetrieveLevel=PATIENT", "PatientID=P1", "PatientName", "NumberOfPatientRelatedStudies"],
        model="-P",
    )
    assert len(rsps) == 1
    assert str(rsps[0].PatientName) == "DOE^JOHN"
    assert int(rsps[0].NumberOfPatientRelatedStudies) == 1


@pytest.mark.peers
def test_series_level_single_value_and_case_sensitive_cs(qr: Populated, tmp_path: Path) -> None:
    study = qr.specs[0].study_uid
    keys = [
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ]
    rsps = findscu(qr.node.port, tmp_path, [*keys, "Modality=MR"])
    assert [str(r.SeriesInstanceUID) for r in rsps] == [qr.specs[1].series_uid]
    assert int(rsps[0].NumberOfSeriesRelatedInstances) == 2
    assert findscu(qr.node.port, tmp_path, [*keys, "Modality=mr"]) == []
    assert len(findscu(qr.node.port, tmp_path, [*keys, "Modality"])) == 2


@pytest.mark.peers
def test_image_level(qr: Populated, tmp_path: Path) -> None:
    spec = qr.specs[0]
    keys = [
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={spec.study_uid}",
        f"SeriesInstanceUID={spec.series_uid}",
        "SOPInstanceUID",
        "SOPClassUID",
    ]
    rsps = findscu(qr.node.port, tmp_path, [*keys, "InstanceNumber"])
    sent = {str(d.SOPInstanceUID) for d in qr.sent if d.SeriesInstanceUID == spec.series_uid}
    assert {str(r.SOPInstanceUID) for r in rsps} == sent
    assert {str(r.SOPClassUID) for r in rsps} == {CTImageStorage}
    rsps = findscu(qr.node.port, tmp_path, [*keys, "InstanceNumber=2"])
    assert [int(r.InstanceNumber) for r in rsps] == [2]


def _find(port: int, identifier: Dataset, model=StudyRootQueryRetrieveInformationModelFind) -> list[tuple[int, object]]:  # noqa: ANN001
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    out = [(int(st.Status), ident) for st, ident in assoc.send_c_find(identifier, model) if st]
    assoc.release()
    return out


@pytest.mark.parametrize(
    ("level", "extra", "model"),
    [
        ("", {}, StudyRootQueryRetrieveInformationModelFind),
        ("FRAME", {}, StudyRootQueryRetrieveInformationModelFind),
        ("PATIENT", {}, StudyRootQueryRetrieveInformationModelFind),
        ("STUDY", {"StudyDate": "2024-01-01"}, StudyRootQueryRetrieveInformationModelFind),
        ("SERIES", {"SeriesDate": "yesterday"}, PatientRootQueryRetrieveInformationModelFind),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_identifier_gets_a_failure_status(qr: Populated, level: str, extra: dict, model) -> None:  # noqa: ANN001
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = ""
    for k, v in extra.items():
        setattr(ds, k, v)
    statuses = [s for s, _ in _find(qr.node.port, ds, model)]
    assert statuses == [0xA900]
    ok = Dataset()
    ok.QueryRetrieveLevel, ok.StudyInstanceUID = "STUDY", ""
    assert [s for s, _ in _find(qr.node.port, ok)] == [0xFF00] * 3 + [0x0000]  # still serving


def test_values_are_sql_parameters(qr: Populated) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "P1' OR '1'='1"
    ds.StudyInstanceUID = ""
    assert [s for s, _ in _find(qr.node.port, ds)] == [0x0000]


class FakeFindEvent:
    """The parts of a pynetdicom C-FIND event the handler reads; cancelled after ``cancel_after`` reads."""

    def __init__(self, identifier: Dataset, cancel_after: int) -> None:
        self.identifier = identifier
        self.request = SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="TESTSCU"))
        self._reads = 0
        self._cancel_after = cancel_after

    @property
    def is_cancelled(self) -> bool:
        self._reads += 1
        return self._reads > self._cancel_after


def test_cancel_stops_the_responses(qr: Populated) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.SOPInstanceUID = "IMAGE", ""
    statuses = [s for s, _ in handle_find(FakeFindEvent(ds, cancel_after=2), qr.node.index)]
    assert statuses == [0xFF00, 0xFF00, 0xFE00]
