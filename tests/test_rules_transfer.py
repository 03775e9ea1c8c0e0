"""Seed 001's per-region mean/std transfer: statistics, Reinhard transfer, neighbourhood search, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from rules.transfer import (
    ParameterSet,
    RegionStats,
    neighbours,
    parameter_distance,
    region_labels,
    region_statistics,
    reinhard_transfer,
    sample_neighbours,
)

CUTS = (-500.0, 150.0)  # air | soft tissue | contrast and bone (HU)


def ct_like(rng: np.random.Generator, shape: tuple[int, ...] = (4, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated classes with known statistics, and their true label map."""
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)
    means, stds = np.array([-1000.0, 40.0, 600.0]), np.array([20.0, 30.0, 80.0])
    values = (means[labels] + stds[labels] * rng.standard_normal(shape)).astype(np.float32)
    return values, labels


def test_region_labels_cut_at_thresholds() -> None:
    values = np.array([-1000, -500, -499, 149, 150, 3000], np.int16)
    assert region_labels(values, CUTS).tolist() == [0, 1, 1, 1, 2, 2]
    assert region_labels(values, ()).tolist() == [0] * 6


def test_statistics_recovered_per_region() -> None:
    rng = np.random.default_rng(1)
    values, labels = ct_like(rng)
    stats = region_statistics(values, labels=labels)
    for k in range(3):
        sel = values[labels == k].astype(np.float64)
        assert stats.regions[k].n == sel.size
        assert stats.regions[k].mean == pytest.approx(sel.mean(), rel=1e-9, abs=1e-6)
        assert stats.regions[k].std == pytest.approx(sel.std(), rel=1e-6)
    # thresholds recover the same classes here (the classes do not overlap)
    cut = region_statistics(values, thresholds=CUTS)
    assert cut.thresholds == CUTS
    np.testing.assert_allclose(cut.vector, stats.vector, rtol=1e-9)
    np.testing.assert_allclose(cut.vector, [[-1000, 20], [40, 30], [600, 80]], rtol=0.05)


def test_statistics_accurate_for_large_offset_small_spread() -> None:
    values = np.full(10_000, 3000.0) + np.tile([-0.5, 0.5], 5_000)
    stats = region_statistics(values)
    assert stats.regions[0].mean == pytest.approx(3000.0)
    assert stats.regions[0].std == pytest.approx(0.5, rel=1e-9)


def test_empty_region_has_no_statistics() -> None:
    values = np.array([[-900.0, 50.0], [60.0, -800.0]])
    stats = region_statistics(values, thresholds=CUTS)
    assert stats.regions[2] == RegionStats(0.0, 0.0, 0) and stats.regions[2].empty
    assert region_statistics(values, labels=np.zeros((2, 2), int), n_regions=3).regions[1].empty


def test_transfer_reaches_target_statistics_per_region() -> None:
    rng = np.random.default_rng(2)
    values, labels = ct_like(rng)
    target = ParameterSet.of([(-950.0, 10.0), (60.0, 15.0), (450.0, 120.0)], name="scanner-B")
    out = reinhard_transfer(values, target, labels=labels)
    assert out.dtype == np.float32 and out.shape == values.shape
    after = region_statistics(out, labels=labels)
    np.testing.assert_allclose(after.vector, target.vector, rtol=1e-4, atol=1e-2)
    # the formula itself, pixel by pixel, in one region
    src = region_statistics(values, labels=labels).regions[1]
    sel = labels == 1
    expected = (values[sel] - src.mean) / src.std * 15.0 + 60.0
    np.testing.assert_allclose(out[sel], expected, rtol=1e-5, atol=1e-3)


def test_low_regions_untouched_when_asked() -> None:
    rng = np.random.default_rng(3)
    values, _ = ct_like(rng)
    target = ParameterSet.of([(-950.0, 10.0), (60.0, 15.0), (450.0, 120.0)], thresholds=CUTS)
    out = reinhard_transfer(values, target, keep_regions=(0,))
    low = values < CUTS[0]
    assert np.array_equal(out[low], values[low])  # bit-identical: gain 1, offset 0
    assert not np.allclose(out[~low], values[~low])
    changed = region_statistics(out, labels=region_labels(values, CUTS))
    np.testing.assert_allclose(changed.vector[1:], target.vector[1:], rtol=1e-4, atol=1e-2)


def test_constant_source_region_goes_to_target_mean() -> None:
    values = np.array([0.0, 0.0, 100.0, 300.0])
    target = ParameterSet.of([(5.0, 2.0), (250.0, 50.0)], thresholds=(50.0,))
    out = reinhard_transfer(values, target)
    np.testing.assert_allclose(out, [5.0, 5.0, 200.0, 300.0])


def test_transfer_to_own_statistics_is_identity_and_integers_accepted() -> None:
    rng = np.random.default_rng(4)
    values = rng.integers(-1024, 2000, size=(8, 32, 32)).astype(np.int16)
    own = region_statistics(values, thresholds=CUTS)
    np.testing.assert_allclose(reinhard_transfer(values, own), values, atol=1e-2)


