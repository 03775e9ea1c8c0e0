"""``harmonode harmonize``: a series folder in, a valid derived series and a picture out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from typer.testing import CliRunner

from models.training.residual import ResidualRecipe, train_residual
from node.cli import app
from peers import dciodvfy_errors
from simulator.studies import simulate_study, write_study

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("residual-weights")
    train_residual(out, ResidualRecipe(steps_ct=3, steps_mr=0, batch=2, patch=32, crops_per_slab=2, width=4), "cpu")
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("series")
    write_study(simulate_study("head-cta", "ge-optima-bone-lowdose", 3, "test", slices=10, matrix=64), folder)
    return folder


def _config(tmp_path: Path) -> Path:
    """A node config whose data directory does not exist yet: no rule for the series."""
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def _run(*args: str) -> object:
    return runner.invoke(app, ["harmonize", *args], catch_exceptions=False)


def test_harmonize_writes_a_valid_derived_series_and_a_preview(series: Path, weights: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "out", tmp_path / "preview.png"
    result = _run("--in", str(series), "--out", str(out), "--blur", "0.7", "--noise", "0.5", "--preview", str(png),
                  "--weights", str(weights), "--device", "cpu", "--config", str(_config(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "residual alpha_blur=0.70 alpha_noise=0.50" in result.output
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 10
    ds = dcmread(files[0])
    assert "DERIVED" in ds.ImageType and "alpha_noise=0.50" in ds.DerivationDescription
    assert dciodvfy_errors(files[0]) == []
    image = Image.open(png)
    assert image.width > 3 * 64 and image.height > 64


def test_zero_strengths_leave_the_series_as_the_histogram_stage_left_it(
    series: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _run("--in", str(series), "--out", str(out), "--blur", "0", "--noise", "0", "--weights", str(weights),
                  "--device", "cpu", "--config", str(_config(tmp_path)))
    assert result.exit_code == 0, result.output
    by_source = {str(dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID): dcmread(p) for p in out.glob("*")}
    for src in series.rglob("*.dcm"):
        ds = dcmread(src)
        np.testing.assert_array_equal(by_source[str(ds.SOPInstanceUID)].pixel_array, ds.pixel_array)


def test_errors_say_what_to_do(series: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["harmonize", "--in", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no DICOM file" in result.output
    result = runner.invoke(app, ["harmonize", "--in", str(series), "--out", str(tmp_path / "o"), "--blur", "1",
                                 "--weights", str(tmp_path / "missing"), "--config", str(_config(tmp_path))])
    assert result.exit_code == 2 and "harmonode train residual" in result.output
    result = runner.invoke(app, ["harmonize", "--in", str(series), "--out", str(tmp_path / "o"), "--rule", "rnope",
                                 "--config", str(_config(tmp_path))])
    assert result.exit_code == 2 and "no rule" in result.output
