"""Radiologist feedback over real parts: a study pushed by DCMTK storescu and analysed with the shipped detector,
an assessment SR (written with highdicom) sent back by storescu, ``harmonode feedback`` on the command line,
corrected SRs in Orthanc, export records in the export folder — and none of them carrying patient identity.

One node and one Orthanc serve the module (the analysis is the expensive part); each test assesses other
findings of the one study, and the privacy test, last, reads every record the others made.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from conftest import make_config
from handlers.results.assessment import FindingVerdict, read_assessment, write_assessment
from models.features import decompress_features
from node.app import Node
from node.cli import app as cli
from node.config import Destination
from peers import dciodvfy_errors, run_tool, running_orthanc, wait_until
from simulator.studies import simulate_study, write_study
from storage.audit import verify_chain
from storage.exports import RECORD_KEYS, record_features

pytestmark = [pytest.mark.peers, pytest.mark.slow]

# distinctive values of the simulated study: none may appear in an export record
PATIENT = {
    "PatientName": "Quinella^Zyxwvut",
    "PatientID": "PIDQ7X9Z3",
    "AccessionNumber": "ACCQ7X9Z3",
    "StudyID": "SQ7X9",
    "PatientBirthDate": "19310102",
    "InstitutionName": "Quinella General",
    "ReferringPhysicianName": "Ferrowick^Oda",
}
DATE = "19870413"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Orthanc, a node with an export folder, and one analysed head CTA study with distinctive identity."""
    root = tmp_path_factory.mktemp("feedback")
    with running_orthanc(root / "orthanc") as pacs:
        exports = root / "exports"
        cfg = make_config(
            root / "node",
            destinations=[Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)],
            learning={"export_dir": str(exports), "reliability_threshold": 0.9},
        )
        study = simulate_study("head-cta", "ge-revolution-standard", seed=5, size="test", lesion_diameters_mm=[9.0])
        for ds in study.datasets:
            for keyword, value in PATIENT.items():
                setattr(ds, keyword, value)
            for element in ds.iterall():
                if element.VR == "DA" and element.value:
                    element.value = DATE
        paths = [p for p in write_study(study, root / "study") if p.suffix == ".dcm"]
        node = Node(cfg)
        node.start()
        try:
            run_tool(["storescu", "-aec", "HARMONODE", "127.0.0.1", str(node.port), *map(str, paths)])
            series_uid = study.truth["series_instance_uid"]
            wait_until(
                lambda: (node.index.series(series_uid) or {}).get("state") == "done", timeout=120, what="analysis"
            )
            config_file = root / "node.toml"
            config_file.write_text(
                f'[node]\ndata_dir = "{root / "node"}"\nport = {cfg.node.port}\n'
                f'[learning]\nexport_dir = "{exports}"\nreliability_threshold = 0.9\n'
                f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nport = {pacs.dicom_port}\n'
            )
            yield {"pacs": pacs, "node": node, "study": study, "exports": exports, "config": config_file, "root": root}
        finally:
            node.stop()


def _status(site) -> dict:
    result = CliRunner().invoke(cli, ["status", "--json", "--config", str(site["config"])])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _findings(site) -> list[dict]:
    return _status(site)["findings"]


def _node_sr(site):  # noqa: ANN202
    node, series_uid = site["node"], site["study"].truth["series_instance_uid"]
    row = node.index.query("SELECT path FROM reports WHERE series_instance_uid=? AND version=1", (series_uid,))[0]
    return dcmread(node.files.abspath(row["path"]))


def _send(site, ds, name: str) -> Path:
    path = site["root"] / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    run_tool(["storescu", "-R", "-aec", "HARMONODE", "127.0.0.1", str(site["node"].port), str(path)])
    return path


def test_status_lists_every_finding_with_the_tracking_uid_its_sr_carries(site):
    report = _status(site)
    findings = report["findings"]
    assert len(findings) >= 3, "the test needs three findings on the simulated study"
    sr_uids = {str(e.value) for e in _node_sr(site).iterall() if e.keyword == "UID"}
    assert {f["finding_id"] for f in findings} <= sr_uids
    series = [s for st in report["studies"] for s in st["series"] if s["findings"]]
    assert {f["finding_id"] for s in series for f in s["findings"]} == {f["finding_id"] for f in findings}
    assert all(0.0 <= f["reliability"] <= 1.0 and f["state"] == "detected" for f in findings)
    stored = site["node"].index.query("SELECT features, feature_codec FROM findings")
    assert all(len(decompress_features(r["features"])) == 384 and r["feature_codec"] for r in stored)


