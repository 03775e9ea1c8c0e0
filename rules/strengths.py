"""The residual stage of a rule (seed 003): strengths, noise models, and the seed's arithmetic on cached maps.

A network (``models.residual``) gives two residual maps per series: ``R_blur`` (added to the input, it takes
out the condition's kernel blur or sharpening) and ``R_noise`` (added, it takes out the dose or Rician
noise). The stage of a rule then only does arithmetic, so a change of strength never re-runs the network:

    intermediate = input + α_blur · R_blur
    R_noise'     = R_noise · σ(intermediate) / σ(input)        (per pixel, the noise model's std)
    output       = intermediate + α_noise · R_noise'

The noise model says how the noise std follows the signal (the seed's formula (1) for a camera): CT noise in
HU is set by dose and kernel, not by the pixel value, so its ratio is 1; TOF-MRA magnitude noise is Rician,
smaller where the signal is near zero. As the seed allows, σ is evaluated on the noise-corrected images
(``input + R_noise`` and ``intermediate + R_noise``), which is more accurate when the noise is large.

``propose_strengths`` picks α_blur so the edge width, then α_noise so the noise level, of a condition's
series match the reference condition's (``rules.quality``): the search runs on cached maps only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.special

#: Allowed strengths: blur correction may overshoot a little (sharper than the reference's kernel is refused
#: beyond 1.5); noise may be removed fully (1) or added back to a noisier reference (down to −1).
ALPHA_BLUR_RANGE = (-1.0, 1.5)
ALPHA_NOISE_RANGE = (-1.0, 1.0)


class StageError(ValueError):
    """Residual-stage strengths or a model version that cannot be stored."""


@dataclass(frozen=True)
class ResidualStage:
    """The residual stage a rule carries after its histogram stage: two strengths and the model they need."""

    alpha_blur: float
    alpha_noise: float
    model_version: str

    def __post_init__(self) -> None:
        for name, value, (lo, hi) in (
            ("alpha_blur", self.alpha_blur, ALPHA_BLUR_RANGE),
            ("alpha_noise", self.alpha_noise, ALPHA_NOISE_RANGE),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or not lo <= value <= hi:
                raise StageError(f"residual stage {name} must be a number in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.model_version, str) or not self.model_version.strip():
            raise StageError("a residual stage names the residual model version it was fitted with")

    @property
    def text(self) -> str:
        """How results name the stage, in ASCII for DICOM text: ``residual alpha_blur=0.90 alpha_noise=0.75 …``."""
        strengths = f"alpha_blur={self.alpha_blur:.2f} alpha_noise={self.alpha_noise:.2f}"
        return f"residual {strengths} (model {self.model_version})"

    def as_dict(self) -> dict[str, Any]:
        """The stored and exported form."""
        return {"alpha_blur": float(self.alpha_blur), "alpha_noise": float(self.alpha_noise),
                "model_version": self.model_version}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ResidualStage | None:
        """Inverse of :meth:`as_dict` (None or an empty mapping: no residual stage).

        Raises
        ------
        StageError
            Missing or invalid fields.
        """
        if not data:
            return None
        try:
            return cls(float(data["alpha_blur"]), float(data["alpha_noise"]), str(data["model_version"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, StageError):
                raise
            raise StageError(f"residual stage {dict(data)!r} is incomplete: {exc!r}") from exc


# -- noise models: how the noise std follows the signal --------------------------------------------------------
class NoiseModel(Protocol):
    """The noise std per pixel of an image whose noise-free signal is ``signal``."""

    def std(self, signal: np.ndarray) -> np.ndarray | float: ...


@dataclass(frozen=True)
class FlatNoise:
    """CT: the std is set by dose and kernel, the same for every pixel value (the ratio is 1)."""

    sigma: float

    def std(self, signal: np.ndarray) -> float:
        """The dose noise std, whatever the signal."""
        return float(self.sigma)


@dataclass(frozen=True)
class RicianNoise:
    """MR magnitude: Rician noise of Gaussian ``sigma`` per channel, its std a function of the signal ``ν``.

    std² = 2σ² + ν² − mean², mean = σ·√(π/2)·L½(−ν²/2σ²) (Gudbjartsson & Patz 1995): σ·0.655 at ν = 0,
    σ for ν ≫ σ.
    """

    sigma: float

    def std(self, signal: np.ndarray) -> np.ndarray:
        """The magnitude noise std at each pixel's signal (negative signal read as zero)."""
        s = np.float32(max(self.sigma, 1e-12))
        nu = np.maximum(np.asarray(signal, dtype=np.float32), 0.0)
        t = (nu / s) ** 2 / 4.0
        laguerre = (1.0 + 2.0 * t) * scipy.special.i0e(t) + 2.0 * t * scipy.special.i1e(t)
        mean = s * np.float32(math.sqrt(math.pi / 2.0)) * laguerre
        return np.sqrt(np.maximum(2.0 * s * s + nu * nu - mean * mean, 0.0)).astype(np.float32)


