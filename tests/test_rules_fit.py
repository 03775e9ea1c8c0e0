"""Histograms, the seed optimizer on known a, b, c, the piecewise method, apply/LUT/inverse, and the
held-out harmonization check on simulated studies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rules.apply import (
    NotInvertible,
    PiecewiseMap,
    RuleParameterError,
    SeedMap,
    apply_rule,
    apply_rule_stored,
    invert_rule,
    make_map,
)
from rules.fit import FitError, FitOptions, fit_groups, fit_piecewise, fit_seed, transform_histogram
from rules.histogram import (
    CT_SPEC,
    HistogramSpec,
    average_histogram,
    image_histogram,
    js_divergence,
    stored_histogram,
)

SPEC = HistogramSpec(body_threshold=None)


def _sample(rng: np.random.Generator, n: int = 200_000) -> np.ndarray:
    """A head-CT-like mixture: fat, brain, vessels, bone."""
    return np.concatenate(
        [
            rng.normal(30, 8, n),
            rng.normal(-60, 10, n // 3),
            rng.normal(250, 40, n // 6),
            rng.normal(900, 200, n // 4),
            rng.uniform(-400, 2000, n // 10),
        ]
    )


def test_histogram_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(0, 300, 50_000)
    ours = image_histogram(values, SPEC)
    clipped = np.clip(values, SPEC.lo, SPEC.hi - 1e-6)
    ref, _ = np.histogram(clipped, bins=SPEC.edges)
    assert ours.sum() == ref.sum() and np.abs(ours - ref).sum() <= 6  # float32 rounding at a few bin edges


def test_stored_histogram_equals_real_units() -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(-1024, 3000, (64, 64)).astype(np.int16)
    for spec in (SPEC, CT_SPEC):
        assert np.allclose(stored_histogram(stored, 1.0, -1024.0, spec), image_histogram(stored - 1024.0, spec))


def test_transform_histogram_matches_mapped_samples() -> None:
    rng = np.random.default_rng(2)
    values = _sample(rng)
    mapping = SeedMap(1.15, -20.0, 130.0)
    predicted = transform_histogram(image_histogram(values, SPEC), SPEC, mapping)
    actual = image_histogram(mapping.forward(values), SPEC)
    assert js_divergence(predicted, actual) < 0.01


@pytest.mark.parametrize(
    ("a", "b", "c"), [(1.1, -15.0, 150.0), (0.9, 15.0, 150.0), (1.2, -60.0, 300.0), (0.85, 30.0, 200.0)]
)
def test_seed_fit_recovers_known_rule(a: float, b: float, c: float) -> None:
    rng = np.random.default_rng(3)
    truth = SeedMap(a, b, c)
    reference = image_histogram(_sample(rng), SPEC)
    group = image_histogram(truth.inverse(_sample(rng)), SPEC)
    fitted, before, after, steps = fit_seed(group, reference, SPEC)
    at_truth = 1.0 - js_divergence(transform_histogram(group, SPEC, truth), reference)
    assert after > before and after >= at_truth - 1e-4
    assert abs(fitted.a - a) < 0.02
    # c is only identified where the map departs from identity; compare the maps where the data are
    grid = np.linspace(-300, 1800, 400)
    assert np.max(np.abs(fitted.forward(grid) - truth.forward(grid))) < 12.0
    assert 0 < steps


def test_seed_fit_identity_when_nothing_to_gain() -> None:
    rng = np.random.default_rng(4)
    hist = image_histogram(_sample(rng), SPEC)
    fitted, before, after, _ = fit_seed(hist, hist, SPEC)
    assert after >= before == pytest.approx(1.0)
    grid = np.linspace(-300, 1800, 50)
    assert np.allclose(fitted.forward(grid), grid, atol=1.0)


def test_kl_divergence_selectable() -> None:
    rng = np.random.default_rng(5)
    reference = image_histogram(_sample(rng), SPEC)
    group = image_histogram(SeedMap(1.1, -15.0, 150.0).inverse(_sample(rng)), SPEC)
    fitted, before, after, _ = fit_seed(group, reference, SPEC, FitOptions(divergence="kl"))
    assert after > before
    assert abs(fitted.a - 1.1) < 0.03


def test_piecewise_fit_improves_and_is_monotone() -> None:
    rng = np.random.default_rng(6)
    reference = image_histogram(_sample(rng), SPEC)
    group = image_histogram(_sample(rng) * 1.3 + 40, SPEC)  # affects the low range too: the seed cannot
    mapping, before, after, _ = fit_piecewise(group, reference, SPEC)
    assert after > 0.99 > before
    assert np.all(np.diff(mapping.forward(np.linspace(-1000, 3000, 500))) >= 0)
    refined, _, after_refined, _ = fit_piecewise(group, reference, SPEC, FitOptions(method="piecewise", refine=True))
    assert after_refined >= after


def test_low_range_untouched_by_seed_rule() -> None:
    """Claim 2: values at or below c are never changed."""
    rule = SeedMap(1.3, -80.0, 120.0)
    low = np.linspace(-1024, 120, 1000, dtype=np.float32)
    assert np.array_equal(apply_rule(rule, low), low)
    stored = np.arange(-1024, 3000, dtype=np.int16)
    out = apply_rule_stored(rule, stored + 1024, 1.0, -1024.0)
    assert np.array_equal(out[stored <= 120], stored[stored <= 120].astype(np.float32))


def test_lut_equals_float_apply_and_inverse() -> None:
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 4096, (8, 32, 32)).astype(np.int16)
    for rule in (SeedMap(0.9, 15.0, 150.0), PiecewiseMap((-100.0, 100.0, 1000.0), (-90.0, 120.0, 900.0)), None):
        via_lut = apply_rule_stored(rule, stored, 1.0, -1024.0)
        direct = apply_rule(rule, stored.astype(np.float32) - 1024.0)
        assert via_lut.dtype == np.float32 and via_lut.shape == stored.shape
        assert np.allclose(via_lut, direct, atol=1e-3)
        assert np.allclose(invert_rule(rule, direct), stored - 1024.0, atol=0.05)
    with pytest.raises(NotInvertible):
        invert_rule(SeedMap(0.5, 0.0, 100.0), np.zeros(3))


@pytest.mark.parametrize(
    ("method", "params"),
    [("seed", {"a": 0, "b": 0, "c": 0}), ("seed", {"a": 1}), ("piecewise", {"xs": [1, 0], "ys": [0, 1]}), ("x", {})],
)
def test_bad_rule_parameters(method: str, params: dict) -> None:
    with pytest.raises(RuleParameterError):
        make_map(method, params)


# -- bad input to a fit -------------------------------------------------------------------------------------
def test_one_group_only() -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(FitError, match="at least two"):
        fit_groups({"CT|a|b|c|d|e": [image_histogram(_sample(rng), SPEC)]}, SPEC)


def test_empty_histograms() -> None:
    rng = np.random.default_rng(9)
    groups = {"CT|a|b|c|d|e": [image_histogram(_sample(rng), SPEC)], "CT|x|b|c|d|e": [np.zeros(SPEC.n_bins)]}
    with pytest.raises(FitError, match="CT\\|x"):
        fit_groups(groups, SPEC)
    with pytest.raises(FitError, match="empty"):
        fit_seed(np.zeros(SPEC.n_bins), groups["CT|a|b|c|d|e"][0], SPEC)


def test_constant_images() -> None:
    rng = np.random.default_rng(10)
    constant = image_histogram(np.full((32, 32), 40.0), SPEC)
    groups = {"CT|a|b|c|d|e": [image_histogram(_sample(rng), SPEC)], "CT|x|b|c|d|e": [constant, constant]}
    with pytest.raises(FitError, match="constant"):
        fit_groups(groups, SPEC)


def test_unknown_reference_and_bad_options() -> None:
    rng = np.random.default_rng(11)
    h = image_histogram(_sample(rng), SPEC)
    with pytest.raises(FitError, match="reference"):
        fit_groups({"A": [h], "B": [h]}, SPEC, reference="C")
    with pytest.raises(FitError):
        FitOptions(method="magic")


def test_reference_is_largest_group() -> None:
    rng = np.random.default_rng(12)
    h = [image_histogram(_sample(rng, 20_000), SPEC) for _ in range(5)]
    g = image_histogram(SeedMap(1.1, -15.0, 150.0).inverse(_sample(rng, 20_000)), SPEC)
    result = fit_groups({"CT|a|b|c|d|e": h, "CT|x|b|c|d|e": [g, g]}, SPEC)
    assert result.reference_key == "CT|a|b|c|d|e"
    ref, other = result.group("CT|a|b|c|d|e"), result.group("CT|x|b|c|d|e")
    assert ref.reference and ref.method == "identity" and ref.n_images == 5
    assert other.n_images == 2 and other.similarity_after > other.similarity_before


# -- the check on simulated studies ------------------------------------------------------------------
def _held_out_jsd(simulate, conditions, fit_seeds, test_seeds, kind, spec, options):  # noqa: ANN001, ANN202
    def histograms(cond, seeds):  # noqa: ANN001, ANN202
        out = []
        for s in seeds:
            study = simulate(kind, cond, s, "test")
            for ds in study.datasets:
                out.append(
                    stored_histogram(
                        ds.pixel_array, float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0)), spec
                    )
                )
        return out

    names = list(conditions)
    fit_h = {n: histograms(conditions[n], [s + 97 * i for s in fit_seeds]) for i, n in enumerate(names)}
    test_h = {n: histograms(conditions[n], [s + 97 * i for s in test_seeds]) for i, n in enumerate(names)}
    result = fit_groups(fit_h, spec, options, reference=names[0])
    ref_test = average_histogram(test_h[names[0]])[0]
    report = {}
    for g in result.groups:
        if g.reference:
            continue
        held = average_histogram(test_h[g.key])[0]
        report[g.key] = (
            js_divergence(held, ref_test),
            js_divergence(transform_histogram(held, spec, g.mapping), ref_test),
        )
    return report


def test_simulated_ct_and_mra_held_out() -> None:
    simulate = pytest.importorskip("simulator.studies")
    base = simulate.CONDITIONS["ge-revolution-standard"]
    # conditions that differ from the reference by the vendor calibration of the bright range (and kVp)
    calibration = {
        "reference": base,
        "cal-steep": dataclasses.replace(base, name="cal-steep", model="X1", calib_slope=1.10, calib_curve=0.03),
        "cal-flat": dataclasses.replace(base, name="cal-flat", model="X2", calib_slope=0.90, calib_knee=150.0),
        "cal-bent": dataclasses.replace(
            base, name="cal-bent", model="X3", calib_slope=1.05, calib_knee=90.0, calib_curve=0.05
        ),
        "cal-low": dataclasses.replace(base, name="cal-low", model="X4", calib_slope=0.92, calib_curve=-0.03),
        "cal-100kv": dataclasses.replace(base, name="cal-100kv", model="X5", kvp=100, calib_slope=1.06),
    }
    report = _held_out_jsd(simulate.simulate_study, calibration, [1, 2], [3, 4], "head-cta", CT_SPEC, FitOptions())
    for key, (before, after) in report.items():
        assert after < 0.3 * before, (key, before, after)
    # the built-in CT conditions (kernel and dose too) and the MRA ones: never worse, and better on average
    ct = {n: c for n, c in simulate.CONDITIONS.items() if c.modality == "CT"}
    assert len(ct) >= 6
    report = _held_out_jsd(simulate.simulate_study, ct, [1], [2], "head-cta", CT_SPEC, FitOptions())
    assert all(after <= before + 1e-3 for before, after in report.values())
    assert np.mean([a for _, a in report.values()]) < 0.8 * np.mean([b for b, _ in report.values()])
    from rules.histogram import MR_SPEC

    mr = {n: c for n, c in simulate.CONDITIONS.items() if c.modality == "MR"}
    assert len(mr) >= 3
    report = _held_out_jsd(
        simulate.simulate_study, mr, [1], [2], "head-mra", MR_SPEC, FitOptions(scale_bounds=(0.1, 10.0))
    )
    assert all(after < 0.5 * before for before, after in report.values()), report
