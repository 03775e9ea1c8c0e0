"""The held-out evaluation of a model card: every held-out study through every reading, counted, stored.

``harmonode evaluate`` runs ``evaluate_card``: the card's detector on the held-out conditions' studies with
the rules (and without, and with the residual stage), the figures counted by the one hit rule
(``models.training.hits``), optionally kept as a candidate cache or counted again from one, and stored in the
card's ``evaluation`` (``store_evaluation``) with the rule they were counted by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.detector import CARD_NAME, Detector
from models.training.data import EVAL_SUBJECTS_FROM, KINDS, check_eval_subjects, held_out_plan
from models.training.evaluate import Reading, Scoring, collect_candidates, froc_plot, summarize
from models.training.hits import PRIMARY


@dataclass(frozen=True)
class EvaluationReport:
    """A card's held-out evaluation: figures per reading (``harmonized``, ``raw``) and the JSON summary."""

    results: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    studies: int
    size: str
    plot: Path | None


def store_evaluation(weights_dir: Path, summary: dict[str, Any], studies: int, size: str, subjects_from: int) -> Path:
    """Write a held-out evaluation into the card's ``evaluation`` (with the command and the hit rule it counts by).

    Returns
    -------
    Path
        The card updated.
    """
    card_path = weights_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    card["evaluation"] = {
        "command": f"harmonode evaluate --studies {studies} --size {size}"
        + (f" --subjects-from {subjects_from}" if subjects_from != EVAL_SUBJECTS_FROM else "")
        + " --update-card",
        "held_out_studies_per_condition": studies,
        "subjects_from": subjects_from,
        "size": size,
        "hit_rule": PRIMARY.card(),
        **summary,
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


@dataclass(frozen=True)
class CandidateOptions:
    """Where an evaluation keeps or finds its caches, and how it counts (``harmonode evaluate --help``)."""

    save_to: Path | None = None  # write the candidate cache here
    read_from: Path | None = None  # count from this candidate cache instead of scoring studies
    sim_cache: Path | None = None  # simulated studies and fitted rules, made once and reused
    scoring: Scoring = field(default_factory=Scoring)


def _readings(
    weights_dir: Path,
    studies: int,
    size: str,
    raw: bool,
    jobs: int,
    subjects_from: int,
    progress: bool,
    residual_dir: Path | None,
    caches: CandidateOptions,
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Every held-out study through every reading: (candidates per reading, what the cache's manifest says)."""
    from models.training.candidate_cache import cached_rules, save_candidates

    check_eval_subjects(subjects_from, studies)
    detector = Detector.load(device="auto", weights_dir=weights_dir)
    plan = held_out_plan(studies, size, subjects_from)
    rules = cached_rules(KINDS, (size,), caches.sim_cache, progress=progress)
    wanted = [Reading("harmonized", rules)] + ([Reading("raw", None)] if raw else [])
    manifest: dict[str, Any] = {
        "model": detector.version, "studies": studies, "size": size, "subjects_from": subjects_from,
    }  # fmt: skip
    if residual_dir is not None:
        from models.residual_net import ResidualModel
        from models.training.residual_eval import residual_plan

        stages = residual_plan(ResidualModel.load("auto", residual_dir), [p[:2] for p in plan], size, rules)
        wanted.append(Reading("harmonized+residual", rules, stages))
        manifest["residual_stages"] = stages.proposals
    readings = collect_candidates(detector, plan, wanted, progress, jobs, caches.sim_cache)
    if caches.save_to is not None:
        save_candidates(caches.save_to, readings, manifest)
    return readings, manifest


def _cached_readings(folder: Path, card_dir: Path | None, raw: bool) -> tuple[dict, dict]:
    """A candidate cache's manifest and readings (``raw`` False: without the raw reading); with ``card_dir``,
    a ``CacheError`` unless the cache holds that card's model."""
    from models.training.candidate_cache import CacheError, load_candidates

    manifest, readings = load_candidates(folder)
    if card_dir is not None:
        card_version = json.loads((card_dir / CARD_NAME).read_text()).get("version")
        if manifest["model"] != card_version:
            raise CacheError(f"{folder} holds candidates of model {manifest['model']}, the card is {card_version}")
    if not raw:
        readings.pop("raw", None)
    return manifest, readings


def evaluate_card(
    weights_dir: Path,
    studies: int = 8,
    size: str = "eval",
    raw: bool = True,
    plot: Path | None = None,
    update_card: bool = False,
    jobs: int = 1,
    subjects_from: int = EVAL_SUBJECTS_FROM,
    progress: bool = True,
    residual_dir: Path | None = None,
    caches: CandidateOptions | None = None,
) -> EvaluationReport:
    """FROC (LUNA16's rates, CPM) and patch AUC of a card's detector on held-out conditions, with and without rules.

    Parameters
    ----------
    weights_dir
        The card's folder.
    studies
        Held-out studies per condition.
    size
        Their simulated size.
    raw
        Also evaluate without harmonization.
    plot
        FROC plot to write (None: none).
    update_card
        Store the results in the card (``store_evaluation``).
    jobs
        Studies scored in parallel processes (0: one per CPU).
    subjects_from
        First held-out subject (kind k from here + 1000 k).
    progress
        Show progress bars.
    residual_dir
        Residual weights: also read every study after the rules and the residual stage
        (``harmonized+residual``), strengths proposed per condition on the rules' subjects.
    caches
        The candidate cache to write or to count from, the simulation cache, the hit rules and NMS
        (``CandidateOptions``; default: none, the primary rule). Counting from a cache takes its studies, size
        and subjects from the cache's manifest and ignores ``studies``, ``size``, ``subjects_from`` and
        ``residual_dir``.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    models.training.data.SubjectsOutOfRange
        A plan reaching outside the evaluation subjects.
    FileNotFoundError, models.detector.WeightsRefused
        As ``Detector.load``.
    models.training.candidate_cache.CacheError
        A candidate cache that cannot be read, or (with ``update_card``) one of another model than the card.
    """
    caches = caches or CandidateOptions()
    if caches.read_from is not None:
        manifest, readings = _cached_readings(caches.read_from, weights_dir if update_card else None, raw)
        studies, size, subjects_from = manifest["studies"], manifest["size"], manifest["subjects_from"]
    else:
        args = (weights_dir, studies, size, raw, jobs, subjects_from, progress, residual_dir, caches)
        readings, manifest = _readings(*args)
    results = {label: summarize(records, caches.scoring) for label, records in readings.items()}
    if "harmonized+residual" in results and "residual_stages" in manifest:
        results["harmonized+residual"]["residual_stages"] = manifest["residual_stages"]
    summary = {**results["harmonized"], "without_harmonization": results.get("raw"), "model": manifest["model"]}
    if "harmonized+residual" in results:
        summary["with_residual_stage"] = results["harmonized+residual"]
    if plot is not None:
        froc_plot(results, plot)
    if update_card:
        store_evaluation(weights_dir, summary, studies, size, subjects_from)
    return EvaluationReport(results, summary, studies, size, plot)
