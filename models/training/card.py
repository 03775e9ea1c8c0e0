"""The detector's model card: written after training, made from a recipe sweep, updated with the held-out FROC.

A card (``models/weights/lesion.json``) sits next to its weights and names everything the detector needs to read
them as they were trained: sha256 of every network, threshold per body part, patch size, views, flips, fine
candidates and the input normalisation (``models.detector.input_normalisation``), beside how the networks were
trained and what they measured.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.detector import CARD_NAME, TTA, WEIGHTS_NAME, input_normalisation, sha256_of
from models.training.data import (
    HELD_OUT_CONDITIONS,
    KINDS,
    REFERENCE,
    RESCAN_NOTE,
    SEEDS,
    TRAIN_CONDITIONS,
    load_or_fit_rules,
)
from models.training.sweep import RECIPE_VIEWS
from models.training.train import calibrate_thresholds, load_checkpoint, save_checkpoint, train_lesions

NAME = "harmonode lesion detector (2.5D mini-VGG, seed 002)"
TASK = {"head": "aneurysm (CTA, TOF-MRA)", "chest": "nodule (CT)"}


class CardError(ValueError):
    """A sweep's networks that cannot become a model card."""


def write_card(weights: Path, card: dict[str, Any]) -> Path:
    """Write the model card next to ``weights`` with the file's sha256 and size.

    Parameters
    ----------
    weights
        The card's first network (``lesion.pt``); the card goes to the same name with ``.json``.
    card
        Everything else the card says.

    Returns
    -------
    Path
        The card written.
    """
    card = {**card, "file": weights.name, "sha256": sha256_of(weights), "size_bytes": weights.stat().st_size}
    path = weights.with_suffix(".json")
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


@dataclass(frozen=True)
class LesionRecipe:
    """How ``harmonode train lesions`` trains a network (its options; ``train_lesions`` says each)."""

    studies: int = 40
    head_studies: int | None = None
    test_size_studies: int = 6
    size: str = "eval"
    epochs: int = 16
    mine: int = 5
    lesions_per_study: int = 4
    width: int = 16
    seed: int = 0
    harmonize: bool = True
    rescan: bool = False
    subjects_from: int | None = None
    compare_scratch: bool = False
    views: tuple[str, ...] = ("planes",)
    fine_candidates: int = 0
    extra_patches: Path | None = None
    extend: tuple[str, ...] = ()  # kind/condition cells extended by inverse rules (data extension)

    def extension(self) -> dict[str, tuple[str, ...]] | None:
        """``extend`` as ``{kind: conditions}`` (None when empty)."""
        out: dict[str, tuple[str, ...]] = {}
        for cell in self.extend:
            kind, _, cond = cell.partition("/")
            out[kind] = (*out.get(kind, ()), cond)
        return out or None

    def command(self) -> str:
        """The commands that train a network so (written into the card)."""
        return (
            f"harmonode train landmarks --studies 8 --epochs 12 --seed {self.seed} && harmonode train lesions "
            f"--studies {self.studies}"
            + (f" --head-studies {self.head_studies}" if self.head_studies else "")
            + f" --test-size-studies {self.test_size_studies} --size {self.size} --epochs {self.epochs} "
            f"--mine {self.mine} --seed {self.seed}"
            + (f" --lesions-per-study {self.lesions_per_study}" if self.lesions_per_study else "")
            + (" --rescan" if self.rescan else "")
            + (f" --subjects-from {self.subjects_from}" if self.subjects_from is not None else "")
            + (f" --views {','.join(self.views)}" if self.views != ("planes",) else "")
            + (f" --fine-candidates {self.fine_candidates}" if self.fine_candidates else "")
            + (f" --extra-patches {self.extra_patches}" if self.extra_patches else "")
            + (f" --extend-with-inverse-rules --scarce {','.join(self.extend)}" if self.extend else "")
        )


@dataclass(frozen=True)
class TrainedCard:
    """A trained network and its card: where both are, and what training measured."""

    checkpoint: Path
    card: Path
    metrics: dict[str, Any]


