"""Seed 004: the feature values behind each finding, how reliable its recognition is, and their compression.

The detector's networks (``models.nets.MiniVGG``) end in an embedding (the penultimate layer: ``hidden``
ReLU units) and a linear head. For every finding the node keeps that embedding — of each network of an
ensemble, concatenated — read once more on the finding's own patch after the threshold and the 3D NMS, so
only a handful of patches per series pay for it (inference itself is untouched).

Reliability (claims 4 and 7) is a number in [0, 1], small when the recognition could easily have gone the
other way:

- the distance of the probability from the decision threshold, scaled so that 0 is at the threshold and 1
  at certainty (``margin``);
- for an ensemble also the agreement of its networks, 1 − (highest − lowest member probability): networks
  that disagree make an unreliable finding however far their mean lies from the threshold.

A finding's reliability is the smaller of the two (``reliability``). Compression (claim 13): float16 then
zlib — the embedding is a ReLU output, so many of its values are exactly zero and compress away.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported when features are computed, not by every process that reads records
    import torch

    from models.nets import MiniVGG

FEATURE_CODEC = "float16+zlib"


@dataclass(frozen=True)
class FindingFeatures:
    """What seed 004 keeps of one finding: its feature vector, the member probabilities, its reliability."""

    vector: np.ndarray  # float32 (members × hidden,)
    member_probabilities: tuple[float, ...]
    reliability: float

    def compressed(self) -> bytes:
        """The feature vector as ``compress_features`` stores it."""
        return compress_features(self.vector)


def margin(probability: float, threshold: float) -> float:
    """Distance of a probability from the decision threshold, 0 at the threshold and 1 at 0 or 1.

    Parameters
    ----------
    probability
        The recognition's probability of the lesion class.
    threshold
        The decision threshold it was compared with (0 < threshold < 1).

    Returns
    -------
    float
        ``(p − t) / (1 − t)`` above the threshold, ``(t − p) / t`` below it.

    Raises
    ------
    ValueError
        A threshold outside (0, 1).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a decision threshold lies in (0, 1), got {threshold}")
    p = float(np.clip(probability, 0.0, 1.0))
    side = (1.0 - threshold) if p >= threshold else threshold
    return float(abs(p - threshold) / side)


def agreement(member_probabilities: Sequence[float]) -> float:
    """1 − the spread (highest − lowest) of an ensemble's probabilities; 1 for a single network."""
    if len(member_probabilities) < 2:
        return 1.0
    return float(1.0 - (max(member_probabilities) - min(member_probabilities)))


def reliability(probability: float, threshold: float, member_probabilities: Sequence[float] = ()) -> float:
    """How reliable a recognition is: the smaller of its ``margin`` and its ensemble's ``agreement``.

    A threshold at 0 or 1 (a card that accepts or refuses everything) is read just inside (0, 1).
    """
    t = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    return round(min(margin(probability, t), agreement(member_probabilities)), 4)


def embed(
    models: Sequence[MiniVGG], patches: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """The penultimate-layer features and the probability of each network for some patches.

    Parameters
    ----------
    models
        The detector's networks (in eval mode: no dropout).
    patches
        float32 (N, channels, 32, 32), as the detector reads them (the unflipped reading).
    device
        Where the networks are.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Features float32 (N, len(models) × hidden), the networks' features side by side; and the
        probabilities float32 (N, len(models)).
    """
    if len(patches) == 0:
        hidden = sum(m.config.hidden for m in models)
        return np.zeros((0, hidden), np.float32), np.zeros((0, len(models)), np.float32)
    import torch

    vectors, probabilities = [], []
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(device)
        for model in models:
            # float32 even on CUDA: a handful of patches, and the exported values must not depend on the device
            features = model.embed(model.features(x))
            vectors.append(features.float().cpu().numpy())
            probabilities.append(torch.softmax(model.head(features).float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(vectors, axis=1).astype(np.float32), np.stack(probabilities, axis=1).astype(np.float32)


def finding_features(
    models: Sequence[MiniVGG],
    patches: np.ndarray,
    probabilities: Sequence[float],
    threshold: float,
    device: torch.device | str = "cpu",
) -> list[FindingFeatures]:
    """Features and reliability of each finding, from its patch and its (final) probability.

    Parameters
    ----------
    models, patches, device
        As ``embed``: one patch per finding.
    probabilities
        Each finding's probability as the detector reported it (averaged over flips and networks).
    threshold
        The decision threshold of the finding's body part.

    Returns
    -------
    list[FindingFeatures]
        One per patch, in order.
    """
    vectors, members = embed(models, patches, device)
    return [
        FindingFeatures(
            vector=vectors[n],
            member_probabilities=tuple(round(float(v), 4) for v in members[n]),
            reliability=reliability(float(probabilities[n]), threshold, [float(v) for v in members[n]]),
        )
        for n in range(len(patches))
    ]


def compress_features(vector: np.ndarray) -> bytes:
    """A feature vector as float16 (little-endian), then zlib (level 9: a few hundred bytes).

    Raises
    ------
    ValueError
        A vector that is not one-dimensional or holds a value that is not finite.
    """
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise ValueError("a feature vector is one-dimensional and finite")
    return zlib.compress(v.astype("<f2").tobytes(), 9)


def decompress_features(blob: bytes) -> np.ndarray:
    """The float32 feature vector ``compress_features`` stored.

    Raises
    ------
    ValueError
        Bytes that are not a compressed float16 vector.
    """
    try:
        raw = zlib.decompress(blob)
    except zlib.error as exc:
        raise ValueError(f"not a compressed feature vector: {exc}") from exc
    if len(raw) % 2:
        raise ValueError("not a compressed float16 vector (odd length)")
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)
