"""Patch sampling of ``models.patches`` in torch: the same views, the same trilinear samples, faster.

``scipy.ndimage.map_coordinates`` costs 7.1 s for a full-size chest CT's 1,500 candidates in planes, zoom and mip
(63 samples of 1,024 points each per candidate) on one core; ``grid_sample`` on a GPU takes milliseconds, and on
the CPU 4.9 s on one core — 3.1 s on two, because the chunks of candidates are spread over ``torch.get_num_threads()``
Python threads (torch's 3D ``grid_sample`` keeps a single volume on one core). Sample points come from
``models.patches.view_grids`` (so the geometry is defined once); ``border`` padding is scipy's ``nearest`` mode for
linear interpolation, so the patches agree with scipy's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from models.patches import PATCH_SIZE, check_views, view_grids

#: Candidates per ``grid_sample`` call on the CPU.
CPU_CHUNK = 256


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
    """``models.patches.extract_views`` on ``device``: float32 (N, 3 × len(views), size, size) on the CPU.

    On the CPU, chunks of at most ``CPU_CHUNK`` candidates go to ``torch.get_num_threads()`` threads (small chunks
    stay in cache: 256 candidates took 4.9 s on one core where 2,048 took 7.6 s); on a GPU, chunks of ``chunk``.
    """
    check_views(views)
    centres = np.asarray(centres, dtype=np.float32).reshape(-1, 3)
    out = np.empty((len(centres), 3 * len(views), size, size), dtype=np.float32)
    on_cpu = torch.device(device).type == "cpu"
    step = min(chunk, CPU_CHUNK) if on_cpu else chunk
    with torch.inference_mode():
        vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)[None, None]

        def fill(start: int) -> None:
            part = centres[start : start + step]
            with torch.inference_mode():  # the mode is per thread
                parts = []
                for view in views:
                    best = None
                    for grid in view_grids(view, part, spacing, patch_mm, size):  # one grid, or a slab's (maximum)
                        sample = _sample(vol, grid)
                        best = sample if best is None else torch.maximum(best, sample)
                    parts.append(best)
                out[start : start + len(part)] = torch.cat(parts, dim=1).cpu().numpy()

        starts = range(0, len(centres), step)
        threads = min(torch.get_num_threads(), len(starts)) if on_cpu else 1
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fill, starts))  # list(): re-raises a thread's exception here
        else:
            for start in starts:
                fill(start)
    return out