def test_assessment_sr_from_storescu_changes_the_findings_and_yields_records(site):
    node, pacs = site["node"], site["pacs"]
    first, second = _findings(site)[:2]
    old_sr = _node_sr(site)
    centre = tuple(float(v) + 2.0 for v in second["center_mm"])
    assessment = write_assessment(
        old_sr,
        [
            FindingVerdict(first["finding_id"], "reject", first["kind"]),
            FindingVerdict(second["finding_id"], "modify", "aneurysm", centre, 7.5),
        ],
        observer="Reader^Ada",
        frame_of_reference_uid=str(site["study"].datasets[0].FrameOfReferenceUID),
    )
    path = _send(site, assessment, "assessment")
    assert dciodvfy_errors(path) == []
    parsed = read_assessment(dcmread(path))
    assert parsed.assessed_sr_uids == (str(old_sr.SOPInstanceUID),) and parsed.observer == "Reader^Ada"

    def applied() -> list[dict]:
        done = (node.index.series(str(assessment.SeriesInstanceUID)) or {}).get("state") == "done"
        rows = node.index.query(
            "SELECT * FROM feedback WHERE assessment_sop_instance_uid=?", (parsed.sop_instance_uid,)
        )
        return rows if done and len(rows) == 2 else []

    rows = wait_until(applied, timeout=60, what="the assessment applied")
    assert {r["state"] for r in rows} == {"applied"} and {r["source"] for r in rows} == {"aira"}
    assert len({r["corrected_sr_uid"] for r in rows}) == 1, "one corrected SR for one assessment"
    states = {f["finding_id"]: f for f in _findings(site)}
    assert states[first["finding_id"]]["state"] == "rejected"
    assert (
        states[second["finding_id"]]["state"] == "modified"
        and states[second["finding_id"]]["assessed_by"] == "Reader^Ada"
    )
    # the corrected SR: next version in the same series, naming the old one, without the rejected finding
    latest = node.index.query("SELECT * FROM reports WHERE superseded_by='' AND version > 1")[-1]
    corrected = dcmread(node.files.abspath(latest["path"]))
    assert dciodvfy_errors(node.files.abspath(latest["path"])) == []
    assert corrected.SeriesInstanceUID == old_sr.SeriesInstanceUID and corrected.SOPInstanceUID != old_sr.SOPInstanceUID
    predecessors = [
        ref.ReferencedSOPInstanceUID
        for study in corrected.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert str(old_sr.SOPInstanceUID) in predecessors
    uids = {str(e.value) for e in corrected.iterall() if e.keyword == "UID"}
    assert first["finding_id"] not in uids and second["finding_id"] in uids
    points = [np.asarray(i.GraphicData, float) for i in _content(corrected) if i.get("GraphicType") == "ELLIPSOID"]
    assert any(np.allclose(p.reshape(-1, 3).mean(axis=0), centre, atol=0.01) for p in points)
    wait_until(
        lambda: pacs.post(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": str(corrected.SOPInstanceUID)}}
        ),
        timeout=60,
        what="the corrected SR in Orthanc",
    )
    # each verdict made a feedback record in the export folder
    records = wait_until(
        lambda: _records(site, "feedback") if len(_records(site, "feedback")) >= 2 else None,
        timeout=30,
        what="feedback export records",
    )
    changed = sorted(r["changed"]["assessment"] for r in records)
    assert changed[:2] == ["modified", "rejected"] or {"modified", "rejected"} <= set(changed)


def _content(ds):  # noqa: ANN001, ANN202
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content(item)


def _records(site, trigger: str | None = None) -> list[dict]:
    out = []
    for path in sorted(site["exports"].glob("*.json")):
        record = json.loads(path.read_text())
        if trigger is None or record["trigger"] == trigger:
            out.append(record)
    return out


def test_assessment_of_an_unknown_sr_or_finding_is_stored_refused_and_changes_nothing(site, caplog):
    node = site["node"]
    finding = _findings(site)[-1]
    before = (len(_records(site)), node.index.query("SELECT COUNT(*) n FROM reports")[0]["n"])
    stranger = _node_sr(site)
    stranger.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.111222333444555666777888999"
    unknown_sr = write_assessment(
        stranger, [FindingVerdict(finding["finding_id"], "reject", finding["kind"])], "Reader^Bo"
    )
    unknown_finding = write_assessment(
        _node_sr(site), [FindingVerdict("1.2.826.0.1.3680043.8.498.424242", "reject", "aneurysm")], "Reader^Bo"
    )
    with caplog.at_level(logging.WARNING, logger="handlers.feedback"):
        for name, ds in (("unknown-sr", unknown_sr), ("unknown-finding", unknown_finding)):
            _send(site, ds, name)
        for ds in (unknown_sr, unknown_finding):
            wait_until(
                lambda ds=ds: (node.index.series(str(ds.SeriesInstanceUID)) or {}).get("state") == "failed",
                timeout=60,
                what="the assessment refused",
            )
    for ds, says in ((unknown_sr, "never issued"), (unknown_finding, "no finding")):
        assert node.index.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (str(ds.SOPInstanceUID),))  # stored
        series = node.index.series(str(ds.SeriesInstanceUID))
        assert series["error"].startswith("assessment refused") and says in series["error"]
        rows = node.index.query("SELECT * FROM feedback WHERE assessment_sop_instance_uid=?", (str(ds.SOPInstanceUID),))
        assert [r["state"] for r in rows] == ["refused"] and says in rows[0]["reason"]
    assert any("feedback refused" in r.getMessage() and "never issued" in r.getMessage() for r in caplog.records)
    assert not any(
        PATIENT["PatientName"] in r.getMessage() or PATIENT["PatientID"] in r.getMessage() for r in caplog.records
    )
    assert next(f for f in _findings(site) if f["finding_id"] == finding["finding_id"])["state"] == "detected"
    assert (len(_records(site)), node.index.query("SELECT COUNT(*) n FROM reports")[0]["n"]) == before


