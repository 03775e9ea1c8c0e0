"""The detector's held-out evaluation: candidates per study, then the FROC, CPM, recall, sizes and AUC of them.

An evaluation has two halves. ``collect_candidates`` simulates each study once, reads it through every asked
reading (rules, none, rules + residual stage), and keeps what the detector made of it (``StudyCandidates``:
every candidate, its probability, the lesions, the geometry); ``summarize`` turns those into figures by the hit
rules of ``models.training.hits`` (``PRIMARY``, the sac-tight count, and ``SECOND`` beside it). The candidate
cache (``models.training.candidate_cache``) stores the first half, so the second re-runs in seconds with another
rule or NMS radius.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.training.data import PlanItem, Study, candidate_labels, harmonized, rules_for, simulated
from models.training.hits import (
    FP_RATES,
    HIT_RULE,
    PRIMARY,
    SECOND,
    HitRule,
    count_hits,
    cpm,
    froc_points,
    hit_reach,
    lesion_hits,
    threshold_at_1fp,
    unmatched,
    within_lesion,
)

__all__ = [
    "FP_RATES", "HIT_RULE", "SIZE_BINS_MM", "Reading", "Scoring", "StudyCandidates", "auc", "collect_candidates",
    "count_hits", "evaluate_detector", "findings_on_lesions", "froc_plot", "froc_points", "hit_reach",
    "lesion_hits", "sensitivity_by_size", "study_candidates", "summarize", "threshold_at_1fp", "unmatched",
    "within_lesion",
]  # fmt: skip

#: Lesion size bins (mm) for sensitivity by size: the small aneurysms are where a detector earns its keep
SIZE_BINS_MM = (0.0, 3.0, 5.0, 10.0, float("inf"))
#: The detector's NMS radius floor per body part (``models.detector.Detector.detect``)
NMS_MIN_MM = {"head": 6.0, "chest": 10.0}


def findings_on_lesions(
    mm: np.ndarray,
    probs: np.ndarray,
    diameters_mm: np.ndarray,
    body: str,
    lesions: Sequence[dict[str, Any]],
    rule: HitRule = PRIMARY,
    nms_min_mm: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The FROC's view of one study: the detector's 3D NMS, then a hit rule on what it keeps.

    Parameters
    ----------
    mm
        Candidate positions (N, 3) in patient mm.
    probs
        Their probabilities.
    diameters_mm
        Their blob diameters (the NMS radius, at least ``nms_min_mm[body]``).
    body
        ``head`` or ``chest``.
    lesions
        True lesions (``center_mm``, ``diameter_mm``).
    rule
        The hit rule (default ``PRIMARY``, the sac-tight count).
    nms_min_mm
        The NMS radius floor per body part (default ``NMS_MIN_MM``, the detector's: 6 mm head, 10 mm chest).

    Returns
    -------
    tuple
        (indices kept by NMS, best first; which lesions each kept one hits, a (kept, lesions) boolean matrix; how
        many lesions any candidate at all hits).
    """
    from models.detector import nms_3d

    floor = (nms_min_mm or NMS_MIN_MM)[body]
    keep = nms_3d(mm, probs, np.maximum(diameters_mm, floor))
    near = lesion_hits(mm, lesions, rule)
    return keep, near[keep], int(near.any(axis=0).sum())


