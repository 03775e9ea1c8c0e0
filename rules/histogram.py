"""Histograms in real units (HU for CT) over a fixed range and bin width, and their average per condition group.

Counting uses ``np.bincount`` on integer bin indices (several times faster than ``np.histogram``). Values outside
the range are counted in the edge bins. An optional body mask drops air outside the patient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


class HistogramError(ValueError):
    """Images or histograms that cannot be compared (empty, constant, mismatched spec)."""


@dataclass(frozen=True)
class HistogramSpec:
    """A fixed binning: ``[lo, hi)`` in real units with ``bin_width``; ``body_threshold`` masks out air.

    ``body_threshold`` (real units, or None for no mask): values at or under it are not counted;
    ``fill_holes`` also counts what the mask encloses in each slice (lungs, sinuses), at some cost.
    """

    lo: float = -1024.0
    hi: float = 3072.0
    bin_width: float = 2.0
    body_threshold: float | None = -500.0
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.hi > self.lo and self.bin_width > 0):
            raise HistogramError(f"histogram range [{self.lo}, {self.hi}) with bin width {self.bin_width} is empty")
        if self.n_bins > 1_000_000:
            raise HistogramError(f"histogram with {self.n_bins} bins is too fine")

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return int(np.ceil((self.hi - self.lo) / self.bin_width))

    @property
    def edges(self) -> np.ndarray:
        """Bin edges (n_bins + 1)."""
        return self.lo + self.bin_width * np.arange(self.n_bins + 1, dtype=np.float64)

    @property
    def centers(self) -> np.ndarray:
        """Bin centres (n_bins)."""
        return self.lo + self.bin_width * (np.arange(self.n_bins, dtype=np.float64) + 0.5)

    def as_dict(self) -> dict[str, object]:
        """Plain dict (stored with each rule)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> HistogramSpec:
        """Inverse of :meth:`as_dict` (unknown keys ignored)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]


#: Defaults per modality: CT in HU; MR in stored units (no absolute scale), wide range, coarser bins.
CT_SPEC = HistogramSpec()
MR_SPEC = HistogramSpec(lo=0.0, hi=8192.0, bin_width=8.0, body_threshold=None)


def default_spec(modality: str) -> HistogramSpec:
    """The default binning for a modality (``MR`` or anything else, treated as CT)."""
    return MR_SPEC if modality.upper() == "MR" else CT_SPEC


def body_mask(values: np.ndarray, spec: HistogramSpec) -> np.ndarray | None:
    """Voxels inside the body (above ``body_threshold``; holes filled per slice when asked), or None for all."""
    if spec.body_threshold is None:
        return None
    mask = values > spec.body_threshold
    if spec.fill_holes:
        planes = mask.reshape((-1, *mask.shape[-2:]))
        for k in range(planes.shape[0]):
            planes[k] = ndimage.binary_fill_holes(planes[k])
    return mask


def image_histogram(values: np.ndarray, spec: HistogramSpec) -> np.ndarray:
    """Pixel counts per bin of one image or volume in real units (float64, length ``spec.n_bins``).

    Parameters
    ----------
    values
        Real-unit values (any shape, any numeric dtype).
    spec
        The binning and mask.

    Returns
    -------
    numpy.ndarray
        Counts (not normalized); all zero when the mask leaves nothing.
    """
    values = np.asarray(values)
    mask = body_mask(values, spec)
    if mask is not None:
        values = values[mask]
    if values.size == 0:
        return np.zeros(spec.n_bins)
    idx = (values.ravel().astype(np.float32) - np.float32(spec.lo)) * np.float32(1.0 / spec.bin_width)
    np.clip(idx, 0, spec.n_bins - 1, out=idx)
    return np.bincount(idx.astype(np.intp), minlength=spec.n_bins).astype(np.float64)


def stored_histogram(stored: np.ndarray, slope: float, intercept: float, spec: HistogramSpec) -> np.ndarray:
    """Histogram of stored integer pixels without converting every pixel: count stored values, then bin them.

    Exact for any rescale; the fast path when the stored range is small (int16 / uint16).
    """
    stored = np.asarray(stored)
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return image_histogram(stored.astype(np.float64) * slope + intercept, spec)
    offset = 32768 if stored.dtype.kind == "i" else 0
    counts = np.bincount((stored.ravel().astype(np.int32) + offset), minlength=65536 if offset else 1)
    levels = (np.arange(counts.size) - offset) * slope + intercept
    keep = counts > 0
    if spec.body_threshold is not None and not spec.fill_holes:
        keep &= levels > spec.body_threshold
    elif spec.fill_holes:
        return image_histogram(stored.astype(np.float64) * slope + intercept, spec)
    idx = np.clip(((levels[keep] - spec.lo) / spec.bin_width).astype(np.intp), 0, spec.n_bins - 1)
    return np.bincount(idx, weights=counts[keep].astype(np.float64), minlength=spec.n_bins)


def normalize(hist: np.ndarray) -> np.ndarray:
    """The histogram as a probability distribution.

    Raises
    ------
    HistogramError
        Empty (no counts) or not finite.
    """
    hist = np.asarray(hist, np.float64)
    total = hist.sum()
    if not np.isfinite(total) or total <= 0 or (hist < 0).any():
        raise HistogramError("histogram is empty (no pixels inside the body mask and range)")
    return hist / total


def average_histogram(histograms: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
    """The average of per-image histograms, each normalized first (seed step S104), and how many were used.

    Images with no counts are skipped (logged).

    Raises
    ------
    HistogramError
        No non-empty histogram.
    """
    total: np.ndarray | None = None
    n = skipped = 0
    for hist in histograms:
        hist = np.asarray(hist, np.float64)
        s = hist.sum()
        if s <= 0 or not np.isfinite(s):
            skipped += 1
            continue
        total = hist / s if total is None else total + hist / s
        n += 1
    if skipped:
        log.info("average histogram: %d empty image(s) skipped", skipped)
    if total is None:
        raise HistogramError("no image has pixels inside the histogram range and body mask")
    return total / n, n


def is_constant(hist: np.ndarray) -> bool:
    """True when all counts fall in one bin (a constant image: nothing to fit)."""
    return int(np.count_nonzero(np.asarray(hist))) <= 1


_EPS = 1e-12


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) of two histograms (normalized here)."""
    p, q = normalize(p), normalize(q)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kq = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(max(0.0, min(1.0, 0.5 * (kp + kq))))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Kullback–Leibler divergence KL(p ‖ q) in bits, with q smoothed by a tiny floor so it stays finite."""
    p, q = normalize(p), normalize(q)
    q = (q + _EPS) / (1.0 + _EPS * q.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(p > 0, p * np.log2(p / q), 0.0).sum())


def similarity(p: np.ndarray, q: np.ndarray, divergence: str = "js") -> float:
    """Similarity in [0, 1]: ``1 − JSD`` (``js``) or ``exp(−KL(p ‖ q))`` (``kl``)."""
    if divergence == "js":
        return 1.0 - js_divergence(p, q)
    if divergence == "kl":
        return float(np.exp(-kl_divergence(p, q)))
    raise HistogramError(f"unknown divergence {divergence!r} (js or kl)")
