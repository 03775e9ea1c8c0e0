"""Image-quality measures of the harmonization stage: noise level, edge sharpness, PSNR and SSIM.

Pure functions over float arrays in real units (HU for CT, stored magnitude for MR), 2-D slices (rows, cols) or
3-D volumes (slices, rows, cols). They pick the strengths of the residual network (a condition's noise and
sharpness are matched to the reference condition's), score the evaluation benchmark, and check the network.

- ``noise_std``: the global noise level of Christianson et al., "Automated technique to measure noise in clinical
  CT examinations", AJR 2015;205:W93-W99. A map of local standard deviations over a small square window,
  restricted to soft tissue, and the mode of its histogram: the std a physicist would read in a uniform ROI,
  found without drawing one.
- ``edge_width_mm``: the 10-90 % rise distance of the edge spread function (ESF) across the body outline
  (air to skin): pixels along many normals of the outline, placed at their distance from the sub-pixel edge
  and averaged into an oversampled ESF (the slanted-edge method of ISO 12233, on the patient's own skin).
- ``psnr``: peak signal-to-noise ratio, 20 log10(data range / RMSE).
- ``ssim``: mean structural similarity of Wang et al., "Image quality assessment: from error visibility to
  structural similarity", IEEE TIP 2004;13(4):600-612, with its 11x11 Gaussian window (sigma 1.5), computed
  as scikit-image's ``structural_similarity`` does with ``gaussian_weights=True``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


class QualityError(ValueError):
    """An image on which a quality measure is undefined (too little tissue, no outline, mismatched shapes)."""


@dataclass(frozen=True)
class Quality:
    """The noise level (real units) and edge width (mm) of one image or volume."""

    noise_std: float
    edge_width_mm: float


#: Fewest soft-tissue pixels the noise histogram is built from.
MIN_TISSUE_PIXELS = 500
#: CT soft tissue: local means in this band (HU); fat, air, bone and contrast fall outside it.
CT_TISSUE_HU = (0.0, 100.0)
#: MR tissue band, as factors of the dominant in-head level (brain): above CSF and air, below fat and vessels.
MR_TISSUE_BAND = (0.6, 1.5)
#: Side of the local-std window (mm) and its fewest pixels.
NOISE_WINDOW_MM = 3.0
NOISE_WINDOW_MIN_PX = 5
#: Histogram of local stds: bins over [0, 3 x median] and the smoothing of the counts, both in bins.
MODE_BINS = 300
MODE_SMOOTH_BINS = 3.0

#: ESF profiles (mm): from ESF_AIR_MM outside the outline to ESF_TISSUE_MM inside, binned every ESF_STEP_MM.
ESF_AIR_MM = 12.0
ESF_TISSUE_MM = 10.0
ESF_STEP_MM = 0.05
#: The air plateau: the far ESF_AIR_WINDOW_MM of the air side; the tissue plateau's least start and length.
ESF_AIR_WINDOW_MM = 3.0
ESF_HIGH_MIN_MM = 1.0
#: Most profiles over a volume, most slices, and the smoothing (mm) that finds the outline and its normal.
ESF_MAX_PROFILES = 4000
ESF_MAX_SLICES = 8
ESF_SMOOTH_MM = 1.0
#: CT air and soft tissue (HU): the outline is the half-way iso-line of the smoothed image.
CT_AIR_HU, CT_SKIN_HU = -1000.0, 40.0
#: SSIM of Wang et al. 2004: window side (px), Gaussian σ (px) and the constants.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _volume(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``image`` as a float64 (slices, rows, cols) array, checked finite."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise QualityError(f"{name} must be 2-D (rows, cols) or 3-D (slices, rows, cols), got shape {arr.shape}")
    if arr.size == 0 or not np.isfinite(arr).all():
        raise QualityError(f"{name} is empty or has non-finite values")
    return arr[None] if arr.ndim == 2 else arr


def _spacing(spacing_mm: tuple[float, float]) -> tuple[float, float]:
    rows, cols = (float(s) for s in spacing_mm)
    if not (np.isfinite(rows) and np.isfinite(cols) and rows > 0 and cols > 0):
        raise QualityError(f"pixel spacing must be two positive numbers (mm), got {spacing_mm}")
    return rows, cols


def _modality(modality: str) -> str:
    mod = modality.upper()
    if mod not in ("CT", "MR"):
        raise QualityError(f"modality must be CT or MR, got {modality!r}")
    return mod


# --- noise ------------------------------------------------------------------------------------------------------


def _window_px(spacing_mm: tuple[float, float] | None) -> tuple[int, int]:
    """Odd window sides (rows, cols) of about ``NOISE_WINDOW_MM``, never under ``NOISE_WINDOW_MIN_PX``."""
    if spacing_mm is None:
        return NOISE_WINDOW_MIN_PX, NOISE_WINDOW_MIN_PX
    sides = []
    for s in _spacing(spacing_mm):
        n = max(NOISE_WINDOW_MIN_PX, int(round(NOISE_WINDOW_MM / s)))
        sides.append(n + 1 - n % 2)
    return sides[0], sides[1]


def _local_stats(volume: np.ndarray, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and (unbiased, n - 1) std over an in-plane ``window``, slice by slice."""
    size = (1, *window)
    mean = ndimage.uniform_filter(volume, size, mode="reflect")
    mean_sq = ndimage.uniform_filter(volume * volume, size, mode="reflect")
    n = window[0] * window[1]
    var = np.maximum(mean_sq - mean * mean, 0.0) * (n / (n - 1))
    return mean, np.sqrt(var)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the split that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(centres[int(np.nanargmax(between[:-1]))])


