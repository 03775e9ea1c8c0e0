"""The command line: help, clear errors, status --json for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from peers import wait_until

ROOT = Path(__file__).parent.parent


def harmonode(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=120
    )


def test_help_lists_the_commands():
    out = harmonode("--help").stdout
    for cmd in ("serve", "listen", "work", "dispatch", "status", "resend", "demo", "simulate"):
        assert cmd in out


def test_bad_config_is_a_clear_cli_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'x'\n")
    r = harmonode("serve", "--config", str(bad))
    assert r.returncode == 2 and "error:" in r.stderr and "port" in r.stderr


def test_training_on_the_evaluation_subjects_is_refused(tmp_path):
    # a second network's subjects (--subjects-from) must never be the held-out studies it is judged on
    r = harmonode("train", "lesions", "--subjects-from", "50500", "--out", str(tmp_path / "x.pt"))
    said = " ".join(r.stderr.replace("│", " ").split())  # the error box wraps lines
    assert r.returncode == 2 and "overlap the eval subjects" in said and "30000" in said
    assert not (tmp_path / "x.pt").exists()


def test_an_unknown_patch_view_is_refused(tmp_path):
    r = harmonode("train", "lesions", "--views", "planes,slab", "--out", str(tmp_path / "x.pt"))
    said = " ".join(r.stderr.replace("│", " ").split())
    assert r.returncode == 2 and "planes, zoom, mip, wide" in said
    assert not (tmp_path / "x.pt").exists()


def test_more_training_subjects_than_the_range_holds_are_refused(tmp_path):
    # subjects base+500 on are the test-size training studies: a plan reaching them would train on duplicates
    r = harmonode("train", "lesions", "--head-studies", "600", "--out", str(tmp_path / "x.pt"))
    said = " ".join(r.stderr.replace("│", " ").split())
    assert r.returncode == 2 and "--head-studies" in said and "1 to 500" in said
    assert not (tmp_path / "x.pt").exists()


def test_evaluating_outside_the_held_out_subjects_is_refused(tmp_path):
    # subjects 57990 + 2000 + 32 reach past the evaluation range into subjects nothing promises are unseen
    r = harmonode("evaluate", "--subjects-from", "57990", "--plot", str(tmp_path / "froc.png"))
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "50000-59999" in said and "--subjects-from 52000" in said
    assert not (tmp_path / "froc.png").exists()


@pytest.mark.slow
def test_evaluate_json_on_a_fresh_draw_of_held_out_studies(tmp_path):
    # the shipped card on one small study per held-out condition, subjects other than the card's: the --json
    # shape the issue names (sensitivity at 0.5/1/2/4 FP, auc, per_condition), a plot, the card untouched
    card = (ROOT / "models" / "weights" / "lesion.json").read_bytes()
    plot = tmp_path / "froc.png"
    args = ("--studies", "1", "--size", "test", "--no-raw", "--subjects-from", "52500", "--plot", str(plot))
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "evaluate", *args, "--json", "--jobs", "2", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["cases"] == 10 and out["lesions"] > 0 and out["without_harmonization"] is None
    rates = ("0.125", "0.25", "0.5", "1", "2", "4", "8")
    reach = [out["second"]["sensitivity_at_fp"][k] for k in rates]
    assert all(0 <= a <= b <= 1 for a, b in zip(reach, reach[1:], strict=False)) and reach[-1] > 0
    tight = [out["sensitivity_at_fp"][k] for k in rates]  # the primary count: inside the sac, the stricter
    assert out["hit_rule"]["name"] == "sac-tight" and all(t <= s for t, s in zip(tight, reach, strict=True))
    assert out["cpm"] == sum(tight) / 7
    assert 0.5 < out["auc"] <= 1
    assert len(out["per_condition"]) == 10 and set(out["per_kind"]) == {"head-cta", "head-mra", "chest-ct"}
    assert plot.stat().st_size > 1000
    assert (ROOT / "models" / "weights" / "lesion.json").read_bytes() == card


def test_status_without_data_says_what_to_do(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "nothing"}"\n')
    r = harmonode("status", "--config", str(cfg))
    assert r.returncode == 2 and "harmonode serve" in r.stderr


def test_status_json_shape(node, tmp_path):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    wait_until(lambda: node.queue.pending_count() == 0 and node.queue.jobs(), timeout=30, what="the series job")
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\ndata_dir = "{node.config.data_path}"\n')
    r = harmonode("status", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    series = next(s for s in report["studies"][0]["series"] if s["origin"] == "received")
    assert series["instance_count"] == 1
    for key in ("state", "instance_count", "condition_key", "rule", "findings"):
        assert key in series
    job = report["jobs"][0]
    for key in ("kind", "state", "attempts", "last_error"):
        assert key in job
    assert report["counts"]["instances"] >= 1  # the received slice, plus any result objects
    assert str(ds.PatientName) not in r.stderr


def test_demo_fits_rules_and_delivers_results_to_orthanc(tmp_path):
    """The README's first command, end to end: rules fitted from unlabeled studies, results in Orthanc."""
    from peers import system_tool

    system_tool("Orthanc")  # the demo falls back to a built-in PACS; this test wants the real one
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--studies", "1", "--data-dir", str(tmp_path / "node")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "harmonode rules fit --from-dir" in r.stdout and "reference" in r.stdout
    assert "PACS: Orthanc" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("1 "))
    assert "siemens-force-br40" in row and "(exact)" in row  # the fitted rule, not identity
    assert "SR:1" in row and "PR:1" in row and "OT:" in row
    assert "Traceback" not in r.stdout + r.stderr
