"""count_hits: one series' findings against its true lesions, by the project's one hit rule."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.evaluate import count_hits, hit_reach, lesion_hits


@pytest.mark.parametrize(
    ("findings", "expected"),
    [
        ([], (0, 0)),
        ([[0.0, 0.0, 0.0]], (1, 0)),  # on the centre
        ([[4.5, 0.0, 0.0]], (1, 0)),  # a 3 mm lesion reaches max(1.5, 3) + 1.5 = 4.5 mm
        ([[4.6, 0.0, 0.0]], (0, 1)),  # just beyond: a false positive
        ([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], (1, 0)),  # two marks on one lesion: it counts once, neither is an FP
        ([[0.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 80.0]], (1, 2)),
    ],
)
def test_hits_and_false_positives_of_one_small_lesion(findings, expected):
    assert count_hits(findings, [[0.0, 0.0, 0.0]], [3.0]) == expected


def test_a_large_lesion_reaches_half_its_diameter_and_a_margin():
    centre = [[10.0, 20.0, 30.0]]
    assert hit_reach(20.0) == 11.5
    assert count_hits([[10.0, 20.0, 41.5]], centre, [20.0]) == (1, 0)
    assert count_hits([[10.0, 20.0, 41.6]], centre, [20.0]) == (0, 1)


def test_one_finding_between_two_sacs_finds_both():
    # as the FROC counts it (the LUNA16 convention): one mark within reach of two lesions finds both
    centres = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    assert count_hits(np.array([[1.0, 0, 0]]), centres, np.array([6.0, 2.5])) == (2, 0)


def test_count_hits_is_the_rule_the_evaluation_uses():
    rng = np.random.default_rng(0)
    findings = rng.uniform(-10, 10, size=(60, 3))
    centres = rng.uniform(-8, 8, size=(5, 3))
    diameters = rng.uniform(2.0, 12.0, size=5)
    hits = lesion_hits(findings, [{"center_mm": c, "diameter_mm": d} for c, d in zip(centres, diameters, strict=True)])
    tp, fp = count_hits(findings, centres, diameters)
    assert (tp, fp) == (int(hits.any(axis=0).sum()), int((~hits.any(axis=1)).sum()))
    assert 0 < tp and 0 < fp  # the draw exercises both


def test_no_lesions_makes_every_finding_a_false_positive():
    assert count_hits([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [], []) == (0, 2)


def test_mismatched_truth_is_refused():
    with pytest.raises(ValueError, match="2 lesion centres but 1 diameters"):
        count_hits([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], [3.0])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        count_hits([[0.0, 0.0]], [[0.0, 0.0, 0.0]], [3.0])
