"""Training the residual network (seed 003) on the synthetic scanner's pairs, and its model card.

Every step draws fresh slabs (``simulator.pairs``): random anatomy (head or chest, random level and pixel
spacing 0.4–1.8 mm) under a random kernel and dose (CT) or a random Rician noise level and bias field (MR),
never one of the named conditions, which are kept for the held-out evaluation. The network reads the
three-slice slab and is fitted, as the seed's variant that outputs the maps directly, to the exact blur
and noise residual maps of the centre slice.

The two maps want different losses. L1 fits the noise map best, but fits the blur map — sparse, large at
edges, zero elsewhere — by zero; a squared term makes the blur map learn and costs the noise map (measured:
card 1.0 kept 186 % of the reference's noise on the low-dose BONE condition, an L1-only network 106 %). So,
as the seed allows, CT has two networks: one trained with L1 alone gives the noise map, and the joint one
(L1 and the squared term, both maps) gives the blur map. ``ct_blur = "denoised"`` instead trains the blur
network on the input *with its noise taken out* (the noise-free condition image with 0–40 % of its noise
left in, as the noise network leaves it): measured, it converts soft kernels far better (Philips B head:
+4.0 dB against +1.8) and sharp ones worse (its map moves no sharp kernel's edges, so the proposal gives it
0), so the joint blur map is the default. MR has one network (L1, both maps). All in one checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.detector import pick_device, sha256_of
from models.findings import VolumeGeometry
from models.nets import ResidualNetConfig, ResidualUNet
from models.residual import CARD_NAME, NORMALISATION, WEIGHTS_NAME, descriptors, scale_of
from models.residual_net import MapNet, ResidualModel
from simulator.pairs import ResidualPair, ct_pair, mr_pair, named_pair, random_ct_condition, random_mr_condition
from simulator.scanner import CONDITIONS

log = logging.getLogger(__name__)

SPACINGS_MM = (0.4, 1.8)
BORDER = 12  # pixels of a training slab's border no crop takes (the filtered anatomy's edge)
#: Subjects of the held-out evaluation pairs (training draws its own from the step number).
EVAL_SEEDS = (7001, 7002)


@dataclass(frozen=True)
class ResidualRecipe:
    """How the residual networks are trained (recorded in the card)."""

    steps_ct: int = 3000
    steps_mr: int = 1200
    batch: int = 16
    patch: int = 80
    crops_per_slab: int = 4
    width: int = 12
    lr: float = 2e-3
    seed: int = 0
    mse_ct: float = 10.0  # weight of the squared term beside L1 (CT: the blur map needs it, see fit_network)
    mse_mr: float = 0.0  # MR has no blur map to speak of; L1 alone denoises best (measured, card 1.0 runs)
    ct_blur: str = "joint"  # CT's blur map: "joint" (the joint network's) or "denoised" (on the denoised input)

    @property
    def command(self) -> str:
        """The CLI command that reproduces this recipe."""
        return (
            f"harmonode train residual --steps-ct {self.steps_ct} --steps-mr {self.steps_mr} --batch {self.batch} "
            f"--patch {self.patch} --width {self.width} --lr {self.lr:g} --seed {self.seed} "
            f"--mse-ct {self.mse_ct:g} --mse-mr {self.mse_mr:g}"
            + ("" if self.ct_blur == "joint" else f" --ct-blur {self.ct_blur}")
        )


@dataclass(frozen=True)
class NetPart:
    """One network to train: its modality, the maps it outputs, its loss and its random stream."""

    modality: str
    maps: tuple[str, ...]
    mse: float  # weight of the squared term beside L1
    stream: int  # the training draws' random stream (and the initialisation's seed offset)
    reads: str = "input"  # or "denoised" (``ResidualNetConfig.reads``)
    use: tuple[str, ...] = ()  # the maps the model takes from it (default: all it outputs)

    @property
    def used(self) -> tuple[str, ...]:
        """The maps the model takes from this network."""
        return self.use or self.maps

    @property
    def name(self) -> str:
        """For progress bars and the card: ``CT``, ``CT noise`` …"""
        return self.modality if self.maps == ("blur", "noise") else f"{self.modality} {'+'.join(self.maps)}"


def parts_of(recipe: ResidualRecipe) -> list[NetPart]:
    """The networks a recipe trains, in order (the joint networks draw as card 1.0 did)."""
    if recipe.ct_blur not in ("joint", "denoised"):
        raise ValueError(f"ct_blur is 'joint' or 'denoised', not {recipe.ct_blur!r}")
    parts = []
    if recipe.steps_ct > 0 and recipe.ct_blur == "joint":
        parts.append(NetPart("CT", ("blur", "noise"), recipe.mse_ct, 0, use=("blur",)))
        parts.append(NetPart("CT", ("noise",), 0.0, 2))
    elif recipe.steps_ct > 0:
        parts.append(NetPart("CT", ("noise",), 0.0, 2))
        parts.append(NetPart("CT", ("blur",), recipe.mse_ct, 3, reads="denoised"))
    if recipe.steps_mr > 0:
        parts.append(NetPart("MR", ("blur", "noise"), recipe.mse_mr, 1))
    return parts


def draw_pair(modality: str, rng: np.random.Generator) -> ResidualPair:
    """One training slab of 3 slices under a random condition (random body, level and pixel spacing)."""
    spacing = float(np.exp(rng.uniform(np.log(SPACINGS_MM[0]), np.log(SPACINGS_MM[1]))))
    matrix = 160
    if modality == "MR":
        return mr_pair(random_mr_condition(rng), rng, 3, matrix, spacing)
    body = "head" if rng.random() < 0.6 else "chest"
    return ct_pair(random_ct_condition(rng), rng, body, 3, matrix, spacing)


def training_batch(
    modality: str, rng: np.random.Generator, batch: int, patch: int, crops: int, reads: str = "input"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (B, 3, P, P), their series' descriptors (B, 3) and targets (B, 2, P, P: the blur and noise
    residual maps of the centre slice), in network units; crops keep clear of the slab's border.

    ``reads`` "denoised": the inputs are the noise-free condition slabs with 0–40 % of their noise left in
    (what a noise network's output looks like); the descriptors are still those of the noisy series.
    """
    xs, ds, ys = [], [], []
    while len(xs) < batch:
        pair = draw_pair(modality, rng)
        scale = np.float32(scale_of(pair.input, modality))
        seen = pair.input
        if reads == "denoised":
            seen = pair.input + np.float32(1 - rng.uniform(0, 0.4)) * pair.noise_residual
        x = seen / scale
        y = np.stack([pair.blur_residual[1], pair.noise_residual[1]]) / scale
        d = descriptors(pair.input, pair.spacing[2], scale)
        n, margin = x.shape[-1], BORDER
        for _ in range(crops):
            r, c = rng.integers(margin, n - patch - margin + 1, 2)
            xc, yc = x[:, r : r + patch, c : c + patch], y[:, r : r + patch, c : c + patch]
            if rng.random() < 0.5:
                xc, yc = xc[..., ::-1], yc[..., ::-1]
            xs.append(np.ascontiguousarray(xc))
            ds.append(d)
            ys.append(np.ascontiguousarray(yc))
    return tuple(torch.from_numpy(np.stack(a[:batch])) for a in (xs, ds, ys))  # type: ignore[return-value]