def sensitivity_by_size(
    per_study: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], threshold: float
) -> dict[str, dict[str, Any]]:
    """Lesions found at ``threshold`` per diameter bin (``SIZE_BINS_MM``); empty bins are left out.

    Parameters
    ----------
    per_study
        (scores of the kept findings, which lesions each hits as ``findings_on_lesions`` gives it, diameters of
        the study's lesions) per study.
    threshold
        A lesion is found when any finding on it scores at least this.

    Returns
    -------
    dict
        ``{bin name: {"lesions", "found", "sensitivity"}}``.
    """
    found, sizes = [], []
    for scores, hits, diameters in per_study:
        on = np.where(np.asarray(hits, bool), np.asarray(scores, float)[:, None], -np.inf)
        best = on.max(axis=0) if len(on) else np.full(len(diameters), -np.inf)
        found.append(best >= threshold)
        sizes.append(np.asarray(diameters, dtype=float))
    hit_all = np.concatenate(found) if found else np.zeros(0, bool)
    size_all = np.concatenate(sizes) if sizes else np.zeros(0)
    out = {}
    for lo, hi in zip(SIZE_BINS_MM[:-1], SIZE_BINS_MM[1:], strict=True):
        sel = (size_all >= lo) & (size_all < hi)
        if sel.any():
            name = f"<{hi:g} mm" if lo == 0 else (f">={lo:g} mm" if hi == float("inf") else f"{lo:g}-{hi:g} mm")
            out[name] = {
                "lesions": int(sel.sum()),
                "found": int(hit_all[sel].sum()),
                "sensitivity": float(hit_all[sel].mean()),
            }
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half); NaN without both classes."""
    from scipy.stats import rankdata

    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        return float("nan")
    r = rankdata(np.concatenate([scores[pos], scores[neg]]))
    return float((r[: pos.sum()].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


# -- the first half: what the detector made of each study ------------------------------------------------------------
@dataclass(frozen=True)
class StudyCandidates:
    """One study as the detector scored it: every candidate (before threshold and NMS) and the study's truth.

    Everything the FROC, the hit rules and the patch AUC read, so figures can be counted again without the
    simulator or the network (``models.training.candidate_cache`` stores it).
    """

    kind: str
    condition: str
    seed: int
    size: str
    body: str
    centres_index: np.ndarray  # (N, 3) voxel indices (slice, row, column)
    centres_mm: np.ndarray  # (N, 3) patient mm
    blob_mm: np.ndarray  # (N,) candidate blob diameters (the NMS radius)
    probs: np.ndarray  # (N,) the detector's probabilities
    labels: np.ndarray  # (N,) training labels (1 lesion, 0 normal, -1 ignored: ``candidate_labels``)
    lesions: tuple[dict[str, Any], ...]  # the truth: center_mm, diameter_mm (and site, place where known)
    geometry: dict[str, Any] = field(default_factory=dict)  # origin, row/column direction, spacing, shape

    @property
    def key(self) -> str:
        """``kind/condition``: the group of the per-condition figures."""
        return f"{self.kind}/{self.condition}"


def study_candidates(study: Study, size: str, cands: Any, probs: np.ndarray) -> StudyCandidates:
    """The ``StudyCandidates`` of a (harmonized) study and ``Detector.score``'s candidates and probabilities."""
    centres = np.asarray(cands.centres, float).reshape(-1, 3)
    mm = study.geometry.index_to_patient(centres) if len(centres) else np.zeros((0, 3))
    g = study.geometry
    geometry = {
        "origin": list(g.origin), "row_direction": list(g.row_direction),
        "column_direction": list(g.column_direction), "spacing": list(g.spacing), "shape": list(g.shape),
    }  # fmt: skip
    lesions = tuple(
        {"center_mm": [float(v) for v in les["center_mm"]], "diameter_mm": float(les["diameter_mm"]),
         **{k: les[k] for k in ("site", "place", "kind") if k in les}}
        for les in study.truth["lesions"]
    )  # fmt: skip
    return StudyCandidates(
        study.kind, study.condition, int(study.seed), size, study.body, centres, np.asarray(mm, float),
        np.asarray(cands.diameters_mm, float).reshape(-1), np.asarray(probs).reshape(-1),
        candidate_labels(study, cands.centres), lesions, geometry,
    )  # fmt: skip


@dataclass(frozen=True)
class Reading:
    """One way the held-out studies are read: histogram rules (``fit_rules_by_size`` output, None: raw) and
    optionally the residual stage (a ``models.training.residual_eval.ResidualPlan``)."""

    label: str
    rules: dict[str, dict[str, Any]] | None
    residual: Any = None


