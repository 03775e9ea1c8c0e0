"""The one hit rule, and the detector's evaluation by it: FROC, candidate recall, sensitivity by size, patch AUC.

Every count of found lesions in harmonode goes through ``lesion_hits`` (``HIT_RULE``): the held-out FROC of
``harmonode evaluate``, the thresholds calibrated on validation studies, the recipe sweep and the demo's table
(``count_hits``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.training.data import PlanItem, candidate_labels, harmonized, rules_for, simulated

#: How ``evaluate`` counts a finding as a hit (written into the model card's evaluation).
HIT_RULE = (
    "a finding (after 3D NMS) hits every lesion whose centre lies within max(d/2, 3) + 1.5 mm of it; one finding on"
    " two overlapping sacs finds both (the LUNA16 convention); a lesion counts once, by its best finding"
)
#: The false-positive rates per case the FROC is read at (keys of ``sensitivity_at_fp``).
FP_RATES = ("0.5", "1", "2", "4")
#: Lesion size bins (mm) for sensitivity by size: the small aneurysms are where a detector earns its keep
SIZE_BINS_MM = (0.0, 3.0, 5.0, 10.0, float("inf"))


def hit_reach(diameter_mm: float) -> float:
    """How far (mm) from a lesion's centre a finding still hits it (``HIT_RULE``)."""
    return max(diameter_mm / 2, 3.0) + 1.5


def within_lesion(diameter_mm: float) -> float:
    """The sac-tight reach: inside the lesion's own sphere (d/2), as challenges that want a mark on the sac count."""
    return diameter_mm / 2


def lesion_hits(
    points_mm: np.ndarray, lesions: Sequence[dict[str, Any]], reach: Callable[[float], float] = hit_reach
) -> np.ndarray:
    """Which lesions each point hits.

    Parameters
    ----------
    points_mm
        Finding positions (N, 3) in patient mm.
    lesions
        True lesions, each with ``center_mm`` and ``diameter_mm``.
    reach
        Distance (mm) within which a point hits a lesion of a given diameter (``hit_reach``: the rule).

    Returns
    -------
    numpy.ndarray
        Boolean (points, lesions) matrix.
    """
    out = np.zeros((len(points_mm), len(lesions)), bool)
    for li, les in enumerate(lesions):
        d = np.linalg.norm(np.asarray(points_mm, float).reshape(-1, 3) - np.asarray(les["center_mm"]), axis=1)
        out[:, li] = d <= reach(float(les["diameter_mm"]))
    return out


def unmatched(hits: np.ndarray) -> np.ndarray:
    """Per finding, True where it hits no lesion (a false positive); ``hits`` as ``findings_on_lesions`` gives it."""
    return ~np.asarray(hits, bool).any(axis=1)


def count_hits(
    findings_xyz_mm: Sequence[Sequence[float]] | np.ndarray,
    lesion_centres_mm: Sequence[Sequence[float]] | np.ndarray,
    lesion_diameters_mm: Sequence[float] | np.ndarray,
) -> tuple[int, int]:
    """True and false positives of one series' findings by the project's hit rule (``lesion_hits``).

    Parameters
    ----------
    findings_xyz_mm
        Finding centres (N, 3) in patient mm.
    lesion_centres_mm
        True lesion centres (M, 3) in patient mm.
    lesion_diameters_mm
        The M lesion diameters (mm).

    Returns
    -------
    tuple
        (lesions hit by at least one finding, findings that hit no lesion). A lesion counts once however many
        findings hit it; one finding within reach of two lesions finds both.

    Raises
    ------
    ValueError
        Lesion centres and diameters of different lengths, or positions that are not 3D.
    """
    centres = np.asarray(lesion_centres_mm, float).reshape(-1, 3) if len(lesion_centres_mm) else np.zeros((0, 3))
    diameters = np.asarray(lesion_diameters_mm, float).reshape(-1)
    if len(centres) != len(diameters):
        raise ValueError(f"{len(centres)} lesion centres but {len(diameters)} diameters")
    points = np.asarray(findings_xyz_mm, float)
    if points.size and (points.ndim != 2 or points.shape[1] != 3):
        raise ValueError(f"finding positions must be (N, 3) in mm, got shape {points.shape}")
    lesions = [{"center_mm": c, "diameter_mm": float(d)} for c, d in zip(centres, diameters, strict=True)]
    hits = lesion_hits(points.reshape(-1, 3), lesions)
    return int(hits.any(axis=0).sum()), int(unmatched(hits).sum())


