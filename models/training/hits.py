"""The one hit rule and the FROC read as the field reads it: LUNA16's rates and its CPM.

Every count of found lesions in harmonode goes through ``lesion_hits`` with a named ``HitRule``: the held-out
FROC of ``harmonode evaluate``, the thresholds calibrated on validation studies, the recipe sweep and the demo's
table (``count_hits``). The primary rule is ``SAC_TIGHT`` (a finding inside the lesion's own sphere, as LUNA16
counts a CAD mark inside a nodule); ``REACH`` (the project's older, looser rule) is kept as a second column so
figures of both can be read side by side.

The FROC follows LUNA16's ``noduleCADEvaluationLUNA16.py``: each lesion is one entry scored by its best finding
(a lesion no finding hits stays in the denominator and is never found), each finding that hits no lesion is a
false positive, the curve is the ROC of those entries scaled to false positives per case and sensitivity
(``sklearn.metrics.roc_curve`` with its default ``drop_intermediate``), interpolated linearly onto 10001 points
from 1/8 to 8 false positives per case, and read at the grid point nearest each of ``FP_RATES``; the CPM is
the mean of the seven readings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class HitRule:
    """How far from a lesion's centre a finding still hits it, named and versioned for the model card."""

    name: str
    version: int
    text: str
    half_diameter: bool  # reach d/2 (inside the sphere) or max(d/2, 3) + 1.5 mm
    strict: bool  # distance < reach (LUNA16) or <= reach

    def reach(self, diameter_mm: float) -> float:
        """The distance (mm) from the centre of a lesion of ``diameter_mm`` within which a finding hits it."""
        return diameter_mm / 2 if self.half_diameter else max(diameter_mm / 2, 3.0) + 1.5

    def inside(self, distance_mm: np.ndarray, diameter_mm: float) -> np.ndarray:
        """Which of the distances (mm) are hits of a lesion of ``diameter_mm``."""
        reach = self.reach(diameter_mm)
        return distance_mm < reach if self.strict else distance_mm <= reach

    def card(self) -> dict[str, Any]:
        """The rule as the model card names it."""
        return {"name": self.name, "version": self.version, "text": self.text}


SAC_TIGHT = HitRule(
    "sac-tight",
    1,
    "a finding (after 3D NMS) hits every lesion whose centre lies closer than d/2 (inside the lesion's own"
    " sphere, as LUNA16 counts a mark inside a nodule); a lesion counts once, by its best finding; one finding"
    " inside two overlapping sacs finds both",
    half_diameter=True,
    strict=True,
)
REACH = HitRule(
    "reach",
    1,
    "a finding (after 3D NMS) hits every lesion whose centre lies within max(d/2, 3) + 1.5 mm of it; one finding"
    " on two overlapping sacs finds both (the LUNA16 convention); a lesion counts once, by its best finding",
    half_diameter=False,
    strict=False,
)
#: The rule every primary figure is counted by; ``SECOND`` is the column printed beside it
PRIMARY = SAC_TIGHT
SECOND = REACH
RULES = {rule.name: rule for rule in (SAC_TIGHT, REACH)}
#: The primary rule's text (what the card's ``hit_rule`` named before rules had names)
HIT_RULE = PRIMARY.text
#: The false-positive rates per case the FROC is read at (LUNA16's seven; keys of ``sensitivity_at_fp``)
FP_RATES = ("0.125", "0.25", "0.5", "1", "2", "4", "8")
#: LUNA16's interpolation grid of the FROC: false positives per case from FROC_minX to FROC_maxX
FROC_GRID = np.linspace(0.125, 8.0, 10001)


def rule_named(name: str) -> HitRule:
    """The rule of that name (``RULES``).

    Raises
    ------
    ValueError
        No rule of that name.
    """
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"no hit rule {name!r}; the rules are {', '.join(RULES)}") from None


def hit_reach(diameter_mm: float) -> float:
    """The older rule's reach (``REACH``): max(d/2, 3) + 1.5 mm."""
    return REACH.reach(diameter_mm)


def within_lesion(diameter_mm: float) -> float:
    """The sac-tight reach (``SAC_TIGHT``): inside the lesion's own sphere, d/2."""
    return SAC_TIGHT.reach(diameter_mm)


def lesion_hits(
    points_mm: np.ndarray,
    lesions: Sequence[dict[str, Any]],
    rule: HitRule | Callable[[float], float] = PRIMARY,
) -> np.ndarray:
    """Which lesions each point hits.

    Parameters
    ----------
    points_mm
        Finding positions (N, 3) in patient mm.
    lesions
        True lesions, each with ``center_mm`` and ``diameter_mm``.
    rule
        A ``HitRule`` (default ``PRIMARY``), or a reach function of the diameter (distance <= reach hits).

    Returns
    -------
    numpy.ndarray
        Boolean (points, lesions) matrix.
    """
    points = np.asarray(points_mm, float).reshape(-1, 3)
    out = np.zeros((len(points), len(lesions)), bool)
    for li, les in enumerate(lesions):
        d = np.linalg.norm(points - np.asarray(les["center_mm"], float), axis=1)
        diameter = float(les["diameter_mm"])
        out[:, li] = rule.inside(d, diameter) if isinstance(rule, HitRule) else d <= rule(diameter)
    return out


def unmatched(hits: np.ndarray) -> np.ndarray:
    """Per finding, True where it hits no lesion (a false positive)."""
    return ~np.asarray(hits, bool).any(axis=1)