@dataclass(frozen=True)
class SignalDependentNoise:
    """The seed's formula (1): σ² = k1·(S − black) + k0 (shot noise plus a floor)."""

    k1: float
    k0: float
    black: float = 0.0

    def std(self, signal: np.ndarray) -> np.ndarray:
        """σ at each pixel's signal."""
        var = self.k1 * (np.asarray(signal, dtype=np.float32) - self.black) + self.k0
        return np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def noise_model_for(modality: str, noise_map: np.ndarray) -> NoiseModel:
    """The noise model of a series, its σ estimated from its own noise residual map (MAD, robust to edges)."""
    sample = np.asarray(noise_map, dtype=np.float32).ravel()[:: max(1, noise_map.size // 2_000_000)]
    sigma = float(np.median(np.abs(sample - np.median(sample))) / 0.6745)
    return RicianNoise(sigma) if modality == "MR" else FlatNoise(sigma)


# -- the seed's arithmetic ---------------------------------------------------------------------------------------
def noise_ratio(values: np.ndarray, intermediate: np.ndarray, noise: np.ndarray, model: NoiseModel) -> np.ndarray:
    """σ(intermediate)/σ(input) per pixel, each evaluated on its noise-corrected image (1 where σ is 0)."""
    before = np.asarray(model.std(values + noise), dtype=np.float32)
    after = np.asarray(model.std(intermediate + noise), dtype=np.float32)
    if before.ndim == 0 and after.ndim == 0:
        return np.float32(1.0 if float(before) == 0 else float(after) / float(before))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(before > 0, after / np.where(before > 0, before, 1), np.float32(1.0))
    return ratio.astype(np.float32)


def apply_strengths(
    values: np.ndarray,
    blur: np.ndarray,
    noise: np.ndarray,
    alpha_blur: float,
    alpha_noise: float,
    model: NoiseModel,
) -> np.ndarray:
    """The seed's output image from the input and its two residual maps (all the same shape, float32).

    Parameters
    ----------
    values
        The input (after the histogram stage), real units.
    blur, noise
        ``R_blur`` and ``R_noise`` of that input (``models.residual``).
    alpha_blur, alpha_noise
        Strengths: 0 leaves a component as it is, 1 removes it as the network estimated it.
    model
        How the noise std follows the signal.

    Returns
    -------
    np.ndarray
        ``input + α_blur·R_blur + α_noise·R_noise·σ(intermediate)/σ(input)``, float32.
    """
    intermediate = values + np.float32(alpha_blur) * blur
    ratio = noise_ratio(values, intermediate, noise, model)
    return (intermediate + np.float32(alpha_noise) * (noise * ratio)).astype(np.float32)


# -- proposing strengths ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One series prepared for the strength search: input after the histogram stage and its residual maps."""

    values: np.ndarray
    blur: np.ndarray
    noise: np.ndarray
    spacing_mm: tuple[float, float]
    modality: str


@dataclass(frozen=True)
class Proposal:
    """Proposed strengths and the figures they reach (before: the histogram stage alone)."""

    alpha_blur: float
    alpha_noise: float
    noise_before: float
    noise_after: float
    noise_reference: float
    edge_before: float
    edge_after: float
    edge_reference: float

    def as_dict(self) -> dict[str, float]:
        """JSON-able figures (the rule's provenance and the fit report; an unmeasured figure is None)."""
        return {k: round(float(v), 4) if math.isfinite(v) else None for k, v in self.__dict__.items()}


#: A figure of an image, called as ``measure(image, spacing_mm=…, modality=…)`` (``rules.quality``).
Measure = Callable[..., float]


def _mean(samples: Sequence[Sample], measure: Measure, ab: float, an: float) -> float:
    out = []
    for s in samples:
        model = noise_model_for(s.modality, s.noise)
        image = apply_strengths(s.values, s.blur, s.noise, ab, an, model)
        out.append(measure(image, spacing_mm=s.spacing_mm, modality=s.modality))
    return float(np.mean(out))


def _search(f: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 13) -> float:
    """The smallest strength on a grid over [lo, hi] whose figure is nearest ``target``, refined once.

    A map that barely moves the figure (under 2 % of the target over the whole range) gets 0: a strength at
    the end of its range would only say the target cannot be reached this way.
    """
    grid = np.linspace(lo, hi, steps)
    figures = np.array([f(float(a)) for a in grid])
    if np.ptp(figures) < 0.02 * abs(target):
        return 0.0
    errors = np.abs(figures - target)
    best = float(grid[int(np.argmax(errors <= errors.min() + 0.01 * abs(target)))])
    step = (hi - lo) / (steps - 1)
    fine = np.linspace(max(lo, best - step), min(hi, best + step), 9)
    fine_errors = np.array([abs(f(float(a)) - target) for a in fine])
    return float(fine[int(np.argmax(fine_errors <= fine_errors.min() + 0.01 * abs(target)))])


def propose_strengths(
    samples: Sequence[Sample],
    noise_reference: float,
    edge_reference: float,
    noise_measure: Measure,
    edge_measure: Measure,
) -> Proposal:
    """Strengths that bring a condition's edge width, then its noise level, to the reference's.

    α_blur is searched first (the blur map does not change the noise), then α_noise with it fixed; both
    over the allowed ranges, on the samples' cached maps only (no network call).

    Parameters
    ----------
    samples
        Series of the condition, after its histogram stage, with their residual maps.
    noise_reference, edge_reference
        The reference condition's noise std and edge width, measured on its own series (edge NaN: none
        could be measured, the blur map is left out and α_blur is 0).
    noise_measure, edge_measure
        ``rules.quality.noise_std`` and ``rules.quality.edge_width_mm`` (or stand-ins with their signature).

    Returns
    -------
    Proposal
    """
    if not samples:
        raise StageError("no series of the condition to propose strengths on")
    noise_before = _mean(samples, noise_measure, 0.0, 0.0)
    if math.isfinite(edge_reference):
        edge_before = _mean(samples, edge_measure, 0.0, 0.0)
        ab = _search(lambda a: _mean(samples, edge_measure, a, 0.0), edge_reference, 0.0, ALPHA_BLUR_RANGE[1])
    else:  # no edge to measure (a field of view inside the body): the blur map is left out
        edge_before, ab = math.nan, 0.0
    an = _search(lambda a: _mean(samples, noise_measure, ab, a), noise_reference, 0.0, ALPHA_NOISE_RANGE[1])
    edge_after = _mean(samples, edge_measure, ab, an) if math.isfinite(edge_reference) else math.nan
    return Proposal(
        ab, an, noise_before, _mean(samples, noise_measure, ab, an), noise_reference,
        edge_before, edge_after, edge_reference,
    )
