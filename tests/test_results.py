"""Result objects (SR, key-image SC, GSPS, SEG, KOS) built from a small synthetic CT series; dciodvfy on each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from builders import ALGORITHM, ORIGIN, SPACING, geometry_of, make_ct_series, make_findings
from handlers.results import SERIES_NUMBERS, build_results
from peers import dciodvfy_errors


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
    assert [ds.Modality for ds in with_findings] == ["SR", "OT", "OT", "PR", "SEG", "KO"]
    assert len({ds.SeriesInstanceUID for ds in with_findings}) == 5
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
    assert len(groups) == 4  # per finding: 3D coordinates (TID 1501) and a planar region (TID 1410)
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
    assert f"condition_key={ALGORITHM.condition_key} " in f"{texts} "  # whole, region included
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
    parameters = str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters)
    assert f"condition_key={ALGORITHM.condition_key}" in parameters


@pytest.mark.parametrize("index", range(6))
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
