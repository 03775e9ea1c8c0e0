"""The scanner model of the synthetic scanner: named conditions and what each does to an image.

A condition is a manufacturer, model, reconstruction kernel and dose (CT: kVp, mAs, CTDIvol) or field strength
and sequence (TOF-MRA). Its effects, in order: kVp and vendor calibration bend the high range (contrast, bone);
the kernel acts as an in-plane MTF (soft blurs, sharp boosts edges and rings at its cut-off); CT noise has a
ramp-shaped (non-white) spectrum shaped by the same kernel and a std ∝ 1/sqrt(mAs); MRA gets an intensity
scale, a smooth bias field and Rician noise. ``simulator.studies`` puts anatomy through it and writes DICOM.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.fft
import scipy.ndimage

from simulator import phantom

log = logging.getLogger(__name__)


class SimulationError(ValueError):
    """A simulation request that cannot be honoured (unknown condition, impossible geometry or lesion)."""


@dataclass(frozen=True)
class ScannerCondition:
    """One imaging condition: what the scanner is and how it reconstructs.

    CT fields: ``kvp``, ``mas`` (Exposure, mAs), ``ctdi_vol`` (mGy), the kernel's MTF (``kernel_sigma_mm``
    Gaussian blur, ``kernel_boost`` edge enhancement at the cut-off, ``kernel_cutoff`` in cycles/mm where the
    response drops, giving ringing), and the vendor calibration above ``calib_knee`` HU (``calib_slope``,
    ``calib_curve`` per 1000 HU). MR fields: ``field_strength`` (T), ``sequence``, ``mr_scale`` (stored value of
    a signal of 1), ``vessel_gain`` (bends the bright range), ``bias_strength``, ``noise_fraction`` (Rician σ).
    """

    name: str
    modality: Literal["CT", "MR"]
    manufacturer: str
    model: str
    kernel: str = ""
    kvp: float = 120.0
    mas: float = 200.0
    ctdi_vol: float = 0.0
    exposure_time_ms: float = 1000.0
    kernel_sigma_mm: float = 0.35
    kernel_boost: float = 0.0
    kernel_cutoff: float = 1.0
    calib_knee: float = 120.0
    calib_slope: float = 1.0
    calib_curve: float = 0.0
    noise_hu_at_100mas: float = 14.0
    field_strength: float = 0.0
    sequence: str = ""
    repetition_time: float = 22.0
    echo_time: float = 3.5
    flip_angle: float = 18.0
    mr_scale: float = 1000.0
    vessel_gain: float = 1.0
    bias_strength: float = 0.15
    noise_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR"):
            raise SimulationError(f"condition {self.name!r}: modality must be CT or MR, got {self.modality!r}")
        if not self.manufacturer or not self.model:
            raise SimulationError(f"condition {self.name!r}: manufacturer and model are required")
        if self.modality == "CT":
            if not (60 <= self.kvp <= 150) or self.mas <= 0 or self.kernel_cutoff <= 0 or self.kernel_sigma_mm < 0:
                raise SimulationError(
                    f"condition {self.name!r}: needs 60 ≤ kVp ≤ 150, mAs > 0, a positive kernel cut-off"
                )
        elif self.field_strength <= 0 or self.mr_scale <= 0 or self.noise_fraction < 0:
            raise SimulationError(
                f"condition {self.name!r}: needs field_strength > 0, mr_scale > 0, noise_fraction ≥ 0"
            )

    @property
    def ctdi(self) -> float:
        """CTDIvol (mGy): the one given, else estimated from mAs and kVp for a 16 cm head phantom."""
        return self.ctdi_vol or round(0.2 * self.mas * (self.kvp / 120.0) ** 2.5, 2)

    def noise_std(self) -> float:
        """Pixel noise std (HU) of this dose and kernel: ∝ 1/sqrt(mAs), more at low kVp and sharp kernels."""
        return (
            self.noise_hu_at_100mas * np.sqrt(100.0 / self.mas) * (120.0 / self.kvp) ** 1.25 * _kernel_noise_gain(self)
        )


def _ct(
    name: str, manufacturer: str, model: str, kernel: str, kvp: float, mas: float, ctdi: float, **kw: Any
) -> ScannerCondition:
    return ScannerCondition(name, "CT", manufacturer, model, kernel, kvp=kvp, mas=mas, ctdi_vol=ctdi, **kw)


def _mr(name: str, manufacturer: str, model: str, tesla: float, sequence: str, **kw: Any) -> ScannerCondition:
    return ScannerCondition(name, "MR", manufacturer, model, field_strength=tesla, sequence=sequence, **kw)


CONDITIONS: dict[str, ScannerCondition] = {
    c.name: c
    for c in (
        _ct("ge-revolution-standard", "GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD", 120, 200, 38.0),
        _ct(
            "ge-optima-bone-lowdose",
            "GE MEDICAL SYSTEMS",
            "Optima CT660",
            "BONE",
            100,
            90,
            14.5,
            kernel_sigma_mm=0.2,
            kernel_boost=0.8,
            kernel_cutoff=1.1,
            calib_slope=1.08,
            calib_curve=0.03,
        ),
        _ct(
            "siemens-force-br40",
            "SIEMENS",
            "SOMATOM Force",
            "Br40d",
            100,
            160,
            24.0,
            kernel_sigma_mm=0.4,
            calib_slope=0.94,
            calib_knee=150.0,
            calib_curve=-0.02,
        ),
        _ct(
            "siemens-definition-hr64",
            "SIEMENS",
            "SOMATOM Definition AS+",
            "Hr64h",
            120,
            280,
            52.0,
            kernel_sigma_mm=0.15,
            kernel_boost=1.4,
            kernel_cutoff=1.2,
            calib_slope=0.94,
            calib_knee=150.0,
        ),
        _ct(
            "canon-aquilion-fc43",
            "CANON_MEC",
            "Aquilion ONE",
            "FC43",
            120,
            150,
            30.0,
            kernel_sigma_mm=0.45,
            calib_slope=1.05,
            calib_knee=90.0,
            calib_curve=0.05,
        ),
        _ct(
            "philips-ict-b-lowdose",
            "Philips",
            "iCT 256",
            "B",
            80,
            120,
            9.5,
            kernel_sigma_mm=0.6,
            kernel_cutoff=0.8,
            calib_slope=0.9,
            calib_knee=100.0,
            calib_curve=-0.03,
        ),
        _ct(
            "philips-ict-yc-sharp",
            "Philips",
            "iCT 256",
            "YC",
            120,
            220,
            41.0,
            kernel_sigma_mm=0.2,
            kernel_boost=1.0,
            kernel_cutoff=1.0,
            calib_slope=0.9,
            calib_knee=100.0,
        ),
        _mr(
            "siemens-skyra-3t-tof",
            "SIEMENS",
            "Skyra",
            3.0,
            "fl3d1r_t70",
            mr_scale=900.0,
            vessel_gain=1.25,
            bias_strength=0.2,
            noise_fraction=0.015,
            repetition_time=21.0,
            echo_time=3.4,
            flip_angle=18.0,
        ),
        _mr(
            "ge-signa-1.5t-tof",
            "GE MEDICAL SYSTEMS",
            "SIGNA Explorer",
            1.5,
            "3D TOF",
            mr_scale=2200.0,
            vessel_gain=0.8,
            bias_strength=0.1,
            noise_fraction=0.03,
            repetition_time=29.0,
            echo_time=6.9,
            flip_angle=20.0,
        ),
        _mr(
            "philips-ingenia-3t-tof",
            "Philips Medical Systems",
            "Ingenia",
            3.0,
            "T1FFE TOF",
            mr_scale=450.0,
            vessel_gain=1.1,
            bias_strength=0.3,
            noise_fraction=0.02,
            repetition_time=23.0,
            echo_time=3.5,
            flip_angle=20.0,
        ),
    )
}


def load_conditions(path: str | Path) -> dict[str, ScannerCondition]:
    """Read user-defined conditions from TOML: one ``[conditions.NAME]`` table per condition.

    Parameters
    ----------
    path
        TOML file; each table holds ``ScannerCondition`` fields (``modality``, ``manufacturer``, ``model`` …).

    Returns
    -------
    dict[str, ScannerCondition]
        Conditions by name.

    Raises
    ------
    SimulationError
        Unreadable file, unknown field or invalid value.
    """
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimulationError(f"cannot read conditions file {path}: {exc}") from exc
    known = {f.name for f in dataclasses.fields(ScannerCondition)}
    out: dict[str, ScannerCondition] = {}
    for name, table in doc.get("conditions", {}).items():
        unknown = set(table) - known
        if unknown:
            raise SimulationError(f"condition {name!r} in {path}: unknown field(s) {sorted(unknown)}")
        try:
            out[name] = ScannerCondition(**{**table, "name": name})
        except TypeError as exc:
            raise SimulationError(f"condition {name!r} in {path}: {exc}") from exc
    if not out:
        raise SimulationError(f"{path} defines no [conditions.NAME] table")
    return out


# --- the scanner model ------------------------------------------------------------------------------------------


def mtf(condition: ScannerCondition, f: np.ndarray) -> np.ndarray:
    """Kernel MTF at radial spatial frequency ``f`` (cycles/mm): Gaussian blur, edge boost, steep cut-off."""
    fc = condition.kernel_cutoff
    gauss = np.exp(-2.0 * (np.pi * condition.kernel_sigma_mm * f) ** 2)
    boost = 1.0 + condition.kernel_boost * (f / fc) ** 2
    window = 1.0 / (1.0 + np.exp((f - fc) / (0.03 * fc)))  # near-hard truncation: ringing next to edges
    return (gauss * boost * window).astype(np.float32)


def _kernel_noise_gain(condition: ScannerCondition) -> float:
    """Noise of this kernel relative to STANDARD-like (σ 0.35 mm, cut-off 1): sqrt of ∫ f·MTF² over the plane."""
    f = np.linspace(0.0, 2.0, 2001)
    ref = ScannerCondition("ref", "CT", "ref", "ref")
    return float(np.sqrt(np.trapezoid(f * f * mtf(condition, f) ** 2, f) / np.trapezoid(f * f * mtf(ref, f) ** 2, f)))


def _freq(shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0], spacing[0])[:, None]
    fx = np.fft.rfftfreq(shape[1], spacing[1])[None, :]
    return np.sqrt(fy**2 + fx**2).astype(np.float32)


def ct_values(condition: ScannerCondition) -> dict[str, float]:
    """HU of each material at this condition's kVp: iodine and bone brighten at low kVp, soft tissue does not."""
    iodine, bone = (120.0 / condition.kvp) ** 1.2, (120.0 / condition.kvp) ** 0.6
    out = {}
    for name, (hu, _) in phantom.MATERIALS.items():
        if name in phantom.CONTRAST_MATERIALS:
            hu = 40.0 + (hu - 40.0) * iodine
        elif name in phantom.BONE_MATERIALS:
            hu = 40.0 + (hu - 40.0) * bone
        out[name] = hu
    return out


