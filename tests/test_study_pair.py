"""``simulator.pairs.study_pair``: pairs from whole studies, the condition's calibration kept, one anatomy."""

from __future__ import annotations

import numpy as np

from simulator.pairs import study_pair
from simulator.scanner import CONDITIONS


def test_the_reference_conditions_pair_is_its_own_scan_and_noise_free_twin() -> None:
    pair = study_pair("head-cta", "ge-revolution-standard", 8000, "test", slices=3)
    assert pair.input.shape == pair.clean.shape == (3, 128, 128)
    np.testing.assert_array_equal(pair.input, pair.reference)
    np.testing.assert_array_equal(pair.blurred, pair.clean)
    assert np.array_equal(pair.input, np.rint(pair.input))  # quantised as stored
    noise = float(np.std(pair.reference - pair.clean))
    assert 0.8 < noise / CONDITIONS["ge-revolution-standard"].noise_std() < 1.2


def test_a_low_dose_pair_keeps_its_noise_and_calibration_over_the_reference_anatomy() -> None:
    ref = study_pair("head-cta", "ge-revolution-standard", 8000, "test", slices=3)
    pair = study_pair("head-cta", "ge-optima-bone-lowdose", 8000, "test", slices=3)
    np.testing.assert_array_equal(pair.clean, ref.clean)  # the same subject, the reference's noise-free scan
    noise = float(np.std(pair.noise_residual))
    assert 0.8 < noise / CONDITIONS["ge-optima-bone-lowdose"].noise_std() < 1.2
    bright = pair.clean > 300  # bone and contrast: 100 kVp and the vendor's calibration brighten them
    assert float(np.mean(pair.blurred[bright] - pair.clean[bright])) > 50


def test_an_mr_pair_has_the_references_scale_in_clean_and_its_own_in_input() -> None:
    pair = study_pair("head-mra", "ge-signa-1.5t-tof", 8000, "test", slices=3)
    assert pair.modality == "MR" and pair.input.min() >= 0
    ratio = float(np.percentile(pair.input, 99) / np.percentile(pair.clean, 99))
    assert 1.5 < ratio < 3.0  # stored scale 2200 against the reference's 900, vessel gains differ
