"""Training the detector's networks: landmark pretraining, lesion fine-tuning, checkpoints, threshold calibration.

The networks are ``models.nets.MiniVGG``; a checkpoint stores the arguments that rebuild it and loads with
``weights_only=True``. Everything is deterministic in ``seed`` (initialisation, sampling, batch order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.nets import MiniVGG, NetConfig
from models.training.data import (
    HELD_OUT_CONDITIONS,
    KINDS,
    RESCAN,
    SEEDS,
    TRAIN_CONDITIONS,
    check_subjects_from,
    collect,
    fit_rules_by_size,
    landmark_names,
    lesion_training_plan,
    studies_per_kind,
    study_plan,
)
from models.training.evaluate import auc, evaluate_detector

log = logging.getLogger(__name__)


def set_determinism(seed: int) -> None:
    """Seed torch and make CPU kernels deterministic."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90° turns of every plane, one draw per batch (lesions have no handedness or up)."""
    f = torch.rand(3, generator=gen)
    xb = torch.flip(xb, dims=(3,)) if f[0] < 0.5 else xb
    xb = torch.flip(xb, dims=(2,)) if f[1] < 0.5 else xb
    return xb.transpose(2, 3) if f[2] < 0.5 else xb


def fits_on_device(device: str, nbytes: int) -> bool:
    """Whether ``nbytes`` of training data can live on a CUDA ``device`` (a quarter of its free memory at most)."""
    if not str(device).startswith("cuda"):
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return nbytes <= free // 4


