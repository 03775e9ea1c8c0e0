"""Candidate points for the lesion classifier: many, cheap, and bounded in number.

Head (CTA/MRA): scale-normalised Laplacian-of-Gaussian blobs that sit on the bright vessel tree (threshold on the
normalised volume); aneurysms are bright blobs hanging off it. Chest CT: the same multi-scale LoG blob detector,
kept inside the lungs (low-attenuation regions not connected to the air around the patient, holes filled and
the mask grown so juxtapleural nodules stay in). Work happens on a strided copy near a working spacing, so a
512×512×300 series costs about what a 256×256×150 one does.

The budgets are set by measured per-lesion recall on held-out scanner conditions (``harmonode evaluate`` reports
``candidate_recall``): low-dose and sharp-kernel series give a thousand noise peaks or more, and a faint
(ground-glass) nodule ranks low by blob strength, so the head keeps 500 and the chest 1500. Near bone only a 2 mm
margin is dropped in the head: ophthalmic and cavernous ICA aneurysms lie against the skull base.

A 2–3 mm aneurysm on the wall of a thick artery may have no candidate of its own: across scales the artery's
larger blob wins the neighbourhood, and the nearest candidate sits 2.5–4.5 mm away on the artery. With
``fine_candidates`` > 0 the strongest peaks of the finest scale alone that lie more than 1.5 mm from every other
candidate are appended (``Candidates.fine`` counts them); a model card turns them on for the networks trained so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from models.patches import apply_ceiling, normalise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateSettings:
    """How candidates are found for one body part (scales in mm, thresholds in normalised units)."""

    sigmas_mm: tuple[float, ...]
    work_spacing_mm: float
    max_candidates: int
    min_value: float  # the candidate voxel must be at least this bright (normalised units)
    min_separation_mm: float
    clip_above: float  # flatten everything brighter (bone) so it does not outshine the lesions
    bone_margin_mm: float  # CT: no candidate closer than this to bone
    fine_candidates: int = 0  # extra peaks of the finest scale alone, away from the others (small sacs)


SETTINGS = {
    "head": CandidateSettings((0.8, 1.4, 2.2, 3.2), 0.9, 500, 0.3, 2.5, 2.0, 2.0),
    "chest": CandidateSettings((1.5, 2.8, 4.5, 7.0), 2.5, 1500, -1.75, 4.0, 0.5, 3.0),
}


BONE = 2.2  # normalised CT (≈ 880 HU): brighter than any iodinated artery, even at 80 kVp


@dataclass(frozen=True)
class Candidates:
    """Candidate points: voxel indices (k, j, i) in the input volume, LoG score, blob diameter estimate (mm)."""

    centres: np.ndarray  # (N, 3) float
    scores: np.ndarray  # (N,)
    diameters_mm: np.ndarray  # (N,)
    fine: int = 0  # how many of the last candidates are finest-scale extras (``fine_candidates``)

    def __len__(self) -> int:
        return int(self.centres.shape[0])


def _strides(spacing: Sequence[float], target: float) -> tuple[int, int, int]:
    return tuple(max(1, int(np.round(target / s))) for s in spacing)  # type: ignore[return-value]


def lung_mask(volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Lungs of a normalised chest CT: air-like voxels not connected to the outside, holes filled, grown 5 mm."""
    air = volume < -1.0  # HU < -400
    labels, n = ndi.label(air)
    if n == 0:
        return np.zeros_like(air)
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    keep = np.ones(n + 1, dtype=bool)
    keep[border] = False
    keep[0] = False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep &= sizes > max(50, 0.001 * air.size)
    lungs = keep[labels]
    lungs = ndi.binary_fill_holes(lungs)
    return grow_box(lungs, tuple(max(1, int(round(5.0 / s))) for s in spacing))


def grow_box(mask: np.ndarray, grow: Sequence[int]) -> np.ndarray:
    """Dilate a boolean mask by ``grow`` voxels per axis with a box (separable max filter, ~7× binary_dilation)."""
    return ndi.maximum_filter(np.asarray(mask, dtype=bool).view(np.uint8), size=tuple(2 * g + 1 for g in grow)) > 0


def settings_for(body: str, fine_candidates: int = 0) -> CandidateSettings:
    """``SETTINGS[body]`` with ``fine_candidates`` finest-scale extras (what a model card or a training asks)."""
    return dataclasses.replace(SETTINGS[body], fine_candidates=int(fine_candidates))


def find_candidates(
    volume: np.ndarray,
    spacing: Sequence[float],
    body: str,
    modality: str = "CT",
    settings: CandidateSettings | None = None,
    device: str | None = None,
) -> Candidates:
    """Blob-like candidate points of a normalised volume (``models.patches.normalise``).

    Parameters
    ----------
    volume
        Normalised volume (slices, rows, columns).
    spacing
        (dz, dy, dx) in mm.
    body
        ``head`` (vessel blobs, CTA or MRA) or ``chest`` (blobs in the lungs).
    modality
        ``CT`` or ``MR``. Only CT has bone to keep away from: in TOF-MRA the brightest voxels are the
        aneurysms themselves (normalised inflow well above 2 in a large one).
    settings
        Instead of ``SETTINGS[body]`` (a model card may ask for ``fine_candidates``).
    device
        None or ``cpu``: scipy on the CPU. A torch device (``cuda``): the same filters and peaks in torch
        (``models.candidates_torch``), equal up to float rounding; the chest's lung mask stays on the CPU.

    Returns
    -------
    Candidates
        At most ``max_candidates`` points, strongest first, then at most ``fine_candidates`` fine-scale extras.
    """
    cfg = settings if settings is not None else SETTINGS[body]
    st = _strides(spacing, cfg.work_spacing_mm)
    work = np.array(volume[:: st[0], :: st[1], :: st[2]], dtype=np.float32, order="C")  # a copy: the caller's
    # volume is never changed (it once was clipped in place whenever no striding was needed)
    wsp = np.asarray(spacing, float) * np.asarray(st)
    with_bone = modality.upper() == "CT"
    if device is not None and str(device) != "cpu":  # torch on the GPU; "cpu" keeps scipy
        from models.candidates_torch import find_peaks_torch

        idx, scores, sigmas, n_fine = find_peaks_torch(work, wsp, cfg, body, with_bone, device)
    else:
        idx, scores, sigmas, n_fine = find_peaks(work, wsp, cfg, body, with_bone)
    centres = idx.astype(np.float64) * np.asarray(st, float)
    log.debug("%s candidates: %d kept, %d fine-scale", body, len(idx) - n_fine, n_fine)
    diameters = (2.0 * np.sqrt(3.0) * sigmas).astype(np.float32)
    return Candidates(centres, scores.astype(np.float32), diameters, n_fine)


