"""The residual network of the harmonization stage (seed 003): residual maps of a series, loaded from its card.

``ResidualModel.maps`` runs the network (:class:`models.nets.ResidualUNet`, one per modality) over a volume,
slice by slice with its two neighbours as a thin slab, and returns the blur and noise residual maps in the
volume's real units. What the rule's strengths do with them is ``rules.strengths.apply_strengths``: pure
arithmetic, so ``residual_stage`` looks the maps up in the cache first and a change of α never calls the
network. A series the network was not trained for (fewer than three slices, no pixel spacing, a pixel
spacing outside the trained range, another modality) is refused with the reason; the pipeline then keeps
the histogram stage's result and says why in the SR.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.detector import WeightsRefused, pick_device, sha256_of
from models.findings import VolumeGeometry
from models.nets import ResidualNetConfig, ResidualUNet
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


def check_takes(values: np.ndarray, geometry: VolumeGeometry | None, modality: str) -> None:
    """Refuse what the network was not trained for.

    Raises
    ------
    ResidualRefused
        Another modality, fewer than three slices, no pixel spacing, or a spacing outside the trained range.
    """
    if modality not in NORMALISATION:
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


def slab_batches(values: np.ndarray, batch: int) -> Any:
    """(first slice, slabs (B, 3, H, W)) over the volume, each slice with its neighbours (edges repeated)."""
    n = values.shape[0]
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))
        around = np.stack([np.clip(idx - 1, 0, n - 1), idx, np.clip(idx + 1, 0, n - 1)], axis=1)
        yield start, values[around]


def run_network(net: ResidualUNet, slabs: torch.Tensor) -> torch.Tensor:
    """The network's maps of slabs (B, 3, H, W) of any size: reflect-padded to a multiple of 4, then cropped."""
    h, w = slabs.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    x = F.pad(slabs, (0, pw, 0, ph), mode="reflect") if ph or pw else slabs
    return net(x)[..., :h, :w]


class ResidualModel:
    """The loaded residual networks (CT and MR) with their card; one per worker process."""

    def __init__(self, nets: Mapping[str, ResidualUNet], card: Mapping[str, Any], device: torch.device) -> None:
        self.nets = {m: n.to(device).eval() for m, n in nets.items()}
        self.card = dict(card)
        self.device = device
        self.version = str(card.get("version", "0"))
        self.calls = 0  # network runs (tests check that a change of strength makes none)

    @classmethod
    def load(cls, device: str = "auto", weights_dir: str | Path | None = None) -> ResidualModel:
        """Load the shipped residual weights after checking them against their card.

        Raises
        ------
        FileNotFoundError
            No residual weights installed.
        WeightsRefused
            No card, a card whose normalisation is not the code's, or a checksum that differs (tampered).
        """
        folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        weights, card_path = folder / WEIGHTS_NAME, folder / CARD_NAME
        if not weights.exists():
            raise FileNotFoundError(f"no residual weights at {weights}")
        if not card_path.exists():
            raise WeightsRefused(f"weights {weights.name} have no model card {card_path.name}: refused")
        card = json.loads(card_path.read_text())
        if card.get("normalisation") != NORMALISATION:
            raise WeightsRefused(
                f"{card_path.name} was trained with normalisation {card.get('normalisation')}, this code "
                f"applies {NORMALISATION}: refused (retrain with `harmonode train residual`)"
            )
        actual = sha256_of(weights)
        if actual != card.get("sha256"):
            raise WeightsRefused(
                f"weights {weights.name} have sha256 {actual[:16]}…, the card says {str(card.get('sha256'))[:16]}…: "
                "refused (tampered or mismatched file)"
            )
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
        nets = {}
        for modality, entry in ckpt["nets"].items():
            net = ResidualUNet(ResidualNetConfig(**entry["config"]))
            net.load_state_dict(entry["state_dict"])
            nets[modality] = net
        log.info("residual model %s loaded from %s (%s)", card.get("version"), folder, ", ".join(sorted(nets)))
        return cls(nets, card, pick_device(device))

    @torch.no_grad()
    def maps(
        self, values: np.ndarray, geometry: VolumeGeometry | None, modality: str, batch: int = 8
    ) -> ResidualMaps:
        """The blur and noise residual maps of a volume (slices, rows, cols) in its real units.

        Raises
        ------
        ResidualRefused
            A series the network was not trained for (``check_takes``), or no network for the modality.
        """
        check_takes(values, geometry, modality)
        if modality not in self.nets:
            raise ResidualRefused(f"the residual model {self.version} has no {modality} network")
        self.calls += 1
        net, scale = self.nets[modality], scale_of(values, modality)
        blur = np.empty(values.shape, np.float32)
        noise = np.empty(values.shape, np.float32)
        for start, slabs in slab_batches(values, batch):
            x = torch.from_numpy(np.ascontiguousarray(slabs, dtype=np.float32) / np.float32(scale)).to(self.device)
            out = run_network(net, x).float().cpu().numpy() * np.float32(scale)
            blur[start : start + len(out)] = out[:, 0]
            noise[start : start + len(out)] = out[:, 1]
        return ResidualMaps(blur, noise)


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
    model: ResidualModel | None,
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
    cached = cache.get(cache_key[0], cache_key[1], model.version) if cache is not None else None
    if cached is None:
        try:
            maps = model.maps(values, geometry, modality)
        except ResidualRefused as exc:
            return ResidualOutcome(values, False, str(exc))
        if cache is not None:
            cache.put(cache_key[0], cache_key[1], model.version, maps.blur, maps.noise)
            cached = cache.get(cache_key[0], cache_key[1], model.version)
        blur, noise = (cached.blur, cached.noise) if cached is not None else (maps.blur, maps.noise)
        hit = False
    else:
        blur, noise, hit = cached.blur, cached.noise, True
    out = apply_strengths(values, blur, noise, stage.alpha_blur, stage.alpha_noise, noise_model_for(modality, noise))
    return ResidualOutcome(out, True, cached=hit)
