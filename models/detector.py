"""The lesion detector the pipeline calls: candidates → 2.5D patches → mini-VGG → threshold → 3D NMS → findings.

``Detector.load`` reads the shipped weights next to their model card and refuses them unless the file's sha256
matches the card. ``detect`` never raises on bad input: a series it cannot analyse comes back as
``Detection(analysed=False, reason=…)`` for the SR to say why.

A card may name further weight files (``members``: file and sha256 each): the detector then reads every patch
with each network and averages the probabilities (an ensemble of independently trained networks; on this
simulator two networks trained on different subjects disagree most on small CTA aneurysms, and their mean
ranks them more steadily than either). A card may also name the patch ``views`` its networks read (default the
seed's three planes) and ``fine_candidates`` per body part; both travel with the weights because the networks
were trained on them. The card's ``normalisation`` names the input constants the networks were trained with
(CT scale, clip range, patch ceiling, MR percentile); ``Detector.load`` refuses a card whose constants are not
the code's (``input_normalisation``), as nnU-Net's plans carry their normalisation with the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.candidates import Candidates, CandidateSettings, network_input_and_candidates, settings_for
from models.features import FindingFeatures, finding_features
from models.findings import Finding, VolumeGeometry
from models.nets import MiniVGG, NetConfig
from models.patches import CLIP, CT_SCALE, PATCH_CEILING, PATCH_MM, check_views, extract_views

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_NAME = "lesion.pt"
CARD_NAME = "lesion.json"
TASKS = {("head", "CT"): "aneurysm", ("head", "MR"): "aneurysm", ("chest", "CT"): "nodule"}
TASK_BODIES = ("head", "chest")
MAX_SPACING_MM = {"head": 3.0, "chest": 6.0}
MAX_ANISOTROPY = 4.0  # largest / smallest voxel side
#: Test-time augmentation per body part for new model cards. Measured on v1.1.0 (held-out, 1 FP per case):
#: nodules 0.64 → 0.71 with 4 views, aneurysms 0.60 → 0.57 (CTA) and 0.69 → 0.61 (MRA), so the head keeps 1.
TTA = {"head": 1, "chest": 4}
#: A patch is read in its further flips only when its first reading (no flip, every network) reaches this
#: probability. Measured with card 1.3 on 64 held-out chest CTs (96,000 candidates): 3.7 % of the patches are
#: read again; the highest full (4-flip) probability among the others is 0.24, below the chest threshold (0.41),
#: and the FROC at 0.5/1/2/4 FP is unchanged on both 32-study sets. The chest network time drops 3.5x. With
#: card 1.4 (chest threshold 0.24): 1.8 % read again, FROC unchanged on both sets, highest skipped 0.15 and 0.23
#: (that one's first reading was under 0.005: no floor above it would catch it). Re-measure for every new card
#: (``tests/benchmarks/flip_cascade.py``).
TTA_FLOOR = 0.02
#: The percentile an MR volume is divided by in ``models.patches.normalise`` (the bright arterial inflow).
MR_PERCENTILE = 99.9


def flipped(x: torch.Tensor, tta: int) -> list[torch.Tensor]:
    """The first ``tta`` (1–4) readings of a batch of patches (B, C, H, W): as they are, mirrored left-right,
    mirrored up-down, transposed — every view's channels alike."""
    return [x, torch.flip(x, dims=(3,)), torch.flip(x, dims=(2,)), x.transpose(2, 3)][: max(1, tta)]


class WeightsRefused(RuntimeError):
    """Weights whose checksum or input normalisation does not match their model card (or no card at all)."""


def input_normalisation() -> dict[str, Any]:
    """The network-input constants this code applies, as a model card's ``normalisation`` block names them.

    Returns
    -------
    dict
        ``ct_scale`` (CT values are divided by it), ``clip`` (the normalised range), ``patch_ceiling`` (per body
        part, the normalised value patches are flattened above) and ``mr_percentile`` (MR volumes are divided by
        this percentile of their values): ``models.patches.normalise`` and ``apply_ceiling``.
    """
    return {
        "ct_scale": float(CT_SCALE),
        "clip": [float(v) for v in CLIP],
        "patch_ceiling": {body: float(v) for body, v in PATCH_CEILING.items()},
        "mr_percentile": float(MR_PERCENTILE),
    }


