"""Patch sampling of ``models.patches`` in torch, for a GPU: the same views, the same trilinear samples.

``scipy.ndimage.map_coordinates`` costs 0.5 s for a chest CT's 1,500 candidates on the CPU; ``grid_sample`` on a
GPU takes milliseconds. Sample points come from ``models.patches.view_grids`` (so the geometry is defined once);
``border`` padding is scipy's ``nearest`` mode for linear interpolation, so the patches agree up to float
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.patches import PATCH_SIZE, check_views, view_grids


def _sample(volume: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
    """Trilinear samples of a (1, 1, D, H, W) tensor at voxel coordinates ``grid`` (3, N, 3, S, S) → (N, 3, S, S)."""
    _, _, d, h, w = volume.shape
    coords = torch.from_numpy(np.ascontiguousarray(grid)).to(volume.device)
    scale = torch.tensor([d - 1, h - 1, w - 1], dtype=coords.dtype, device=volume.device).clamp(min=1)
    norm = coords.reshape(3, -1).T / scale * 2 - 1  # (points, k j i) in [-1, 1]
    n = grid.shape[1]
    xyz = norm[:, [2, 1, 0]].reshape(1, n * 3, grid.shape[3], grid.shape[4], 3)  # grid_sample wants (x=i, y=j, z=k)
    out = F.grid_sample(volume, xyz, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(n, 3, grid.shape[3], grid.shape[4])


def extract_views_torch(
    volume: np.ndarray,
    spacing: Sequence[float],
    centres: np.ndarray,
    patch_mm: float,
    views: Sequence[str],
    device: str,
    size: int = PATCH_SIZE,
    chunk: int = 2048,
) -> np.ndarray:
    """``models.patches.extract_views`` on ``device``: float32 (N, 3 × len(views), size, size) on the CPU."""
    check_views(views)
    centres = np.asarray(centres, dtype=np.float32).reshape(-1, 3)
    out = np.empty((len(centres), 3 * len(views), size, size), dtype=np.float32)
    with torch.inference_mode():
        vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)[None, None]
        for start in range(0, len(centres), chunk):
            part = centres[start : start + chunk]
            parts = []
            for view in views:
                best = None
                for grid in view_grids(view, part, spacing, patch_mm, size):  # one grid, or a slab's (maximum)
                    sample = _sample(vol, grid)
                    best = sample if best is None else torch.maximum(best, sample)
                parts.append(best)
            out[start : start + len(part)] = torch.cat(parts, dim=1).cpu().numpy()
    return out
