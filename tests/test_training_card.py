"""The model card: the input normalisation it carries and the detector checks, what training writes into it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.detector import (
    CARD_NAME,
    MR_PERCENTILE,
    WEIGHTS_DIR,
    Detector,
    WeightsRefused,
    check_normalisation,
    input_normalisation,
)
from models.nets import MiniVGG, NetConfig
from models.patches import CLIP, CT_SCALE, PATCH_CEILING, apply_ceiling, normalise
from models.training.card import LesionRecipe, lesion_card, store_evaluation, write_card
from models.training.data import EVAL_SUBJECTS_FROM, SubjectsOutOfRange, check_eval_subjects, held_out_plan
from models.training.hits import PRIMARY

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "lesion.pt").exists(), reason="no shipped weights")


def test_the_constants_describe_what_normalise_does():
    # what the card carries must be what the code applies: a changed literal in models.patches fails here
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, size=(16, 20, 20)).astype(np.float32)  # < 32 slices: every slice is sampled
    expected = np.clip(mr / np.percentile(mr, MR_PERCENTILE), *CLIP)
    np.testing.assert_allclose(normalise(mr, "MR"), expected, rtol=1e-5)
    assert not np.allclose(normalise(mr, "MR"), np.clip(mr / np.percentile(mr, 99.0), *CLIP), rtol=1e-3)
    ct = rng.uniform(-1500, 3000, size=(8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(normalise(ct, "CT"), np.clip(ct / CT_SCALE, *CLIP), rtol=1e-6)
    assert apply_ceiling(normalise(ct, "CT"), "head").max() == np.float32(PATCH_CEILING["head"])
    assert input_normalisation() == {
        "ct_scale": CT_SCALE,
        "clip": list(CLIP),
        "patch_ceiling": PATCH_CEILING,
        "mr_percentile": MR_PERCENTILE,
    }


def test_the_shipped_card_names_the_codes_normalisation():
    card = json.loads((WEIGHTS_DIR / CARD_NAME).read_text())
    assert card["normalisation"] == input_normalisation()
    check_normalisation(card)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"ct_scale": 500.0}, "ct_scale 500.0, the code's 400.0"),
        ({"clip": [-3.0, 4.0]}, "clip [-3.0, 4.0], the code's [-3.0, 5.0]"),
        ({"patch_ceiling": {}}, 'patch_ceiling {}, the code\'s {"head": 2.0}'),
        ({"mr_percentile": 99.5}, "mr_percentile 99.5, the code's 99.9"),
    ],
)
def test_a_card_with_other_constants_is_refused(change, said):
    card = {"normalisation": {**input_normalisation(), **change}}
    with pytest.raises(WeightsRefused) as refused:
        check_normalisation(card)
    assert str(refused.value) == (
        f"model card lesion.json normalisation differs from the code's ({said}): refused (the networks were "
        "trained on other input values)"
    )


def test_a_card_without_normalisation_is_refused():
    with pytest.raises(WeightsRefused, match="names no input normalisation"):
        check_normalisation({"version": "1.0"})


def copy_shipped(folder: Path) -> dict:
    card = json.loads((WEIGHTS_DIR / CARD_NAME).read_text())
    for name in ("lesion.pt", CARD_NAME, *(m["file"] for m in card.get("members", []))):
        shutil.copy(WEIGHTS_DIR / name, folder / name)
    return card


@needs_weights
def test_load_refuses_weights_whose_card_has_other_constants(tmp_path: Path):
    card = copy_shipped(tmp_path)
    Detector.load(device="cpu", weights_dir=tmp_path)  # intact copy loads
    card["normalisation"]["ct_scale"] = 1000.0
    (tmp_path / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(WeightsRefused, match=r"ct_scale 1000.0, the code's 400.0\): refused"):
        Detector.load(device="cpu", weights_dir=tmp_path)
    del card["normalisation"]
    (tmp_path / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(WeightsRefused, match="names no input normalisation"):
        Detector.load(device="cpu", weights_dir=tmp_path)


def test_a_trained_networks_card_carries_the_recipe_and_the_normalisation(tmp_path: Path):
    recipe = LesionRecipe(studies=12, head_studies=40, rescan=True, views=("planes", "mip"), fine_candidates=20)
    metrics = {"studies_per_kind": {"head-cta": 40, "head-mra": 40, "chest-ct": 12}, "threshold_at_1fp_validation": {}}
    card = lesion_card(recipe, metrics, {"top1": 0.9}, pretrained=True, version="9.9.9")
    assert card["normalisation"] == input_normalisation()
    assert card["views"] == ["planes", "mip"] and card["fine_candidates"] == {"head": 20}
    assert card["training"]["command"].endswith(
        "--studies 12 --head-studies 40 --test-size-studies 6 --size eval --epochs 16 --mine 5 --seed 0"
        " --lesions-per-study 4 --rescan --views planes,mip --fine-candidates 20"
    )
    assert "models.training.data.rescanned" in card["training"]["rescan_augmentation"]
    weights = tmp_path / "lesion.pt"
    torch.save({"config": {}, "state_dict": {}}, weights)
    written = json.loads(write_card(weights, card).read_text())
    assert written["file"] == "lesion.pt" and written["size_bytes"] == weights.stat().st_size
    check_normalisation(written)


def test_a_detector_built_from_a_new_card_reads_it():
    metrics = {"studies_per_kind": {}, "threshold_at_1fp_validation": {"head": 0.6, "chest": 0.3}}
    card = lesion_card(LesionRecipe(views=("planes", "zoom")), metrics, {}, pretrained=False, version="t")
    detector = Detector(MiniVGG(NetConfig(in_channels=6)), card, torch.device("cpu"))
    assert detector.views == ("planes", "zoom") and detector.thresholds == {"head": 0.6, "chest": 0.3}


def test_the_evaluation_is_stored_with_the_hit_rule(tmp_path: Path):
    (tmp_path / CARD_NAME).write_text(json.dumps({"version": "t", "evaluation": {"old": True}}))
    store_evaluation(tmp_path, {"cases": 3, "model": "t"}, studies=2, size="test", subjects_from=52500)
    evaluation = json.loads((tmp_path / CARD_NAME).read_text())["evaluation"]
    assert evaluation == {
        "command": "harmonode evaluate --studies 2 --size test --subjects-from 52500 --update-card",
        "held_out_studies_per_condition": 2,
        "subjects_from": 52500,
        "size": "test",
        "hit_rule": PRIMARY.card(),
        "cases": 3,
        "model": "t",
    }


def test_the_held_out_plan_stays_in_the_evaluation_subjects():
    plan = held_out_plan(2, "test")
    assert len(plan) == 2 * (4 + 2 + 4) and min(seed for *_, seed, _ in plan) == EVAL_SUBJECTS_FROM
    assert {cond for kind, cond, *_ in plan if kind == "head-mra"} == {"ge-signa-1.5t-tof", "philips-ingenia-3t-tof"}
    check_eval_subjects(EVAL_SUBJECTS_FROM, 8)
    with pytest.raises(SubjectsOutOfRange, match="uses subjects 57990-60021"):
        check_eval_subjects(57990, 8)
    with pytest.raises(SubjectsOutOfRange, match="must lie in 50000-59999"):
        check_eval_subjects(49000, 1)
