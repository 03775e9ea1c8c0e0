"""Result objects (SR, key-image SC, GSPS, SEG) built from a small synthetic CT series; dciodvfy on each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from handlers.results import SERIES_NUMBERS, AlgorithmInfo, build_results
from models.findings import Finding, VolumeGeometry
from peers import dciodvfy_errors

SLICES, ROWS, COLS = 16, 64, 64
SPACING = (2.0, 0.8, 0.8)  # (slice, row, column) mm
ORIGIN = (-25.6, -25.6, -40.0)

ALGORITHM = AlgorithmInfo(
    name="harmonode-detector",
    version="0.1.0",
    rule_id="ct-acme-b30-std-v1",
    rule_match="exact",
    condition_key="CT|ACME|B30|std",
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


@pytest.fixture(scope="module")
def ct_series() -> list[Dataset]:
    return make_ct_series()


@pytest.fixture(scope="module")
def with_findings(ct_series: list[Dataset]) -> list[Dataset]:
    geometry = geometry_of(ct_series)
    return build_results(ct_series, geometry, make_findings(geometry), ALGORITHM, analysed=True, write_seg=True)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _by_modality(results: list[Dataset], modality: str) -> list[Dataset]:
    return [ds for ds in results if ds.Modality == modality]


def test_kinds_and_common_identity(with_findings: list[Dataset], ct_series: list[Dataset]) -> None:
    source = ct_series[0]
    assert [ds.Modality for ds in with_findings] == ["SR", "OT", "OT", "PR", "SEG"]
    assert len({ds.SeriesInstanceUID for ds in with_findings}) == 4
    for ds in with_findings:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert str(ds.PatientBirthDate) == str(source.PatientBirthDate) and ds.PatientSex == source.PatientSex
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SeriesNumber in SERIES_NUMBERS.values()
        assert ds.ManufacturerModelName == ALGORITHM.name and ds.SoftwareVersions == ALGORITHM.version
    assert ALGORITHM.rule_id in with_findings[0].SeriesDescription


def test_results_are_deterministic(ct_series: list[Dataset], with_findings: list[Dataset]) -> None:
    geometry = geometry_of(ct_series)
    findings = make_findings(geometry)
    again = build_results(list(reversed(ct_series)), geometry, findings, ALGORITHM, analysed=True, write_seg=True)
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in with_findings]


def _content_items(ds: Dataset) -> list[Dataset]:
    out = []
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(item.get("ContentSequence", []))
    return out


def test_sr_content(with_findings: list[Dataset], ct_series: list[Dataset]) -> None:
    sr = with_findings[0]
    items = _content_items(sr)
    codes_ = [(i.ConceptNameCodeSequence[0].CodeValue, i.ValueType) for i in items if "ConceptNameCodeSequence" in i]
    assert ("126010", "CONTAINER") in codes_  # Imaging Measurements
    groups = [i for i in items if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(groups) == 2
    finding_types = {
        i.ConceptCodeSequence[0].CodeValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121071"
    }
    assert finding_types == {"85659009", "27925004"}
    scoords = [i for i in items if i.ValueType == "SCOORD3D"]
    assert {i.GraphicType for i in scoords} == {"POINT", "ELLIPSOID"}
    assert all(i.ReferencedFrameOfReferenceUID == ct_series[0].FrameOfReferenceUID for i in scoords)
    points = [np.asarray(i.GraphicData, float) for i in scoords if i.GraphicType == "POINT"]
    geometry = geometry_of(ct_series)
    assert np.allclose(geometry.patient_to_index(points[0]), (8, 30, 20), atol=1e-3) or np.allclose(
        geometry.patient_to_index(points[1]), (8, 30, 20), atol=1e-3
    )
    nums = {
        i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
        for i in items
        if i.ValueType == "NUM"
    }
    assert "81827009" in nums and "122157" in nums  # diameter, probability
    texts = " ".join(str(i.get("TextValue", "")) for i in items)
    assert f"rule_id={ALGORITHM.rule_id}" in texts and "rule_match=exact" in texts
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in ct_series}


@pytest.mark.parametrize("analysed", [True, False])
def test_sr_without_findings(ct_series: list[Dataset], analysed: bool, tmp_path: Path) -> None:
    reason = "" if analysed else "mixed orientations: 2 distinct ImageOrientationPatient values"
    geometry = geometry_of(ct_series) if analysed else None  # a series refused before its volume was built
    results = build_results(ct_series, geometry, [], ALGORITHM, analysed=analysed, reason=reason)
    assert [ds.Modality for ds in results] == (["SR", "OT"] if analysed else ["SR"])
    items = _content_items(results[0])
    summary = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "111017"
    ]
    assert summary == (["111241"] if analysed else ["111245"])
    if reason:
        assert reason in [i.get("TextValue") for i in items]
    for n, ds in enumerate(results):
        assert dciodvfy_errors(_save(ds, tmp_path / f"{n}.dcm")) == []


def test_key_images(with_findings: list[Dataset], ct_series: list[Dataset]) -> None:
    key_images = _by_modality(with_findings, "OT")
    assert len(key_images) == 2
    first = key_images[0]
    assert first.PhotometricInterpretation == "RGB" and first.BurnedInAnnotation == "YES"
    rgb = first.pixel_array
    assert rgb.shape[0] >= 512 and rgb.shape[2] == 3
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 100)
    assert red.sum() > 100  # the circle (and the red NOT FOR DIAGNOSIS label) are burned in
    source_uid = first.SourceImageSequence[0].ReferencedSOPInstanceUID
    by_uid = {ds.SOPInstanceUID: ds for ds in ct_series}
    assert float(by_uid[source_uid].ImagePositionPatient[2]) == pytest.approx(ORIGIN[2] + 8 * SPACING[0])
    assert "NOT FOR DIAGNOSIS" in first.ImageComments


def test_gsps_annotations(with_findings: list[Dataset], ct_series: list[Dataset]) -> None:
    (gsps,) = _by_modality(with_findings, "PR")
    annotations = gsps.GraphicAnnotationSequence
    assert len(annotations) == 2
    by_uid = {ds.SOPInstanceUID: ds for ds in ct_series}
    centres = []
    for ann in annotations:
        ref = by_uid[ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID]
        circle = ann.GraphicObjectSequence[0]
        assert circle.GraphicType == "CIRCLE" and circle.GraphicAnnotationUnits == "PIXEL"
        k = round((float(ref.ImagePositionPatient[2]) - ORIGIN[2]) / SPACING[0])
        centres.append((k, *circle.GraphicData[:2]))
        assert "p=" in ann.TextObjectSequence[0].UnformattedTextValue
    assert (8, 20.5, 30.5) in centres


def test_seg_spheres(with_findings: list[Dataset]) -> None:
    (seg,) = _by_modality(with_findings, "SEG")
    assert len(seg.SegmentSequence) == 2
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85659009"
    assert seg.NumberOfFrames >= 3


@pytest.mark.parametrize("index", range(5))
def test_dciodvfy_zero_errors(with_findings: list[Dataset], index: int, tmp_path: Path) -> None:
    ds = with_findings[index]
    path = _save(ds, tmp_path / f"{ds.Modality}.dcm")
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert dciodvfy_errors(path) == []


def test_source_series_is_valid(ct_series: list[Dataset], tmp_path: Path) -> None:
    assert dciodvfy_errors(_save(ct_series[0], tmp_path / "ct.dcm")) == []


def test_refuses_mixed_series(ct_series: list[Dataset]) -> None:
    other = make_ct_series(seed=1, slices=2)
    with pytest.raises(ValueError, match="exactly one series"):
        build_results([*ct_series, *other], geometry_of(ct_series), [], ALGORITHM, analysed=True)
    with pytest.raises(ValueError, match="at least one"):
        build_results([], None, [], ALGORITHM, analysed=False)