def lesion_card(
    recipe: LesionRecipe, metrics: dict[str, Any], landmark: dict[str, Any], pretrained: bool, version: str
) -> dict[str, Any]:
    """The card of one network trained by ``recipe`` (without the file's checksum: ``write_card`` adds it).

    Parameters
    ----------
    recipe
        How it was trained.
    metrics
        What ``train_lesions`` returned.
    landmark
        The landmark checkpoint's metrics (empty when trained from scratch).
    pretrained
        Whether it started from the landmark trunk.
    version
        The card's version.

    Returns
    -------
    dict
    """
    from models.patches import PATCH_MM
    from simulator.studies import GEOMETRY

    size = recipe.size
    training = {
        "command": recipe.command(),
        "data": (
            f"harmonode simulate: {metrics['studies_per_kind']} studies at size={size} "
            f"(simulator.studies.GEOMETRY) + {recipe.test_size_studies} per kind at size=test; landmarks at size=test"
        ),
        "size": size,
        "geometry": {
            kind: dict(zip(("slices", "matrix", "pixel_mm", "slice_mm"), GEOMETRY[(kind, size)][:4], strict=True))
            for kind in KINDS
        },
        "studies_per_kind": metrics["studies_per_kind"],
        "test_size_studies_per_kind": recipe.test_size_studies,
        "hard_negatives": f"{recipe.mine} negatives per positive each epoch, half the highest-scored by the model",
        "rescan_augmentation": RESCAN_NOTE if recipe.rescan else None,
        "seeds_from": SEEDS,
        "train_conditions": TRAIN_CONDITIONS,
        "held_out_conditions": HELD_OUT_CONDITIONS,
        "harmonization": (
            f"seed-000 rules (a, b, c) per condition fitted from unlabeled studies against {REFERENCE}"
            if recipe.harmonize
            else "none (raw values)"
        ),
        "init": "landmark pretraining" if pretrained else "scratch",
        "landmark_pretraining": landmark,
    }
    return {
        "name": NAME,
        "version": version,
        "created": dt.date.today().isoformat(),
        "task": TASK,
        "threshold": metrics["threshold_at_1fp_validation"],
        "threshold_note": (
            "probability at one false positive per case on validation studies of the training conditions "
            f"(size {size}; models.training.train.calibrate_thresholds; head: the lower of CTA and MRA)"
        ),
        "patch_mm": PATCH_MM,
        "tta": TTA,
        "views": list(recipe.views),
        "fine_candidates": {"head": recipe.fine_candidates} if recipe.fine_candidates else {},
        "normalisation": input_normalisation(),
        "training": training,
        "metrics": metrics,
    }


def train_lesion_card(
    out: Path, pretrained: Path | None, recipe: LesionRecipe, device: str, version: str
) -> TrainedCard:
    """Train a lesion network (``train_lesions``) and write its one-network card next to it.

    Parameters
    ----------
    out
        Checkpoint to write; the card goes beside it.
    pretrained
        Landmark checkpoint (None: from scratch).
    recipe
        How to train.
    device
        Where the network trains (``cpu``, ``cuda``).
    version
        The card's version.

    Returns
    -------
    TrainedCard
    """
    metrics = train_lesions(
        out, pretrained, studies=recipe.studies, epochs=recipe.epochs, seed=recipe.seed, harmonize=recipe.harmonize,
        compare_scratch=recipe.compare_scratch, size=recipe.size, test_size_studies=recipe.test_size_studies,
        mine=recipe.mine, width=recipe.width, lesions_per_study=recipe.lesions_per_study, rescan=recipe.rescan,
        subjects_from=recipe.subjects_from, views=recipe.views, fine_candidates=recipe.fine_candidates,
        device=device, head_studies=recipe.head_studies, extra_patches=recipe.extra_patches,
        extend=recipe.extension(),
    )  # fmt: skip
    landmark = load_checkpoint(pretrained)[1].get("metrics", {}) if pretrained is not None else {}
    card = lesion_card(recipe, metrics, landmark, pretrained is not None, version)
    return TrainedCard(out, write_card(out, card), metrics)


# -- a card from a recipe sweep --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepProvenance:
    """How a sweep's networks were trained, in the words the card keeps (``harmonode train card --help``)."""

    sweep_command: str
    data: str
    trained_on: str = ""
    studies_per_kind: dict[str, int] = field(default_factory=dict)
    lesions_per_study: int = 5
    epochs: int = 16


@dataclass(frozen=True)
class SweepCard:
    """A card made from a sweep: where it is, its networks and their calibrated thresholds."""

    card: Path
    files: list[str]
    thresholds: dict[str, float]


def recipe_views(recipe: str) -> list[str]:
    """The views of a recipe that can be shipped (views only: no ``+fine``, no ``+lm``).

    Raises
    ------
    CardError
        Any other recipe.
    """
    base, fine, lm = recipe.partition("+")[0], "+fine" in recipe, "+lm" in recipe
    if fine or lm or base not in RECIPE_VIEWS:
        raise CardError(f"recipe {recipe!r}: only views recipes ({', '.join(RECIPE_VIEWS)}) can be shipped")
    return list(RECIPE_VIEWS[base])


def _save_sweep_networks(
    states: dict[str, Any], recipe: str, weights: Path, views: list[str], provenance: SweepProvenance
) -> tuple[list[Any], list[int], list[str]]:
    """Every seed of ``recipe`` saved as one network of the card: (networks, seeds, file names)."""
    from models.nets import MiniVGG, NetConfig

    seeds = sorted(int(k.split("/")[1]) for k in states if k.split("/")[0] == recipe)
    if not seeds:
        raise CardError(f"no networks of recipe {recipe!r} in the sweep's states: {sorted(states)}")
    files = [WEIGHTS_NAME] + [f"lesion-{string.ascii_lowercase[i]}.pt" for i in range(1, len(seeds))]
    networks = []
    for seed, name in zip(seeds, files, strict=True):
        state, config = states[f"{recipe}/{seed}"]
        model = MiniVGG(NetConfig(**config))
        model.load_state_dict(state)
        networks.append(model.eval())
        metrics = {
            "shipped_init": "transfer", "seed": seed, "studies_per_kind": provenance.studies_per_kind,
            "size": "eval", "lesions_per_training_study": provenance.lesions_per_study, "epochs": provenance.epochs,
            "views": views, "hard_negative_ratio": 5, "trained_on": provenance.trained_on, "recipe": recipe,
        }  # fmt: skip
        save_checkpoint(model, weights / name, {"task": "lesion", "init": "transfer", "metrics": metrics})
    return networks, seeds, files


