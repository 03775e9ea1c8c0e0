"""The one hit rule: the sac-tight count (primary) and the older reach rule beside it, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.hits import (
    PRIMARY,
    REACH,
    SAC_TIGHT,
    count_hits,
    hit_reach,
    lesion_hits,
    rule_named,
    within_lesion,
)


def test_the_primary_count_is_sac_tight():
    assert PRIMARY is SAC_TIGHT and PRIMARY.card()["name"] == "sac-tight"


def test_a_finding_one_mm_outside_a_2_mm_sac_is_a_miss_by_the_sac_tight_count_and_a_hit_by_the_old_one():
    sac, finding = [[10.0, -5.0, 30.0]], [[10.0, -5.0, 32.0]]  # 2 mm sac: radius 1 mm; the finding 2 mm away
    assert count_hits(finding, sac, [2.0]) == (0, 1)  # the default rule: a false positive and a missed sac
    assert count_hits(finding, sac, [2.0], SAC_TIGHT) == (0, 1)
    assert count_hits(finding, sac, [2.0], REACH) == (1, 0)  # within max(1, 3) + 1.5 = 4.5 mm


@pytest.mark.parametrize(
    ("findings", "sac_tight", "reach"),
    [
        ([], (0, 0), (0, 0)),
        ([[0.0, 0.0, 0.0]], (1, 0), (1, 0)),  # on the centre
        ([[1.4, 0.0, 0.0]], (1, 0), (1, 0)),  # inside the 3 mm sac (radius 1.5)
        ([[1.5, 0.0, 0.0]], (0, 1), (1, 0)),  # on its surface: LUNA16 counts strictly inside
        ([[4.5, 0.0, 0.0]], (0, 1), (1, 0)),  # a 3 mm lesion reaches max(1.5, 3) + 1.5 = 4.5 mm by the old rule
        ([[4.6, 0.0, 0.0]], (0, 1), (0, 1)),  # beyond both
        ([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], (1, 0), (1, 0)),  # two marks on one lesion: once, neither an FP
        ([[0.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 80.0]], (1, 2), (1, 2)),
    ],
)
def test_hits_and_false_positives_of_one_small_lesion(findings, sac_tight, reach):
    assert count_hits(findings, [[0.0, 0.0, 0.0]], [3.0], SAC_TIGHT) == sac_tight
    assert count_hits(findings, [[0.0, 0.0, 0.0]], [3.0], REACH) == reach


def test_a_large_lesion_reaches_half_its_diameter_and_by_the_old_rule_a_margin():
    centre = [[10.0, 20.0, 30.0]]
    assert within_lesion(20.0) == 10.0 and hit_reach(20.0) == 11.5
    assert count_hits([[10.0, 20.0, 39.9]], centre, [20.0]) == (1, 0)
    assert count_hits([[10.0, 20.0, 41.5]], centre, [20.0]) == (0, 1)
    assert count_hits([[10.0, 20.0, 41.5]], centre, [20.0], REACH) == (1, 0)
    assert count_hits([[10.0, 20.0, 41.6]], centre, [20.0], REACH) == (0, 1)


def test_one_finding_inside_two_overlapping_sacs_finds_both():
    # as the FROC counts it (the LUNA16 convention): one mark inside two lesions finds both
    centres = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    assert count_hits(np.array([[1.0, 0, 0]]), centres, np.array([6.0, 2.5])) == (2, 0)


@pytest.mark.parametrize("rule", [SAC_TIGHT, REACH])
def test_count_hits_is_the_rule_the_evaluation_uses(rule):
    rng = np.random.default_rng(0)
    findings = rng.uniform(-10, 10, size=(80, 3))
    centres = rng.uniform(-8, 8, size=(5, 3))
    diameters = rng.uniform(2.0, 12.0, size=5)
    lesions = [{"center_mm": c, "diameter_mm": d} for c, d in zip(centres, diameters, strict=True)]
    hits = lesion_hits(findings, lesions, rule)
    tp, fp = count_hits(findings, centres, diameters, rule)
    assert (tp, fp) == (int(hits.any(axis=0).sum()), int((~hits.any(axis=1)).sum()))
    assert 0 < tp and 0 < fp  # the draw exercises both
    d = np.linalg.norm(findings[:, None] - centres[None], axis=2)
    assert np.array_equal(hits, d < diameters / 2 if rule is SAC_TIGHT else d <= np.maximum(diameters / 2, 3) + 1.5)


def test_a_reach_function_still_counts_as_before():
    beside = np.array([[5.0, 0, 0]])  # 3 mm from a 2.5 mm sac's centre: within the 4.5 mm reach, not in the sac
    lesions = [{"center_mm": [2.0, 0, 0], "diameter_mm": 2.5}]
    assert lesion_hits(beside, lesions, hit_reach).tolist() == [[True]]
    assert lesion_hits(beside, lesions, within_lesion).tolist() == [[False]]
    assert lesion_hits(beside, lesions).tolist() == [[False]]


def test_no_lesions_makes_every_finding_a_false_positive():
    assert count_hits([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [], []) == (0, 2)


def test_mismatched_truth_and_unknown_rules_are_refused():
    with pytest.raises(ValueError, match="2 lesion centres but 1 diameters"):
        count_hits([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], [3.0])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        count_hits([[0.0, 0.0]], [[0.0, 0.0, 0.0]], [3.0])
    with pytest.raises(ValueError, match="no hit rule 'near'; the rules are sac-tight, reach"):
        rule_named("near")
    assert rule_named("reach") is REACH