def count_hits(
    findings_xyz_mm: Sequence[Sequence[float]] | np.ndarray,
    lesion_centres_mm: Sequence[Sequence[float]] | np.ndarray,
    lesion_diameters_mm: Sequence[float] | np.ndarray,
    rule: HitRule = PRIMARY,
) -> tuple[int, int]:
    """True and false positives of one series' findings by a hit rule (``lesion_hits``).

    Parameters
    ----------
    findings_xyz_mm
        Finding centres (N, 3) in patient mm.
    lesion_centres_mm
        True lesion centres (M, 3) in patient mm.
    lesion_diameters_mm
        The M lesion diameters (mm).
    rule
        The hit rule (default ``PRIMARY``).

    Returns
    -------
    tuple
        (lesions hit by at least one finding, findings that hit no lesion). A lesion counts once however many
        findings hit it; one finding that hits two lesions finds both.

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
    hits = lesion_hits(points.reshape(-1, 3), lesions, rule)
    return int(hits.any(axis=0).sum()), int(unmatched(hits).sum())


# -- the FROC as LUNA16 computes it ----------------------------------------------------------------------------------
def froc_entries(per_study: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """LUNA16's FROC lists: one entry per lesion some finding hits (its best score) and per false positive.

    Parameters
    ----------
    per_study
        (scores of the findings, which lesions each hits (findings, lesions), number of lesions) per study.

    Returns
    -------
    tuple
        (scores, is-lesion flags, total lesions including the ones no finding hits).
    """
    scores: list[float] = []
    positive: list[bool] = []
    total = 0
    for s, hits, n in per_study:
        s = np.asarray(s, float).reshape(-1)
        hits = np.asarray(hits, bool)
        if hits.ndim != 2:
            hits = hits.reshape(len(s), int(n))
        total += int(n)
        on = np.where(hits, s[:, None], -np.inf)
        best = on.max(axis=0) if len(s) else np.full(hits.shape[1], -np.inf)
        scores += [float(b) for b in best if np.isfinite(b)]
        positive += [True] * int(np.isfinite(best).sum())
        scores += s[unmatched(hits)].tolist()
        positive += [False] * int(unmatched(hits).sum())
    return np.asarray(scores, float), np.asarray(positive, bool), total


def _roc_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (false, true) positives at each distinct threshold, from (0, 0), with the collinear points
    dropped as ``sklearn.metrics.roc_curve(drop_intermediate=True)`` drops them."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.zeros(0, int)
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    if len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    return np.r_[0, fps].astype(float), np.r_[0, tps].astype(float)


def froc_curve(per_study: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The FROC as LUNA16's ``computeFROC`` draws it: (false positives per case, sensitivity) per threshold.

    Parameters
    ----------
    per_study
        As ``froc_entries`` takes it, findings already NMS-suppressed.

    Returns
    -------
    tuple
        (false positives per case, sensitivity), both rising, from (0, 0).
    """
    scores, positive, total = froc_entries(per_study)
    cases = max(len(per_study), 1)
    if not positive.any() or total == 0:
        return np.array([0.0]), np.array([0.0])  # nothing found: LUNA16's CPM is 0
    fps, tps = _roc_counts(scores, positive)
    if positive.all():
        fps = np.zeros_like(fps)  # LUNA16: a system without false positives sits at 0 FP per case
    return fps / cases, tps / total


def read_froc(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float]) -> list[float]:
    """Sensitivity at each rate on the curve interpolated onto LUNA16's grid (``FROC_GRID``), read at the grid
    point nearest each rate (a rate off the grid is read at its own value)."""
    out = []
    for rate in rates:
        if FROC_GRID[0] <= rate <= FROC_GRID[-1]:
            at = float(FROC_GRID[int(np.argmin(np.abs(FROC_GRID - rate)))])
        else:
            at = float(rate)
        out.append(float(np.interp(at, fps, sens)))
    return out


def froc_points(
    per_study: Sequence[tuple[np.ndarray, np.ndarray, int]], fp_rates: Sequence[float] | None = None
) -> dict[str, float]:
    """Sensitivity at each false-positive rate per case, read as LUNA16 reads it.

    Parameters
    ----------
    per_study
        (scores of the findings, which lesions each finding hits, number of lesions) per study, findings
        already NMS-suppressed.
    fp_rates
        False positives per case to read the curve at (default ``FP_RATES``).

    Returns
    -------
    dict
        ``{f"{rate:g}": sensitivity}``.
    """
    rates = [float(r) for r in (fp_rates if fp_rates is not None else FP_RATES)]
    fps, sens = froc_curve(per_study)
    return {f"{r:g}": s for r, s in zip(rates, read_froc(fps, sens, rates), strict=True)}


def cpm(sensitivity_at_fp: dict[str, float]) -> float:
    """LUNA16's competition performance metric: the mean sensitivity at its seven rates (``FP_RATES``).

    Raises
    ------
    KeyError
        A reading without one of the seven rates.
    """
    return float(np.mean([sensitivity_at_fp[k] for k in FP_RATES]))


def threshold_at_fp(per_study: Sequence[tuple[np.ndarray, np.ndarray]], rate: float = 1.0) -> float:
    """The probability above which there are on average ``rate`` false positives per case (0.5 with fewer).

    Parameters
    ----------
    per_study
        (scores of the kept findings, which lesions each hits) per study.
    rate
        False positives per case.

    Returns
    -------
    float
    """
    fp = np.sort(np.concatenate([np.asarray(s, float)[unmatched(h)] for s, h in per_study] or [np.zeros(0)]))[::-1]
    n = int(round(rate * len(per_study)))
    return float(fp[n - 1]) if n >= 1 and len(fp) >= n else 0.5


def threshold_at_1fp(per_study: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """``threshold_at_fp`` at one false positive per case."""
    return threshold_at_fp(per_study, 1.0)
