"""The whole loop against a real PACS: DCMTK storescu → node → SR, key images and GSPS in Orthanc.

Also: a series that cannot be analysed still reaches the PACS as an SR that says why.
"""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
from pydicom import dcmread

from conftest import make_config
from node.app import Node
from node.config import Destination
from peers import dciodvfy_errors, run_tool, running_orthanc, wait_until
from simulator.studies import simulate_study, write_study

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def orthanc_series(pacs, study_uid: str) -> dict[str, list[str]]:
    """Modality → instance IDs of the study in Orthanc."""
    out: dict[str, list[str]] = {}
    for sid in pacs.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}):
        for series in pacs.get(f"/studies/{sid}/series"):
            out.setdefault(series["MainDicomTags"].get("Modality", "?"), []).extend(series["Instances"])
    return out


def content_items(ds):  # noqa: ANN001, ANN201
    """Every SR content item under ``ds``, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


@pytest.fixture
def pacs_and_node(tmp_path):
    with running_orthanc(tmp_path / "orthanc") as pacs:
        cfg = make_config(tmp_path / "node", destinations=[Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)])
        node = Node(cfg)
        node.start()
        try:
            yield pacs, node
        finally:
            node.stop()


def test_study_pushed_by_storescu_gets_sr_key_images_and_gsps_in_orthanc(pacs_and_node, tmp_path):
    pacs, node = pacs_and_node
    study = simulate_study("head-cta", "ge-revolution-standard", seed=5, size="test", lesion_diameters_mm=[9.0])
    paths = [p for p in write_study(study, tmp_path / "study") if p.suffix == ".dcm"]
    run_tool(["storescu", "-aec", "HARMONODE", "127.0.0.1", str(node.port), *map(str, paths)])
    uid = study.truth["study_instance_uid"]

    def results_arrived() -> dict[str, list[str]] | None:
        series = orthanc_series(pacs, uid)
        return series if {"SR", "PR"} <= set(series) and ({"OT", "SC"} & set(series)) else None

    got = wait_until(results_arrived, timeout=180, interval=0.5, what="SR, key images and GSPS in Orthanc")
    assert "CT" not in got  # the node sends its results, not the originals back
    sr = pacs.get(f"/instances/{got['SR'][0]}/simplified-tags")
    assert sr["StudyInstanceUID"] == uid and sr["PatientID"] == study.datasets[0].PatientID
    row = node.index.series(study.truth["series_instance_uid"])
    assert row["state"] == "done" and row["rule_match"] and row["model_version"]
    findings = json.loads(row["findings"])
    lesion = np.asarray(study.truth["lesions"][0]["center_mm"])
    ds0 = study.datasets[0]
    voxel = float(np.linalg.norm([*map(float, ds0.PixelSpacing), float(ds0.SliceThickness)]))
    assert findings, "the detector found nothing"
    assert min(np.linalg.norm(np.asarray(f["center_mm"]) - lesion) for f in findings) <= voxel
    # the SR as Orthanc holds it: its 3D points (SCOORD3D POINT, frame of reference of the series) hit the lesion
    with urllib.request.urlopen(f"{pacs.url}/instances/{got['SR'][0]}/file", timeout=10) as r:  # noqa: S310
        sr_ds = dcmread(io.BytesIO(r.read()))
    scoords = [item for item in content_items(sr_ds) if item.get("ValueType") == "SCOORD3D"]
    points = [np.asarray(item.GraphicData, float) for item in scoords if item.GraphicType == "POINT"]
    assert points and {item.ReferencedFrameOfReferenceUID for item in scoords} == {ds0.FrameOfReferenceUID}
    assert min(np.linalg.norm(p - lesion) for p in points) <= voxel
    # every object the node made for this study passes dciodvfy
    for r in node.index.query(
        "SELECT path FROM instances i JOIN series s USING (series_instance_uid) WHERE s.origin = 'result'"
    ):
        assert dciodvfy_errors(node.files.abspath(r["path"])) == [], r["path"]


def test_series_that_cannot_be_analysed_gets_an_sr_saying_why(pacs_and_node, tmp_path):
    pacs, node = pacs_and_node
    study = simulate_study("head-cta", "ge-revolution-standard", seed=6, size="test")
    paths = [p for p in write_study(study, tmp_path / "study") if p.suffix == ".dcm"][:3]  # 3 slices only
    run_tool(["storescu", "-aec", "HARMONODE", "127.0.0.1", str(node.port), *map(str, paths)])
    uid = study.truth["study_instance_uid"]
    got = wait_until(lambda: orthanc_series(pacs, uid).get("SR"), timeout=120, interval=0.5, what="the SR")
    row = node.index.series(study.truth["series_instance_uid"])
    assert "not analysed" in row["error"] and "slice" in row["error"]
    sr_path = node.index.query("SELECT path FROM instances WHERE sop_class_uid = '1.2.840.10008.5.1.4.1.1.88.34'")[0][
        "path"
    ]
    texts = [str(e.value) for e in dcmread(node.files.abspath(sr_path)).iterall() if e.keyword == "TextValue"]
    assert any("at least" in t for t in texts), texts  # the reason is in the report
    assert len(got) == 1