def test_neighbourhood_search_radius_and_box() -> None:
    centre = ParameterSet.of([(100.0, 20.0)])
    stored = [ParameterSet.of([p]) for p in [(103.0, 24.0), (100.0, 20.0), (90.0, 20.0), (101.0, 21.0), (96.0, 17.0)]]
    # distances: 5, 0, 10, sqrt 2, 5
    found = neighbours(centre, stored, radius=5.0)
    assert [i for i, _ in found] == [1, 3]  # strictly inside R; 5.0 is on the boundary
    assert found[1][1] == pytest.approx(np.sqrt(2))
    assert [i for i, _ in neighbours(centre, stored, radius=5.01)] == [1, 3, 0, 4]  # ties by index
    box = neighbours(centre, stored, mean_tolerance=4.0, std_tolerance=4.5)
    assert [i for i, _ in box] == [1, 3, 0]  # |Δmean| 3 < 4 and |Δstd| 4 < 4.5; 4 fails |Δmean| 4 < 4
    # several regions: the distance runs over all of them, like parameter_distance
    two = ParameterSet.of([(0.0, 1.0), (10.0, 2.0)])
    cands = [ParameterSet.of([(0.0, 1.0), (13.0, 6.0)]), ParameterSet.of([(3.0, 1.0), (10.0, 2.0)])]
    assert neighbours(two, cands, radius=5.5) == [(1, 3.0), (0, 5.0)]
    assert parameter_distance(two, cands[0]) == pytest.approx(5.0)
    assert neighbours(centre, [], radius=1.0) == []


def test_brute_force_agrees_with_neighbourhood_search() -> None:
    rng = np.random.default_rng(5)
    centre = ParameterSet.of([(0.0, 10.0), (50.0, 5.0)])
    cands = [ParameterSet.of(rng.normal([[0, 10], [50, 5]], 3.0).clip(0.01)) for _ in range(300)]
    fast = [i for i, _ in neighbours(centre, cands, radius=4.0)]
    slow = sorted((parameter_distance(centre, c), i) for i, c in enumerate(cands))
    assert fast == [i for d, i in slow if d < 4.0] and 0 < len(fast) < 300


def test_sampled_neighbours_lie_inside_radius() -> None:
    centre = ParameterSet.of([(40.0, 0.5), (300.0, 60.0)], thresholds=(150.0,))
    near = sample_neighbours(centre, 3.0, 200, np.random.default_rng(6))
    assert len(near) == 200 and all(p.thresholds == centre.thresholds for p in near)
    assert max(parameter_distance(centre, p) for p in near) < 3.0
    assert min(r.std for p in near for r in p.regions) >= 0  # reflected at 0 near a small std
    assert len({p.vector.tobytes() for p in near}) == 200


def test_parameter_set_round_trips_as_dict() -> None:
    stats = region_statistics(np.arange(100.0), thresholds=(50.0,), name="series-1")
    assert ParameterSet.from_dict(stats.as_dict()) == stats


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: region_statistics(np.array([])), "empty"),
        (lambda: region_statistics(np.array([1.0, np.nan])), "non-finite"),
        (lambda: region_statistics(np.zeros(3), thresholds=(5.0, 1.0)), "strictly increasing"),
        (lambda: region_statistics(np.zeros(3), labels=np.zeros(4, int)), "shape"),
        (lambda: region_statistics(np.zeros(3), labels=np.zeros(3)), "integers"),
        (lambda: region_statistics(np.zeros(3), labels=np.array([0, 1, 3]), n_regions=3), r"\[0, 2\]"),
        (lambda: region_statistics(np.zeros(3), labels=np.zeros(3, int), thresholds=(1.0,)), "not both"),
        (lambda: RegionStats(1.0, -1.0), "≥ 0"),
        (lambda: RegionStats(np.inf, 1.0), "finite"),
        (lambda: ParameterSet(()), "at least one region"),
        (lambda: ParameterSet.of([(0, 1), (1, 1)], thresholds=(1.0, 2.0)), "3 regions"),
        (lambda: ParameterSet.from_dict({"regions": [{"mean": 1}]}), "malformed"),
        (lambda: reinhard_transfer(np.zeros(4), ParameterSet.of([(0, 1)]), labels=np.array([0, 0, 1, 0])), r"\[0, 0\]"),
        (lambda: reinhard_transfer(np.zeros(2), ParameterSet.of([(0, 1)]), keep_regions=(1,)), "keep_regions"),
        (
            lambda: reinhard_transfer(
                np.array([0.0, 9.0]), ParameterSet((RegionStats(0, 1), RegionStats(0, 0, 0)), (5.0,))
            ),
            r"no statistics \(n = 0\) for region\(s\) \[1\]",
        ),
        (lambda: neighbours(ParameterSet.of([(0, 1)]), [], radius=-1.0), "> 0"),
        (lambda: neighbours(ParameterSet.of([(0, 1)]), [], radius=1.0, mean_tolerance=1.0), "either radius"),
        (lambda: neighbours(ParameterSet.of([(0, 1)]), [], mean_tolerance=1.0), "either radius"),
        (lambda: neighbours(ParameterSet.of([(0, 1)]), [ParameterSet.of([(0, 1), (2, 1)])], radius=1.0), "regions"),
        (lambda: parameter_distance(ParameterSet.of([(0, 1)]), ParameterSet.of([(0, 1), (2, 1)])), "regions"),
        (lambda: sample_neighbours(ParameterSet.of([(0, 1)]), 0.0, 3, np.random.default_rng()), "radius"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()
