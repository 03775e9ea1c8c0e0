"""The shipped card's evaluation was counted by today's hit rule, with both counts and the CPM."""

from __future__ import annotations

import json

import pytest

from models.detector import CARD_NAME, WEIGHTS_DIR
from models.training.hits import FP_RATES, PRIMARY, SECOND

card_path = WEIGHTS_DIR / CARD_NAME


@pytest.mark.skipif(not card_path.exists(), reason="no shipped card")
def test_the_shipped_cards_figures_were_counted_by_todays_rule():
    evaluation = json.loads(card_path.read_text())["evaluation"]
    named = evaluation["hit_rule"]
    assert isinstance(named, dict), "the card's figures predate named hit rules: re-count them (README, Detection)"
    assert (named["name"], named["version"]) == (PRIMARY.name, PRIMARY.version), (
        "the hit rule changed: harmonode evaluate --from-candidates DIR --update-card"
    )
    assert (evaluation["second_rule"]["name"], evaluation["second_rule"]["version"]) == (SECOND.name, SECOND.version)
    for figures in (evaluation, evaluation["second"], *evaluation["per_kind"].values()):
        assert set(figures["sensitivity_at_fp"]) == set(FP_RATES)
        assert figures["cpm"] == pytest.approx(sum(figures["sensitivity_at_fp"].values()) / 7)
    assert evaluation["cases"] == 80 and evaluation["model"] == json.loads(card_path.read_text())["version"]
