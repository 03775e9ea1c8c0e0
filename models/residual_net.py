"""The residual network loaded from its card: maps of a volume, slab by slab (torch)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.detector import WeightsRefused, pick_device, read_card, sha256_of
from models.findings import VolumeGeometry
from models.nets import ResidualNetConfig, ResidualUNet
from models.residual import (
    CARD_NAME,
    NORMALISATION,
    WEIGHTS_DIR,
    WEIGHTS_NAME,
    ResidualMaps,
    ResidualRefused,
    central_slices,
    check_takes,
    descriptors,
    scale_of,
)

log = logging.getLogger(__name__)


def slab_batches(values: np.ndarray, batch: int) -> Any:
    """(first slice, slabs (B, 3, H, W)) over the volume, each slice with its neighbours (edges repeated)."""
    n = values.shape[0]
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))
        around = np.stack([np.clip(idx - 1, 0, n - 1), idx, np.clip(idx + 1, 0, n - 1)], axis=1)
        yield start, values[around]


def run_network(net: ResidualUNet, slabs: torch.Tensor, described: torch.Tensor | None = None) -> torch.Tensor:
    """The network's maps of slabs (B, 3, H, W) of any size: reflect-padded to a multiple of 4, then cropped.

    ``described``: the series' descriptors (k,) or (B, k), repeated over the batch.
    """
    h, w = slabs.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    x = F.pad(slabs, (0, pw, 0, ph), mode="reflect") if ph or pw else slabs
    if described is not None and described.ndim == 1:
        described = described[None].expand(len(x), -1)
    return net(x, described)[..., :h, :w]


@dataclass(frozen=True)
class MapNet:
    """One network of a modality and the maps taken from its outputs.

    The seed allows the two maps from one network or from two: a modality may have one network giving both,
    or a joint network whose blur map is used beside a network of its own for the noise map.
    """

    net: ResidualUNet
    use: tuple[str, ...]

    def __post_init__(self) -> None:
        if not set(self.use) <= set(self.net.config.maps):
            raise ValueError(f"maps {self.use} are not among the network's outputs {self.net.config.maps}")

    def entry(self) -> dict[str, Any]:
        """The checkpoint entry of this network."""
        config = {**asdict(self.net.config), "maps": list(self.net.config.maps)}
        state = {k: v.cpu() for k, v in self.net.state_dict().items()}
        return {"config": config, "use": list(self.use), "state_dict": state}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> MapNet:
        """A network from its checkpoint entry (entries without ``use`` give every output they have)."""
        net = ResidualUNet(ResidualNetConfig(**entry["config"]))
        net.load_state_dict(entry["state_dict"])
        return cls(net, tuple(entry.get("use", net.config.maps)))


def as_parts(nets: ResidualUNet | MapNet | Sequence[MapNet]) -> list[MapNet]:
    """A modality's networks as a list of :class:`MapNet` that together give both maps exactly once."""
    if isinstance(nets, ResidualUNet):
        parts = [MapNet(nets, nets.config.maps)]
    elif isinstance(nets, MapNet):
        parts = [nets]
    else:
        parts = list(nets)
    given = [m for p in parts for m in p.use]
    if sorted(given) != ["blur", "noise"]:
        raise ValueError(f"the networks give the maps {given}; they must give blur and noise once each")
    if any(p.net.config.reads == "denoised" and "noise" in p.use for p in parts):
        raise ValueError("a network that reads the denoised input cannot give the noise map it reads")
    return parts


@torch.no_grad()
def maps_of(
    parts: Sequence[MapNet], slabs: torch.Tensor, described: torch.Tensor | None, reads: str = "input"
) -> dict[str, torch.Tensor]:
    """The maps (B, H, W) of slabs (B, 3, H, W) in network units from the networks that read ``reads``."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        if part.net.config.reads != reads:
            continue
        y = run_network(part.net, slabs, described)
        for name in part.use:
            out[name] = y[:, part.net.config.maps.index(name)]
    return out


class ResidualModel:
    """The loaded residual networks (CT and MR) with their card; one per worker process."""

    def __init__(
        self,
        nets: Mapping[str, ResidualUNet | MapNet | Sequence[MapNet]],
        card: Mapping[str, Any],
        device: torch.device,
    ) -> None:
        self.parts = {m: as_parts(n) for m, n in nets.items()}
        for parts in self.parts.values():
            for part in parts:
                part.net.to(device).eval()
        self.nets = {m: [p.net for p in parts] for m, parts in self.parts.items()}
        self.card = dict(card)
        self.device = device
        self.version = str(card.get("version", "0"))
        # what cached maps are keyed by: the version, and the weights themselves (two trainings of one recipe
        # on different machines share a version, not their maps)
        self.cache_tag = f"{self.version}@{str(card.get('sha256', ''))[:12]}"
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
        weights, card = read_card(folder, WEIGHTS_NAME, CARD_NAME, "residual")
        if card.get("normalisation") != NORMALISATION:
            raise WeightsRefused(
                f"{CARD_NAME} was trained with normalisation {card.get('normalisation')}, this code "
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
            entries = entry if isinstance(entry, list) else [entry]  # residual-1.0: one network, both maps
            nets[modality] = [MapNet.from_entry(e) for e in entries]
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
        if modality not in self.parts:
            raise ResidualRefused(f"the residual model {self.version} has no {modality} network")
        self.calls += 1
        parts, scale = self.parts[modality], scale_of(values, modality)
        central = central_slices(values)
        described = torch.from_numpy(descriptors(central, float(geometry.spacing[2]), scale)).to(self.device)
        found = {"blur": np.empty(values.shape, np.float32), "noise": np.empty(values.shape, np.float32)}
        # first the networks that read the input (the noise map), then any that read it denoised (a blur network)
        for reads in ("input", "denoised"):
            if not any(p.net.config.reads == reads for p in parts):
                continue
            volume = values if reads == "input" else values + found["noise"]
            for start, slabs in slab_batches(volume, batch):
                x = torch.from_numpy(np.ascontiguousarray(slabs, dtype=np.float32) / np.float32(scale))
                for name, y in maps_of(parts, x.to(self.device), described, reads).items():
                    found[name][start : start + len(x)] = y.float().cpu().numpy() * np.float32(scale)
        return ResidualMaps(found["blur"], found["noise"])


