"""``harmonode rules …`` end to end on simulated studies: fit (from a folder and from the store), list, show,
export, import, activate, and the errors that leave the registry unchanged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydicom import dcmwrite
from typer.testing import CliRunner

from node.cli import app
from rules.registry import RuleRegistry
from storage.index import Index

simulate = pytest.importorskip("simulator.studies")

CT_CONDITIONS = ("ge-revolution-standard", "ge-optima-bone-lowdose", "siemens-force-br40")
runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    return cfg


def _studies(conditions: tuple[str, ...], per_condition: int = 2, ct_kind: str = "head-cta") -> list:
    out = []
    for i, name in enumerate(conditions):
        kind = "head-mra" if simulate.CONDITIONS[name].modality == "MR" else ct_kind
        for j in range(per_condition):
            out.append(simulate.simulate_study(kind, name, 100 * i + j, "test", slices=16, matrix=64))
    return out


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    for k, study in enumerate(_studies(CT_CONDITIONS)):
        simulate.write_study(study, root / f"s{k}")
    (root / "notes.bin").write_bytes(b"not dicom")
    return root


def _registry_rows(cfg: Path) -> list[dict]:
    index = Index(cfg.parent / "var" / "index.sqlite")
    RuleRegistry(index.db)
    return list(index.db.query("SELECT * FROM rules ORDER BY id, version"))


def _invoke(*args: str) -> object:
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_fit_from_dir_json_list_show_export_import(tmp_path: Path, study_dir: Path) -> None:
    cfg = _config(tmp_path)
    result = _invoke("rules", "fit", "--from-dir", str(study_dir), "--config", str(cfg), "--json", "--activate")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and sum(r["reference"] for r in rows) == 1
    for row in rows:
        assert {"key", "n_images", "reference", "similarity_before", "similarity_after"} <= set(row)
        assert row["n_images"] == 32
        if not row["reference"]:
            assert row["similarity_after"] >= row["similarity_before"]
            assert "similarity_after_piecewise" in row

    listed = json.loads(_invoke("rules", "list", "--config", str(cfg), "--json").stdout)
    assert len(listed) == 3 and all(r["active"] for r in listed)
    seed_rule = next(r for r in listed if r["method"] == "seed")

    png = tmp_path / "plot.png"
    shown = _invoke("rules", "show", seed_rule["id"], "--config", str(cfg), "--plot", str(png))
    assert shown.exit_code == 0, shown.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    exported = tmp_path / "rules.json"
    assert _invoke("rules", "export", str(exported), "--config", str(cfg)).exit_code == 0
    other = _config(tmp_path / "other")
    imported = _invoke("rules", "import", str(exported), "--config", str(other))
    assert imported.exit_code == 0, imported.output
    assert len(_registry_rows(other)) == 3

    # a second fit adds versions; activating an old version switches back
    again = _invoke("rules", "fit", "--from-dir", str(study_dir), "--config", str(cfg), "--method", "piecewise")
    assert again.exit_code == 0, again.output
    assert len(_registry_rows(cfg)) == 6
    act = _invoke("rules", "activate", f"{seed_rule['id']}@v1", "--config", str(cfg))
    assert act.exit_code == 0 and "active" in act.stdout


def test_fit_with_named_reference_and_holdout(tmp_path: Path, study_dir: Path) -> None:
    cfg = _config(tmp_path)
    ref = "CT|siemens|somatom-force|br40d|ctdi15-30|100kv"
    result = _invoke(
        "rules", "fit", "--from-dir", str(study_dir), "-c", str(cfg), "--json", "--reference", ref,
        "--holdout", "0.5", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.stdout)}
    assert rows[ref + "|head"]["reference"] is True  # a reference without a region: that condition in each region
    assert all("heldout_jsd_after" in r for r in rows.values() if not r["reference"])
    assert _registry_rows(cfg) == []  # dry run stores nothing


def _into_store(tmp_path: Path, studies: list) -> None:
    from storage.files import FileStore
    from storage.index import instance_meta_from_dataset

    files, index = FileStore(tmp_path / "var", fsync=False), Index(tmp_path / "var" / "index.sqlite")
    for study in studies:
        for ds in study.datasets:
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            stored = files.write_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
            index.record_instance(
                instance_meta_from_dataset(ds), files.relpath(stored.path), stored.size, stored.sha256, stored.version
            )
    index.close()


def test_fit_from_store(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    _into_store(tmp_path, _studies(CT_CONDITIONS[:2], per_condition=1))
    result = _invoke("rules", "fit", "-c", str(cfg), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(r["n_images"] for r in json.loads(result.stdout)) == [16, 16]


def test_fit_from_store_with_head_and_chest_fits_two_rules_per_scanner(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    scanners = CT_CONDITIONS[:2]
    _into_store(tmp_path, _studies(scanners, 1) + _studies(scanners, 1, ct_kind="chest-ct"))
    result = _invoke("rules", "fit", "-c", str(cfg), "--activate")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if not line.startswith(" ")]  # not the residual lines
    assert len(lines) == 4 and sorted(line.split()[1] for line in lines) == ["chest", "chest", "head", "head"]
    rules = RuleRegistry(Index(cfg.parent / "var" / "index.sqlite").db).active()
    by_scanner: dict[str, set[str]] = {}
    for rule in rules:
        by_scanner.setdefault(rule.key.model, set()).add(rule.key.region)
    assert by_scanner == {"revolution-ct": {"head", "chest"}, "optima-ct660": {"head", "chest"}}
    assert all(r.provenance["reference_key"].endswith("|" + r.key.region) for r in rules)


def test_fit_skips_a_region_without_the_reference_and_says_so(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    _into_store(tmp_path, _studies(CT_CONDITIONS, 1) + _studies(CT_CONDITIONS[1:], 1, ct_kind="chest-ct"))
    ref = "CT|ge|revolution-ct|standard|ctdi30-60|120kv"  # no chest series of it in the store
    result = runner.invoke(app, ["rules", "fit", "-c", str(cfg), "--json", "--reference", ref, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert {r["region"] for r in json.loads(result.stdout)} == {"head"}
    assert "warning: CT chest: no chest series of the reference condition" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--method", "magic"),
        ("--reference", "not a key"),
        ("--reference", "CT|acme|x|y|z|w"),
        ("--holdout", "1.5"),
    ],
)
def test_fit_errors_exit_2(tmp_path: Path, study_dir: Path, args: tuple[str, ...]) -> None:
    cfg = _config(tmp_path)
    result = runner.invoke(app, ["rules", "fit", "--from-dir", str(study_dir), "-c", str(cfg), *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert _registry_rows(cfg) == []


def test_fit_one_group_only(tmp_path: Path) -> None:
    root = tmp_path / "one"
    for k, study in enumerate(_studies(CT_CONDITIONS[:1])):
        simulate.write_study(study, root / f"s{k}")
    cfg = _config(tmp_path)
    result = runner.invoke(app, ["rules", "fit", "--from-dir", str(root), "-c", str(cfg)])
    assert result.exit_code == 2 and "at least two imaging conditions" in result.output
    assert _registry_rows(cfg) == []
    empty = runner.invoke(app, ["rules", "fit", "--from-dir", str(tmp_path / "missing"), "-c", str(cfg)])
    assert empty.exit_code == 2


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": "harmonode-rules", "format_version": 3, "rules": []}),
        json.dumps(
            {
                "format": "harmonode-rules",
                "format_version": 1,
                "rules": [{"id": "r1", "version": 1, "key": "CT|bad key", "method": "seed", "parameters": {}}],
            }
        ),
    ],
)
def test_import_bad_file(tmp_path: Path, content: str) -> None:
    cfg = _config(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    before = _registry_rows(cfg)
    result = runner.invoke(app, ["rules", "import", str(bad), "-c", str(cfg)])
    assert result.exit_code == 2 and "error:" in result.output
    assert _registry_rows(cfg) == before


def test_show_and_activate_unknown(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    for cmd in ("show", "activate"):
        result = runner.invoke(app, ["rules", cmd, "r000", "-c", str(cfg)])
        assert result.exit_code == 2 and "no rule" in result.output


def test_fit_proposes_residual_strengths_stored_with_each_rule(tmp_path: Path, study_dir: Path) -> None:
    """With the shipped residual model, each non-reference rule carries its stage in the same version."""
    cfg = _config(tmp_path)
    result = _invoke("rules", "fit", "--from-dir", str(study_dir), "--config", str(cfg), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    for row in rows:
        if row["reference"]:
            assert row["residual"].startswith("none: the reference condition")
        else:
            assert row["residual"].startswith("residual alpha_blur="), row.get("residual")
            fit = row["residual_fit"]
            # the proposal brings the noise level toward the reference's
            assert abs(fit["noise_after"] - fit["noise_reference"]) <= abs(fit["noise_before"] - fit["noise_reference"])
    listed = json.loads(_invoke("rules", "list", "--config", str(cfg), "--json").stdout)
    assert len(listed) == 3
    assert sum(r["residual"] is not None for r in listed) == 2
    table = _invoke("rules", "fit", "--from-dir", str(study_dir), "--config", str(cfg), "--no-residual")
    assert "alpha_blur" not in table.stdout