def fit_network(
    part: NetPart,
    recipe: ResidualRecipe,
    steps: int,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[ResidualUNet, list[float]]:
    """Train one network; returns it and the loss per 50 steps."""
    modality = part.modality
    torch.manual_seed(recipe.seed + (part.stream if part.stream > 1 else 0))
    rng = np.random.default_rng([recipe.seed, part.stream])
    config = ResidualNetConfig(width=recipe.width, out_channels=len(part.maps), maps=part.maps, reads=part.reads)
    net = ResidualUNet(config).to(device)
    channels = [("blur", "noise").index(m) for m in part.maps]
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(steps, 1), pct_start=0.1)
    losses, window = [], []
    mse = part.mse
    net.train()
    for step in range(steps):
        x, d, y = training_batch(modality, rng, recipe.batch, recipe.patch, recipe.crops_per_slab, part.reads)
        out = net(x.to(device), d.to(device))
        y = y[:, channels].to(device)
        # L1 learns the noise map well; a squared term keeps the blur map's sparse, large residuals at edges
        # from being fitted by zero (the median of a mostly-zero map: what L1 alone gave the blur map)
        loss = F.l1_loss(out, y) + mse * F.mse_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == 50 or step == steps - 1:
            losses.append(round(float(np.mean(window)), 6))
            window = []
        if progress is not None:
            progress(step, window[-1] if window else losses[-1])
    return net.eval(), losses


def geometry_of(pair: ResidualPair) -> VolumeGeometry:
    """An axial geometry of a pair's slab (what the model checks and reads its spacing from)."""
    return VolumeGeometry(
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        spacing=tuple(float(s) for s in pair.spacing),
        shape=pair.input.shape,
    )


