"""The FROC read at LUNA16's seven rates and its CPM, on curves whose readings are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.hits import FP_RATES, cpm, froc_curve, froc_entries, froc_points, read_froc, threshold_at_fp


def _study(scores, hits, lesions):
    return np.asarray(scores, float), np.asarray(hits, bool).reshape(len(scores), lesions), lesions


def test_the_seven_rates_are_luna16s():
    assert FP_RATES == ("0.125", "0.25", "0.5", "1", "2", "4", "8")


def test_cpm_of_a_known_curve():
    # 8 cases, 4 lesions. Scores: TP .95, FP .9, TP .8, FP .7, FP .6, TP .5, FP .4 ... (8 FPs in all), one lesion
    # never hit. The step curve: sens 1/4 up to 1 FP (0.125 per case), 2/4 up to 3 FPs (0.375), 3/4 after.
    studies = [_study([0.95, 0.9], [[1], [0]], 1), _study([0.8, 0.7], [[1], [0]], 1)]
    studies += [_study([0.6, 0.5], [[0, 0], [0, 1]], 2)]  # its second lesion no finding hits
    studies += [_study([0.4 - 0.01 * i], [[]], 0) for i in range(5)]
    fps, sens = froc_curve(studies)
    assert fps.tolist() == [0, 0, 1 / 8, 1 / 8, 3 / 8, 3 / 8, 1.0]
    assert sens.tolist() == [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
    # LUNA16 reads the interpolated curve at the grid point nearest each rate (0.125 and 8 are on the grid;
    # 0.25 lies between 0.24942 and 0.25021, nearer the second): at 0.125, on the step itself, np.interp gives
    # its top (the TP scored above the second FP counts); 0.25, 0.5, 1, 2, 4, 8 fall on the flat parts
    readings = froc_points(studies)
    assert readings == pytest.approx(
        {"0.125": 0.5, "0.25": 0.5, "0.5": 0.75, "1": 0.75, "2": 0.75, "4": 0.75, "8": 0.75}
    )
    assert cpm(readings) == pytest.approx((0.5 + 0.5 + 0.75 * 5) / 7)


def test_a_rate_on_a_vertical_step_is_read_on_the_grid_point_beside_it():
    # 2 cases: an FP at .95, a TP at .9, an FP at .8, a TP at .3: the curve rises at 0.5 and at 1 FP per case
    studies = [_study([0.9, 0.8], [[1], [0]], 1), _study([0.95, 0.3], [[0], [1]], 1)]
    fps, sens = froc_curve(studies)
    assert fps.tolist() == [0, 0.5, 0.5, 1, 1] and sens.tolist() == [0, 0, 0.5, 0.5, 1]
    # 0.5 and 1 are read at 0.49985 and 0.99975 (the grid points nearest): just before each step
    assert froc_points(studies, (0.5, 1, 4)) == pytest.approx({"0.5": 0.0, "1": 0.5, "4": 1.0})
    assert read_froc(fps, sens, [0.75]) == pytest.approx([0.5])


def test_a_finding_on_two_lesions_finds_both_and_extra_marks_on_a_lesion_are_not_false_positives():
    studies = [_study([0.9, 0.8, 0.2], [[1, 1], [1, 0], [0, 0]], 2)]
    scores, positive, total = froc_entries(studies)
    assert sorted(zip(scores.tolist(), positive.tolist(), strict=True)) == [(0.2, False), (0.9, True), (0.9, True)]
    assert total == 2
    assert froc_points(studies)["0.125"] == 1.0


def test_a_system_without_false_positives_and_one_that_finds_nothing():
    perfect = [_study([0.9], [[1]], 1), _study([0.7], [[1]], 1)]
    assert set(froc_points(perfect).values()) == {1.0}
    blind = [_study([0.9], [[0]], 1), _study([], np.zeros((0, 1)), 1)]
    assert set(froc_points(blind).values()) == {0.0} and cpm(froc_points(blind)) == 0.0


def test_thresholds_at_a_rate():
    studies = [(np.array([0.9, 0.8, 0.7]), np.array([[0], [1], [0]])), (np.array([0.6]), np.array([[0]]))]
    assert threshold_at_fp(studies, 1.0) == 0.7  # the second false positive's score: 2 cases, 1 per case
    assert threshold_at_fp(studies, 0.5) == 0.9
    assert threshold_at_fp(studies, 4.0) == 0.5  # fewer false positives than asked
