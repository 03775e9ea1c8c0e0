"""``harmonode rules fit --from-pacs QUERY``: pull matching studies from a real Orthanc, then fit on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders import encoded, post_instance
from handlers.pull import parse_pacs_query
from node.app import Node
from node.cli import app
from node.config import load_config
from peers import free_port, running_orthanc
from storage.index import Index

simulate = pytest.importorskip("simulator.studies")

CONDITIONS = ("ge-revolution-standard", "ge-optima-bone-lowdose")
IN_RANGE, OUT_OF_RANGE = "20260315", "20250101"
runner = CliRunner()


def _config(tmp_path: Path, node_port: int, pacs_port: int) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nae_title = "HARMONODE"\nhost = "127.0.0.1"\nport = {node_port}\ndata_dir = "{tmp_path / "var"}"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    )
    return cfg


def _load(orthanc_url: str) -> dict[str, str]:
    """Two small studies per condition dated in 2026, one more dated 2025; study UID → condition."""
    studies: dict[str, str] = {}
    plan = [(name, 10 * i + j, IN_RANGE) for i, name in enumerate(CONDITIONS) for j in range(2)]
    plan.append((CONDITIONS[0], 99, OUT_OF_RANGE))
    for name, seed, day in plan:
        study = simulate.simulate_study("head-cta", name, seed, "test", slices=12, matrix=48)
        for ds in study.datasets:
            ds.StudyDate = day
            post_instance(orthanc_url, encoded(ds))
        studies[str(study.datasets[0].StudyInstanceUID)] = f"{name}@{day}"
    return studies


def _stored_studies(cfg: Path) -> set[str]:
    index = Index(cfg.parent / "var" / "index.sqlite")
    try:
        return {r["study_instance_uid"] for r in index.query("SELECT DISTINCT study_instance_uid FROM series")}
    finally:
        index.close()


@pytest.mark.peers
def test_fit_from_pacs_pulls_matching_studies_then_fits(tmp_path: Path) -> None:
    node_port = free_port()
    modalities = {"harmonode": ["HARMONODE", "127.0.0.1", node_port]}
    with running_orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        studies = _load(orthanc.url)
        cfg = _config(tmp_path, node_port, orthanc.dicom_port)

        # the node is not running: the command listens for the move itself, only while it pulls
        query = f"StudyDate={IN_RANGE[:4]}0101-{IN_RANGE[:4]}1231"
        args = ["rules", "fit", "--from-pacs", query, "--from", "pacs", "--config", str(cfg), "--json"]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert len(rows) == 2 and sum(r["reference"] for r in rows) == 1
        assert all(r["n_images"] == 2 * 12 and r["n_series"] == 2 for r in rows)
        fitted = next(r for r in rows if not r["reference"])
        assert fitted["similarity_after"] > fitted["similarity_before"]
        in_range = {uid for uid, what in studies.items() if what.endswith(IN_RANGE)}
        assert _stored_studies(cfg) == in_range  # the 2025 study stayed on the PACS

        listed = json.loads(runner.invoke(app, ["rules", "list", "--config", str(cfg), "--json"]).stdout)
        assert len(listed) == 2
        source = f"pacs:pacs:{query}"
        shown = runner.invoke(
            app, ["rules", "show", listed[0]["id"], "--config", str(cfg), "--plot", str(tmp_path / "r.png")]
        )
        assert source in shown.output

        # a running node receives the move itself; only the studies of the query are fitted on
        node = Node(load_config(cfg))
        node.start(("listen",))
        try:
            old = next(uid for uid, what in studies.items() if what.endswith(OUT_OF_RANGE))
            args = ["rules", "fit", "--from-pacs", f"StudyInstanceUID={old}", "--config", str(cfg), "--dry-run"]
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 2 and "only one condition" not in result.output
            assert "need images under at least two imaging conditions" in result.output
            assert "pulled 1 stud(ies), 12 instance(s) from pacs" in result.output
            assert old in _stored_studies(cfg)
        finally:
            node.stop()

        result = runner.invoke(app, ["rules", "fit", "--from-pacs", "PatientID=NOBODY", "--config", str(cfg)])
        assert result.exit_code == 2 and "no study on pacs matches 'PatientID=NOBODY'" in result.output
        assert len(json.loads(runner.invoke(app, ["rules", "list", "--config", str(cfg), "--json"]).stdout)) == 2


def test_fit_from_pacs_errors(tmp_path: Path) -> None:
    cfg = _config(tmp_path, free_port(), free_port())
    cases = [
        (["--from-pacs", "Modality=CT"], "not one of StudyDate, PatientID, StudyInstanceUID"),
        (["--from-pacs", "StudyDate=2026"], "YYYYMMDD"),
        (["--from-pacs", "PatientID=A", "--from", "nope"], "no destination named 'nope'"),
        (["--from-pacs", "PatientID=A"], "refused the association"),  # nobody listens on the PACS port
        (["--from-pacs", "PatientID=A", "--from-dir", str(tmp_path)], "not both"),
        (["--from", "pacs"], "--from names the PACS for --from-pacs"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["rules", "fit", *extra, "--config", str(cfg)])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)


def test_parse_pacs_query() -> None:
    assert parse_pacs_query("StudyDate=20260101-20261231,PatientID=P1&StudyInstanceUID=1.2.3") == {
        "date_range": "20260101-20261231",
        "patient_id": "P1",
        "study_uid": "1.2.3",
    }
    assert parse_pacs_query(" StudyDate=20260101-  PatientID=P1 ") == {"date_range": "20260101-", "patient_id": "P1"}
    for bad, message in [
        ("", "empty"),
        ("PatientID", "KEY=VALUE"),
        ("PatientID=", "KEY=VALUE"),
        ("PatientID=a PatientID=b", "twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_pacs_query(bad)
