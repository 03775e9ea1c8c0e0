"""The residual stage of the harmonization (seed 003): what the network may take, and the stage itself.

``models.residual_net.ResidualModel.maps`` runs the network (:class:`models.nets.ResidualUNet`, one per
modality) over a volume, slice by slice with its two neighbours as a thin slab, and returns the blur and
noise residual maps in the volume's real units. What the rule's strengths do with them is
``rules.strengths.apply_strengths``: pure arithmetic, so ``residual_stage`` looks the maps up in the cache
first and a change of α never calls the network. A series the network was not trained for (fewer than
three slices, no pixel spacing, a pixel spacing outside the trained range, another modality) is refused
with the reason; the pipeline then keeps the histogram stage's result and says why in the SR. This module
needs no torch: a node that only receives, or whose rules have no residual stage, never loads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.findings import VolumeGeometry
from rules.strengths import ResidualStage, apply_strengths, noise_model_for
from storage.maps import MapCache

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_NAME = "residual.pt"
CARD_NAME = "residual.json"
#: In-plane pixel spacings (mm) the network was trained over; outside, the kernel's blur spans other pixels.
SPACING_RANGE_MM = (0.3, 2.0)
MIN_SLICES = 3
#: How real units become network units (in the card, checked at load): CT HU / 1000, MR by the series' 99th
#: percentile (the scale after the histogram stage varies with the rule's fit).
NORMALISATION: dict[str, dict[str, Any]] = {
    "CT": {"method": "fixed", "scale": 1000.0},
    "MR": {"method": "percentile", "q": 99.0},
    "descriptors": {"method": "lag-1 MAD ×10, lag-1/lag-2 MAD ratio, pixel spacing mm"},
}


class ResidualRefused(ValueError):
    """A series the residual network cannot take; the message says why."""


@dataclass(frozen=True)
class ResidualMaps:
    """The blur and noise residual maps of one volume (float32, real units, the volume's shape)."""

    blur: np.ndarray
    noise: np.ndarray


def scale_of(values: np.ndarray, modality: str) -> float:
    """The factor that brings a volume to network units (``NORMALISATION``)."""
    spec = NORMALISATION[modality]
    if spec["method"] == "fixed":
        return float(spec["scale"])
    sample = np.asarray(values, dtype=np.float32).ravel()[:: max(1, values.size // 1_000_000)]
    return max(float(np.percentile(sample, spec["q"])), 1e-6)


#: Central slices of a series that its per-series figures are read from (descriptors, strengths).
CENTRAL_SLICES = 16


def central_slices(values: np.ndarray, slices: int = CENTRAL_SLICES) -> np.ndarray:
    """The central ``slices`` slices of a volume (all of them when it has fewer)."""
    start = max(0, (values.shape[0] - slices) // 2)
    return values[start : start + slices]


def descriptors(values: np.ndarray, spacing_mm: float, scale: float) -> np.ndarray:
    """The noise descriptors the network reads beside the slab: (level, correlation, pixel spacing).

    From the differences of horizontally adjacent pixels, robust to edges (medians): the level is the
    median absolute lag-1 difference (network units, ×10), the correlation the ratio of the lag-1 to the
    lag-2 median absolute difference (1 for white noise, below for a soft kernel's smooth noise, above for
    an edge-enhancing kernel's), and the in-plane pixel spacing in mm. The same function runs on training
    slabs and on a series' central slices.
    """
    x = np.asarray(values, dtype=np.float32) / np.float32(scale)
    lag1 = np.median(np.abs(x[..., 1:] - x[..., :-1]))
    lag2 = np.median(np.abs(x[..., 2:] - x[..., :-2]))
    return np.array([10.0 * lag1, lag1 / max(float(lag2), 1e-6), spacing_mm], dtype=np.float32)


def check_takes(values: np.ndarray, geometry: VolumeGeometry | None, modality: str) -> None:
    """Refuse what the network was not trained for.

    Raises
    ------
    ResidualRefused
        Another modality, fewer than three slices, no pixel spacing, or a spacing outside the trained range.
    """
    if modality not in ("CT", "MR"):
        raise ResidualRefused(f"the residual network reads CT and MR, not {modality or 'an unknown modality'}")
    if values.ndim != 3 or values.shape[0] < MIN_SLICES:
        raise ResidualRefused(f"the residual network reads a slab of {MIN_SLICES} slices; the series has fewer")
    spacing = None if geometry is None else geometry.spacing[1:]
    if spacing is None or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ResidualRefused("the series has no pixel spacing: the residual network's kernels are in mm")
    lo, hi = SPACING_RANGE_MM
    if not all(lo <= s <= hi for s in spacing):
        raise ResidualRefused(
            f"pixel spacing {spacing[0]:.2f} × {spacing[1]:.2f} mm is outside the trained {lo}–{hi} mm"
        )


class MapsModel(Protocol):
    """What the stage needs of a residual model (``models.residual_net.ResidualModel``)."""

    version: str
    cache_tag: str  # what cached maps are keyed by (the version and the weights' digest)

    def maps(self, values: np.ndarray, geometry: VolumeGeometry | None, modality: str) -> ResidualMaps: ...


@dataclass(frozen=True)
class ResidualOutcome:
    """What the residual stage did to a series: the values to detect on, and whether the stage ran."""

    values: np.ndarray
    applied: bool
    reason: str = ""
    cached: bool = False


def residual_stage(
    values: np.ndarray,
    geometry: VolumeGeometry | None,
    modality: str,
    stage: ResidualStage | None,
    model: MapsModel | None,
    cache: MapCache | None,
    cache_key: tuple[str, str],
) -> ResidualOutcome:
    """Apply a rule's residual stage to the histogram stage's output (maps from the cache when present).

    Parameters
    ----------
    values
        The histogram stage's output (real units).
    geometry, modality
        The series' geometry and modality.
    stage
        The rule's residual stage (None: the histogram stage's output stands).
    model
        The loaded residual model (None: not installed).
    cache
        The map cache (None: maps are computed every time).
    cache_key
        (series UID, histogram rule label): what, with the model version, the maps depend on.

    Returns
    -------
    ResidualOutcome
        ``applied`` False with the reason when the stage could not run; the input values then stand.
    """
    if stage is None:
        return ResidualOutcome(values, False)
    if model is None:
        return ResidualOutcome(values, False, "no residual model is installed on this node")
    if stage.model_version != model.version:
        return ResidualOutcome(
            values, False, f"the rule's strengths were fitted for residual model {stage.model_version}, "
            f"this node has {model.version} (refit with `harmonode rules fit`)",
        )
    tag = model.cache_tag
    cached = cache.get(cache_key[0], cache_key[1], tag) if cache is not None else None
    if cached is None:
        try:
            maps = model.maps(values, geometry, modality)
        except ResidualRefused as exc:
            return ResidualOutcome(values, False, str(exc))
        if cache is not None:
            cache.put(cache_key[0], cache_key[1], tag, maps.blur, maps.noise)
            cached = cache.get(cache_key[0], cache_key[1], tag)
        blur, noise = (cached.blur, cached.noise) if cached is not None else (maps.blur, maps.noise)
        hit = False
    else:
        blur, noise, hit = cached.blur, cached.noise, True
    out = apply_strengths(values, blur, noise, stage.alpha_blur, stage.alpha_noise, noise_model_for(modality, noise))
    return ResidualOutcome(out, True, cached=hit)