def check_normalisation(card: Mapping[str, Any], card_name: str = CARD_NAME) -> None:
    """Refuse a model card whose networks were trained on input values other than the code gives.

    Parameters
    ----------
    card
        The model card.
    card_name
        Its file name, for the message.

    Raises
    ------
    WeightsRefused
        The card has no ``normalisation`` block, or one whose constants differ from ``input_normalisation()``.
    """
    expected = input_normalisation()
    stated = card.get("normalisation")
    if not isinstance(stated, Mapping):
        raise WeightsRefused(
            f"model card {card_name} names no input normalisation: refused (its networks' inputs are unknown; "
            f"this code's are {json.dumps(expected)})"
        )
    differ = [key for key in sorted({*expected, *stated}) if stated.get(key) != expected.get(key)]
    if differ:
        said = "; ".join(f"{k} {json.dumps(stated.get(k))}, the code's {json.dumps(expected.get(k))}" for k in differ)
        raise WeightsRefused(
            f"model card {card_name} normalisation differs from the code's ({said}): refused (the networks were "
            "trained on other input values)"
        )


@dataclass
class Detection:
    """What the detector says about one series."""

    findings: list[Finding]
    analysed: bool
    reason: str = ""
    task: str = ""
    n_candidates: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: seed 004: each finding's penultimate-layer features and reliability, in the order of ``findings``
    features: list[FindingFeatures] = field(default_factory=list)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(folder: Path, weights_name: str, card_name: str, what: str) -> tuple[Path, dict[str, Any]]:
    """The weights file in ``folder`` and its parsed model card (the checks of the card are the caller's).

    Raises
    ------
    FileNotFoundError
        No weights installed.
    WeightsRefused
        Weights without their card.
    """
    weights, card_path = folder / weights_name, folder / card_name
    if not weights.exists():
        raise FileNotFoundError(f"no {what} weights at {weights}")
    if not card_path.exists():
        raise WeightsRefused(f"weights {weights.name} have no model card {card_path.name}: refused")
    return weights, json.loads(card_path.read_text())


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def nms_3d(points_mm: np.ndarray, scores: np.ndarray, radii_mm: np.ndarray) -> np.ndarray:
    """Greedy 3D non-maximum suppression: indices kept, best first (a point suppresses others within its radius)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    alive = np.ones(len(scores), dtype=bool)
    for idx in order:
        if not alive[idx]:
            continue
        keep.append(int(idx))
        d = np.linalg.norm(points_mm - points_mm[idx], axis=1)
        alive &= d > radii_mm[idx]
    return np.asarray(keep, dtype=np.intp)


class Detector:
    """A loaded lesion classifier with its card; one per worker process."""

    def __init__(
        self,
        model: MiniVGG | Sequence[MiniVGG],
        card: dict[str, Any],
        device: torch.device,
        threshold: float | None = None,
    ):
        members = [model] if isinstance(model, MiniVGG) else list(model)
        if not members:
            raise ValueError("a detector needs at least one network")
        # on the CPU, channels-last convolutions read the 9-channel patches 1.5-3x faster (measured on 2 cores)
        layout = torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format
        #: the networks whose probabilities are averaged (one, or an ensemble named by the card)
        self.models = [m.to(device, memory_format=layout).eval() for m in members]
        self.layout = layout
        self.model = self.models[0]
        self.card = card
        self.device = device
        self.version = str(card.get("version", "0"))
        chosen = card.get("threshold", 0.5) if threshold is None else threshold
        self.thresholds = (
            {k: float(v) for k, v in chosen.items()} if isinstance(chosen, dict) else dict.fromkeys(TASK_BODIES, chosen)
        )
        self.patch_mm: dict[str, float] = dict(card.get("patch_mm", PATCH_MM))
        #: test-time augmentation per body part: the mean over this many flips/turns of each patch (1: none)
        tta = card.get("tta", 1)
        self.tta = {b: max(1, min(4, int(tta.get(b, 1) if isinstance(tta, dict) else tta))) for b in TASK_BODIES}
        #: the patch views every network reads (``models.patches.VIEWS``; cards before 1.3 name none: the planes)
        self.views: tuple[str, ...] = tuple(card.get("views", ("planes",)))
        check_views(self.views)
        channels = {m.config.in_channels for m in self.models}
        if channels != {3 * len(self.views)}:
            raise ValueError(
                f"model card views {list(self.views)} give {3 * len(self.views)} channels, the networks read "
                f"{sorted(channels)}"
            )
        #: finest-scale extra candidates per body part (``models.candidates``), as the networks were trained
        fine = card.get("fine_candidates", {})
        self.candidate_settings: dict[str, CandidateSettings] = {
            body: settings_for(body, fine.get(body, 0)) for body in TASK_BODIES
        }

    @property
    def torch_device(self) -> str | None:
        """Where candidates are found in torch: the CUDA device, or None (scipy on the CPU). Patches are always
        sampled in torch, on the detector's device."""
        return str(self.device) if self.device.type == "cuda" else None

    @classmethod
    def load(cls, device: str = "auto", weights_dir: str | Path | None = None) -> Detector:
        """Load the shipped weights after checking their sha256 against the model card.

        Parameters
        ----------
        device
            ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` …
        weights_dir
            Folder holding ``lesion.pt`` and ``lesion.json`` (default: ``models/weights``).

        Returns
        -------
        Detector

        Raises
        ------
        FileNotFoundError
            No weights installed.
        WeightsRefused
            No card, a card whose input normalisation is not the code's (``check_normalisation``), or weights
            whose checksum differs from the card's.
        """
        folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        weights, card = read_card(folder, WEIGHTS_NAME, CARD_NAME, "detector")
        check_normalisation(card, CARD_NAME)
        files = [(weights, card.get("sha256"))]
        for member in card.get("members", []):
            name = Path(str(member.get("file", "")))
            if name.name != str(name) or not name.name:  # a bare file name next to the card, nothing else
                raise WeightsRefused(f"model card names an invalid member file {str(name)!r}: refused")
            files.append((folder / name.name, member.get("sha256")))
        models = []
        for path, expected in files:
            if not path.exists():
                raise WeightsRefused(f"the model card names {path.name}, which is missing: refused")
            actual = sha256_of(path)
            if actual != expected:
                raise WeightsRefused(
                    f"weights {path.name} have sha256 {actual[:16]}…, the card says {str(expected)[:16]}…: "
                    "refused (tampered or mismatched file)"
                )
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model = MiniVGG(NetConfig(**ckpt["config"]))
            model.load_state_dict(ckpt["state_dict"])
            models.append(model)
        log.info("detector %s loaded from %s (%d network(s))", card.get("version"), folder, len(models))
        return cls(models, card, pick_device(device))

    # -- checks ---------------------------------------------------------------------------------------------------
    def refusal(
        self, values: np.ndarray | None, geometry: VolumeGeometry | None, modality: str, body: str
    ) -> tuple[str, str]:
        """(task, reason) — reason is empty when the series can be analysed."""
        task = TASKS.get((body, modality.upper()), "")
        if body not in ("head", "chest"):
            return task, f"unknown body part {body!r}: the detector reads head CTA/MRA and chest CT"
        if not task:
            return task, f"this {modality} series cannot go to the {body} CT model (nodule detection reads CT only)"
        if values is None or np.ndim(values) != 3:
            return task, f"need a 3D volume, got {np.ndim(values) if values is not None else 'no'} dimensions"
        if geometry is None or geometry.spacing is None:
            return task, "the series has no voxel spacing: sizes in mm are unknown"
        spacing = np.asarray(geometry.spacing, float)
        if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            return task, f"invalid voxel spacing {tuple(spacing)}"
        if spacing.max() > MAX_SPACING_MM[body] or spacing.max() / spacing.min() > MAX_ANISOTROPY:
            return task, (
                f"voxel spacing {tuple(round(float(s), 2) for s in spacing)} mm is too coarse or anisotropic for "
                f"{task} detection (at most {MAX_SPACING_MM[body]:g} mm and {MAX_ANISOTROPY:g}:1)"
            )
        extent = np.asarray(np.shape(values)) * spacing
        need = self.patch_mm[body]
        if min(np.shape(values)) < 8 or extent.min() < need:
            return task, (
                f"series too small for a patch: {tuple(np.shape(values))} voxels, "
                f"{tuple(round(float(e), 1) for e in extent)} mm; need ≥ 8 voxels and {need:g} mm per axis"
            )
        return task, ""

    # -- inference ------------------------------------------------------------------------------------------------
    def classify(
        self, patches: np.ndarray, batch: int | None = None, tta: int = 1, floor: float = TTA_FLOOR
    ) -> np.ndarray:
        """Lesion probability of each (N, channels, 32, 32) patch (float32 N), averaged over ``tta`` flips/turns and
        over the ensemble's networks. ``batch``: patches per forward pass (default 1024 on a GPU, 256 on the CPU,
        where larger batches fall out of cache).

        With ``tta`` > 1 every patch is first read once (no flip) by every network; only the patches whose first
        probability reaches ``floor`` are read with all ``tta`` flips, and get exactly the probability a full
        reading gives. The others keep their first probability: far below any threshold (``TTA_FLOOR``).
        ``floor=0`` reads every patch fully.
        """
        if tta <= 1 or floor <= 0:
            return self._read(patches, batch, tta)
        first = self._read(patches, batch, 1)
        again = np.flatnonzero(first >= floor)
        if len(again):
            first[again] = self._read(patches[again], batch, tta)
        return first

    @torch.inference_mode()
    def _read(self, patches: np.ndarray, batch: int | None, tta: int) -> np.ndarray:
        """``classify`` with every patch read in all ``tta`` flips."""
        out = np.empty(len(patches), dtype=np.float32)
        cuda = self.device.type == "cuda"
        batch = batch or (1024 if cuda else 256)
        for start in range(0, len(patches), batch):
            x = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch])).to(self.device)
            views = flipped(x, tta)
            prob = torch.zeros(len(x), device=self.device)
            for model in self.models:
                for view in views:
                    with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                        logits = model(view.contiguous(memory_format=self.layout))
                    prob += torch.softmax(logits.float(), dim=1)[:, 1]
            out[start : start + len(x)] = (prob / (len(views) * len(self.models))).cpu().numpy()
        return out

    def score(
        self, values: np.ndarray, geometry: VolumeGeometry, modality: str, body: str
    ) -> tuple[Candidates, np.ndarray]:
        """Every candidate with its probability (no threshold, no NMS): what ``evaluate`` sweeps."""
        cands, probs, _ = self._score(values, geometry, modality, body)
        return cands, probs

    def _score(
        self, values: np.ndarray, geometry: VolumeGeometry, modality: str, body: str
    ) -> tuple[Candidates, np.ndarray, np.ndarray]:
        """``score`` and the candidates' patches (which ``detect`` reads again for the findings' features)."""
        settings = self.candidate_settings[body]
        on_gpu = self.torch_device
        volume, cands = network_input_and_candidates(values, geometry.spacing, modality, body, settings, on_gpu)
        if len(cands) == 0:
            return cands, np.zeros(0, np.float32), np.zeros((0, 3 * len(self.views), 32, 32), np.float32)
        spacing, mm = geometry.spacing, self.patch_mm[body]
        patches = extract_views(volume, spacing, cands.centres, mm, self.views, device=str(self.device))
        return cands, self.classify(patches, tta=self.tta[body]), patches

    def detect(self, values: np.ndarray, geometry: VolumeGeometry | None, modality: str, body: str) -> Detection:
        """Find lesions in a harmonized volume.

        Parameters
        ----------
        values
            Real-unit volume (slices, rows, columns), harmonized by the series' rule.
        geometry
            Its geometry (spacing, orientation); None when the series has none.
        modality
            ``CT`` or ``MR``.
        body
            ``head`` (aneurysms, CTA or MRA) or ``chest`` (nodules, CT).

        Returns
        -------
        Detection
            Findings (probability ≥ threshold, after 3D NMS), or ``analysed=False`` with the reason.
        """
        t0 = time.perf_counter()
        task, reason = self.refusal(values, geometry, modality, body)
        if reason:
            log.info("series not analysed: %s", reason)
            return Detection([], False, reason, task)
        assert geometry is not None
        try:
            cands, probs, patches = self._score(values, geometry, modality, body)
        except (ValueError, MemoryError, RuntimeError) as exc:  # the SR says why; the worker keeps going
            log.exception("detector failed on a %s series", modality)
            return Detection([], False, f"detector failed: {exc}", task)
        threshold = self.thresholds.get(body, 0.5)
        hit = probs >= threshold
        centres, p, diam = cands.centres[hit], probs[hit], cands.diameters_mm[hit]
        mm = geometry.index_to_patient(centres) if len(centres) else np.zeros((0, 3))
        keep = nms_3d(mm, p, np.maximum(diam, 6.0 if body == "head" else 10.0))
        # seed 004: only the findings' own patches are read again, for their features (a few per series)
        found = np.flatnonzero(hit)[keep]
        features = finding_features(self.models, patches[found], p[keep], threshold, self.device)
        del patches
        findings = [
            Finding(
                kind=task,
                center_mm=tuple(float(v) for v in mm[i]),  # type: ignore[arg-type]
                diameter_mm=float(max(diam[i], 1.0)),
                probability=float(np.clip(p[i], 0.0, 1.0)),
                center_index=tuple(float(v) for v in centres[i]),  # type: ignore[arg-type]
                tracking_id=f"{task}-{n + 1}",
            )
            for n, i in enumerate(keep)
        ]
        seconds = time.perf_counter() - t0
        log.info("%s detection: %d candidates, %d findings in %.2f s", task, len(cands), len(findings), seconds)
        return Detection(findings, True, "", task, len(cands), seconds, features=features)