def find_peaks(
    work: np.ndarray, wsp: np.ndarray, cfg: CandidateSettings, body: str, with_bone: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The candidate finder's core on the CPU (scipy): (voxel indices in ``work``, scores, LoG sigmas, number of
    fine-scale extras at the end). ``work`` is the strided normalised volume; it is clipped in place."""
    bone = work > BONE if with_bone else np.zeros(work.shape, dtype=bool)
    np.minimum(work, np.float32(cfg.clip_above), out=work)
    best = np.full(work.shape, -np.inf, dtype=np.float32)
    best_sigma = np.zeros(work.shape, dtype=np.float32)

    def log_response(sigma: float) -> np.ndarray:
        resp = ndi.gaussian_laplace(work, sigma=tuple(sigma / wsp), mode="nearest")
        resp *= np.float32(-(sigma**2))  # scale-normalised, bright blobs positive
        return resp

    def where_allowed() -> np.ndarray:
        if body == "chest":
            mask = lung_mask(work, wsp)
        else:
            mask = ndi.maximum_filter(work, size=3) > cfg.min_value  # on or next to the vessel tree
        if bone.any():  # CT: nothing in or near bone (skull base, ribs, spine): its edges would flood the budget
            mask &= ~grow_box(bone, bone_grow(cfg, wsp))
        return mask

    # scipy.ndimage releases the GIL: the scales and the mask run side by side (same result, combined in order)
    finest = None
    with ThreadPoolExecutor(max(1, min(len(cfg.sigmas_mm), os.cpu_count() or 1))) as pool:
        responses = pool.map(log_response, cfg.sigmas_mm)
        allowed = pool.submit(where_allowed)  # reads ``work``, which is clipped above and no longer changes
        for sigma, resp in zip(cfg.sigmas_mm, responses, strict=True):
            if finest is None and cfg.fine_candidates:
                finest = resp.copy()
            better = resp > best
            np.copyto(best_sigma, np.float32(sigma), where=better)
            np.maximum(best, resp, out=best)
        mask = allowed.result()
    footprint = peak_footprint(cfg, wsp)
    peaks = (best == ndi.maximum_filter(best, size=footprint)) & mask & (best > 0) & (work > cfg.min_value)
    idx = np.argwhere(peaks)
    scores = best[peaks]
    order = np.argsort(-scores, kind="stable")[: cfg.max_candidates]
    idx, scores = idx[order], scores[order]
    sigmas = best_sigma[tuple(idx.T)] if len(idx) else np.zeros(0, np.float32)
    n_fine = 0
    if finest is not None:
        kept = np.zeros(work.shape, dtype=bool)
        kept[tuple(idx.T)] = True
        fine = (finest == ndi.maximum_filter(finest, size=3)) & mask & (finest > 0) & (work > cfg.min_value)
        fine &= ~grow_box(kept, fine_grow(wsp))
        fine_scores = finest[fine]
        order = np.argsort(-fine_scores, kind="stable")[: cfg.fine_candidates]
        n_fine = len(order)
        idx = np.concatenate([idx, np.argwhere(fine)[order]])
        scores = np.concatenate([scores, fine_scores[order]])
        sigmas = np.concatenate([sigmas, np.full(n_fine, cfg.sigmas_mm[0], np.float32)])
    return idx, scores, sigmas, n_fine


def bone_grow(cfg: CandidateSettings, wsp: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis of the bone margin."""
    return tuple(max(1, int(round(cfg.bone_margin_mm / s))) for s in wsp)


def fine_grow(wsp: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis of the 1.5 mm box a fine-scale extra must keep from the other candidates."""
    return tuple(max(1, int(round(1.5 / s))) for s in wsp)


def peak_footprint(cfg: CandidateSettings, wsp: Sequence[float]) -> tuple[int, ...]:
    """Box (voxels per axis, odd) within which a candidate must be the strongest response."""
    return tuple(max(3, 2 * int(round(cfg.min_separation_mm / 2 / s)) + 1) for s in wsp)


def network_input_and_candidates(
    values: np.ndarray,
    spacing: Sequence[float],
    modality: str,
    body: str,
    settings: CandidateSettings | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, Candidates]:
    """The volume patches are cut from, and the candidates, in the one order that is right.

    Candidates are found on the normalised volume (bone still visible, so they keep away from it); the
    body part's patch ceiling is applied afterwards. Training and inference both come through here;
    ``settings`` and ``device`` as ``find_candidates``.

    Returns
    -------
    tuple
        (normalised volume with the ceiling applied, candidates).
    """
    volume = normalise(values, modality)
    cands = find_candidates(volume, spacing, body, modality, settings, device)
    return apply_ceiling(volume, body), cands
