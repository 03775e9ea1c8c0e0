"""2.5D patches (seed 002): three orthogonal 32×32 planes through a point, stacked as 3 channels.

A network may read more than the seed's three planes (``VIEWS``): each further view adds three channels on the
same axes, so flips and turns of the patch apply to every view alike.

Every plane spans a fixed field of view in millimetres, whatever the voxel spacing, so a 0.5 mm head CTA and a
1.75 mm test series give the network the same anatomy at the same scale. Sampling is one
``scipy.ndimage.map_coordinates`` call per chunk of points (trilinear), no Python loop over voxels; the detector
samples the same points with torch's ``grid_sample`` (``models.patches_torch``: 2.3x faster on two CPU cores).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.ndimage

log = logging.getLogger(__name__)

PATCH_SIZE = 32
#: Field of view of a patch (mm) per body part: aneurysms are 2–12 mm, nodules 4–25 mm.
PATCH_MM = {"head": 24.0, "chest": 48.0}
#: CT: HU / 400, so air is -2.5, soft tissue ≈ 0.1, iodinated arteries ≈ 1, cortical bone ≈ 3.4.
CT_SCALE = 400.0
CLIP = (-3.0, 5.0)


def normalise(values: np.ndarray, modality: str) -> np.ndarray:
    """Map real-unit values to the network's range (float32, new array).

    CT keeps its physical scale (HU / 400): that is what harmonization makes comparable across scanners.
    MR has no absolute scale, so it is divided by its 99.9th percentile (the bright inflow of the arteries).

    Parameters
    ----------
    values
        Real-unit volume (HU for CT, stored units for MR).
    modality
        ``CT`` or ``MR``.

    Returns
    -------
    numpy.ndarray
        float32 volume clipped to ``CLIP``.
    """
    out = np.asarray(values, dtype=np.float32)
    if modality.upper() == "MR":
        sample = out[:: max(1, out.shape[0] // 32)]
        scale = float(np.percentile(sample, 99.9)) or 1.0
        out = out * np.float32(1.0 / scale)
    else:
        out = out * np.float32(1.0 / CT_SCALE)
    np.clip(out, *CLIP, out=out)
    return out


#: Upper bound of the network's input per body part (normalised units). Head patches are seen with everything
#: brighter than 2.0 (CT ≈ 800 HU: bone) flattened, as the candidate finder sees them, so the skull does not
#: outshine the vessels; the shipped weights were trained so. Chest patches keep the full range.
PATCH_CEILING = {"head": 2.0}


def apply_ceiling(volume: np.ndarray, body: str) -> np.ndarray:
    """Flatten a normalised volume above its body part's ``PATCH_CEILING``, in place; returns it.

    Candidates are found on the normalised volume first (they need the bone to keep away from it); the
    patches are then cut from the flattened one.
    """
    ceiling = PATCH_CEILING.get(body)
    if ceiling is not None:
        np.minimum(volume, np.float32(ceiling), out=volume)
    return volume


def plane_offsets(patch_mm: float, size: int = PATCH_SIZE) -> np.ndarray:
    """Offsets (mm) of the ``size`` sample points along one plane axis, centred on the point."""
    return (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(patch_mm / size)


def sample_grid(centres: np.ndarray, spacing: Sequence[float], patch_mm: float, size: int = PATCH_SIZE) -> np.ndarray:
    """Fractional voxel coordinates of every sample of every patch: shape (3, N, 3, size, size).

    Channel 0 is the axial plane (rows along j, columns along i), 1 the coronal (rows k, columns i),
    2 the sagittal (rows k, columns j).
    """
    c = np.asarray(centres, dtype=np.float32).reshape(-1, 3)
    n = c.shape[0]
    u = plane_offsets(patch_mm, size)
    sk, sj, si = (np.float32(u / s) for s in np.asarray(spacing, dtype=np.float32))  # offsets in voxels
    rows = np.broadcast_to
    grid = np.empty((3, n, 3, size, size), dtype=np.float32)
    for axis in range(3):
        grid[axis] = c[:, axis, None, None, None]
    # axial: (j, i) vary
    grid[1, :, 0] += rows(sj[:, None], (size, size))
    grid[2, :, 0] += rows(si[None, :], (size, size))
    # coronal: (k, i) vary; superior (larger k) at the top
    grid[0, :, 1] -= rows(sk[:, None], (size, size))
    grid[2, :, 1] += rows(si[None, :], (size, size))
    # sagittal: (k, j) vary
    grid[0, :, 2] -= rows(sk[:, None], (size, size))
    grid[1, :, 2] += rows(sj[None, :], (size, size))
    return grid


def extract_patches(
    volume: np.ndarray,
    spacing: Sequence[float],
    centres: np.ndarray,
    patch_mm: float,
    size: int = PATCH_SIZE,
    chunk: int = 2048,
) -> np.ndarray:
    """2.5D patches around ``centres`` (voxel indices k, j, i) of a normalised volume.

    Parameters
    ----------
    volume
        Normalised volume (``normalise``), shape (slices, rows, columns).
    spacing
        (dz, dy, dx) in mm.
    centres
        (N, 3) fractional voxel indices.
    patch_mm
        Field of view of each plane, mm.
    size
        Pixels per side.
    chunk
        Points per ``map_coordinates`` call (bounds memory on big batches).

    Returns
    -------
    numpy.ndarray
        float32 (N, 3, size, size); samples outside the volume take the nearest edge value.
    """
    return extract_views(volume, spacing, centres, patch_mm, ("planes",), size, chunk)


#: The views a network may read, three channels each (axial, coronal, sagittal, as ``sample_grid``):
#: ``planes`` the seed's planes through the point over the body part's field of view; ``zoom`` the same planes over
#: half that field (twice the resolution: a 2 mm sac spans five pixels instead of three); ``mip`` each plane's
#: maximum over a slab ±``MIP_SLAB_FRACTION`` × field thick (a sac just beside the plane, off its parent
#: artery, still shows); ``wide`` the planes over twice the field (the context: the whole ICA T or siphon bend
#: around a point, where card 1.3's false positives sit).
VIEWS = ("planes", "zoom", "mip", "wide")
#: Field of view of each view relative to the body part's ``PATCH_MM``.
VIEW_SCALE = {"planes": 1.0, "zoom": 0.5, "mip": 1.0, "wide": 2.0}
MIP_SLAB_FRACTION = 0.125
MIP_STEPS = 7


def check_views(views: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``views`` is a non-empty list of names out of ``VIEWS``."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"unknown patch views {unknown or list(views)}: choose from {', '.join(VIEWS)}")


def view_grids(
    view: str, centres: np.ndarray, spacing: Sequence[float], patch_mm: float, size: int = PATCH_SIZE
) -> Iterator[np.ndarray]:
    """The sample grids (``sample_grid`` layout) of one view: one for ``planes`` and ``zoom``; for ``mip``,
    ``MIP_STEPS`` parallel copies across a slab of ±``MIP_SLAB_FRACTION`` × ``patch_mm``, each plane moved along
    its own normal (axial along k, coronal along j, sagittal along i) — the view is their maximum."""
    if view != "mip":
        yield sample_grid(centres, spacing, patch_mm * VIEW_SCALE[view], size)
        return
    base = sample_grid(centres, spacing, patch_mm, size)
    normal_voxels = np.float32(1.0) / np.asarray(spacing, dtype=np.float32)  # mm → voxels along k, j, i
    for t in np.linspace(-1.0, 1.0, MIP_STEPS, dtype=np.float32) * np.float32(MIP_SLAB_FRACTION * patch_mm):
        grid = base.copy()
        for channel in range(3):  # the channel's plane moves along axis == channel
            grid[channel, :, channel] += t * normal_voxels[channel]
        yield grid


def extract_views(
    volume: np.ndarray,
    spacing: Sequence[float],
    centres: np.ndarray,
    patch_mm: float,
    views: Sequence[str] = ("planes",),
    size: int = PATCH_SIZE,
    chunk: int = 2048,
    device: str | None = None,
) -> np.ndarray:
    """Patches of several views around ``centres``, concatenated along the channels (``VIEWS``).

    Parameters
    ----------
    volume, spacing, centres, patch_mm, size, chunk
        As ``extract_patches``; ``patch_mm`` is the field of view of ``planes`` and ``mip``.
    views
        Names out of ``VIEWS``, in channel order.
    device
        None: ``map_coordinates`` (the reference: one core). A torch device (``cpu``, ``cuda``): the same samples
        with ``grid_sample`` there (``models.patches_torch``; on the CPU spread over the torch threads), equal up
        to float rounding — what the detector uses.

    Returns
    -------
    numpy.ndarray
        float32 (N, 3 × len(views), size, size); samples outside the volume take the nearest edge value.
    """
    check_views(views)
    if device is not None:
        from models.patches_torch import extract_views_torch

        return extract_views_torch(volume, spacing, centres, patch_mm, views, str(device), size, chunk)
    centres = np.asarray(centres, dtype=np.float32).reshape(-1, 3)
    out = np.empty((centres.shape[0], 3 * len(views), size, size), dtype=np.float32)
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    for start in range(0, centres.shape[0], chunk):
        part = centres[start : start + chunk]
        for v, view in enumerate(views):
            target = out[start : start + len(part), 3 * v : 3 * v + 3]
            for n, grid in enumerate(view_grids(view, part, spacing, patch_mm, size)):
                flat = scipy.ndimage.map_coordinates(vol, grid.reshape(3, -1), order=1, mode="nearest", prefilter=False)
                sample = flat.reshape(len(part), 3, size, size)
                if n == 0:
                    target[...] = sample
                else:
                    np.maximum(target, sample, out=target)
    return out