@torch.no_grad()
def held_out_figures(nets: dict[str, list[MapNet]], device: torch.device) -> dict[str, Any]:
    """RMSE against the noise-free reference-kernel image, input vs full correction (α = 1), per named condition.

    Held out: the named conditions are never drawn in training, and neither are these subjects.
    """
    out: dict[str, Any] = {}
    model = ResidualModel(nets, {"version": "held-out"}, device)
    for name, cond in CONDITIONS.items():
        if cond.modality not in nets:
            continue
        before, after = [], []
        for seed in EVAL_SEEDS:
            pair = named_pair(name, seed, "head", slices=3, matrix=256, spacing_mm=0.6)
            maps = model.maps(pair.input, geometry_of(pair), cond.modality)
            corrected = pair.input[1] + maps.blur[1] + maps.noise[1]
            before.append(float(np.sqrt(np.mean((pair.input[1] - pair.clean[1]) ** 2))))
            after.append(float(np.sqrt(np.mean((corrected - pair.clean[1]) ** 2))))
        out[name] = {"rmse_before": round(float(np.mean(before)), 3), "rmse_after": round(float(np.mean(after)), 3)}
    return out


def train_residual(
    out: Path,
    recipe: ResidualRecipe,
    device: str = "auto",
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the CT and MR networks, save ``residual.pt`` and its card ``residual.json`` into ``out``.

    Parameters
    ----------
    out
        Folder for the weights and card (created).
    recipe
        Steps, batch, patch size, width, learning rate, seed.
    device
        ``auto``, ``cpu``, ``cuda`` …
    progress
        Called as ``progress(modality, step, steps, loss)`` after every step.

    Returns
    -------
    dict
        The card.
    """
    dev = pick_device(device)
    t0 = time.perf_counter()
    nets: dict[str, list[MapNet]] = {}
    losses: dict[str, list[float]] = {}
    for part in parts_of(recipe):
        steps = recipe.steps_ct if part.modality == "CT" else recipe.steps_mr
        report = (lambda s, loss, m=part.name, n=steps: progress(m, s, n, loss)) if progress else None
        net, losses[part.name] = fit_network(part, recipe, steps, dev, report)
        nets.setdefault(part.modality, []).append(MapNet(net, part.used))
    return save_model(out, recipe, nets, losses, dev, time.perf_counter() - t0)


def save_model(
    out: Path,
    recipe: ResidualRecipe,
    nets: dict[str, list[MapNet]],
    losses: dict[str, list[float]],
    device: torch.device,
    train_s: float,
) -> dict[str, Any]:
    """Write ``residual.pt`` and its card (with the held-out figures and the weights' sha256) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = {"nets": {m: [p.entry() for p in parts] for m, parts in nets.items()}}
    weights = out / WEIGHTS_NAME
    torch.save(ckpt, weights)
    card = residual_card(recipe, nets, losses, held_out_figures(nets, device), str(device), train_s)
    card["sha256"] = sha256_of(weights)
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    log.info("residual model %s written to %s (%.0f s)", card["version"], out, train_s)
    return card


def residual_card(
    recipe: ResidualRecipe,
    nets: dict[str, list[MapNet]],
    losses: dict[str, list[float]],
    figures: dict[str, Any],
    device: str,
    train_s: float,
) -> dict[str, Any]:
    """The model card of the residual networks (the sha256 is added once the weights are written)."""
    return {
        "name": "harmonode residual harmonization network (seed 003)",
        "version": f"residual-1.1-w{recipe.width}-s{recipe.steps_ct}" + ("" if recipe.ct_blur == "joint" else "-dn"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": "ResidualUNet: conv, 2 stride-2 levels, transposed convs, skips summed (seed FIG. 3)",
        "parameters": {m: sum(p.net.n_parameters() for p in parts) for m, parts in nets.items()},
        "networks": {m: [{"outputs": list(p.net.config.maps), "used_for": list(p.use), "reads": p.net.config.reads}
                         for p in parts]
                     for m, parts in nets.items()},
        "inputs": "a 3-slice slab after the histogram stage; outputs blur and noise residual maps of its centre",
        "normalisation": NORMALISATION,
        "spacing_range_mm": list(SPACINGS_MM),
        "training_data": {
            "source": "simulator.pairs: synthetic scanner, fresh slabs every step (160² px, 3 slices)",
            "ct": "head 60 % / chest 40 %, random kernel (σ 0.1–0.75 mm, boost 0–1.8, cut-off 0.7–1.35 "
            "cycles/mm) and dose (25–400 mAs) against ge-revolution-standard's kernel",
            "mr": "head TOF, Rician noise 0.6–6 % of the signal scale, bias field 0–0.35, 1.5 and 3 T",
            "named_conditions": "none: every named condition is held out for evaluation",
        },
        "recipe": asdict(recipe),
        "command": recipe.command,
        "device": device,
        "train_seconds": round(train_s, 1),
        "loss_per_50_steps": losses,
        "held_out": {
            "pairs": f"subjects {list(EVAL_SEEDS)}, 256² head slices at 0.6 mm, each named condition",
            "metric": "RMSE (real units) against the noise-free reference-kernel image, input vs α = 1",
            "figures": figures,
        },
    }