def calibrate(hu: np.ndarray, condition: ScannerCondition) -> np.ndarray:
    """Vendor calibration: identity up to ``calib_knee``, then a smooth bend of the high range (in place)."""
    if condition.calib_slope == 1.0 and condition.calib_curve == 0.0:
        return hu
    over = np.logaddexp(np.float32(0.0), (hu - np.float32(condition.calib_knee)) / np.float32(25.0)) * np.float32(25.0)
    hu += over * np.float32(condition.calib_slope - 1.0) + np.float32(condition.calib_curve / 1000.0) * over**2
    return hu


def scan_ct(
    hu: np.ndarray,
    condition: ScannerCondition,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    thickness_mm: float | None = None,
) -> np.ndarray:
    """What a CT scanner with ``condition`` reconstructs from true HU ``hu`` (z, y, x), float32 HU.

    Parameters
    ----------
    hu
        Noise-free HU at this kVp (modified in place).
    condition
        A CT condition.
    spacing
        (slice, row, column) spacing in mm.
    rng
        Noise generator.
    thickness_mm
        Reconstructed slice thickness; a slice profile blurs z where it exceeds the slice spacing.

    Returns
    -------
    np.ndarray
        Reconstructed HU, float32.
    """
    calibrate(hu, condition)
    if thickness_mm and thickness_mm > spacing[0] * 1.01:
        sigma = np.sqrt(thickness_mm**2 - spacing[0] ** 2) / 2.355 / spacing[0]
        hu = scipy.ndimage.gaussian_filter1d(hu, sigma, axis=0, mode="nearest")
    f = _freq(hu.shape[1:], spacing[1:])
    transfer = mtf(condition, f)
    fy = np.fft.fftfreq(hu.shape[1], spacing[1])[:, None]
    fxf = np.fft.fftfreq(hu.shape[2], spacing[2])[None, :]
    ff = np.sqrt(fy**2 + fxf**2).astype(np.float32)
    # CT noise power ∝ |f| · MTF² (filtered back-projection ramp times the kernel), normalised on the full plane
    norm = np.sqrt(np.mean(ff * mtf(condition, ff) ** 2))
    noise_filter = (np.sqrt(f) * transfer / norm).astype(np.float32)
    spec = scipy.fft.rfft2(hu, axes=(1, 2), norm="ortho", workers=-1)
    spec *= transfer
    sigma = np.float32(condition.noise_std() / np.sqrt(2.0))
    noise = rng.standard_normal((*spec.shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
    noise *= noise_filter * sigma
    spec += noise
    del noise
    return scipy.fft.irfft2(spec, s=hu.shape[1:], axes=(1, 2), norm="ortho", workers=-1).astype(np.float32, copy=False)


def _bias_field(
    shape: tuple[int, int, int], strength: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth multiplicative coil-sensitivity field, exp of a random quadratic in normalised coordinates,
    returned as its z factor (nz,) and in-plane factor (ny, nx) so applying it costs two multiplications."""
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    c = rng.normal(0, 1, 6).astype(np.float32) * np.float32(strength)
    plane = c[0] * x[None, :] + c[1] * y[:, None] + c[3] * x[None, :] ** 2 + c[4] * y[:, None] ** 2
    plane = plane + c[5] * x[None, :] * y[:, None]
    return np.exp(c[2] * 0.5 * z), np.exp(plane)


def scan_mr(
    signal: np.ndarray, condition: ScannerCondition, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """What a TOF-MRA scanner with ``condition`` reconstructs from relative signal ``signal`` (0..1), float32.

    The bright (flow-enhanced) range is bent by ``vessel_gain``, then a bias field, the k-space window of the
    acquisition (slight ringing), Rician noise (magnitude of complex Gaussian noise) and the vendor scale.
    ``signal`` is modified in place.
    """
    over = np.maximum(signal - np.float32(0.4), np.float32(0.0))
    over *= np.float32(condition.vessel_gain - 1.0)
    signal += over
    del over
    bz, bxy = _bias_field(signal.shape, condition.bias_strength, rng)
    signal *= bz[:, None, None]
    signal *= bxy[None]
    f = _freq(signal.shape[1:], spacing[1:])
    window = (1.0 / (1.0 + np.exp((f - 0.8 / (2 * spacing[1])) / (0.02 / spacing[1])))).astype(np.float32)
    spec = scipy.fft.rfft2(signal, axes=(1, 2), norm="ortho", workers=-1)
    spec *= window
    real = scipy.fft.irfft2(spec, s=signal.shape[1:], axes=(1, 2), norm="ortho", workers=-1)
    del spec
    sigma = np.float32(condition.noise_fraction)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= sigma
    real += noise
    real *= real
    rng.standard_normal(dtype=np.float32, out=noise)
    noise *= sigma
    noise *= noise
    real += noise
    np.sqrt(real, out=real)
    real *= np.float32(condition.mr_scale)
    return real
