"""What viewers and PACS read in the results (IHE AI Results): planar regions in the SR, the KOS, the
GSPS's colours, one tracking UID per finding across objects, the source study's attributes on every object.

Read back with highdicom's own readers and checked with dicom3tools (dciodvfy, dcentvfy) and DCMTK's
dcmpschk: real validators nobody here wrote.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from builders import ALGORITHM, geometry_of, make_ct_series, make_findings
from handlers.results import build_results
from models.findings import Finding
from peers import dcentvfy_report, dciodvfy_errors, run_tool

STUDY = {
    "StudyDescription": "CTA HEAD^Circle of Willis",
    "ReferringPhysicianName": "Referrer^Rita",
    "AccessionNumber": "ACC-2024-0042",
    "StudyID": "S42",
    "PatientAge": "064Y",
}


@pytest.fixture(scope="module")
def source() -> list[Dataset]:
    """The test CT series with the study attributes a hospital's study carries."""
    series = make_ct_series(seed=3)
    for ds in series:
        for keyword, value in STUDY.items():
            setattr(ds, keyword, value)
    return series


@pytest.fixture(scope="module")
def findings(source: list[Dataset]) -> list[Finding]:
    return make_findings(geometry_of(source))


@pytest.fixture(scope="module")
def results(source: list[Dataset], findings: list[Finding]) -> list[Dataset]:
    return build_results(source, geometry_of(source), findings, ALGORITHM, analysed=True)


def _one(results: list[Dataset], modality: str) -> Dataset:
    (ds,) = [ds for ds in results if ds.Modality == modality]
    return ds


def _slice_through(source: list[Dataset], k: int) -> Dataset:
    """The source slice at volume index ``k`` (the series is shuffled; z grows with k)."""
    return sorted(source, key=lambda ds: float(ds.ImagePositionPatient[2]))[k]