def _verdicts_by(trail, observer: str) -> int:
    """How many audit messages name ``observer`` as the requesting user."""
    return trail.read_text().count(f'UserID=\\"{observer}\\" UserIsRequestor=\\"true\\"') if trail.exists() else 0


def test_cli_feedback_relabels_a_finding_and_refuses_an_unknown_one(site):
    finding = _findings(site)[2]
    trail = site["root"] / "node" / "audit" / "audit.log"
    audited_before = _verdicts_by(trail, "Reader^Cy")
    config = str(site["config"])
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "feedback",
            finding["finding_id"],
            "--relabel",
            "nodule",
            "--diameter",
            "6",
            "--by",
            "Reader^Cy",
            "--config",
            config,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output.strip().splitlines()[-1])
    assert outcome["state"] == "applied" and outcome["corrected_sr"] and outcome["export_record"]
    after = next(f for f in _findings(site) if f["finding_id"] == finding["finding_id"])
    assert after["state"] == "modified" and after["assessed_kind"] == "nodule" and after["assessed_by"] == "Reader^Cy"
    wait_until(lambda: (site["exports"] / f"{outcome['export_record']}.json").exists(), timeout=30, what="the record")
    record = json.loads((site["exports"] / f"{outcome['export_record']}.json").read_text())
    assert record["changed"] == {"assessment": "modified", "kind": "nodule", "diameter_mm": 6.0}
    # the CLI's verdict is in the running node's audit trail too, and the chain stays whole
    assert verify_chain(trail) > 0 and _verdicts_by(trail, "Reader^Cy") == audited_before + 1
    bad = runner.invoke(cli, ["feedback", "1.2.3.4.5", "--reject", "--by", "Reader^Cy", "--config", config])
    assert bad.exit_code != 0 and "no finding with ID 1.2.3.4.5" in bad.output
    both = runner.invoke(
        cli, ["feedback", finding["finding_id"], "--accept", "--reject", "--by", "X", "--config", config]
    )
    assert both.exit_code != 0 and "exactly one" in both.output


def test_no_export_record_carries_patient_study_uid_date_or_coordinate(site):
    """The privacy test: every record (features decompressed) against every identifier of the source."""
    node, study = site["node"], site["study"]
    records = _records(site)
    assert {r["trigger"] for r in records} == {"low-reliability", "feedback"}, "both triggers must be covered"
    ds = study.datasets[0]
    forbidden = {
        *PATIENT.values(),
        DATE,
        "1987-04-13",
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.FrameOfReferenceUID),
        *(str(d.SOPInstanceUID) for d in study.datasets),
    }
    forbidden |= {r["finding_id"] for r in node.index.query("SELECT finding_id FROM findings")}
    forbidden |= {r["sop_instance_uid"] for r in node.index.query("SELECT sop_instance_uid FROM reports")}
    forbidden |= {"Quinella", "Zyxwvut", "Ferrowick", "Reader"}
    coordinates = [
        float(v) for r in node.index.query("SELECT center_mm FROM findings") for v in json.loads(r["center_mm"])
    ]
    coordinates += [float(v) for d in study.datasets for v in d.ImagePositionPatient]
    uid_like = re.compile(r"\b\d+(\.\d+){4,}\b")
    for record in records:
        assert set(record) == RECORD_KEYS
        features = decompress_features(record_features(record))
        assert len(features) == record["feature_length"] and np.all(np.isfinite(features))
        text = json.dumps(record)
        raw = record_features(record).decode("latin-1") + features.tobytes().decode("latin-1")
        for value in forbidden:
            assert value not in text and value not in raw, value
        assert not uid_like.search(text.replace(record["features"], "")), "a UID-like string in a record"
        numbers = [v for v in _numbers(record) if abs(v) > 1.0]
        assert not any(abs(v - c) < 0.05 for v in numbers for c in coordinates if abs(c) > 1.0), numbers


def _numbers(value) -> list[float]:  # noqa: ANN001
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []
