"""Per-region intensity distribution transfer (seed 001): statistics, Reinhard transfer, neighbourhood search.

An image is split into regions, either intensity classes cut at thresholds (CT: air / soft tissue / bone and
contrast) or a label map given by the caller. Each region is described by its mean and standard deviation;
a *parameter set* is one ``(mean, std)`` per region. Converting an image towards a target parameter set is
the Reinhard transfer, region by region::

    x' = (x − s_mean) / s_std · t_std + t_mean

which is a per-region affine map, so it runs as two small gathers and one fused multiply-add over the image.
Hard-example mining (``models/mining``) tries stored parameter sets, keeps the converted images the model finds
hard, and then tries the sets near the hard ones: those within distance ``R`` in (mean, std) space (the seed's
Expression 3), or within separate mean and std tolerances (Expression 4), chosen from stored sets
(:func:`neighbours`) or generated (:func:`sample_neighbours`).

Everything here is a pure function on numpy arrays; nothing reads files or the network.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ParameterSet",
    "RegionStats",
    "neighbours",
    "parameter_distance",
    "region_labels",
    "region_statistics",
    "reinhard_transfer",
    "sample_neighbours",
]

MAX_REGIONS = 256
_CHUNK = 1 << 20  # pixels per statistics pass


@dataclass(frozen=True)
class RegionStats:
    """Mean and standard deviation of one region's values, and how many pixels they were measured on.

    Parameters
    ----------
    mean, std
        Finite; ``std ≥ 0``.
    n
        Pixels measured (``0``: the region was empty in that image, so it has no statistics);
        ``None`` for a hand-set or generated target.
    """

    mean: float
    std: float
    n: int | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean) and np.isfinite(self.std)):
            raise ValueError(f"region statistics must be finite; got mean={self.mean}, std={self.std}")
        if self.std < 0:
            raise ValueError(f"region standard deviation must be ≥ 0; got {self.std}")
        if self.n is not None and self.n < 0:
            raise ValueError(f"region pixel count must be ≥ 0; got {self.n}")

    @property
    def empty(self) -> bool:
        """True when measured on no pixel."""
        return self.n == 0


@dataclass(frozen=True)
class ParameterSet:
    """One ``(mean, std)`` per region: a stored target for the transfer, or an image's measured statistics.

    Parameters
    ----------
    regions
        Per-region statistics, region 0 first.
    thresholds
        Increasing intensity cuts that define the regions (``len(regions) − 1`` of them), or ``()`` when the
        regions come from a label map.
    name
        Free label (the source image or series, for provenance).
    """

    regions: tuple[RegionStats, ...]
    thresholds: tuple[float, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("a parameter set needs at least one region")
        if len(self.regions) > MAX_REGIONS:
            raise ValueError(f"a parameter set has at most {MAX_REGIONS} regions; got {len(self.regions)}")
        if self.thresholds:
            _check_thresholds(self.thresholds)
            if len(self.thresholds) != len(self.regions) - 1:
                raise ValueError(
                    f"{len(self.thresholds)} threshold(s) define {len(self.thresholds) + 1} regions, "
                    f"but the parameter set has {len(self.regions)}"
                )

    @classmethod
    def of(cls, pairs: Sequence[tuple[float, float]], thresholds: Sequence[float] = (), name: str = "") -> ParameterSet:
        """A parameter set from ``(mean, std)`` pairs."""
        return cls(tuple(RegionStats(float(m), float(s)) for m, s in pairs), tuple(float(t) for t in thresholds), name)

    @property
    def n_regions(self) -> int:
        """Number of regions."""
        return len(self.regions)

    @property
    def vector(self) -> np.ndarray:
        """``(n_regions, 2)`` float64 array of ``(mean, std)``."""
        return np.array([(r.mean, r.std) for r in self.regions], dtype=np.float64)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored with a rule or a mining run)."""
        return {
            "name": self.name,
            "thresholds": list(self.thresholds),
            "regions": [{"mean": r.mean, "std": r.std, "n": r.n} for r in self.regions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParameterSet:
        """Inverse of :meth:`as_dict`.

        Raises
        ------
        ValueError
            Missing or malformed fields.
        """
        try:
            regions = tuple(
                RegionStats(float(r["mean"]), float(r["std"]), None if r.get("n") is None else int(r["n"]))
                for r in data["regions"]
            )
            thresholds = tuple(float(t) for t in data.get("thresholds", ()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed parameter set: {exc!r}") from exc
        return cls(regions, thresholds, str(data.get("name", "")))


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError("thresholds must be a flat sequence of numbers")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"thresholds must be finite; got {list(t)}")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        raise ValueError(f"thresholds must be strictly increasing; got {list(t)}")
    if t.size + 1 > MAX_REGIONS:
        raise ValueError(f"at most {MAX_REGIONS - 1} thresholds; got {t.size}")
    return t


def _check_values(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    if v.size == 0:
        raise ValueError("the image is empty")
    if v.dtype.kind not in "iuf":
        raise ValueError(f"image values must be numeric; got dtype {v.dtype}")
    if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
        raise ValueError("the image has non-finite values (NaN or inf)")
    return v


def region_labels(values: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Region index of every pixel: 0 below ``thresholds[0]``, …, ``len(thresholds)`` at or above the last.

    Parameters
    ----------
    values
        The image, any shape.
    thresholds
        Strictly increasing cuts (empty: one region).

    Returns
    -------
    numpy.ndarray
        uint8 labels of ``values.shape``.

    Raises
    ------
    ValueError
        Empty or non-finite image, thresholds not finite or not increasing.
    """
    v = _check_values(values)
    t = _check_thresholds(thresholds)
    if t.size == 0:
        return np.zeros(v.shape, np.uint8)
    return np.searchsorted(t, v, side="right").astype(np.uint8)


def _resolve_labels(
    values: np.ndarray, labels: np.ndarray | None, thresholds: Sequence[float] | None, n_regions: int | None
) -> tuple[np.ndarray, int, tuple[float, ...]]:
    """Labels, region count and thresholds (``()`` for a label map) for ``values``."""
    if labels is not None and thresholds:
        raise ValueError("give either a label map or thresholds, not both")
    if labels is None:
        cuts = tuple(float(t) for t in (thresholds or ()))
        lab = region_labels(values, cuts)
        count = len(cuts) + 1
        if n_regions is not None and n_regions != count:
            raise ValueError(f"{len(cuts)} threshold(s) make {count} regions, not {n_regions}")
        return lab, count, cuts
    lab = np.asarray(labels)
    if lab.shape != np.shape(values):
        raise ValueError(f"label map shape {lab.shape} differs from the image shape {np.shape(values)}")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"a label map must hold integers; got dtype {lab.dtype}")
    lo, hi = int(lab.min()), int(lab.max())
    count = n_regions if n_regions is not None else hi + 1
    if lo < 0 or hi >= count or count > MAX_REGIONS:
        raise ValueError(f"labels must lie in [0, {min(count, MAX_REGIONS) - 1}]; got [{lo}, {hi}]")
    return lab, count, ()


def region_statistics(
    values: np.ndarray,
    labels: np.ndarray | None = None,
    thresholds: Sequence[float] | None = None,
    n_regions: int | None = None,
    name: str = "",
) -> ParameterSet:
    """Per-region mean and (population) standard deviation of an image.

    Parameters
    ----------
    values
        The image (2D slice or 3D volume; real units such as HU).
    labels
        Integer region of every pixel (same shape), or None to cut by ``thresholds``.
    thresholds
        Intensity cuts defining the regions (None or empty with no labels: the whole image is one region).
    n_regions
        Number of regions for a label map (default: highest label + 1); regions absent from the image get
        ``n = 0``.
    name
        Label of the returned set.

    Returns
    -------
    ParameterSet
        One :class:`RegionStats` per region (empty regions: mean 0, std 0, ``n = 0``).

    Raises
    ------
    ValueError
        Empty or non-finite image, label map of another shape or out of range, bad thresholds.
    """
    v = _check_values(values)
    lab, count, cuts = _resolve_labels(v, labels, thresholds, n_regions)
    flat, x = lab.reshape(-1), v.reshape(-1)
    n = np.bincount(flat, minlength=count)
    sums = np.zeros(count)
    for part in range(0, x.size, _CHUNK):  # chunks: a float64 copy of a whole CT volume would be ~600 MB
        sums += np.bincount(flat[part : part + _CHUNK], weights=x[part : part + _CHUNK], minlength=count)
    mean = sums / np.maximum(n, 1)
    # two passes: the centred sum of squares stays accurate where E[x²] − E[x]² would cancel (HU ~ 1e3, std ~ 1)
    squares = np.zeros(count)
    for part in range(0, x.size, _CHUNK):
        lab_part = flat[part : part + _CHUNK]
        centred = x[part : part + _CHUNK] - mean[lab_part]
        squares += np.bincount(lab_part, weights=centred * centred, minlength=count)
    var = squares / np.maximum(n, 1)
    regions = tuple(RegionStats(float(m), float(np.sqrt(s)), int(k)) for m, s, k in zip(mean, var, n, strict=True))
    return ParameterSet(regions, cuts, name)


def reinhard_transfer(
    values: np.ndarray,
    target: ParameterSet,
    labels: np.ndarray | None = None,
    source: ParameterSet | None = None,
    keep_regions: Collection[int] = (),
) -> np.ndarray:
    """Convert an image so that each region has the target's mean and std: ``(x − s_mean)/s_std · t_std + t_mean``.

    Parameters
    ----------
    values
        The image, any shape.
    target
        The stored target parameter set. Without ``labels`` its thresholds define the regions.
    labels
        Region of every pixel (a segmentation), or None to cut by ``target.thresholds``.
    source
        The image's own statistics over the same regions (computed when None).
    keep_regions
        Regions whose pixels are copied unchanged (e.g. air and fat below soft tissue, as seed 000's claim 2).

    Returns
    -------
    numpy.ndarray
        float32 converted image of ``values.shape``. A constant source region (``s_std = 0``) becomes ``t_mean``.

    Raises
    ------
    ValueError
        Shape or region-count mismatch, a keep region that does not exist, a region with pixels in the image
        but no statistics in the target (``n = 0``), an empty or non-finite image.
    """
    v = _check_values(values)
    lab, count, _ = _resolve_labels(v, labels, None if labels is not None else target.thresholds, target.n_regions)
    if source is None:
        source = region_statistics(v, labels=lab, n_regions=count)
    elif source.n_regions != count:
        raise ValueError(f"the source parameter set has {source.n_regions} regions, the image {count}")
    keep = set(int(k) for k in keep_regions)
    if any(k < 0 or k >= count for k in keep):
        raise ValueError(f"keep_regions {sorted(keep)} name regions outside [0, {count - 1}]")
    present = np.bincount(lab.reshape(-1), minlength=count) > 0
    missing = [k for k in range(count) if present[k] and k not in keep and target.regions[k].empty]
    if missing:
        raise ValueError(f"the target parameter set has no statistics (n = 0) for region(s) {missing}")
    s, t = source.vector, target.vector
    gain = np.divide(t[:, 1], s[:, 1], out=np.zeros(count), where=s[:, 1] > 0)
    offset = t[:, 0] - s[:, 0] * gain
    for k in keep:
        gain[k], offset[k] = 1.0, 0.0
    g, o = gain.astype(np.float32), offset.astype(np.float32)
    out = np.take(g, lab)
    out *= v.astype(np.float32, copy=False)
    out += np.take(o, lab)
    return out


def _stack(candidates: Sequence[ParameterSet], n_regions: int) -> np.ndarray:
    bad = [i for i, c in enumerate(candidates) if c.n_regions != n_regions]
    if bad:
        raise ValueError(f"candidate(s) {bad[:5]} do not have {n_regions} regions like the centre")
    if not candidates:
        return np.empty((0, n_regions, 2))
    return np.stack([c.vector for c in candidates])


def parameter_distance(a: ParameterSet, b: ParameterSet) -> float:
    """Euclidean distance in (mean, std) space over all regions (one region: the seed's Expression 3).

    Raises
    ------
    ValueError
        The sets have different region counts.
    """
    if a.n_regions != b.n_regions:
        raise ValueError(f"parameter sets with {a.n_regions} and {b.n_regions} regions cannot be compared")
    return float(np.sqrt(np.sum(np.square(a.vector - b.vector))))


def neighbours(
    centre: ParameterSet,
    candidates: Sequence[ParameterSet],
    radius: float | None = None,
    mean_tolerance: float | None = None,
    std_tolerance: float | None = None,
) -> list[tuple[int, float]]:
    """The stored parameter sets near ``centre``, nearest first (the seed's search around a hard example).

    Either ``radius`` (Expression 3: Euclidean distance over every region's (mean, std) ``< R``) or both
    tolerances (Expression 4: ``|Δmean| < M`` and ``|Δstd| < S`` in every region).

    Parameters
    ----------
    centre
        The parameter set used for a hard example.
    candidates
        Stored parameter sets to choose from (a set equal to ``centre`` is at distance 0 and included).
    radius
        ``R > 0``.
    mean_tolerance, std_tolerance
        ``M > 0`` and ``S > 0``, instead of ``radius``.

    Returns
    -------
    list[tuple[int, float]]
        ``(index into candidates, Euclidean distance)`` of each neighbour, by distance then index.

    Raises
    ------
    ValueError
        Neither or both criteria, a non-positive or non-finite bound, a candidate with another region count.
    """
    box = mean_tolerance is not None or std_tolerance is not None
    if (radius is None) == (not box) or (box and (mean_tolerance is None or std_tolerance is None)):
        raise ValueError("give either radius, or both mean_tolerance and std_tolerance")
    bounds = (radius,) if radius is not None else (mean_tolerance, std_tolerance)
    if not all(b is not None and np.isfinite(b) and b > 0 for b in bounds):
        raise ValueError(f"neighbourhood bounds must be finite and > 0; got {bounds}")
    stacked = _stack(candidates, centre.n_regions)
    delta = stacked - centre.vector
    dist = np.sqrt(np.sum(np.square(delta), axis=(1, 2)))
    if radius is not None:
        inside = dist < radius
    else:
        dev = np.abs(delta)
        inside = np.all(dev[:, :, 0] < mean_tolerance, axis=1) & np.all(dev[:, :, 1] < std_tolerance, axis=1)
    idx = np.flatnonzero(inside)
    idx = idx[np.lexsort((idx, dist[idx]))]
    return [(int(i), float(dist[i])) for i in idx]


def sample_neighbours(
    centre: ParameterSet, radius: float, count: int, rng: np.random.Generator, name: str = "near"
) -> list[ParameterSet]:
    """Generate ``count`` parameter sets within Euclidean distance ``< radius`` of ``centre`` (seed: generate
    ``(t_mean1 + α, t_std1 + β)`` when no stored set is near). Uniform in the ball; a std that would turn
    negative is reflected at 0, which keeps it inside the ball.

    Raises
    ------
    ValueError
        ``radius`` not finite and > 0, or ``count < 0``.
    """
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be finite and > 0; got {radius}")
    if count < 0:
        raise ValueError(f"count must be ≥ 0; got {count}")
    dim = 2 * centre.n_regions
    direction = rng.standard_normal((count, dim))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-300)
    # radius·u^(1/d) is uniform in the ball; 0.999 keeps the bound strict under rounding
    r = 0.999 * radius * rng.random((count, 1)) ** (1.0 / dim)
    points = centre.vector.reshape(1, dim) + direction * r
    points = points.reshape(count, centre.n_regions, 2)
    points[:, :, 1] = np.abs(points[:, :, 1])
    return [ParameterSet.of([tuple(p) for p in pt], centre.thresholds, f"{name}-{i}") for i, pt in enumerate(points)]
