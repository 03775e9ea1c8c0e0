"""The image-quality measures (rules/quality.py) against known truths: synthetic noise and blur, the simulator's
noise-free twin of a scan, and scikit-image for PSNR and SSIM."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage, stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rules.quality import Quality, QualityError, edge_width_mm, measure, noise_std, psnr, ssim
from simulator.paint import MATERIAL_INDEX
from simulator.studies import CONDITIONS, ScannerCondition, SimulatedStudy, simulate_study

CT_CONDITIONS = [name for name, c in CONDITIONS.items() if c.modality == "CT"]
MR_CONDITIONS = [name for name, c in CONDITIONS.items() if c.modality == "MR"]
HEAD_MM = (0.85, 0.85)  # in-plane spacing of the eval-size head


def head(condition: str | ScannerCondition) -> SimulatedStudy:
    """An eval-size 8-slice head (CTA or TOF-MRA by the condition's modality) of subject 1."""
    cond = CONDITIONS[condition] if isinstance(condition, str) else condition
    kind = "head-mra" if cond.modality == "MR" else "head-cta"
    return simulate_study(kind, condition, 1, "eval", slices=8, keep_arrays=True)


def disc(sigma_mm: float, noise_hu: float = 0.0, pixel_mm: float = 0.5, seed: int = 0) -> np.ndarray:
    """A 40 HU disc (radius 45 mm) in air, blurred by a Gaussian of ``sigma_mm`` (exactly: a disc seen through
    a 2-D Gaussian is the non-central chi-square CDF of the radius), plus white noise."""
    r = np.hypot(*((np.mgrid[:240, :240] - 119.5) * pixel_mm))
    inside = stats.ncx2.cdf((45.0 / sigma_mm) ** 2, 2, (r / sigma_mm) ** 2) if sigma_mm else (r < 45.0) * 1.0
    return -1000.0 + 1040.0 * inside + np.random.default_rng(seed).normal(0.0, noise_hu, r.shape)


def smooth_field(noise: np.ndarray) -> np.ndarray:
    """Spatially correlated structure from white noise, so that SSIM has something to compare."""
    return ndimage.gaussian_filter(noise, (0.0,) * (noise.ndim - 2) + (2.0, 2.0)) * 4.0


@pytest.mark.parametrize("sigma", [5.0, 20.0, 60.0])
def test_noise_std_of_white_noise_on_a_uniform_disc(sigma: float) -> None:
    volume = np.stack([disc(0.0, sigma, seed=k) for k in range(4)])
    # 1.5 %: without the chi-mode correction a 5x5 window reads 2 % low
    assert noise_std(volume, "CT", (0.5, 0.5)) == pytest.approx(sigma, rel=0.015)
    assert noise_std(volume[0], "CT") == pytest.approx(sigma, rel=0.05)  # one slice, the 5 px minimum window


def scanner_noise(study: SimulatedStudy, quiet: ScannerCondition) -> float:
    """The true noise std over brain: the scan minus the same subject scanned with the noise switched off."""
    clean = head(quiet).values
    brain = np.isin(study.anatomy.labels, [MATERIAL_INDEX["brain_wm"], MATERIAL_INDEX["brain_gm"]])
    return float((study.values - clean)[brain].std())


@pytest.mark.parametrize("name", CT_CONDITIONS)
def test_noise_std_of_simulated_head_ct_matches_its_noise_free_twin(name: str) -> None:
    # the soft kernels' correlated noise reads a few percent low in a 3 mm window (philips-ict-b: 4 %)
    study = head(name)
    truth = scanner_noise(study, dataclasses.replace(CONDITIONS[name], noise_hu_at_100mas=0.0))
    assert noise_std(study.values, "CT", HEAD_MM) == pytest.approx(truth, rel=0.05)


@pytest.mark.parametrize("name", MR_CONDITIONS)
def test_noise_std_of_simulated_head_mra_matches_its_noise_free_twin(name: str) -> None:
    study = head(name)
    truth = scanner_noise(study, dataclasses.replace(CONDITIONS[name], noise_fraction=0.0))
    assert noise_std(study.values, "MR", HEAD_MM) == pytest.approx(truth, rel=0.05)


def test_noise_std_orders_conditions_as_the_scanner_model_predicts() -> None:
    # predicted 49.6 > 9.90 > 9.59 HU: the last two are 3 % apart in the model itself
    names = ["ge-optima-bone-lowdose", "ge-revolution-standard", "philips-ict-b-lowdose"]
    measured = [noise_std(head(n).values, "CT", HEAD_MM) for n in names]
    predicted = [CONDITIONS[n].noise_std() for n in names]
    assert measured == sorted(measured, reverse=True)
    assert predicted == sorted(predicted, reverse=True)
    for m, p in zip(measured, predicted, strict=True):
        assert m == pytest.approx(p, rel=0.2)


@pytest.mark.parametrize("sigma_mm", [0.5, 1.0, 2.0])
def test_edge_width_of_a_gaussian_blurred_disc_is_2563_sigma(sigma_mm: float) -> None:
    image = disc(sigma_mm, noise_hu=10.0)
    assert edge_width_mm(image, (0.5, 0.5), "CT") == pytest.approx(2.563 * sigma_mm, rel=0.03)


def test_edge_width_of_the_noise_free_head_is_its_one_pixel_ramp() -> None:
    # the phantom is painted anti-aliased over one pixel: a linear ramp of 0.85 mm, 10-90 % over 0.68 mm;
    # interpolating the profiles instead of binning pixels would widen it (linear: 1.08 mm)
    assert edge_width_mm(head("ge-revolution-standard").anatomy.image, HEAD_MM, "CT") == pytest.approx(0.68, rel=0.05)


def test_edge_width_orders_kernels_sharp_standard_soft() -> None:
    widths = [
        edge_width_mm(head(n).values, HEAD_MM, "CT")
        for n in ("siemens-definition-hr64", "ge-revolution-standard", "philips-ict-b-lowdose")
    ]
    assert widths[0] * 1.3 < widths[1] and widths[1] * 1.3 < widths[2]
    assert 0.5 < widths[0] and widths[2] < 2.5


def test_edge_width_of_simulated_head_mra_follows_its_acquisition_window() -> None:
    # the TOF k-space window (0.8 of Nyquist) blurs more than the painting alone, not more than the soft CT kernel
    study = head("siemens-skyra-3t-tof")
    assert edge_width_mm(study.anatomy.image * 900.0, HEAD_MM, "MR") < edge_width_mm(study.values, HEAD_MM, "MR") < 1.7


def test_measure_gives_both_measures_frozen() -> None:
    values = head("ge-revolution-standard").values
    quality = measure(values, HEAD_MM, "CT")
    assert quality == Quality(noise_std(values, "CT", HEAD_MM), edge_width_mm(values, HEAD_MM, "CT"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quality.noise_std = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("shape", [(64, 64), (37, 90), (128, 96)])
@pytest.mark.parametrize("data_range", [None, 255.0])
def test_psnr_and_ssim_agree_with_scikit_image(shape: tuple[int, int], data_range: float | None) -> None:
    rng = np.random.default_rng(sum(shape))
    reference = smooth_field(rng.normal(0.0, 40.0, shape))
    image = reference + rng.normal(0.0, 10.0, shape)
    span = float(reference.max() - reference.min()) if data_range is None else data_range
    expected_psnr = peak_signal_noise_ratio(reference, image, data_range=span)
    expected_ssim = structural_similarity(
        image, reference, data_range=span, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert psnr(image, reference, data_range) == pytest.approx(expected_psnr, abs=1e-4)
    assert ssim(image, reference, data_range) == pytest.approx(expected_ssim, abs=1e-4)
    assert 0.05 < expected_ssim < 0.95  # a comparison that could disagree


def test_ssim_of_a_volume_is_the_mean_over_its_slices() -> None:
    rng = np.random.default_rng(3)
    reference = smooth_field(rng.normal(0.0, 40.0, (3, 48, 48)))
    image = reference + rng.normal(0.0, 8.0, reference.shape)
    per_slice = [
        structural_similarity(i, r, data_range=100.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for i, r in zip(image, reference, strict=True)
    ]
    assert ssim(image, reference, 100.0) == pytest.approx(np.mean(per_slice), abs=1e-4)


def test_identical_images_give_infinite_psnr_and_unit_ssim() -> None:
    image = np.random.default_rng(1).normal(size=(32, 32))
    assert psnr(image, image.copy()) == math.inf
    assert ssim(image, image.copy()) == 1.0


def test_an_all_air_image_has_no_tissue_and_no_outline() -> None:
    air = np.random.default_rng(2).normal(-1000.0, 10.0, (4, 128, 128))
    with pytest.raises(QualityError, match="soft-tissue pixels"):
        noise_std(air, "CT", (0.85, 0.85))
    with pytest.raises(QualityError, match="outline"):
        edge_width_mm(air, (0.85, 0.85), "CT")


def test_mismatched_shapes_and_bad_arguments_are_refused() -> None:
    with pytest.raises(QualityError, match="differ in shape"):
        psnr(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(QualityError, match="modality"):
        noise_std(np.zeros((8, 8)), "PET")
    with pytest.raises(QualityError, match="spacing"):
        edge_width_mm(np.zeros((8, 8)), (0.0, 1.0), "CT")