def _mined_rows(
    model: MiniVGG,
    x: np.ndarray,
    rng: np.random.Generator,
    classes: tuple[np.ndarray, np.ndarray],
    hard: np.ndarray,
    n_neg: int,
    refresh: bool,
    device: str,
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's rows under mining: (every positive, the hard negatives and random others; the hard ones).

    With ``refresh`` the hard negatives are the highest-scored of a random pool of 2 × ``n_neg`` negatives.
    """
    pos_idx, neg_idx = classes
    if refresh:
        pool = np.sort(rng.choice(neg_idx, min(len(neg_idx), 2 * n_neg), replace=False))
        scores = predict(model, x[pool], device=device)[:, 1]
        hard = pool[np.argsort(-scores, kind="stable")[: n_neg // 2]]
        model.train()
    rest = np.setdiff1d(neg_idx, hard, assume_unique=True)
    chosen = np.concatenate([pos_idx, hard, rng.choice(rest, min(len(rest), n_neg - len(hard)), False)])
    return chosen, hard


def _epoch(
    model: MiniVGG,
    step: Any,
    data: tuple[torch.Tensor, torch.Tensor],
    perm: torch.Tensor,
    loss_fn: nn.Module,
    options: dict[str, Any],
) -> float:
    """One pass over ``perm``'s rows in batches; returns the mean loss. ``step`` advances optimizer and schedule."""
    xt, yt = data
    device, batch = options["device"], options["batch"]
    total = 0.0
    for start in range(0, len(perm), batch):
        sel = perm[start : start + batch]
        xb, yb = xt[sel.to(xt.device)].float().to(device), yt[sel].to(device)
        if options["flips"]:
            xb = augment(xb, options["gen"])
        loss = loss_fn(model(xb), yb)
        step(loss)
        total += float(loss.detach()) * len(sel)
    return total / len(perm)


def train_classifier(
    model: MiniVGG,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    lr: float = 2e-3,
    batch: int = 128,
    flips: bool = False,
    balance: bool = False,
    desc: str = "train",
    device: str = "cpu",
    mine: int = 0,
    mine_every: int = 3,
) -> list[float]:
    """Adam + one-cycle schedule, cross-entropy; returns the mean loss per epoch.

    ``mine`` > 0 (binary tasks): each epoch sees every positive and ``mine`` × as many negatives, half of them
    the negatives the model itself scored highest at its last look (every ``mine_every`` epochs), half drawn at
    random — the normal candidates that outrank lesions are what costs false positives.

    Parameters
    ----------
    model, x, y
        The network (trained in place, left in eval mode on ``device``); patches (N, C, 32, 32) and labels (N,).
    epochs, seed, lr, batch, desc
        Schedule, determinism, peak learning rate, batch size, the progress bar's label.
    flips, balance
        Mirror and turn patches at random (lesions have no handedness; landmarks do, so they are never flipped);
        weight the classes inversely to their frequency in each epoch's rows.
    device, mine, mine_every
        Where it trains (the patches too when they fit, ``fits_on_device``); hard-negative mining as above.

    Returns
    -------
    list
        Mean loss per epoch.
    """
    set_determinism(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device).train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if fits_on_device(device, x.nbytes):
        xt = xt.to(device)  # the patches stay on the GPU: no host gather and copy per batch
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_neg = min(len(neg_idx), mine * len(pos_idx)) if mine else len(neg_idx)
    hard = rng.permutation(neg_idx)[: n_neg // 2] if mine else neg_idx
    per_epoch = len(y) if not mine else len(pos_idx) + n_neg
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((per_epoch + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched.last_epoch < steps - 1:
            sched.step()

    options = {"device": device, "batch": batch, "flips": flips, "gen": gen}
    history = []
    for epoch in (bar := tqdm(range(epochs), desc=desc, leave=False)):
        if mine:
            refresh = bool(epoch and epoch % mine_every == 0)
            chosen, hard = _mined_rows(model, x, rng, (pos_idx, neg_idx), hard, n_neg, refresh, device)
        else:
            chosen = np.arange(len(y))
        weight = None
        if balance:
            counts = torch.bincount(yt[chosen], minlength=model.config.n_classes).float().clamp(min=1)
            weight = (counts.sum() / counts / len(counts)).to(device)
        perm = torch.from_numpy(chosen)[torch.randperm(len(chosen), generator=gen)]
        history.append(_epoch(model, step, (xt, yt), perm, nn.CrossEntropyLoss(weight=weight), options))
        bar.set_postfix(loss=f"{history[-1]:.4f}", epoch=epoch)
    model.eval()
    return history


@torch.inference_mode()
def predict(model: MiniVGG, x: np.ndarray, batch: int = 1024, device: str = "cpu") -> np.ndarray:
    """Softmax probabilities (N, n_classes) of the patches ``x``."""
    model.eval()
    out = [
        torch.softmax(model(torch.from_numpy(x[s : s + batch]).float().to(device)), 1).cpu().numpy()
        for s in range(0, len(x), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), np.float32)


def save_checkpoint(model: MiniVGG, path: Path, extra: dict[str, Any]) -> None:
    """Weights + constructor arguments (+ plain metadata ``extra``), loadable with ``weights_only=True``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state_dict": state, **extra}, path)


def load_checkpoint(path: Path | str) -> tuple[MiniVGG, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by ``save_checkpoint``: (model in eval mode, the checkpoint)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MiniVGG(NetConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def train_landmarks(
    out: Path, studies: int = 8, epochs: int = 12, seed: int = 0, width: int = 16, harmonize: bool = True
) -> dict[str, Any]:
    """Pretrain on landmark classification; writes the checkpoint ``out``.

    Parameters
    ----------
    out
        Checkpoint to write.
    studies
        Training studies per kind (held-out: a quarter as many, at least 2).
    epochs, seed
        Schedule and determinism.
    width
        Channels of the first block.
    harmonize
        Apply seed-000 rules to every study.

    Returns
    -------
    dict
        Metrics: held-out top-1 (with and without background), patch and study counts, loss, CPU seconds.
    """
    t0 = time.process_time()
    rules = fit_rules_by_size(KINDS, ("test",)) if harmonize else None  # the whole head and chest: every landmark
    names = landmark_names()
    train_plan = study_plan(KINDS, TRAIN_CONDITIONS, studies, SEEDS["landmarks"])
    test_plan = study_plan(KINDS, HELD_OUT_CONDITIONS, max(2, studies // 4), SEEDS["eval"] + 500)
    x, y = collect("landmarks", train_plan, rules, names, seed)
    xv, yv = collect("landmarks", test_plan, rules, names, seed + 1)
    model = MiniVGG(NetConfig(n_classes=len(names), width=width))
    history = train_classifier(model, x, y, epochs, seed, desc="landmarks")
    pred = predict(model, xv).argmax(1)
    lm = yv > 0
    metrics = {
        "top1": float((pred == yv).mean()),
        "top1_landmarks_only": float((pred[lm] == yv[lm]).mean()),
        "n_classes": len(names),
        "n_train_patches": len(y),
        "n_test_patches": len(yv),
        "train_studies": len(train_plan),
        "test_studies": len(test_plan),
        "final_loss": history[-1],
        "cpu_seconds": time.process_time() - t0,
    }
    save_checkpoint(model, out, {"task": "landmarks", "classes": names, "metrics": metrics})
    log.info("landmark model: %s", metrics)
    return metrics


def _lesion_model(pretrained: Path | None, width: int, seed: int, in_channels: int = 3) -> MiniVGG:
    """The landmark trunk with a two-class head (further input views at zero weight), or a fresh network."""
    if pretrained is not None:
        model, _ = load_checkpoint(pretrained)
        model.replace_head(2)
        if in_channels != model.config.in_channels:
            model.widen_input(in_channels)  # further views start at zero weight beside the pretrained planes
        return model
    set_determinism(seed)
    return MiniVGG(NetConfig(n_classes=2, width=width, in_channels=in_channels))


def _lesion_runs(
    pretrained: Path | None,
    compare_scratch: bool,
    data: tuple[np.ndarray, np.ndarray],
    width: int,
    seed: int,
    epochs: int,
    options: dict[str, Any],
) -> dict[str, MiniVGG]:
    """The lesion networks trained on all of ``data``, by initialisation (``transfer``, ``scratch``), on the CPU."""
    x, y = data
    names = ("transfer", "scratch") if compare_scratch and pretrained else ("transfer" if pretrained else "scratch",)
    runs: dict[str, MiniVGG] = {}
    for name in names:
        model = _lesion_model(pretrained if name == "transfer" else None, width, seed, x.shape[1])
        train_classifier(model, x, y, epochs, seed, desc=f"lesions ({name})", **options)
        runs[name] = model
    return {name: m.cpu() for name, m in runs.items()}


def _few_examples_aucs(
    pretrained: Path, data: tuple[np.ndarray, ...], width: int, seed: int, epochs: int, options: dict[str, Any]
) -> dict[str, float]:
    """Held-out AUC of transfer and scratch trained on a 20 % subset (the seed's regime: few lesion examples)."""
    x, y, xv, yv = data
    sub = np.sort(np.random.default_rng(seed).choice(len(y), len(y) // 5, replace=False))
    small: dict[str, float] = {}
    for name in ("transfer", "scratch"):
        model = _lesion_model(pretrained if name == "transfer" else None, width, seed, x.shape[1])
        train_classifier(model, x[sub], y[sub], epochs, seed, desc=f"{name} 20%", **options)
        small[name] = auc(predict(model.cpu(), xv)[:, 1], yv)
    return small


def train_lesions(
    out: Path,
    pretrained: Path | None,
    studies: int = 40,
    epochs: int = 16,
    seed: int = 0,
    width: int = 16,
    harmonize: bool = True,
    compare_scratch: bool = False,
    eval_studies: int = 6,
    size: str = "eval",
    test_size_studies: int = 6,
    mine: int = 5,
    lesions_per_study: int | None = 4,
    rescan: bool = False,
    subjects_from: int | None = None,
    views: Sequence[str] = ("planes",),
    fine_candidates: int = 0,
    device: str = "cpu",
    head_studies: int | None = None,
    extra_patches: Path | None = None,
    extend: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Fine-tune the landmark trunk to lesion vs normal (aneurysm and nodule patches in one binary task).

    Training studies are ``studies`` per kind at ``size`` (``head_studies`` per head kind when given) plus
    ``test_size_studies`` per kind at the coarse "test" size (so the model still reads small series), simulated
    subjects numbered from ``subjects_from`` (default ``SEEDS["lesions"]``; another base gives another network
    disjoint subjects); every normal candidate is kept and the hard ones are mined during training (``mine``
    negatives per positive each epoch). With ``compare_scratch`` the same network is also trained from scratch on
    the same patches for the same epochs (all the data, and a 20 % subset: the seed's few-examples regime).
    ``views`` (``models.patches.VIEWS``) are what the network reads, three channels each; ``fine_candidates``
    adds the head's finest-scale extra candidates to training, validation and calibration (the card then asks
    the detector for them). ``device``: where the network trains (``cuda`` on a GPU). Writes the checkpoint
    ``out``; ``pretrained`` is the landmark checkpoint to start from (None: from scratch). ``extra_patches``: a
    mined set (``harmonode mine``, ``models.mining.load_mined``) added to the training patches; ``extend``: data
    extension (seed 000, 0143), ``{kind: scarce conditions}`` whose inverse rules convert the reference studies.
    Long because it is the lesion recipe end to end (data, runs, calibration, the card's metrics), each step
    one call, and the card records every option this docstring names.

    Returns
    -------
    dict
        Metrics: held-out candidate-patch AUC per initialisation, data counts, the recipe, the thresholds at one
        false positive per case on validation studies, CPU seconds.

    Raises
    ------
    ValueError
        Subjects that overlap another use's (``check_subjects_from``) or more than 500 studies per kind.
    """
    t0 = time.process_time()
    base = SEEDS["lesions"] if subjects_from is None else subjects_from
    check_subjects_from(base)
    train_plan = lesion_training_plan(studies, base, size, test_size_studies, head_studies)
    rules = fit_rules_by_size(KINDS, (size, "test")) if harmonize else None
    test_plan = study_plan(KINDS, HELD_OUT_CONDITIONS, eval_studies, SEEDS["eval"], size)
    inputs = {"views": tuple(views), "fine_candidates": fine_candidates}
    n_lesions = lesions_per_study or None
    extension = {
        "extend": extend,
        "extend_rules": (rules or fit_rules_by_size(KINDS, (size, "test"))) if extend else None,
    }
    x, y = collect("lesions", train_plan, rules, seed=seed, n_lesions=n_lesions, rescan=rescan, **inputs, **extension)
    n_before_extra = len(y)
    x, y, mined = _with_mined(x, y, extra_patches)
    xv, yv = collect("lesions", test_plan, rules, seed=seed + 1, **inputs)
    options = {"lr": 1e-3, "flips": True, "balance": True, "mine": mine, "device": device}
    runs = _lesion_runs(pretrained, compare_scratch, (x, y), width, seed, epochs, options)
    shipped = max(runs, key=lambda name: auc(predict(runs[name], xv)[:, 1], yv))
    aucs = {name: auc(predict(m, xv)[:, 1], yv) for name, m in runs.items()}
    small: dict[str, float] = {}
    if compare_scratch and pretrained is not None:
        small = _few_examples_aucs(pretrained, (x, y, xv, yv), width, seed, epochs, options)
    thresholds = calibrate_thresholds(runs[shipped], rules, seed, size=size, **inputs)  # type: ignore[arg-type]
    metrics: dict[str, Any] = {
        "patch_auc_held_out": aucs[shipped], "patch_auc_by_init": aucs, "patch_auc_by_init_20pct_data": small,
        "shipped_init": shipped, "n_train_patches": int(len(y)), "n_train_positive": int(y.sum()),
        "n_test_patches": int(len(yv)), "n_test_positive": int(yv.sum()), "train_studies": len(train_plan),
        "studies_per_kind": studies_per_kind(studies, head_studies), "size": size,
        "test_size_studies_per_kind": test_size_studies, "hard_negative_ratio": mine, "subjects_from": base,
        "rescan_augmentation": RESCAN if rescan else None, "views": list(views),
        "fine_candidates": {"head": fine_candidates} if fine_candidates else {},
        "lesions_per_training_study": lesions_per_study or "simulator default (1-3 aneurysms, 1-4 nodules)",
        "threshold_at_1fp_validation": thresholds, "cpu_seconds": time.process_time() - t0,
        "extra_patches": mined, "n_train_patches_before_extra": n_before_extra,
        "extended_with_inverse_rules": {k: list(v) for k, v in extend.items()} if extend else {},
    }  # fmt: skip
    save_checkpoint(runs[shipped], out, {"task": "lesion", "init": shipped, "metrics": metrics})
    log.info("lesion model: %s", metrics)
    return metrics


def _with_mined(x: np.ndarray, y: np.ndarray, folder: Path | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The training patches with a mined set (``harmonode mine``) added, and what the card says of it."""
    if folder is None:
        return x, y, {}
    from models.mining import load_mined

    xm, ym, manifest = load_mined(folder, channels=x.shape[1])
    said = {"folder": str(folder), "patches": int(len(ym)), "lesion_patches": int(ym.sum()),
            "model_version": manifest.get("model_version"), "random": manifest.get("random", False)}  # fmt: skip
    return np.concatenate([x, xm.astype(x.dtype)]), np.concatenate([y, ym]), said


def calibrate_thresholds(
    model: MiniVGG | Sequence[MiniVGG],
    rules: dict | None,
    seed: int,
    studies: int = 6,
    size: str = "eval",
    views: Sequence[str] = ("planes",),
    fine_candidates: int = 0,
) -> dict[str, float]:
    """Per body part, the probability giving one false positive per case on validation studies.

    The validation studies come from the training conditions with seeds used neither for training nor for
    evaluation; for the head the lower of the CTA and MRA thresholds is kept (sensitivity first).

    Parameters
    ----------
    model
        A network, or an ensemble (probabilities averaged).
    rules
        ``fit_rules_by_size`` output (or None).
    seed
        Offsets the validation subjects.
    studies
        Validation studies per kind.
    size
        Their simulated size.
    views, fine_candidates
        As the networks were trained.

    Returns
    -------
    dict
        ``{"head": threshold, "chest": threshold}``, rounded to 4 digits.
    """
    from models.detector import TTA, Detector

    card = {
        "version": "calibration",
        "threshold": 0.5,
        "tta": TTA,
        "views": list(views),
        "fine_candidates": {"head": fine_candidates} if fine_candidates else {},
    }
    detector = Detector(model, card, torch.device("cpu"))
    plan = study_plan(KINDS, TRAIN_CONDITIONS, studies, SEEDS["eval"] + 8000 + seed, size)
    per_kind = evaluate_detector(detector, plan, rules, progress=False)["per_kind"]
    head = min(per_kind["head-cta"]["threshold_at_1fp"], per_kind["head-mra"]["threshold_at_1fp"])
    return {"head": round(float(head), 4), "chest": round(float(per_kind["chest-ct"]["threshold_at_1fp"]), 4)}
