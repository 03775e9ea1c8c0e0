"""The synthetic scanner: valid DICOM, deterministic bytes, dose noise, kernel sharpness, calibration, truth, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from typer.testing import CliRunner

from models.findings import VolumeGeometry
from node.cli import app
from peers import dciodvfy_errors, wait_until
from simulator import phantom
from simulator.studies import (
    CONDITIONS,
    ScannerCondition,
    SimulationError,
    load_conditions,
    scan_ct,
    simulate_study,
    write_study,
)

MATERIAL = phantom.MATERIAL_INDEX


def geometry_of(study) -> VolumeGeometry:  # noqa: ANN001
    g = study.truth["geometry"]
    return VolumeGeometry(g["origin"], (1, 0, 0), (0, 1, 0), tuple(g["spacing"]), tuple(g["shape"]))


def test_condition_catalogue_has_enough_ct_and_mra():
    modalities = [c.modality for c in CONDITIONS.values()]
    assert modalities.count("CT") >= 6 and modalities.count("MR") >= 3


@pytest.mark.parametrize(
    ("kind", "condition"),
    [("head-cta", "siemens-definition-hr64"), ("head-mra", "ge-signa-1.5t-tof"), ("chest-ct", "philips-ict-b-lowdose")],
)
def test_written_files_pass_dciodvfy_and_carry_the_condition(tmp_path: Path, kind: str, condition: str):
    study = simulate_study(kind, condition, seed=3, size="test", slices=6)
    paths = write_study(study, tmp_path)
    assert paths[-1].name == "truth.json" and len(paths) == 7
    for path in (paths[0], paths[3]):
        assert dciodvfy_errors(path) == []
    ds = study.datasets[0]
    cond = CONDITIONS[condition]
    assert ds.Manufacturer == cond.manufacturer and ds.ManufacturerModelName == cond.model
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
    if cond.modality == "CT":
        assert ds.ConvolutionKernel == cond.kernel and float(ds.KVP) == cond.kvp and int(ds.Exposure) == cond.mas
        assert float(ds.CTDIvol) > 0 and float(ds.RescaleIntercept) == -1024
    else:
        assert float(ds.MagneticFieldStrength) == cond.field_strength
    # the truth stays out of the headers
    header = b"".join(bytes(str(el.value), "latin-1", "replace") for el in ds if el.keyword != "PixelData")
    assert b"aneurysm" not in header.lower() and b"nodule" not in header.lower()
    truth = json.loads(paths[-1].read_text())
    assert {"kind", "condition", "study_instance_uid", "series_instance_uid", "lesions", "landmarks"} <= set(truth)
    assert truth["series_instance_uid"] == ds.SeriesInstanceUID


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path):
    a = write_study(simulate_study("head-cta", "canon-aquilion-fc43", 11, "test", slices=4), tmp_path / "a")
    b = write_study(simulate_study("head-cta", "canon-aquilion-fc43", 11, "test", slices=4), tmp_path / "b")
    c = write_study(simulate_study("head-cta", "canon-aquilion-fc43", 12, "test", slices=4), tmp_path / "c")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()


def _white_matter_noise(condition: ScannerCondition) -> np.ndarray:
    """Reconstructed minus true HU inside uniform white matter, away from every edge."""
    study = simulate_study("head-cta", condition, 5, "test", slices=24, keep_arrays=True)
    wm = scipy.ndimage.binary_erosion(study.anatomy.labels == MATERIAL["brain_wm"], iterations=3)
    assert wm.sum() > 5000
    return (study.values - study.anatomy.image)[wm]


def test_noise_std_follows_one_over_sqrt_mas():
    base = CONDITIONS["ge-revolution-standard"]
    low, high = (dataclasses.replace(base, mas=m) for m in (50.0, 200.0))
    s_low, s_high = np.std(_white_matter_noise(low)), np.std(_white_matter_noise(high))
    assert s_low / s_high == pytest.approx(2.0, rel=0.10)
    assert s_high == pytest.approx(high.noise_std(), rel=0.10)


def test_ct_noise_is_correlated_not_white():
    cond = CONDITIONS["ge-revolution-standard"]
    noise = scan_ct(np.zeros((8, 128, 128), np.float32), cond, (1.0, 0.5, 0.5), np.random.default_rng(0))
    pixel = noise.std()
    nps = (np.abs(np.fft.fft2(noise, axes=(1, 2))) ** 2).mean(axis=0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128, 0.5), np.fft.fftfreq(128, 0.5), indexing="ij"))
    low, mid, high = nps[f < 0.1].mean(), nps[(f > 0.25) & (f < 0.45)].mean(), nps[f > 0.85].mean()
    # a CT noise power spectrum peaks at mid frequencies (ramp × kernel); white noise would be flat
    assert low < 0.5 * mid and high < 0.5 * mid
    assert pixel == pytest.approx(cond.noise_std(), rel=0.05)


def edge_width_10_90(condition: ScannerCondition) -> float:
    """10–90 % width (mm) of a 0 → 1000 HU step reconstructed at 0.25 mm pixels, noise made negligible."""
    quiet = dataclasses.replace(condition, mas=1e9)
    step = np.zeros((2, 64, 256), np.float32)
    step[:, :, 128:] = 1000.0
    profile = scan_ct(step, quiet, (1.0, 0.25, 0.25), np.random.default_rng(0)).mean(axis=(0, 1))[64:192]
    lo, hi = profile[:32].mean(), profile[-32:].mean()
    esf = (profile - lo) / (hi - lo)
    x = np.arange(len(esf)) * 0.25
    return float(np.interp(0.9, esf[60:68], x[60:68]) - np.interp(0.1, esf[60:68], x[60:68]))


def test_sharp_kernel_narrows_edges_and_soft_kernel_widens_them():
    standard = edge_width_10_90(CONDITIONS["ge-revolution-standard"])
    sharp = edge_width_10_90(CONDITIONS["siemens-definition-hr64"])
    soft = edge_width_10_90(CONDITIONS["philips-ict-b-lowdose"])
    assert sharp < 0.85 * standard < 0.85 * soft


def test_conditions_differ_mainly_above_soft_tissue():
    a = simulate_study("head-cta", "ge-revolution-standard", 8, "test", slices=32, keep_arrays=True)
    b = simulate_study("head-cta", "philips-ict-b-lowdose", 8, "test", slices=32, keep_arrays=True)
    labels = a.anatomy.labels
    assert np.array_equal(labels, b.anatomy.labels)  # same subject
    for name in ("brain_wm", "brain_gm", "soft"):
        inside = scipy.ndimage.binary_erosion(labels == MATERIAL[name], iterations=1)
        assert abs(a.values[inside].mean() - b.values[inside].mean()) < 5.0, name
    for name in ("bone_cortical", "artery"):
        inside = labels == MATERIAL[name]
        assert abs(a.values[inside].mean() - b.values[inside].mean()) > 50.0, name
    body_a, body_b = a.values[labels > 0], b.values[labels > 0]
    soft_a, soft_b = (np.median(v[(v > -100) & (v < 150)]) for v in (body_a, body_b))
    bright = abs(np.percentile(body_a, 99.5) - np.percentile(body_b, 99.5))
    assert abs(soft_a - soft_b) < 5.0
    assert bright > 30.0 and bright > 5 * abs(soft_a - soft_b)


@pytest.mark.parametrize(
    ("kind", "condition", "materials", "span"),
    [
        ("head-cta", "ge-revolution-standard", ("aneurysm",), (2.0, 12.0)),
        ("head-mra", "siemens-skyra-3t-tof", ("aneurysm",), (2.0, 12.0)),
        ("chest-ct", "canon-aquilion-fc43", ("nodule_solid", "nodule_ggo"), (4.0, 25.0)),
    ],
)
def test_truth_lesion_centres_lie_in_rendered_lesions(kind, condition, materials, span):  # noqa: ANN001
    for seed in (1, 2, 3):
        study = simulate_study(kind, condition, seed, "test", keep_arrays=True)
        geometry = geometry_of(study)
        assert study.truth["lesions"]
        for lesion in study.truth["lesions"]:
            assert span[0] <= lesion["diameter_mm"] <= span[1]
            k, j, i = np.rint(geometry.patient_to_index(lesion["center_mm"])).astype(int)
            assert phantom.MATERIAL_NAMES[study.anatomy.labels[k, j, i]] in materials, lesion
        assert len({lm["name"] for lm in study.truth["landmarks"]}) >= 20


def test_fixed_lesion_sizes_and_rejected_ones():
    study = simulate_study("head-cta", "ge-revolution-standard", 4, "test", slices=4, lesion_diameters_mm=[3.0, 8.0])
    assert sorted(les["diameter_mm"] for les in study.truth["lesions"]) == [3.0, 8.0]
    with pytest.raises(SimulationError, match="does not fit"):
        simulate_study("head-cta", "ge-revolution-standard", 4, "test", lesion_diameters_mm=[250.0])
    with pytest.raises(SimulationError, match="positive"):
        simulate_study("chest-ct", "ge-revolution-standard", 4, "test", spacing_mm=0.0)
    with pytest.raises(SimulationError, match="needs a MR"):
        simulate_study("head-mra", "ge-revolution-standard", 4, "test")


def test_user_conditions_from_toml(tmp_path: Path):
    path = tmp_path / "scanners.toml"
    path.write_text(
        '[conditions.acme-sharp]\nmodality = "CT"\nmanufacturer = "ACME"\nmodel = "X1"\nkernel = "K9"\n'
        "kvp = 140\nmas = 75\nkernel_boost = 1.0\n"
    )
    extra = load_conditions(path)
    study = simulate_study("chest-ct", "acme-sharp", 2, "test", slices=2, extra_conditions=extra)
    assert study.datasets[0].Manufacturer == "ACME" and study.datasets[0].ConvolutionKernel == "K9"
    path.write_text('[conditions.bad]\nmodality = "CT"\nmanufacturer = "A"\nmodel = "B"\nwattage = 3\n')
    with pytest.raises(SimulationError, match="wattage"):
        load_conditions(path)


def test_cli_writes_studies_atomically(tmp_path: Path):
    out = tmp_path / "out"
    args = ["simulate", "--out", str(out), "--size", "test", "--kind", "chest-ct", "--studies", "2", "--seed", "4"]
    result = CliRunner().invoke(app, [*args, "--condition", "philips-ict-yc-sharp"])
    assert result.exit_code == 0, result.output
    folders = sorted(out.iterdir())
    assert len(folders) == 2 and all((f / "truth.json").is_file() for f in folders)
    assert len(list(folders[0].glob("*.dcm"))) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--condition", "no-such-scanner"], "unknown condition"),
        (["--lesion-mm", "300"], "does not fit"),
        (["--spacing", "0"], "must be positive"),
        (["--kind", "head-mra", "--condition", "ge-revolution-standard"], "needs a MR"),
    ],
)
def test_cli_bad_input_is_a_clear_error_and_writes_nothing(tmp_path: Path, extra: list[str], message: str):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--out", str(out), "--size", "test", *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_sends_the_study_to_the_node(tmp_path: Path, node):  # noqa: ANN001
    out = tmp_path / "out"
    args = ["simulate", "--out", str(out), "--size", "test", "--kind", "head-mra", "--seed", "9"]
    result = CliRunner().invoke(app, [*args, "--send", f"127.0.0.1:{node.port}", "--aet", "HARMONODE"])
    assert result.exit_code == 0, result.output
    truth = json.loads(next(out.glob("*/truth.json")).read_text())
    n_files = len(list(out.glob("*/*.dcm")))
    rows = wait_until(
        lambda: len(node.index.instances_of_series(truth["series_instance_uid"])) == n_files, what="all slices"
    )
    assert rows and n_files == 48


@pytest.mark.parametrize(("kind", "pixel_mm", "slice_mm"), [("head-cta", 0.85, 1.0), ("chest-ct", 1.4, 2.5)])
def test_eval_size_resolves_small_lesions(kind, pixel_mm, slice_mm):
    study = simulate_study(kind, "ge-revolution-standard", 2, "eval", slices=4)
    ds = study.datasets[0]
    assert (ds.Rows, ds.Columns) == (256, 256)
    assert float(ds.PixelSpacing[0]) == pytest.approx(pixel_mm)
    assert float(ds.SliceThickness) == pytest.approx(slice_mm)
    with pytest.raises(SimulationError, match="unknown size"):
        simulate_study(kind, "ge-revolution-standard", 2, "huge")  # type: ignore[arg-type]