def threshold_at_1fp(per_study: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The probability above which there is on average one false positive per case (0.5 when there are fewer).

    Parameters
    ----------
    per_study
        (scores of the kept findings, which lesions each hits) per study.

    Returns
    -------
    float
    """
    fp = np.sort(np.concatenate([np.asarray(scores)[unmatched(hits)] for scores, hits in per_study]))[::-1]
    return float(fp[len(per_study) - 1]) if len(fp) >= len(per_study) else 0.5


def froc_points(
    per_study: list[tuple[np.ndarray, np.ndarray, int]], fp_rates: Sequence[float] = (0.5, 1, 2, 4)
) -> dict[str, float]:
    """Sensitivity at each false-positive rate per case.

    A lesion counts once (its best finding); extra hits on it are not FPs; a finding within reach of two lesions
    finds both (as the LUNA16 evaluation counts a CAD mark inside two nodules).

    Parameters
    ----------
    per_study
        (scores of the findings, which lesions each finding hits as ``findings_on_lesions`` gives it, number of
        lesions) per study, findings already NMS-suppressed.
    fp_rates
        False positives per case to read the curve at.

    Returns
    -------
    dict
        ``{f"{rate:g}": sensitivity}``.
    """
    n_cases = len(per_study)
    n_lesions = sum(n for _, _, n in per_study)
    events = []  # (score, lesion ids the finding hits; empty: a false positive)
    for si, (scores, hits, _) in enumerate(per_study):
        for s, row in zip(scores, np.asarray(hits, bool), strict=True):
            events.append((float(s), [(si, int(li)) for li in np.flatnonzero(row)]))
    events.sort(key=lambda e: -e[0])
    seen: set[tuple[int, int]] = set()
    tps, fps, curve = 0, 0, [(0.0, 0.0)]
    for _, lesion_ids in events:
        if lesion_ids:
            fresh = [lid for lid in lesion_ids if lid not in seen]
            seen.update(fresh)
            tps += len(fresh)
        else:
            fps += 1
        curve.append((fps / max(n_cases, 1), tps / max(n_lesions, 1)))
    out = {}
    for rate in fp_rates:
        ok = [sens for fpr, sens in curve if fpr <= rate]
        out[f"{rate:g}"] = float(max(ok)) if ok else 0.0
    return out


def findings_on_lesions(
    mm: np.ndarray, probs: np.ndarray, diameters_mm: np.ndarray, body: str, lesions: Sequence[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, int]:
    """The FROC's view of one study: the detector's 3D NMS, then the hit rule on what it keeps.

    Parameters
    ----------
    mm
        Candidate positions (N, 3) in patient mm.
    probs
        Their probabilities.
    diameters_mm
        Their blob diameters (the NMS radius, at least 6 mm in the head and 10 mm in the chest).
    body
        ``head`` or ``chest``.
    lesions
        True lesions (``center_mm``, ``diameter_mm``).

    Returns
    -------
    tuple
        (indices kept by NMS, best first; which lesions each kept one hits, a (kept, lesions) boolean matrix; how
        many lesions have any candidate at all).
    """
    from models.detector import nms_3d

    keep = nms_3d(mm, probs, np.maximum(diameters_mm, 6.0 if body == "head" else 10.0))
    near = lesion_hits(mm, lesions)
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


def _score_study(
    detector: Any,
    kind: str,
    cond: str,
    seed: int,
    size: str,
    rules: dict | None,
    threads: int = 0,
    residual: Any = None,
) -> tuple[str, tuple]:
    """One study's row for ``evaluate_detector``: (key, (finding scores, hits, lesions, probs, labels, found,
    lesion diameters, hits within the lesions' own spheres))."""
    if threads:
        torch.set_num_threads(threads)
    study = harmonized(simulated(kind, cond, seed, size), rules_for(rules, size))
    if residual is not None:
        from models.training.residual_eval import with_residual

        study = with_residual(study, residual)
    cands, probs = detector.score(study.values, study.geometry, study.modality, study.body)
    labels = candidate_labels(study, cands.centres)
    mm = study.geometry.index_to_patient(cands.centres) if len(cands) else np.zeros((0, 3))
    keep, hits, with_candidate = findings_on_lesions(mm, probs, cands.diameters_mm, study.body, study.truth["lesions"])
    lesions = study.truth["lesions"]
    diameters = np.array([float(les["diameter_mm"]) for les in lesions])
    inside = lesion_hits(mm[keep], lesions, within_lesion)
    return f"{kind}/{cond}", (probs[keep], hits, len(lesions), probs, labels, with_candidate, diameters, inside)


def _summary(items: list[tuple]) -> dict[str, Any]:
    """The figures of a group of ``_score_study`` rows."""
    s = np.concatenate([it[3] for it in items])
    lab = np.concatenate([it[4] for it in items])
    threshold = threshold_at_1fp([it[:2] for it in items])
    return {
        "sensitivity_at_fp": froc_points([it[:3] for it in items]),
        # the same FROC with a hit only inside the lesion's own sphere (d/2): the sac-tight reading
        "sensitivity_at_fp_within_lesion": froc_points([(it[0], it[7], it[2]) for it in items]),
        "auc": auc(s, lab),
        "cases": len(items),
        "lesions": int(sum(it[2] for it in items)),
        "candidate_recall": float(sum(it[5] for it in items) / max(1, sum(it[2] for it in items))),
        "threshold_at_1fp": threshold,
        "sensitivity_at_1fp_by_size": sensitivity_by_size([(it[0], it[1], it[6]) for it in items], threshold),
    }


def evaluate_detector(
    detector: Any,
    plan: Sequence[PlanItem],
    rules: dict[str, dict[str, Any]] | None,
    progress: bool = True,
    jobs: int = 1,
    residual: Any = None,
) -> dict[str, Any]:
    """FROC (sensitivity at 0.5/1/2/4 FP per case) and candidate-patch AUC, overall, per condition and per kind.

    Also counts the lesions that have any candidate at all (``candidate_recall``: no classifier can find the
    others) and the lesions found at the 1-FP-per-case threshold by diameter (``sensitivity_at_1fp_by_size``).

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
        The overall figures with ``per_condition`` and ``per_kind`` figures beside them.
    """
    rows: dict[str, list] = {}
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # a forked child cannot use CUDA once the parent has (the detector's networks are there): spawn then
        on_cuda = getattr(getattr(detector, "device", None), "type", "cpu") == "cuda"
        context = multiprocessing.get_context("spawn" if on_cuda else None)
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_score_study, detector, *item, rules, 1, residual) for item in plan]
            for future in tqdm(futures, desc="evaluate", disable=not progress):
                key, row = future.result()
                rows.setdefault(key, []).append(row)
    else:
        for item in tqdm(plan, desc="evaluate", disable=not progress):
            key, row = _score_study(detector, *item, rules, 0, residual)
            rows.setdefault(key, []).append(row)
    everything = [it for items in rows.values() for it in items]
    result = _summary(everything)
    result["per_condition"] = {key: _summary(items) for key, items in sorted(rows.items())}
    result["per_kind"] = {
        kind: _summary([it for key, items in rows.items() if key.startswith(kind + "/") for it in items])
        for kind in sorted({key.split("/")[0] for key in rows})
    }
    return result


def froc_plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Draw the FROC per kind of each labelled result (``harmonized`` solid, others dashed) into a PNG.

    Parameters
    ----------
    results
        ``{label: evaluate_detector(...)}``.
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
            ax.plot(rates, sens, style, color=colour, marker=marker, label=f"{kind} ({label})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, FP_RATES)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("sensitivity")
    ax.set_title("FROC on held-out scanner conditions (simulated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
