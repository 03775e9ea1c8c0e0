"""Model bundles: a fitted model exported from one node, imported on a second node's data dir, activated, and
named by the SR of the next series that node analyses (a study pushed by DCMTK storescu); a bundle whose files,
weights or normalisation were changed is refused and installs nothing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from conftest import make_config
from models import bundles
from models.training.head import Example, fit_heads
from node.app import Node
from node.cli import app as cli
from node.pipeline import DetectorSlot
from peers import run_tool, wait_until
from simulator.studies import simulate_study, write_study


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A model 1.4.1-test fitted (heads only) from the shipped one on a few labelled feature vectors."""
    rng = np.random.default_rng(0)
    examples = [
        Example(np.maximum(rng.normal(size=384), 0).astype(np.float32), n % 2, "CT|x|chest", "site-a", "1.4.0")
        for n in range(20)
    ]
    out = tmp_path_factory.mktemp("fitted")
    fit_heads((examples, 20), out, version="1.4.1-test", epochs=20)
    return out


def _config_file(path: Path, data_dir: Path, port: int = 11112) -> Path:
    path.write_text(f'[node]\ndata_dir = "{data_dir}"\nport = {port}\n')
    return path


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _repack(bundle: Path, out: Path, change, fix_manifest: bool) -> Path:  # noqa: ANN001
    """A copy of ``bundle`` with ``change(files)`` applied (the manifest updated to match when asked)."""
    with tarfile.open(bundle) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    change(files)
    if fix_manifest:
        manifest = json.loads(files["bundle.json"])
        manifest["files"] = {n: bundles._sha256(d) for n, d in files.items() if n != "bundle.json"}
        files["bundle.json"] = json.dumps(manifest).encode()
    with tarfile.open(out, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_bundle_moves_a_model_to_a_second_node_whose_sr_names_it(fitted, tmp_path):
    source = _config_file(tmp_path / "a.toml", tmp_path / "node-a")
    bundle = Path(_cli("models", "export", str(tmp_path), "--weights", str(fitted), "--config", str(source)).split()[1])
    assert bundle.name == "harmonode-model-1.4.1-test.tar.gz"
    cfg = make_config(tmp_path / "node-b")
    second = _config_file(tmp_path / "b.toml", tmp_path / "node-b", cfg.node.port)
    assert "installed" in _cli("models", "import", str(bundle), "--config", str(second))
    assert "installed" in _cli("models", "import", str(bundle), "--config", str(second))  # again: a no-op
    _cli("models", "activate", "1.4.1-test", "--config", str(second))
    assert json.loads(_cli("models", "list", "--json", "--config", str(second))) == {
        "installed": ["1.4.1-test"],
        "active": "1.4.1-test",
    }
    node = Node(cfg)
    node.start(("listen", "work"))
    try:
        study = simulate_study("head-cta", "ge-revolution-standard", seed=5, size="test", lesion_diameters_mm=[9.0])
        paths = [p for p in write_study(study, tmp_path / "study") if p.suffix == ".dcm"]
        run_tool(["storescu", "-aec", "HARMONODE", "127.0.0.1", str(node.port), *map(str, paths)])
        uid = study.truth["series_instance_uid"]
        wait_until(lambda: (node.index.series(uid) or {}).get("state") == "done", timeout=180, what="analysis")
        assert node.index.series(uid)["model_version"] == "1.4.1-test"
        row = node.index.query("SELECT path FROM reports WHERE series_instance_uid=? AND version=1", (uid,))[0]
        sr = dcmread(node.files.abspath(row["path"]))
        texts = [getattr(item, "TextValue", "") for item in _content_items(sr)]
        assert "1.4.1-test" in texts
    finally:
        node.stop()


def _content_items(ds):  # noqa: ANN001, ANN202
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_the_worker_switches_to_the_activated_model_between_series(fitted, tmp_path):
    models_dir = tmp_path / "models"
    slot = DetectorSlot("cpu", models_dir=models_dir)
    assert slot.get().version == "1.4.0"
    installed = bundles.import_bundle(bundles.export_bundle(tmp_path, fitted), models_dir)
    assert slot.get().version == "1.4.0"  # installed is not active
    bundles.activate(models_dir, installed.version)
    assert slot.get().version == "1.4.1-test"


def _flip_byte(name: str):  # noqa: ANN202
    def change(files: dict[str, bytes]) -> None:
        data = bytearray(files[name])
        data[len(data) // 2] ^= 0xFF
        files[name] = bytes(data)

    return change


def _other_normalisation(files: dict[str, bytes]) -> None:
    card = json.loads(files["lesion.json"])
    card["normalisation"]["ct_scale"] = 500.0
    files["lesion.json"] = json.dumps(card).encode()


def _escape(files: dict[str, bytes]) -> None:
    files["../evil.py"] = b"print('x')"


@pytest.mark.parametrize(
    ("change", "fix_manifest", "said"),
    [
        (_flip_byte("lesion-b.pt"), False, "does not match its checksum in the manifest"),
        (_flip_byte("lesion-b.pt"), True, "the card says"),  # consistent manifest, weights not the card's
        (_other_normalisation, True, "normalisation differs"),
        (_escape, True, "bare name"),
    ],
)
def test_a_tampered_bundle_is_refused_and_installs_nothing(fitted, tmp_path, change, fix_manifest, said):
    bundle = bundles.export_bundle(tmp_path / "good.tar.gz", fitted)
    bad = _repack(bundle, tmp_path / "bad.tar.gz", change, fix_manifest)
    config = _config_file(tmp_path / "b.toml", tmp_path / "node-b")
    result = CliRunner().invoke(cli, ["models", "import", str(bad), "--config", str(config)])
    assert result.exit_code == 2 and said in result.output, result.output
    models_dir = tmp_path / "node-b" / "models"
    assert bundles.installed_versions(models_dir) == [] and not list(models_dir.glob(".incoming-*"))
    result = CliRunner().invoke(cli, ["models", "activate", "1.4.1-test", "--config", str(config)])
    assert result.exit_code == 2 and "not installed" in result.output