def _sweep_training(
    old: dict[str, Any],
    recipe: str,
    version: str,
    views: list[str],
    provenance: SweepProvenance,
    landmark: dict[str, Any],
) -> dict[str, Any]:
    """The card's ``training`` for a sweep's networks: the previous card's, with what the sweep changed."""
    training = copy.deepcopy(old.get("training", {}))
    training.update({
        "command": (
            f"harmonode train landmarks --studies 8 --epochs 12 --seed 0 && {provenance.sweep_command} && "
            f"harmonode train card states.pt --recipe {recipe} --version {version}"
        ),
        "data": provenance.data,
        "studies_per_kind": provenance.studies_per_kind,
        "lesions_per_study": provenance.lesions_per_study,
        "epochs": provenance.epochs,
        "views": views,
        "trained_on": provenance.trained_on,
        "rescan_augmentation": RESCAN_NOTE if "+rs" in recipe else None,
        "landmark_pretraining": landmark,
    })  # fmt: skip
    return training


def card_from_sweep(
    states_path: Path, recipe: str, version: str, weights: Path, provenance: SweepProvenance, rules: Path | None = None
) -> SweepCard:
    """Ship a recipe of a sweep (``states.pt`` of ``harmonode train sweep``) as the detector's weights and card.

    Every seed of the recipe becomes one network of the card (``lesion.pt``, then ``lesion-b.pt``, ``lesion-c.pt``
    … as ``members``); the thresholds are calibrated on validation studies of the training conditions with the
    networks averaged (``calibrate_thresholds``, a few minutes on 2 CPU cores); the card keeps the previous card's
    fields that still hold (task, patch size, flips, conditions, the transfer-vs-scratch measurement) and says how
    the networks were trained (``provenance``). Then ``harmonode evaluate --update-card`` stores the held-out FROC.

    Parameters
    ----------
    states_path
        The sweep's ``states.pt`` (``recipe/seed`` → (state dict, network config)); your own file (it is a pickle).
    recipe
        The recipe whose seeds become the card's networks.
    version
        The card's version.
    weights
        The card's folder (its current card is the previous one).
    provenance
        How the networks were trained.
    rules
        Pickle of ``fit_rules_by_size(kinds, ("eval", "test"))`` (None: fit them).

    Returns
    -------
    SweepCard

    Raises
    ------
    CardError
        A recipe that cannot be shipped, or none of its networks in ``states_path``.
    """
    import torch

    views = recipe_views(recipe)
    states = torch.load(states_path, weights_only=False)
    old = json.loads((weights / CARD_NAME).read_text())
    networks, seeds, files = _save_sweep_networks(states, recipe, weights, views, provenance)
    thresholds = calibrate_thresholds(
        networks, load_or_fit_rules(rules, KINDS, ("eval", "test")), seed=0, studies=8, size="eval", views=views
    )
    _, landmarks = load_checkpoint(weights / "landmarks.pt")
    drop = ("file", "sha256", "size_bytes", "members", "evaluation", "metrics")  # what no longer holds
    card = {k: v for k, v in old.items() if k not in drop}
    card.update({
        "version": version,
        "created": dt.date.today().isoformat(),
        "threshold": thresholds,
        "threshold_note": (
            "probability at one false positive per case on validation studies of the training conditions (8 per "
            f"kind, size eval; models.training.train.calibrate_thresholds with the {len(networks)} networks "
            "averaged; head: the lower of CTA and MRA)"
        ),
        "views": views,
        "fine_candidates": {},
        "normalisation": input_normalisation(),
        "ensemble": (
            f"the probability is the mean of {len(networks)} networks trained alike (seeds "
            f"{', '.join(map(str, seeds))}) on the same simulated subjects: {', '.join(files)}"
        ),
    })  # fmt: skip
    card["training"] = _sweep_training(old, recipe, version, views, provenance, landmarks.get("metrics", {}))
    card["metrics"] = {
        "threshold_at_1fp_validation": thresholds,
        **{name: torch.load(weights / name, weights_only=True)["metrics"] for name in files},
    }
    card["members"] = [
        {"file": n, "sha256": sha256_of(weights / n), "size_bytes": (weights / n).stat().st_size} for n in files[1:]
    ]
    return SweepCard(write_card(weights / WEIGHTS_NAME, card), files, thresholds)


# the held-out evaluation of a card lives in its own module; these names stay importable from here
from models.training.heldout import EvaluationReport, evaluate_card, store_evaluation  # noqa: E402

__all__ = ["EvaluationReport", "evaluate_card", "store_evaluation"]