def _candidates_of(
    detector: Any, item: PlanItem, readings: Sequence[Reading], threads: int, sim_cache: Path | None
) -> list[tuple[str, StudyCandidates]]:
    """One study simulated once (or loaded from ``sim_cache``), scored through every reading."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    kind, condition, seed, size = item
    if sim_cache is not None:
        from models.training.candidate_cache import cached_simulation

        source = cached_simulation(kind, condition, seed, size, sim_cache)
    else:
        source = simulated(kind, condition, seed, size)
    out = []
    for reading in readings:
        study = harmonized(source, rules_for(reading.rules, size))
        if reading.residual is not None:
            from models.training.residual_eval import with_residual

            study = with_residual(study, reading.residual)
        cands, probs = detector.score(study.values, study.geometry, study.modality, study.body)
        out.append((reading.label, study_candidates(study, size, cands, probs)))
    return out


def collect_candidates(
    detector: Any,
    plan: Sequence[PlanItem],
    readings: Sequence[Reading],
    progress: bool = True,
    jobs: int = 1,
    sim_cache: Path | None = None,
) -> dict[str, list[StudyCandidates]]:
    """Every study of ``plan`` through every reading: the detector's candidates, in plan order.

    Parameters
    ----------
    detector
        A ``models.detector.Detector`` (or anything with its ``score``).
    plan
        The studies (``models.training.data.held_out_plan``).
    readings
        How to read each study (each study is simulated once for all of them).
    progress
        Show a progress bar.
    jobs
        > 1: studies in that many processes (one torch thread each); the result is the same. 0: one per CPU.
    sim_cache
        Folder of simulated studies (``candidate_cache.cached_simulation``): each simulated once, reused by
        later runs. None: simulate every time.

    Returns
    -------
    dict
        ``{reading label: [StudyCandidates per study of plan]}``.
    """
    jobs = min(jobs or os.cpu_count() or 1, max(len(plan), 1))
    out: dict[str, list[StudyCandidates]] = {r.label: [] for r in readings}
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # a forked child cannot use CUDA once the parent has (the detector's networks are there): spawn then
        on_cuda = getattr(getattr(detector, "device", None), "type", "cpu") == "cuda"
        context = multiprocessing.get_context("spawn" if on_cuda else None)
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_candidates_of, detector, item, readings, 1, sim_cache) for item in plan]
            for future in tqdm(futures, desc="evaluate", disable=not progress):
                for label, record in future.result():
                    out[label].append(record)
    else:
        for item in tqdm(plan, desc="evaluate", disable=not progress):
            for label, record in _candidates_of(detector, item, readings, 0, sim_cache):
                out[label].append(record)
    return out


# -- the second half: figures by the hit rules -----------------------------------------------------------------------
#: Moves the kept findings of a study before they are counted: (study, indices NMS kept) -> positions (kept, 3) mm
Refine = Callable[[StudyCandidates, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Scoring:
    """How candidates become counted findings: the hit rules, the NMS radius floor, an optional refinement."""

    rule: HitRule = PRIMARY
    second: HitRule = SECOND
    nms_min_mm: Mapping[str, float] = field(default_factory=lambda: dict(NMS_MIN_MM))
    refine: Refine | None = None


@dataclass(frozen=True)
class _Row:
    """One study counted: kept findings' scores, their hits by both rules, the truth, the patches' labels."""

    key: str
    scores: np.ndarray
    hits: np.ndarray
    hits_second: np.ndarray
    lesions: int
    probs: np.ndarray
    labels: np.ndarray
    with_candidate: int
    with_candidate_second: int
    diameters: np.ndarray


def _row(rec: StudyCandidates, scoring: Scoring) -> _Row:
    keep, hits, with_candidate = findings_on_lesions(
        rec.centres_mm, rec.probs, rec.blob_mm, rec.body, rec.lesions, scoring.rule, scoring.nms_min_mm
    )
    mm = rec.centres_mm[keep] if scoring.refine is None else scoring.refine(rec, keep)
    if scoring.refine is not None:
        hits = lesion_hits(mm, rec.lesions, scoring.rule)
    second = lesion_hits(mm, rec.lesions, scoring.second)
    with_second = int(lesion_hits(rec.centres_mm, rec.lesions, scoring.second).any(axis=0).sum())
    diameters = np.array([float(les["diameter_mm"]) for les in rec.lesions])
    return _Row(
        rec.key, np.asarray(rec.probs)[keep], hits, second, len(rec.lesions), np.asarray(rec.probs), rec.labels,
        with_candidate, with_second, diameters,
    )  # fmt: skip


def _counted(rows: Sequence[_Row], second: bool) -> dict[str, Any]:
    """FROC, CPM, candidate recall and sensitivity by size of ``rows`` by one of the two rules."""
    per = [(r.scores, r.hits_second if second else r.hits, r.lesions) for r in rows]
    sens = froc_points(per)
    threshold = threshold_at_1fp([p[:2] for p in per])
    lesions = max(1, sum(r.lesions for r in rows))
    found = sum(r.with_candidate_second if second else r.with_candidate for r in rows)
    return {
        "sensitivity_at_fp": sens,
        "cpm": cpm(sens),
        "candidate_recall": float(found / lesions),
        "threshold_at_1fp": threshold,
        "sensitivity_at_1fp_by_size": sensitivity_by_size(
            [(s, h, r.diameters) for (s, h, _), r in zip(per, rows, strict=True)], threshold
        ),
    }


def _summary(rows: Sequence[_Row]) -> dict[str, Any]:
    """The figures of a group of studies: primary rule at the top level, the second rule under ``second``."""
    probs = np.concatenate([r.probs for r in rows]) if rows else np.zeros(0)
    labels = np.concatenate([r.labels for r in rows]) if rows else np.zeros(0, np.int64)
    return {
        **_counted(rows, second=False),
        "auc": auc(probs, labels),
        "cases": len(rows),
        "lesions": int(sum(r.lesions for r in rows)),
        "second": _counted(rows, second=True),
    }


def summarize(records: Sequence[StudyCandidates], scoring: Scoring | None = None) -> dict[str, Any]:
    """The held-out figures of scored studies, overall, per condition and per kind.

    Parameters
    ----------
    records
        What ``collect_candidates`` (or the candidate cache) gives for one reading.
    scoring
        Hit rules, NMS radius floor and refinement (default ``Scoring()``: the sac-tight count, the reach rule
        beside it, the detector's NMS).

    Returns
    -------
    dict
        ``sensitivity_at_fp`` (LUNA16's seven rates), ``cpm``, ``auc``, ``cases``, ``lesions``,
        ``candidate_recall``, ``threshold_at_1fp``, ``sensitivity_at_1fp_by_size`` by the primary rule; the same
        by the second rule under ``second``; ``hit_rule`` and ``second_rule`` (name, version, text);
        ``per_condition`` and ``per_kind`` figures beside them.
    """
    scoring = scoring or Scoring()
    rows = [_row(rec, scoring) for rec in records]
    result = _summary(rows)
    result["hit_rule"] = scoring.rule.card()
    result["second_rule"] = scoring.second.card()
    keys = sorted({r.key for r in rows})
    result["per_condition"] = {key: _summary([r for r in rows if r.key == key]) for key in keys}
    result["per_kind"] = {
        kind: _summary([r for r in rows if r.key.startswith(kind + "/")])
        for kind in sorted({key.split("/")[0] for key in keys})
    }
    return result


def evaluate_detector(
    detector: Any,
    plan: Sequence[PlanItem],
    rules: dict[str, dict[str, Any]] | None,
    progress: bool = True,
    jobs: int = 1,
    residual: Any = None,
) -> dict[str, Any]:
    """FROC at LUNA16's rates, CPM and candidate-patch AUC of one reading, overall, per condition and per kind.

    Parameters
    ----------
    detector
        A ``models.detector.Detector`` (or anything with its ``score``).
    plan
        The studies (``models.training.data.study_plan``).
    rules
        ``fit_rules_by_size`` output for the sizes in ``plan``, or None (no harmonization).
    progress
        Show a progress bar.
    jobs
        > 1: score studies in that many processes (one torch thread each); the result is the same.
    residual
        A ``models.training.residual_eval.ResidualPlan``: each study also goes through its condition's
        residual stage after the rules (None: the histogram stage only).

    Returns
    -------
    dict
        As ``summarize``.
    """
    reading = Reading("reading", rules, residual)
    return summarize(collect_candidates(detector, plan, [reading], progress, jobs)["reading"])


def froc_plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Draw the FROC (primary rule) per kind of each labelled result (``harmonized`` solid, others dashed).

    Parameters
    ----------
    results
        ``{label: summarize(...)}``.
    path
        The PNG to write (its folder is made).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [float(r) for r in FP_RATES]
    colours: dict[str, str] = {}  # one colour per task, solid with the rules, dashed without: each pair reads as one
    for label, res in results.items():
        for kind, r in res["per_kind"].items():
            colour = colours.setdefault(kind, f"C{len(colours)}")
            style, marker = ("-", "o") if label == "harmonized" else ("--", "x")
            sens = [r["sensitivity_at_fp"][k] for k in FP_RATES]
            ax.plot(rates, sens, style, color=colour, marker=marker, label=f"{kind} ({label}, CPM {r['cpm']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, FP_RATES)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel(f"sensitivity ({next(iter(results.values()))['hit_rule']['name']} count)")
    ax.set_title("FROC on held-out scanner conditions (simulated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
