"""Builders the test files share: synthetic instances and series, populated nodes, DCMTK helpers."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from conftest import make_config
from handlers.results import AlgorithmInfo
from models.findings import Finding, VolumeGeometry
from node.app import Node
from node.config import Config
from peers import run_tool

SLICES, ROWS, COLS = 16, 64, 64
SPACING = (2.0, 0.8, 0.8)  # (slice, row, column) mm
ORIGIN = (-25.6, -25.6, -40.0)


ALGORITHM = AlgorithmInfo(
    name="harmonode-detector",
    version="0.1.0",
    rule_id="ct-acme-b30-std-v1",
    rule_match="exact",
    condition_key="CT|siemens|somatom-force|br40d|ctdi15-30|100kv|head",  # 65 characters with its name
    parameters={"threshold": "0.5"},
)


def make_ct_series(seed: int = 0, slices: int = SLICES) -> list[Dataset]:
    """A small CT series (axial, int16, full image plane module) with a bright blob, slices shuffled."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Test^Patient"
        ds.PatientID = f"TEST{seed:04d}"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC1"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.SeriesDescription = "CTA head"
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "ACME"
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = "120"
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SPACING[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = SPACING[0]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 300
        ds.WindowWidth = 800
        pixels = rng.normal(1024 + 40, 10, (ROWS, COLS))
        yy, xx = np.mgrid[:ROWS, :COLS]
        pixels[(yy - 30) ** 2 + (xx - 20) ** 2 < 16 - (k - 8) ** 2] = 1024 + 400
        ds.PixelData = pixels.astype(np.int16).tobytes()
        datasets.append(ds)
    rng.shuffle(datasets)
    return datasets


def geometry_of(datasets: list[Dataset]) -> VolumeGeometry:
    """The volume geometry of ``make_ct_series``."""
    return VolumeGeometry(
        origin=ORIGIN,
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        spacing=SPACING,
        shape=(len(datasets), ROWS, COLS),
        frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
    )


def make_findings(geometry: VolumeGeometry) -> list[Finding]:
    """Two findings: an aneurysm at voxel (8, 30, 20) and a nodule at (3, 50, 45)."""
    out = []
    for kind, kji, diameter, p in (("aneurysm", (8, 30, 20), 5.0, 0.91), ("nodule", (3, 50, 45), 3.2, 0.62)):
        out.append(
            Finding(
                kind=kind,
                center_mm=tuple(float(v) for v in geometry.index_to_patient(kji)),
                diameter_mm=diameter,
                probability=p,
                center_index=tuple(float(v) for v in kji),
                tracking_id=f"{kind}-1",
                tracking_uid=generate_uid(),
            )
        )
    return out


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


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta (the file meta of a copy may differ)."""
    raw = Path(path).read_bytes()
    ds = dcmread(BytesIO(raw), stop_before_pixels=True)
    return raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]


def post_instance(url: str, data: bytes) -> dict:
    """Upload one DICOM file to Orthanc (REST ``POST /instances`` with the raw file bytes)."""
    req = urllib.request.Request(url + "/instances", data=data, method="POST")
    req.add_header("Content-Type", "application/dicom")
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def encoded(ds) -> bytes:  # noqa: ANN001
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed key and certificate for 127.0.0.1 (OpenSSL), for TLS tests."""
    key, crt = directory / "node.key", directory / "node.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, crt


def write_noise_series(out: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` CT slices of one new series (pydicom's CT_small with ``size``² noise pixels), written to ``out``."""
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds[0xFFFCFFFC]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = generate_uid()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.Rows = ds.Columns = size
        ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def shipped_dicom_files() -> list[Path]:
    """Every file pydicom's test files and the ``pydicom-data`` package ship offline (DICOM or not), sorted."""
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())
