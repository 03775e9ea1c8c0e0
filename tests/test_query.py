"""C-FIND against the node with DCMTK findscu (and pynetdicom for status checks): every level and matching kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from conftest import make_config
from handlers.query import handle_find
from node.app import Node
from node.config import Config
from peers import run_tool


@dataclass(frozen=True)
class SeriesSpec:
    """One synthetic series of the test population."""

    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    series_uid: str
    modality: str
    count: int


def synthetic_instance(spec: SeriesSpec, number: int) -> Dataset:
    """A small CT or MR image (8×8) of ``spec``; MR is written Implicit VR, CT Explicit VR Little Endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if spec.modality == "MR" else ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage if spec.modality == "MR" else CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = spec.patient_name, spec.patient_id, "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = spec.study_uid, spec.study_date, spec.study_time
    ds.AccessionNumber, ds.StudyID, ds.StudyDescription = spec.accession, "1", "QR test"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = spec.series_uid, spec.modality, 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = bytes(range(128))
    return ds


def population() -> list[SeriesSpec]:
    """Three patients, three studies, four series, eight instances."""
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    return [
        SeriesSpec("P1", "DOE^JOHN", a, "20240115", "101500", "ACC1", generate_uid(), "CT", 3),
        SeriesSpec("P1", "DOE^JOHN", a, "20240115", "101500", "ACC1", generate_uid(), "MR", 2),
        SeriesSpec("P2", "doe^jane", b, "20240301", "143000", "ACC2", generate_uid(), "CT", 2),
        SeriesSpec("P3", "SMITH^ANNA", c, "20231220", "080000", "ACC3", generate_uid(), "CT", 1),
    ]


def store_population(port: int, specs: list[SeriesSpec]) -> list[Dataset]:
    """C-STORE every instance of ``specs`` to the node; return the datasets sent."""
    ae = AE(ae_title="TESTSCU")
    for ctx in ((CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ImplicitVRLittleEndian)):
        ae.add_requested_context(ctx[0], [ctx[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    sent = []
    for spec in specs:
        for i in range(spec.count):
            ds = synthetic_instance(spec, i + 1)
            assert assoc.send_c_store(ds).Status == 0x0000
            sent.append(ds)
    assoc.release()
    return sent


@dataclass
class Populated:
    """A listening node with the synthetic population stored."""

    node: Node
    config: Config
    specs: list[SeriesSpec]
    sent: list[Dataset]


def populated_node(workdir: Path, **sections) -> Iterator[Populated]:  # noqa: ANN003
    """Start a listen-only node under ``workdir``, store the population, yield it, stop it."""
    config = make_config(workdir, **sections)
    node = Node(config)
    node.start(("listen",))
    specs = population()
    sent = store_population(node.port, specs)
    try:
        yield Populated(node, config, specs, sent)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Populated]:
    yield from populated_node(tmp_path_factory.mktemp("qr") / "node")


def findscu(port: int, out: Path, keys: list[str], model: str = "-S") -> list[Dataset]:
    """Run DCMTK findscu with ``keys``; return the response identifiers it extracted."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-aec", "HARMONODE", model, "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    run_tool([*args, "127.0.0.1", str(port)], timeout=30)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def study_uids(rsps: list[Dataset]) -> set[str]:
    return {str(r.StudyInstanceUID) for r in rsps}


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
