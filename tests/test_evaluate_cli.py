"""``harmonode evaluate``'s counting: both hit rules in the printed table and in --json, from hand-made studies."""

from __future__ import annotations

import json

import numpy as np

from models.training.evaluate import StudyCandidates, summarize
from models.training.hits import FP_RATES


def hand_made(seed: int, offset_mm: float, kind: str = "head-cta", score: float = 0.9) -> StudyCandidates:
    """A study with one 2 mm sac at the origin, a finding ``offset_mm`` from it scored ``score``, and two far
    false positives scored 0.4 and 0.3."""
    mm = np.array([[offset_mm, 0.0, 0.0], [60.0, 0.0, 0.0], [0.0, 60.0, 0.0]])
    return StudyCandidates(
        kind, "cond", seed, "test", "head", mm.copy(), mm, np.full(3, 2.0), np.array([score, 0.4, 0.3], np.float32),
        np.array([1, 0, 0]), ({"center_mm": [0.0, 0.0, 0.0], "diameter_mm": 2.0},), {},
    )  # fmt: skip


def test_a_finding_beside_the_sac_counts_only_by_the_second_rule():
    beside = summarize([hand_made(0, 2.0), hand_made(1, 2.0)])  # 1 mm outside the sac: the parent artery
    inside = summarize([hand_made(0, 0.5), hand_made(1, 0.5)])
    assert beside["hit_rule"]["name"] == "sac-tight" and beside["second_rule"]["name"] == "reach"
    assert beside["cpm"] == 0.0 and beside["candidate_recall"] == 0.0
    assert beside["second"]["cpm"] == 1.0 and beside["second"]["candidate_recall"] == 1.0
    assert inside["cpm"] == 1.0 and inside["second"]["cpm"] == 1.0
    assert set(beside["sensitivity_at_fp"]) == set(FP_RATES) == set(beside["second"]["sensitivity_at_fp"])
    assert beside["auc"] == 1.0 and beside["cases"] == 2 and beside["lesions"] == 2


def test_the_printed_table_and_json_carry_both_counts():
    from node.cli.models import _table

    # two sacs found inside at 0.9; one marked beside at 0.35, after the three false positives at 0.4
    result = summarize([hand_made(0, 2.0, score=0.35), hand_made(1, 0.5), hand_made(2, 0.5, "head-mra")])
    text = _table(result, "held out")
    lines = text.splitlines()
    assert "sac-tight" in text and "reach" in lines[1] and "CPM" in lines[1] and "FP0.125" in lines[1]
    overall = lines[2].split()
    assert overall[0] == "overall" and overall[3:10] == ["0.67"] * 7  # 2 of 3 sacs by the sac-tight count
    # by the reach rule the third is found at the fourth FP: 2/3 up to 1 FP per case (read at 0.99975), 1 after
    assert overall[10] == "0.667" and overall[-3:] == ["0.67", "0.67", f"{(4 * 2 / 3 + 3) / 7:.3f}"]
    out = json.loads(json.dumps(result))  # --json prints the summary as is
    assert out["cpm"] == 2 / 3 and abs(out["second"]["cpm"] - (4 * 2 / 3 + 3) / 7) < 1e-12
