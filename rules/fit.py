"""Fitting conversion rules per condition group (seed 000, steps S102–S109), and a piecewise-linear alternative.

The reference histogram is the average histogram of the group with the most images (or a group the user
names). For every other group the seed's map ``d' = a·d + b for d > c, d' = d for d ≤ c`` is fitted to maximize
the similarity (``1 − JSD``, or ``exp(−KL)``) of the group's converted average histogram to the reference:
scipy's bounded Nelder–Mead from several starts, each stopping when its gain falls under ``tol`` or after
``max_steps`` steps; the best parameters seen anywhere are kept (identity included, so a fit never makes a
group less similar). The ``piecewise`` method instead maps quantile landmarks of the group onto those of the
reference (Nyúl-style), optionally refined by the same optimizer: a monotone piecewise-linear map.

A converted histogram is computed exactly from the group's cumulative histogram (mass of every output bin
= source mass of its preimage, uniform within a source bin), so the objective is smooth in ``a, b, c``.
No labels are used anywhere: rules can be fitted from unlabeled series (seed 0144).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import xlogy

from rules.apply import IdentityMap, IntensityMap, PiecewiseMap, SeedMap
from rules.histogram import HistogramError, HistogramSpec, average_histogram, is_constant, normalize

log = logging.getLogger(__name__)

_LN2 = float(np.log(2.0))


class FitError(ValueError):
    """Groups that cannot be fitted (fewer than two, empty or constant histograms, unknown reference)."""


@dataclass(frozen=True)
class FitOptions:
    """How to fit.

    ``method``: ``seed`` or ``piecewise``. ``divergence``: ``js`` or ``kl``. ``starts``: optimizer starts.
    ``max_steps``: steps per start. ``tol``: stop a start when its gain is under this. ``scale_bounds``: bounds of
    ``a``. ``knots``: landmarks of the piecewise map; ``refine``: optimize the piecewise knots after the quantile
    initialisation. ``low_quantile``: ``c`` is never set below this quantile of the group (keeps the rule off
    the noise floor); ``None`` lets it range over the whole histogram.
    """

    method: str = "seed"
    divergence: str = "js"
    starts: int = 6
    max_steps: int = 300
    tol: float = 1e-7
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    knots: int = 11
    refine: bool = False
    low_quantile: float | None = 0.01

    def __post_init__(self) -> None:
        if self.method not in ("seed", "piecewise"):
            raise FitError(f"unknown fit method {self.method!r} (seed or piecewise)")
        if self.divergence not in ("js", "kl"):
            raise FitError(f"unknown divergence {self.divergence!r} (js or kl)")
        if self.starts < 1 or self.max_steps < 1 or self.knots < 2:
            raise FitError("starts, max_steps must be ≥ 1 and knots ≥ 2")
        lo, hi = self.scale_bounds
        if not 0 < lo <= 1 <= hi:
            raise FitError(f"scale bounds {self.scale_bounds} must satisfy 0 < lo ≤ 1 ≤ hi")


@dataclass
class GroupFit:
    """The fit for one condition group."""

    key: str
    n_images: int
    reference: bool
    method: str
    parameters: dict[str, Any]
    similarity_before: float
    similarity_after: float
    steps: int = 0
    seconds: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def mapping(self) -> IntensityMap:
        """The fitted intensity map."""
        if self.method == "identity":
            return IdentityMap()
        if self.method == "seed":
            return SeedMap(**self.parameters)
        return PiecewiseMap(tuple(self.parameters["xs"]), tuple(self.parameters["ys"]))

    def summary(self) -> dict[str, Any]:
        """The JSON summary printed by ``harmonode rules fit --json``."""
        return {
            "key": self.key,
            "n_images": self.n_images,
            "reference": self.reference,
            "method": self.method,
            "parameters": self.parameters,
            "similarity_before": round(self.similarity_before, 6),
            "similarity_after": round(self.similarity_after, 6),
        }


@dataclass
class FitResult:
    """All groups of one fit, with the reference and its histogram."""

    reference_key: str
    spec: HistogramSpec
    options: FitOptions
    reference_histogram: np.ndarray = field(repr=False)
    groups: list[GroupFit]

    def group(self, key: str) -> GroupFit:
        """The fit of one group by key string."""
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)


# -- the objective ----------------------------------------------------------------------------------------
def _cdf_at(cdf_edges: np.ndarray, edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.interp(x, edges, cdf_edges)


def transform_histogram(hist: np.ndarray, spec: HistogramSpec, mapping: IntensityMap) -> np.ndarray:
    """The normalized histogram of the values after ``mapping`` (mass outside the range goes to the edge bins).

    Parameters
    ----------
    hist
        Source histogram over ``spec``.
    spec
        The binning.
    mapping
        An increasing map per piece (identity, seed with ``a > 0``, piecewise).

    Returns
    -------
    numpy.ndarray
        The converted, normalized histogram.
    """
    p = normalize(hist)
    edges = spec.edges
    cdf = np.concatenate(([0.0], np.cumsum(p)))
    return _transform(cdf, edges, mapping)


def _transform(cdf: np.ndarray, edges: np.ndarray, mapping: IntensityMap) -> np.ndarray:
    y = edges.copy()
    y[0], y[-1] = -np.inf, np.inf
    if isinstance(mapping, IdentityMap):
        out = np.diff(cdf)
    elif isinstance(mapping, SeedMap):
        a, b, c = mapping.a, mapping.b, mapping.c
        f_c = np.interp(c, edges, cdf)
        g = np.interp(np.minimum(y, c), edges, cdf) + np.interp(np.maximum((y - b) / a, c), edges, cdf) - f_c
        out = np.diff(g)
    else:
        far = 1e6
        xs = np.concatenate(([mapping.xs[0] - far], mapping.xs, [mapping.xs[-1] + far]))
        ys = np.concatenate(([mapping.ys[0] - far], mapping.ys, [mapping.ys[-1] + far]))
        out = np.diff(np.interp(np.interp(y, ys, xs), edges, cdf))
    return np.maximum(out, 0.0)


def _similarity(p: np.ndarray, q: np.ndarray, divergence: str) -> float:
    """Similarity of two normalized histograms (``q`` the reference): ``1 − JSD`` or ``exp(−KL(q ‖ p))``."""
    if divergence == "js":
        m = 0.5 * (p + q)
        js = 0.5 * (np.sum(xlogy(p, p) - xlogy(p, m)) + np.sum(xlogy(q, q) - xlogy(q, m))) / _LN2
        return 1.0 - float(min(1.0, max(0.0, js)))
    p = (p + 1e-12) / (1.0 + 1e-12 * p.size)
    kl = float(np.sum(xlogy(q, q) - xlogy(q, p))) / _LN2
    return float(np.exp(-max(0.0, kl)))


def _quantiles(cdf: np.ndarray, edges: np.ndarray, qs: np.ndarray) -> np.ndarray:
    keep = np.concatenate(([True], np.diff(cdf) > 0))  # strictly increasing for the inverse interpolation
    return np.interp(qs, cdf[keep], edges[keep])


# -- the seed's method ------------------------------------------------------------------------------------
def fit_seed(
    hist: np.ndarray, reference: np.ndarray, spec: HistogramSpec, options: FitOptions | None = None
) -> tuple[SeedMap, float, float, int]:
    """Find ``a, b, c`` maximizing the similarity of the converted ``hist`` to ``reference``.

    Long because it is one optimiser loop (seed 000's hill climbing) with its stopping rules, kept together to
    be read against the seed.

    Parameters
    ----------
    hist, reference
        Average histograms over ``spec`` (normalized here).
    spec
        The binning.
    options
        Optimizer settings.

    Returns
    -------
    tuple
        ``(SeedMap, similarity_before, similarity_after, steps)``; identity (``a=1, b=0``) when nothing helps.

    Raises
    ------
    FitError
        Empty or constant histograms.
    """
    options = options or FitOptions()
    p, q = _checked(hist, "group"), _checked(reference, "reference")
    edges = spec.edges
    cdf = np.concatenate(([0.0], np.cumsum(p)))
    div = options.divergence
    before = _similarity(p, q, div)
    span = spec.hi - spec.lo
    c_lo = _quantiles(cdf, edges, np.array([options.low_quantile]))[0] if options.low_quantile else spec.lo
    c_hi = _quantiles(cdf, edges, np.array([0.999]))[0]
    c_lo, c_hi = float(c_lo), float(max(c_hi, c_lo + spec.bin_width))
    la_lo, la_hi = np.log(options.scale_bounds[0]), np.log(options.scale_bounds[1])
    e_max = 0.25 * span
    # x = (log a, jump e scaled, c scaled); b = c·(1 − a) + e keeps the map continuous at c when e = 0
    scale = np.array([1.0, e_max, c_hi - c_lo])
    bounds = [(la_lo, la_hi), (-1.0, 1.0), (0.0, 1.0)]

    def to_map(x: np.ndarray) -> SeedMap:
        a = float(np.exp(np.clip(x[0], la_lo, la_hi)))
        c = float(c_lo + np.clip(x[2], 0.0, 1.0) * scale[2])
        return SeedMap(a, float(c * (1.0 - a) + np.clip(x[1], -1.0, 1.0) * e_max), c)

    best = {"sim": before, "map": SeedMap(1.0, 0.0, c_lo), "steps": 0}

    def objective(x: np.ndarray) -> float:
        mapping = to_map(x)
        sim = _similarity(_transform(cdf, edges, mapping), q, div)
        best["steps"] += 1
        if sim > best["sim"]:
            best["sim"], best["map"] = sim, mapping
        return -sim

    # stage 1: for c on a grid of quantiles of the group (where its mass is), fit a and the jump at fixed c
    c_grid = (_quantiles(cdf, edges, np.linspace(0.02, 0.995, 4 * options.starts)) - c_lo) / scale[2]
    stage1 = []
    for f in np.unique(np.clip(c_grid, 0.0, 1.0)):
        res = optimize.minimize(
            lambda z, f=f: objective(np.array([z[0], z[1], f])),
            np.zeros(2),
            method="Nelder-Mead",
            bounds=bounds[:2],
            options={
                "maxiter": 60,
                "fatol": options.tol,
                "xatol": 1e-3,
                "initial_simplex": _simplex(np.zeros(2), bounds[:2]),
            },
        )
        stage1.append((float(res.fun), np.array([res.x[0], res.x[1], f])))
    # stage 2: polish the best starts in (a, b, c), each until its gain is under tol or max_steps
    for _, x0 in sorted(stage1, key=lambda t: t[0])[: options.starts]:
        previous = best["sim"]
        optimize.minimize(
            objective,
            x0,
            method="Nelder-Mead",
            bounds=bounds,
            options={
                "maxiter": options.max_steps,
                "fatol": options.tol,
                "xatol": 1e-5,
                "initial_simplex": _simplex(x0, bounds),
            },
        )
        log.debug("start c=%.1f: similarity %.6f → best %.6f", c_lo + x0[2] * scale[2], previous, best["sim"])
    return best["map"], before, best["sim"], best["steps"]


def _simplex(x0: np.ndarray, bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    steps = np.array([0.1, 0.05, 0.1])[: len(x0)]
    pts = [x0.copy()]
    for i, (lo, hi) in enumerate(bounds):
        x = x0.copy()
        x[i] = x[i] + steps[i] if x[i] + steps[i] <= hi else x[i] - steps[i]
        x[i] = min(max(x[i], lo), hi)
        pts.append(x)
    return np.array(pts)


# -- the piecewise-linear alternative ---------------------------------------------------------------------
def fit_piecewise(
    hist: np.ndarray, reference: np.ndarray, spec: HistogramSpec, options: FitOptions | None = None
) -> tuple[PiecewiseMap, float, float, int]:
    """A monotone piecewise-linear map: quantile landmarks of ``hist`` onto those of ``reference`` (Nyúl).

    With ``options.refine`` the knot outputs are then optimized (positive increments) for the same similarity.

    Returns
    -------
    tuple
        ``(PiecewiseMap, similarity_before, similarity_after, steps)``.

    Raises
    ------
    FitError
        Empty or constant histograms.
    """
    options = options or FitOptions(method="piecewise")
    p, q = _checked(hist, "group"), _checked(reference, "reference")
    edges = spec.edges
    cdf_p = np.concatenate(([0.0], np.cumsum(p)))
    cdf_q = np.concatenate(([0.0], np.cumsum(q)))
    lo_q = options.low_quantile or 0.005
    qs = np.linspace(lo_q, 1.0 - lo_q, options.knots)
    xs, ys = _quantiles(cdf_p, edges, qs), _quantiles(cdf_q, edges, qs)
    keep = np.concatenate(([True], np.diff(xs) > 1e-9))
    xs, ys = xs[keep], np.maximum.accumulate(ys[keep])
    if xs.size < 2:
        raise FitError("group histogram has too few distinct values for a piecewise map")
    div = options.divergence
    before = _similarity(p, q, div)
    best = {"sim": before, "map": PiecewiseMap((float(xs[0]), float(xs[-1])), (float(xs[0]), float(xs[-1]))), "n": 0}

    def consider(mapping: PiecewiseMap) -> float:
        sim = _similarity(_transform(cdf_p, edges, mapping), q, div)
        best["n"] += 1
        if sim > best["sim"]:
            best["sim"], best["map"] = sim, mapping
        return sim

    consider(PiecewiseMap(tuple(map(float, xs)), tuple(map(float, ys))))
    if options.refine:
        y0, inc0 = ys[0], np.log(np.maximum(np.diff(ys), 1e-3))

        def objective(z: np.ndarray) -> float:
            yy = np.concatenate(([z[0]], z[0] + np.cumsum(np.exp(z[1:]))))
            return -consider(PiecewiseMap(tuple(map(float, xs)), tuple(map(float, yy))))

        optimize.minimize(
            objective,
            np.concatenate(([y0], inc0)),
            method="Powell",
            options={"maxiter": options.max_steps, "ftol": options.tol},
        )
    return best["map"], before, best["sim"], best["n"]


def _checked(hist: np.ndarray, what: str) -> np.ndarray:
    hist = np.asarray(hist, np.float64)
    try:
        p = normalize(hist)
    except HistogramError as exc:
        raise FitError(f"{what} histogram: {exc}") from exc
    if is_constant(p):
        raise FitError(f"{what} histogram has a single value (constant images): nothing to fit")
    return p


# -- all groups -------------------------------------------------------------------------------------------
def fit_groups(
    groups: Mapping[str, Sequence[np.ndarray]],
    spec: HistogramSpec,
    options: FitOptions | None = None,
    reference: str | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> FitResult:
    """Fit one rule per condition group against the reference group (seed steps S103–S109).

    Parameters
    ----------
    groups
        Per condition key (string): the per-image histograms over ``spec``.
    spec
        The binning of every histogram.
    options
        Method and optimizer settings.
    reference
        The reference group's key; default: the group with the most images (ties: the first key in sort order).
    progress
        Wraps the iteration over groups (e.g. ``tqdm``).

    Returns
    -------
    FitResult
        One :class:`GroupFit` per group (the reference's is identity), in key order.

    Raises
    ------
    FitError
        Fewer than two groups, an unknown reference, or a group whose histograms are empty or constant.
    """
    options = options or FitOptions()
    if len(groups) < 2:
        raise FitError(
            f"need images under at least two imaging conditions to fit rules, found {len(groups)}"
            + (f" ({next(iter(groups))})" if groups else "")
        )
    averages: dict[str, tuple[np.ndarray, int]] = {}
    for key in sorted(groups):
        try:
            averages[key] = average_histogram(groups[key])
        except HistogramError as exc:
            raise FitError(f"group {key}: {exc}") from exc
        if is_constant(averages[key][0]):
            raise FitError(f"group {key}: every image is constant (one value): nothing to fit")
    if reference is None:
        reference = max(sorted(averages), key=lambda k: averages[k][1])
    elif reference not in averages:
        raise FitError(f"reference {reference!r} is not one of the groups: {', '.join(sorted(averages))}")
    ref_hist, ref_n = averages[reference]
    keys: Iterable[str] = sorted(averages)
    fits = []
    for key in progress(keys) if progress else keys:
        hist, n = averages[key]
        t0 = time.perf_counter()
        if key == reference:
            fits.append(GroupFit(key, ref_n, True, "identity", {}, 1.0, 1.0, 0, 0.0, hist))
            continue
        fitter = fit_seed if options.method == "seed" else fit_piecewise
        mapping, before, after, steps = fitter(hist, ref_hist, spec, options)
        seconds = time.perf_counter() - t0
        log.info("%s: similarity %.4f → %.4f (%s, %d steps, %.2fs)", key, before, after, options.method, steps, seconds)
        fits.append(GroupFit(key, n, False, mapping.method, mapping.parameters(), before, after, steps, seconds, hist))
    return FitResult(reference, spec, options, ref_hist, fits)