def test_highdicom_reads_one_planar_region_per_finding(
    results: list[Dataset], source: list[Dataset], findings: list[Finding]
) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(results[0])
    planar = sr.content.get_planar_roi_measurement_groups()
    volumetric_3d = sr.content.get_image_measurement_groups()  # the TID 1501 groups with SCOORD3D
    assert len(planar) == len(findings) == len(volumetric_3d)
    by_uid = {str(g.tracking_uid): g for g in planar}
    assert set(by_uid) == {f.tracking_uid for f in findings} == {str(g.tracking_uid) for g in volumetric_3d}
    aneurysm = by_uid[findings[0].tracking_uid]
    assert aneurysm.finding_type.value == "85659009"
    region = aneurysm.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
    centre, edge = np.asarray(region.value, float)
    assert tuple(centre) == (20.5, 30.5)  # voxel (k 8, row 30, column 20): the centre of its pixel
    assert edge[0] - centre[0] == pytest.approx(5.0 / 2 / 0.8)  # the lesion's radius in pixels
    referenced = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert referenced == _slice_through(source, 8).SOPInstanceUID
    values = {m.name.meaning: (m.value, m.unit.value) for m in aneurysm.get_measurements()}
    assert values == {"Diameter": (5.0, "mm"), "Probability": (pytest.approx(0.91), "{probability}")}
    algorithm = [i for i in aneurysm[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
    assert algorithm and algorithm[0].TextValue == ALGORITHM.name  # TID 4019 in the group


def test_sr_image_library_and_evidence(results: list[Dataset], source: list[Dataset]) -> None:
    sr = results[0]
    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert library, "no Image Library (TID 1600)"
    entries = {
        entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in library[0].ContentSequence
        for entry in group.ContentSequence
        if entry.ValueType == "IMAGE"
    }
    assert entries == {_slice_through(source, 8).SOPInstanceUID, _slice_through(source, 3).SOPInstanceUID}
    evidence = {
        r.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in source}


def test_kos_flags_the_key_slices_and_references_the_results(results: list[Dataset], source: list[Dataset]) -> None:
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(_one(results, "KO"))
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest (CID 7010)
    assert kos.StudyInstanceUID == source[0].StudyInstanceUID
    key_slices = {_slice_through(source, 8).SOPInstanceUID, _slice_through(source, 3).SOPInstanceUID}
    others = {ds.SOPInstanceUID for ds in results if ds.Modality != "KO"}
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    assert referenced == key_slices | others  # the SR, the key images, the GSPS and the SEG
    study, series_uid, sop = kos.resolve_reference(_one(results, "SEG").SOPInstanceUID)
    assert (study, series_uid) == (source[0].StudyInstanceUID, _one(results, "SEG").SeriesInstanceUID)
    description = [i.TextValue for i in kos.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert description and "aneurysm-1 (p=0.91)" in description[0] and "NOT FOR DIAGNOSIS" in description[0]


def test_no_kos_without_findings(source: list[Dataset]) -> None:
    results = build_results(source, geometry_of(source), [], ALGORITHM, analysed=True)
    assert [ds.Modality for ds in results] == ["SR", "OT"]


def test_seg_segments_are_tracked_like_the_sr(results: list[Dataset]) -> None:
    seg = _one(results, "SEG")
    sr_uids = {
        str(g.tracking_uid)
        for g in hd.sr.Comprehensive3DSR.from_dataset(results[0]).content.get_planar_roi_measurement_groups()
    }
    segments = seg.SegmentSequence
    assert len(segments) == 2
    assert {s.TrackingUID for s in segments} == sr_uids
    assert [s.TrackingID for s in segments] == ["aneurysm-1", "nodule-1"]


def test_gsps_layer_colour_line_style_and_labels_on_the_image(results: list[Dataset], tmp_path: Path) -> None:
    gsps = _one(results, "PR")
    (layer,) = gsps.GraphicLayerSequence
    assert hd.color.CIELabColor.from_dicom_value(tuple(layer.GraphicLayerRecommendedDisplayCIELabValue)).to_rgb() == (
        255,
        255,
        0,
    )
    assert layer.GraphicLayerRecommendedDisplayGrayscaleValue == 0xFFFF
    for annotation in gsps.GraphicAnnotationSequence:
        circle = annotation.GraphicObjectSequence[0]
        assert circle.LineStyleSequence[0].ShadowStyle == "OUTLINED"
        text = annotation.TextObjectSequence[0]
        left, top = text.BoundingBoxTopLeftHandCorner
        right, bottom = text.BoundingBoxBottomRightHandCorner
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 64 * 0.2  # along the top edge
        assert text.AnchorPointVisibility == "Y"
        assert float(text.AnchorPoint[0]) == pytest.approx(float(circle.GraphicData[0]))  # tied to its circle
    path = tmp_path / "pr.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    check = run_tool(["dcmpschk", str(path)], check=False)
    assert check.returncode == 0 and "Test passed" in check.stdout + check.stderr


def test_every_result_carries_the_study_of_its_source(results: list[Dataset], source: list[Dataset]) -> None:
    for ds in results:
        for keyword, value in STUDY.items():
            assert str(ds.get(keyword)) == value, (ds.Modality, keyword)
        assert (ds.StudyDate, ds.StudyTime) == (source[0].StudyDate, source[0].StudyTime)


def test_dcentvfy_over_source_and_results(results: list[Dataset], source: list[Dataset], tmp_path: Path) -> None:
    paths = []
    for n, ds in enumerate([*source, *results]):
        paths.append(tmp_path / f"{n:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    errors, warnings = dcentvfy_report(paths)
    assert errors == []
    assert not [w for w in warnings if "present in one instance but not the other" in w], warnings
    # and it would see a result that strays from its study
    stray = results[1].copy()
    stray.StudyDescription = "another description"
    stray.save_as(paths[len(source) + 1], enforce_file_format=True)
    errors, _ = dcentvfy_report(paths)
    assert any("StudyDescription" in e for e in errors), errors