def _mode(values: np.ndarray, upper: float) -> float:
    """The mode of ``values`` in [0, upper]: a fine histogram, smoothed, its peak refined by a parabola."""
    width = upper / MODE_BINS
    idx = (values / width).astype(np.intp)
    counts = np.bincount(idx[idx < MODE_BINS], minlength=MODE_BINS).astype(np.float64)
    smooth = ndimage.gaussian_filter1d(counts, MODE_SMOOTH_BINS, mode="constant")
    k = int(np.argmax(smooth))
    offset = 0.0
    if 0 < k < MODE_BINS - 1:
        a, b, c = smooth[k - 1 : k + 2]
        curvature = a - 2 * b + c
        offset = 0.5 * (a - c) / curvature if curvature < 0 else 0.0
    return float((k + 0.5 + offset) * width)


def _mr_tissue(volume: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """MR tissue pixels: inside the head (above Otsu's air/tissue split) with a local mean near the brain level.

    The brain is the dominant in-head level; the band around it leaves out the Rician floor of the air, CSF,
    and the fat and flow-bright vessels above it. The bias field moves the level by tens of percent across the
    head, hence a wide band; the noise itself does not depend on the level.
    """
    inside = mean > _otsu(mean[:, ::2, ::2].ravel())
    if inside.sum() < MIN_TISSUE_PIXELS:
        return inside
    levels = mean[inside]
    level = _mode(levels, 2.0 * float(np.median(levels)))
    lo, hi = MR_TISSUE_BAND
    return inside & (mean >= lo * level) & (mean <= hi * level)


def noise_std(image: np.ndarray, modality: str, spacing_mm: tuple[float, float] | None = None) -> float:
    """The noise level in uniform tissue: the global noise level (GNL) of Christianson et al. 2015.

    A map of local standard deviations over a square window of about 3 mm (at least 5 px), kept where the
    window's mean is soft tissue (CT: 0-100 HU; MR: inside the head, near the brain's own level), and the mode
    of the histogram of those stds. Edges between tissues and vessels give larger stds in the histogram's right
    tail; the mode is where the uniform windows pile up. The mode is corrected for where the sample std of
    white noise peaks (chi distribution); spatially correlated noise of soft kernels still reads a few percent
    low. A 3-D volume is measured over all its slices at once (the window is in-plane).

    Parameters
    ----------
    image
        A 2-D slice or 3-D volume in real units (HU for CT).
    modality
        ``CT`` or ``MR``.
    spacing_mm
        In-plane pixel spacing (rows, cols) in mm, for the window size; None gives the 5 px minimum.

    Returns
    -------
    float
        The noise std in the image's units.

    Raises
    ------
    QualityError
        Fewer than ``MIN_TISSUE_PIXELS`` tissue pixels, a modality other than CT or MR, a bad shape or spacing.
    """
    mod = _modality(modality)
    volume = _volume(image)
    window = _window_px(spacing_mm)
    if volume.shape[1] < window[0] or volume.shape[2] < window[1]:
        raise QualityError(f"image {volume.shape[1:]} is smaller than the noise window {window}")
    mean, std = _local_stats(volume, window)
    if mod == "CT":
        tissue = (mean >= CT_TISSUE_HU[0]) & (mean <= CT_TISSUE_HU[1])
    else:
        tissue = _mr_tissue(volume, mean)
    n = int(tissue.sum())
    if n < MIN_TISSUE_PIXELS:
        raise QualityError(
            f"only {n} {mod} soft-tissue pixels (need {MIN_TISSUE_PIXELS}): no uniform tissue to measure noise in"
        )
    stds = std[tissue]
    scale = float(np.median(stds))
    if scale <= 0.0:
        return 0.0
    n_px = window[0] * window[1]
    # the sample std of n independent normal pixels peaks at σ·sqrt((n - 2)/(n - 1)), not at σ (the chi
    # distribution's mode): 2 % low for a 5x5 window; dividing it out makes white noise read true
    return _mode(stds, 3.0 * scale) * math.sqrt((n_px - 1) / (n_px - 2))


# --- edge sharpness ---------------------------------------------------------------------------------------------


def _outline_threshold(volume: np.ndarray, mod: str) -> float:
    """Half-way between air and the tissue under the skin: fixed HU for CT, the image's own levels for MR."""
    if mod == "CT":
        return 0.5 * (CT_AIR_HU + CT_SKIN_HU)
    sample = volume[:, ::2, ::2].ravel()
    split = _otsu(sample)
    return 0.5 * (float(np.median(sample[sample <= split])) + float(np.median(sample[sample > split])))


def _outline(smooth: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (row, col) indices on the outline of the largest body above ``threshold``.

    Holes are filled before the largest piece is chosen: on MR the dark skull parts the scalp's thin bright
    ring from the brain, and the ring, filled, is the whole head.
    """
    labels, n = ndimage.label(ndimage.binary_fill_holes(smooth > threshold))
    if n == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return np.nonzero(body & ~ndimage.binary_erosion(body))


def _edge_samples(
    plane: np.ndarray, spacing: tuple[float, float], threshold: float, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel values across one slice's outline and their signed distance (mm, + inward) to the sub-pixel edge.

    The normal (gradient direction) and the edge position (the half-way crossing, found by Newton steps with
    ``map_coordinates``) come from a smoothed copy, where noise would not scatter them. The values are the
    unsmoothed pixels nearest each point of the normal, placed at their own exact distance from the edge:
    outline points at every sub-pixel offset fill in an oversampled ESF (the slanted-edge method of ISO 12233).
    Interpolating the values instead would measure the interpolator: linear interpolation widened the 0.68 mm
    edge of the noise-free head phantom to 1.08 mm, cubic splines rang on it.
    """
    dy, dx = spacing
    smooth = ndimage.gaussian_filter(plane, (ESF_SMOOTH_MM / dy, ESF_SMOOTH_MM / dx))
    rows, cols = _outline(smooth, threshold)
    stride = max(1, rows.size // budget)
    rows, cols = rows[::stride], cols[::stride]
    g_row, g_col = np.gradient(smooth)
    g_row, g_col = g_row[rows, cols] / dy, g_col[rows, cols] / dx
    g = np.hypot(g_row, g_col)
    ok = g > 0
    g, n_row, n_col = g[ok], g_row[ok] / g[ok], g_col[ok] / g[ok]  # inward unit normal, mm space
    e_row, e_col = rows[ok].astype(np.float64), cols[ok].astype(np.float64)
    reach = 2.0 * max(dy, dx)
    for _ in range(3):
        at = ndimage.map_coordinates(smooth, [e_row, e_col], order=1, mode="nearest")
        step = np.clip((threshold - at) / g, -reach, reach)
        e_row, e_col = e_row + step * n_row / dy, e_col + step * n_col / dx
    t = np.arange(-ESF_AIR_MM, ESF_TISSUE_MM, 0.5 * min(dy, dx))
    p_row = np.rint(e_row[:, None] + t[None, :] * (n_row / dy)[:, None])
    p_col = np.rint(e_col[:, None] + t[None, :] * (n_col / dx)[:, None])
    # a profile that leaves the image (a body cut by the field of view) has no air plateau: dropped whole
    rows_ok = (p_row.min(1) >= 0) & (p_row.max(1) < plane.shape[0])
    inside = rows_ok & (p_col.min(1) >= 0) & (p_col.max(1) < plane.shape[1])
    p_row, p_col, e_row, e_col = p_row[inside], p_col[inside], e_row[inside, None], e_col[inside, None]
    dist = (p_row - e_row) * dy * n_row[inside, None] + (p_col - e_col) * dx * n_col[inside, None]
    return dist.ravel(), plane[p_row.astype(np.intp), p_col.astype(np.intp)].ravel()


def _binned_esf(dist: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean value in ``ESF_STEP_MM`` bins of distance: the averaged ESF (noise averages out), empty bins out."""
    n_bins = int(round((ESF_AIR_MM + ESF_TISSUE_MM) / ESF_STEP_MM))
    idx = np.floor((dist + ESF_AIR_MM) / ESF_STEP_MM).astype(np.intp)
    keep = (idx >= 0) & (idx < n_bins)
    counts = np.bincount(idx[keep], minlength=n_bins)
    sums = np.bincount(idx[keep], weights=values[keep], minlength=n_bins)
    filled = counts > 0
    centres = -ESF_AIR_MM + ESF_STEP_MM * (np.arange(n_bins) + 0.5)
    return centres[filled], sums[filled] / counts[filled]


def _crossing(t: np.ndarray, y: np.ndarray, level: float, start: int, direction: int) -> float:
    """Where ``y`` last crosses ``level`` walking from ``start`` outward (``direction`` -1: to air, +1: to tissue).

    Walking out from the half-way point, not searching the whole profile, takes the crossing of the edge
    itself and not of a ringing lobe or of the bone under the scalp.
    """
    i = start
    while 0 < i < len(y) - 1 and (y[i] - level) * direction < 0:
        i += direction
    j = i - direction
    if (y[i] - level) * direction < 0 or y[i] == y[j]:
        raise QualityError("the edge profile never reaches its plateau: no clean outline to measure")
    return float(t[j] + (level - y[j]) * (t[i] - t[j]) / (y[i] - y[j]))


def _rise_distance(t: np.ndarray, esf: np.ndarray) -> float:
    """The 10-90 % rise distance (mm) of an ESF sampled at ``t`` (mm, air negative).

    The low plateau is the air far from the edge; the high plateau a short window just past the edge (it
    must end before the bone under a scalp a few mm thick), placed one width in, where a Gaussian edge is at
    99.5 %. The width is not known before it is measured, so the window moves until the width settles. Means
    over a window span the overshoot and ringing of a sharp kernel: the plateau level, not its peaks.
    """
    low = float(esf[t <= -ESF_AIR_MM + ESF_AIR_WINDOW_MM].mean())
    width = 1.0
    for _ in range(10):
        start = max(ESF_HIGH_MIN_MM, width)
        high = float(esf[(t >= start) & (t <= start + max(ESF_HIGH_MIN_MM, 0.5 * width))].mean())
        if not high > low:
            raise QualityError("no air-to-tissue contrast across the outline")
        mid = 0.5 * (low + high)
        rising = np.nonzero((esf[:-1] < mid) & (esf[1:] >= mid))[0]
        if rising.size == 0:
            raise QualityError("the edge profile never crosses half-way: no clean outline to measure")
        centre = int(rising[np.argmin(np.abs(t[rising]))])
        t10 = _crossing(t, esf, low + 0.1 * (high - low), centre, -1)
        t90 = _crossing(t, esf, low + 0.9 * (high - low), centre + 1, +1)
        settled = abs((t90 - t10) - width) < 1e-3
        width = t90 - t10
        if settled:
            break
    return width


def edge_width_mm(image: np.ndarray, spacing_mm: tuple[float, float], modality: str) -> float:
    """The 10-90 % width (mm) of the edge spread function across the body outline (air to skin).

    The outline is the half-way iso-line (air to soft tissue) of a smoothed copy, on the largest body in each
    slice; profiles along its normal are aligned on the sub-pixel edge and averaged into one ESF (see
    ``_edge_samples``), whose 10 % and 90 % crossings between its air and tissue plateaus are linearly
    interpolated. A 3-D volume contributes up to ``ESF_MAX_SLICES`` evenly spaced slices.

    Parameters
    ----------
    image
        A 2-D slice or 3-D volume in real units (HU for CT), the body surrounded by air.
    spacing_mm
        In-plane pixel spacing (rows, cols) in mm.
    modality
        ``CT`` or ``MR``.

    Returns
    -------
    float
        The rise distance in mm; a Gaussian blur of std σ gives 2.563 σ.

    Raises
    ------
    QualityError
        No outline with air around it, no contrast across it, a bad modality, shape or spacing.
    """
    mod = _modality(modality)
    spacing = _spacing(spacing_mm)
    volume = _volume(image)
    picks = np.unique(np.linspace(0, volume.shape[0] - 1, min(ESF_MAX_SLICES, volume.shape[0])).round())
    volume = volume[picks.astype(np.intp)]
    threshold = _outline_threshold(volume, mod)
    budget = max(1, ESF_MAX_PROFILES // volume.shape[0])
    samples = [_edge_samples(plane, spacing, threshold, budget) for plane in volume]
    dist = np.concatenate([d for d, _ in samples])
    if dist.size == 0:
        raise QualityError("no body outline (air to tissue, with air around it) found to measure edge width on")
    t, esf = _binned_esf(dist, np.concatenate([v for _, v in samples]))
    return _rise_distance(t, esf)


# --- reference metrics ------------------------------------------------------------------------------------------


def _pair(image: np.ndarray, reference: np.ndarray, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Both images as float64 of one shape, and the data range (the reference's span unless given)."""
    img, ref = _volume(image), _volume(reference, "reference")
    if img.shape != ref.shape:
        raise QualityError(f"image {np.shape(image)} and reference {np.shape(reference)} differ in shape")
    span = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    return img, ref, span


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB): 20 log10(data_range / RMSE).

    Parameters
    ----------
    image, reference
        Arrays of one shape (2-D or 3-D).
    data_range
        The peak signal; default ``reference.max() - reference.min()``.

    Returns
    -------
    float
        PSNR in dB; ``math.inf`` for identical images.

    Raises
    ------
    QualityError
        Shapes differ, non-finite values, or a data range that is not positive.
    """
    img, ref, span = _pair(image, reference, data_range)
    mse = float(np.mean((img - ref) ** 2))
    if mse == 0.0:
        return math.inf
    if not span > 0:
        raise QualityError(f"data range must be positive, got {span} (a constant reference needs data_range=)")
    return 10.0 * math.log10(span * span / mse)


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004), 11x11 Gaussian window of σ 1.5, K1 0.01, K2 0.03.

    Local means, variances and covariance are Gaussian-weighted population moments; the SSIM map is averaged
    away from the border (5 px, where the window leaves the image), as scikit-image's ``structural_similarity``
    does with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``. A volume is compared slice by
    slice (the window is in-plane) and the slices' means averaged.

    Parameters
    ----------
    image, reference
        Arrays of one shape (2-D, or 3-D as slices), each slice at least 11x11.
    data_range
        The dynamic range L in C1 = (K1 L)^2, C2 = (K2 L)^2; default ``reference.max() - reference.min()``.

    Returns
    -------
    float
        Mean SSIM, 1.0 for identical images.

    Raises
    ------
    QualityError
        Shapes differ, slices under 11x11, non-finite values, or a data range that is not positive.
    """
    img, ref, span = _pair(image, reference, data_range)
    if min(img.shape[1:]) < SSIM_WINDOW:
        raise QualityError(f"SSIM needs slices of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {img.shape[1:]}")
    if np.array_equal(img, ref):
        return 1.0
    if not span > 0:
        raise QualityError(f"data range must be positive, got {span} (a constant reference needs data_range=)")
    c1, c2 = (SSIM_K1 * span) ** 2, (SSIM_K2 * span) ** 2
    sigma = (0.0, SSIM_SIGMA, SSIM_SIGMA)
    truncate = (SSIM_WINDOW // 2) / SSIM_SIGMA  # an 11-tap window exactly

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, truncate=truncate, mode="reflect")

    mu_x, mu_y = blur(img), blur(ref)
    var_x = blur(img * img) - mu_x * mu_x
    var_y = blur(ref * ref) - mu_y * mu_y
    cov = blur(img * ref) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    pad = SSIM_WINDOW // 2
    return float(index[:, pad:-pad, pad:-pad].mean())


def measure(image: np.ndarray, spacing_mm: tuple[float, float], modality: str) -> Quality:
    """The noise level and edge width of one image or volume.

    Parameters
    ----------
    image
        A 2-D slice or 3-D volume in real units.
    spacing_mm
        In-plane pixel spacing (rows, cols) in mm.
    modality
        ``CT`` or ``MR``.

    Returns
    -------
    Quality

    Raises
    ------
    QualityError
        As ``noise_std`` and ``edge_width_mm``.
    """
    return Quality(noise_std(image, modality, spacing_mm), edge_width_mm(image, spacing_mm, modality))
