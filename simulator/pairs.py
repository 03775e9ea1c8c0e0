"""Pairs for the residual stage (seed 003): one anatomy seen clean, blurred, noisy, and by the reference scanner.

The seed trains its two residual maps on patches whose components are known exactly: a component-free patch,
the same patch blurred, a noise patch (component-free + noise) and a noise-blur patch (blurred + the *same*
noise). Here the scanner model provides them directly, for CT and for TOF-MRA:

- CT: ``clean`` is the anatomy through the reference kernel's MTF (no noise); ``blurred`` through the
  condition's kernel; ``noise`` the condition's dose noise (ramp-shaped spectrum through its kernel);
  ``input`` = blurred + noise. The blur residual's target is clean − blurred, the noise residual's −noise.
- MR: the acquisition window is the same for every condition, so ``blurred`` = ``clean`` (the noise-free
  magnitude with the condition's bias field) and ``input`` its Rician magnitude at the condition's noise;
  the noise residual's target clean − input (Rician bias included).

``reference`` is the same anatomy as the reference condition scans it (its own noise), for evaluation.
Calibration is the reference's on both sides: the histogram rules (seed 000) correct it before this stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft

from simulator import phantom
from simulator.scanner import CONDITIONS, ScannerCondition, _bias_field, _freq, ct_values, mtf

#: Anatomy centres (x, y, z mm) of the slabs drawn per body part, and the ranges they are jittered over.
CENTRES = {"head": ((0.0, 5.0, 5.0), (25.0, 25.0, 45.0)), "chest": ((0.0, 0.0, -20.0), (60.0, 40.0, 90.0))}
#: The reference conditions of the residual stage (the rules' references in ``models.training.data``).
REFERENCE = {"CT": "ge-revolution-standard", "MR": "siemens-skyra-3t-tof"}


@dataclass(frozen=True)
class ResidualPair:
    """One slab (slices, rows, cols) in real units (CT HU, MR stored scale), with its known components."""

    input: np.ndarray  # what the condition's scanner shows: blurred + noise
    clean: np.ndarray  # the reference kernel, no noise (the component-free patch)
    blurred: np.ndarray  # the condition's kernel, no noise (the blur patch)
    reference: np.ndarray  # the reference condition's scan: clean + the reference's own noise
    spacing: tuple[float, float, float]
    modality: str
    condition: str

    @property
    def blur_residual(self) -> np.ndarray:
        """The exact blur residual map: what, added to the input, removes the condition's blur."""
        return self.clean - self.blurred

    @property
    def noise_residual(self) -> np.ndarray:
        """The exact noise residual map: what, added to the input, removes the condition's noise."""
        return self.blurred - self.input


def random_ct_condition(rng: np.random.Generator, name: str = "random-ct") -> ScannerCondition:
    """A CT kernel and dose drawn from soft to sharp and 25–400 mAs (training conditions, none of the named)."""
    return ScannerCondition(
        name,
        "CT",
        "synthetic",
        "random",
        kvp=120.0,
        mas=float(np.exp(rng.uniform(np.log(25.0), np.log(400.0)))),
        kernel_sigma_mm=float(rng.uniform(0.1, 0.75)),
        kernel_boost=float(rng.choice([0.0, rng.uniform(0.0, 1.8)])),
        kernel_cutoff=float(rng.uniform(0.7, 1.35)),
    )


def random_mr_condition(rng: np.random.Generator, name: str = "random-mr") -> ScannerCondition:
    """A TOF-MRA noise level and bias field drawn over 1.5–3 T practice (training conditions)."""
    return ScannerCondition(
        name,
        "MR",
        "synthetic",
        "random",
        field_strength=float(rng.choice([1.5, 3.0])),
        sequence="tof",
        mr_scale=float(rng.uniform(600.0, 1400.0)),
        bias_strength=float(rng.uniform(0.0, 0.35)),
        noise_fraction=float(np.exp(rng.uniform(np.log(0.006), np.log(0.06)))),
    )


def _grid(body: str, rng: np.random.Generator, slices: int, matrix: int, spacing_mm: float) -> phantom.Grid:
    centre, jitter = CENTRES[body]
    c = tuple(float(v + rng.uniform(-j, j)) for v, j in zip(centre, jitter, strict=True))
    return phantom.Grid.centred(c, (slices, matrix, matrix), (spacing_mm, spacing_mm, spacing_mm))


#: Pixels of reflected anatomy around a slab before it is filtered: a kernel applied through the FFT wraps
#: around, and anatomy cut by the field of view would otherwise ring in from the opposite edge.
PAD = 24


def _filtered(
    image: np.ndarray, transfer_of: Callable[[np.ndarray], np.ndarray], spacing: tuple[float, float]
) -> np.ndarray:
    padded = np.pad(image, ((0, 0), (PAD, PAD), (PAD, PAD)), mode="reflect")
    spec = scipy.fft.rfft2(padded, axes=(1, 2), norm="ortho", workers=-1)
    spec *= transfer_of(_freq(padded.shape[1:], spacing))
    out = scipy.fft.irfft2(spec, s=padded.shape[1:], axes=(1, 2), norm="ortho", workers=-1)
    return out[:, PAD:-PAD, PAD:-PAD].astype(np.float32)


def ct_noise(
    shape: tuple[int, int, int], condition: ScannerCondition, spacing: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """The condition's dose noise alone (HU), with the spectrum ``simulator.scanner.scan_ct`` gives it."""
    f = _freq(shape[1:], spacing)
    fy = np.fft.fftfreq(shape[1], spacing[0])[:, None]
    fx = np.fft.fftfreq(shape[2], spacing[1])[None, :]
    ff = np.sqrt(fy**2 + fx**2).astype(np.float32)
    norm = np.sqrt(np.mean(ff * mtf(condition, ff) ** 2))
    noise_filter = (np.sqrt(f) * mtf(condition, f) / norm).astype(np.float32)
    sigma = np.float32(condition.noise_std() / np.sqrt(2.0))
    spec = rng.standard_normal((shape[0], *f.shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
    spec *= noise_filter * sigma
    return scipy.fft.irfft2(spec, s=shape[1:], axes=(1, 2), norm="ortho", workers=-1).astype(np.float32)


def ct_pair(
    condition: ScannerCondition,
    rng: np.random.Generator,
    body: str = "head",
    slices: int = 3,
    matrix: int = 256,
    spacing_mm: float = 0.7,
    reference: ScannerCondition | None = None,
) -> ResidualPair:
    """One CT slab under ``condition`` and the reference kernel, its components known (see the module doc)."""
    ref = reference or CONDITIONS[REFERENCE["CT"]]
    grid = _grid(body, rng, slices, matrix, spacing_mm)
    draw = phantom.head if body == "head" else phantom.chest
    hu = draw(grid, rng, ct_values(ref), False).image
    blurred = _filtered(hu, lambda f: mtf(condition, f), grid.spacing[1:])
    clean = _filtered(hu, lambda f: mtf(ref, f), grid.spacing[1:])
    noise = ct_noise(hu.shape, condition, grid.spacing[1:], rng)
    ref_noise = ct_noise(hu.shape, ref, grid.spacing[1:], rng)
    return ResidualPair(blurred + noise, clean, blurred, clean + ref_noise, grid.spacing, "CT", condition.name)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    imag = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt(real * real + imag * imag)


def mr_pair(
    condition: ScannerCondition,
    rng: np.random.Generator,
    slices: int = 3,
    matrix: int = 256,
    spacing_mm: float = 0.7,
    reference: ScannerCondition | None = None,
) -> ResidualPair:
    """One TOF-MRA slab under ``condition`` (its bias field, Rician noise) at the reference's scale."""
    ref = reference or CONDITIONS[REFERENCE["MR"]]
    grid = _grid("head", rng, slices, matrix, spacing_mm)
    signal = phantom.head(grid, rng, {k: v[1] for k, v in phantom.MATERIALS.items()}, False).image
    over = np.maximum(signal - np.float32(0.4), np.float32(0.0)) * np.float32(ref.vessel_gain - 1.0)
    signal = signal + over
    bz, bxy = _bias_field(signal.shape, condition.bias_strength, rng)
    signal = signal * bz[:, None, None] * bxy[None]
    def window(f: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp((f - 0.8 / (2 * spacing_mm)) / (0.02 / spacing_mm)))).astype(np.float32)

    real = _filtered(signal, window, grid.spacing[1:])
    scale = np.float32(ref.mr_scale)
    clean = np.abs(real) * scale
    noisy = _rician(real, condition.noise_fraction, rng) * scale
    reference_scan = _rician(real, ref.noise_fraction, rng) * scale
    return ResidualPair(noisy, clean, clean, reference_scan, grid.spacing, "MR", condition.name)


def named_pair(
    name: str, seed: int, body: str = "head", slices: int = 3, matrix: int = 256, spacing_mm: float = 0.7
) -> ResidualPair:
    """A pair under a named condition of ``simulator.scanner.CONDITIONS`` (held-out evaluation), seeded.

    The condition keeps its kernel and dose noise (CT) or noise and bias (MR); material contrast and
    calibration are the reference's, which the histogram stage restores before this one.
    """
    condition = CONDITIONS[name]
    rng = np.random.default_rng([seed, 3003])
    if condition.modality == "MR":
        return mr_pair(condition, rng, slices, matrix, spacing_mm)
    return ct_pair(condition, rng, body, slices, matrix, spacing_mm)


def _stored(values: np.ndarray, modality: str) -> np.ndarray:
    """Real units as the scanner stores them: whole numbers, CT from −1024 HU, MR non-negative (float32)."""
    lo, hi = (-1024.0, 31743.0) if modality == "CT" else (0.0, 32767.0)
    return np.clip(np.rint(values), lo, hi).astype(np.float32)


def study_pair(kind: str, condition: str, seed: int, size: str = "eval", slices: int = 8) -> ResidualPair:
    """A pair from whole simulated studies: the condition's own scan, calibration and contrast included.

    Unlike ``named_pair`` (the reference's calibration on both sides), ``input`` is the study a scanner of
    ``condition`` stores (``simulator.studies.simulate_study``: its kVp contrast, vendor calibration, kernel
    and dose noise, or MR scale, vessel gain, bias field and Rician noise), so a histogram rule (seed 000)
    must map it to the reference's intensities before the residual stage. The anatomy depends only on
    (seed, kind) and the grid, so the same seed under the reference condition is the same subject.

    ``clean`` is the reference condition's study without noise (the same noise stream, its σ set to zero:
    for MR the reference's own bias field stays); ``reference`` the reference's scan; ``blurred`` the
    condition's study without noise, so ``blur_residual`` here also holds the calibration and contrast
    difference, not only the kernel's. ``input`` and ``reference`` are quantised as stored.

    Parameters
    ----------
    kind
        ``head-cta``, ``head-mra`` or ``chest-ct``.
    condition
        A named condition of ``simulator.scanner.CONDITIONS`` of the kind's modality.
    seed
        The subject (and noise) seed of ``simulate_study``.
    size, slices
        The geometry of ``simulator.studies.GEOMETRY`` for ``size``, cut to ``slices`` slices round its centre.

    Returns
    -------
    ResidualPair
    """
    from simulator.studies import resolve_condition, simulate_study

    cond = resolve_condition(condition, kind)
    ref = CONDITIONS[REFERENCE[cond.modality]]

    def scan(c: ScannerCondition, noisy: bool) -> tuple[np.ndarray, tuple[float, float, float]]:
        quiet = {"noise_hu_at_100mas": 0.0} if c.modality == "CT" else {"noise_fraction": 0.0}
        c = c if noisy else dataclasses.replace(c, **quiet)  # same name: the same noise stream, bias field
        study = simulate_study(kind, c, seed, size, slices=slices, keep_arrays=True)  # type: ignore[arg-type]
        assert study.values is not None
        return study.values.astype(np.float32), tuple(study.truth["geometry"]["spacing"])  # type: ignore[return-value]

    noisy, spacing = scan(cond, True)
    blurred, _ = scan(cond, False)
    reference, _ = scan(ref, True)
    clean, _ = scan(ref, False)
    mod = cond.modality
    return ResidualPair(_stored(noisy, mod), clean, blurred, _stored(reference, mod), spacing, mod, cond.name)
