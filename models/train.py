"""Training and evaluation of the detector on simulated studies (seed 002 with seed 000's harmonization).

1. Rules: per study kind, one seed-000 rule per scanner condition, fitted from *unlabeled* studies of every
   condition against the reference condition (the one with the most images); training volumes and held-out
   volumes are harmonized with them, exactly as the node does at inference.
2. Landmarks: 2.5D patches at every simulated anatomical landmark (head and chest: 58 classes) plus background,
   mini-VGG trained to classify them (pretraining).
3. Lesions: patches at every candidate of harmonized training studies (positive near a lesion, plus jittered
   copies of the truth), mostly at the "eval" size where a 2–3 mm aneurysm spans several voxels and some at the
   coarse "test" size; mini-VGG fine-tuned from the landmark trunk (or from scratch, for the comparison), each
   epoch on all positives and hard negatives mined by the model itself.
4. Evaluation: FROC, candidate recall and patch AUC on held-out studies under conditions never used for training;
   thresholds from validation studies of the training conditions.

Everything is deterministic in ``seed`` (simulation, sampling, initialisation, batch order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.candidates import network_input_and_candidates, settings_for
from models.findings import VolumeGeometry
from models.nets import MiniVGG, NetConfig
from models.patches import PATCH_MM, extract_patches, extract_views, normalise

log = logging.getLogger(__name__)

KIND_BODY = {"head-cta": "head", "head-mra": "head", "chest-ct": "chest"}
KINDS = tuple(KIND_BODY)  # every kind a lesion network reads, in the order of its training plan
#: Conditions whose labeled studies train the models; the others are held out (their rules see no labels).
TRAIN_CONDITIONS = {
    "head-cta": ("ge-revolution-standard", "siemens-force-br40", "canon-aquilion-fc43"),
    "head-mra": ("siemens-skyra-3t-tof",),
    "chest-ct": ("ge-revolution-standard", "siemens-force-br40", "canon-aquilion-fc43"),
}
HELD_OUT_CONDITIONS = {
    "head-cta": ("ge-optima-bone-lowdose", "siemens-definition-hr64", "philips-ict-b-lowdose", "philips-ict-yc-sharp"),
    "head-mra": ("ge-signa-1.5t-tof", "philips-ingenia-3t-tof"),
    "chest-ct": ("ge-optima-bone-lowdose", "siemens-definition-hr64", "philips-ict-b-lowdose", "philips-ict-yc-sharp"),
}
REFERENCE = {
    "head-cta": "ge-revolution-standard",
    "head-mra": "siemens-skyra-3t-tof",
    "chest-ct": "ge-revolution-standard",
}
# seed ranges keep the four uses of the simulator disjoint
SEEDS = {"rules": 90_000, "landmarks": 10_000, "lesions": 20_000, "eval": 50_000}


@dataclass(frozen=True)
class Study:
    """One simulated series as the detector sees it: real-unit values, geometry, modality, truth."""

    kind: str
    condition: str
    seed: int
    values: np.ndarray
    geometry: VolumeGeometry
    modality: str
    truth: dict[str, Any]

    @property
    def body(self) -> str:
        return KIND_BODY[self.kind]


def simulated(kind: str, condition: str, seed: int, size: str = "test", n_lesions: int | None = None) -> Study:
    """Simulate a study and load it through the node's own volume builder (same geometry as in the pipeline).

    ``n_lesions`` fixes how many lesions the subject has (default: the simulator's 1–3 aneurysms, 1–4 nodules).
    """
    from models.volume import build_volume
    from simulator.studies import simulate_study

    sim = simulate_study(kind, condition, seed, size, n_lesions=n_lesions)  # type: ignore[arg-type]
    vol = build_volume(sim.datasets)
    return Study(kind, condition, seed, vol.values, vol.geometry, vol.modality, sim.truth)


# -- rules (seed 000 learning phase) ------------------------------------------------------------------------------
def fit_rules(
    kinds: Iterable[str], per_condition: int = 2, progress: bool = True, size: str = "test"
) -> dict[str, dict[str, Any]]:
    """Fit one seed-000 rule per (kind, condition) from unlabeled studies; the reference gets twice as many.

    Returns
    -------
    dict
        ``{kind: {condition: mapping}}`` where mapping is a ``rules.apply`` intensity map.
    """
    from rules.fit import FitOptions, fit_groups
    from rules.histogram import default_spec, image_histogram

    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        conditions = TRAIN_CONDITIONS[kind] + HELD_OUT_CONDITIONS[kind]
        modality = "MR" if kind == "head-mra" else "CT"
        spec = default_spec(modality)
        groups: dict[str, list[np.ndarray]] = {}
        for ci, cond in enumerate(tqdm(conditions, desc=f"rules {kind}", disable=not progress)):
            n = 2 * per_condition if cond == REFERENCE[kind] else per_condition
            groups[cond] = [
                image_histogram(simulated(kind, cond, SEEDS["rules"] + 100 * ci + s, size).values, spec)
                for s in range(n)
            ]
        fit = fit_groups(groups, spec, FitOptions(starts=3, max_steps=150), reference=REFERENCE[kind])
        out[kind] = {g.key: g.mapping for g in fit.groups}
        log.info("rules %s: %s", kind, {g.key: g.parameters for g in fit.groups})
    return out


def harmonized(study: Study, rules: dict[str, dict[str, Any]] | None) -> Study:
    """The study with its condition's rule applied (unchanged when ``rules`` is None)."""
    if not rules:
        return study
    from rules.apply import apply_rule

    mapping = rules[study.kind].get(study.condition)
    return Study(**{**study.__dict__, "values": apply_rule(mapping, study.values)})


# -- samples -------------------------------------------------------------------------------------------------------
def landmark_names() -> list[str]:
    """The landmark classes (head then chest, as the simulator names them); class 0 is background."""
    names: list[str] = []
    for kind in ("head-cta", "chest-ct"):
        names += [lm["name"] for lm in simulated(kind, REFERENCE[kind], 0).truth["landmarks"]]
    return ["background", *names]


def landmark_samples(
    study: Study, names: Sequence[str], rng: np.random.Generator, copies: int = 3, jitter_mm: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Patches at the study's landmarks (jittered copies) and as many background patches, with class labels."""
    index = {n: i for i, n in enumerate(names)}
    lms = [lm for lm in study.truth["landmarks"] if lm["name"] in index]
    centres_mm = np.array([lm["center_mm"] for lm in lms], float).reshape(-1, 3)
    labels = np.array([index[lm["name"]] for lm in lms], np.int64)
    pts = np.repeat(centres_mm, copies, axis=0)
    pts[len(lms) :] += rng.normal(0, jitter_mm, size=(len(pts) - len(lms), 3)) if copies > 1 else 0.0
    lab = np.repeat(labels, copies)
    shape = np.asarray(study.geometry.shape, float)
    bg_idx = rng.uniform(0.1, 0.9, size=(len(pts), 3)) * (shape - 1)
    bg_mm = study.geometry.index_to_patient(bg_idx)
    far = np.min(np.linalg.norm(bg_mm[:, None] - centres_mm[None], axis=2), axis=1) > 8.0
    bg_idx = bg_idx[far]
    vol = normalise(study.values, study.modality)
    idx = np.concatenate([study.geometry.patient_to_index(pts), bg_idx])
    x = extract_patches(vol, study.geometry.spacing, idx, PATCH_MM[study.body])
    y = np.concatenate([lab, np.zeros(len(bg_idx), np.int64)])
    return x, y


def candidate_labels(study: Study, centres: np.ndarray) -> np.ndarray:
    """1 for a candidate within max(d/2, 3) mm of a lesion, 0 beyond d/2 + 4 mm, -1 in between (ignored)."""
    mm = study.geometry.index_to_patient(centres) if len(centres) else np.zeros((0, 3))
    out = np.zeros(len(mm), np.int64)
    for les in study.truth["lesions"]:
        d = np.linalg.norm(mm - np.asarray(les["center_mm"]), axis=1)
        r = float(les["diameter_mm"]) / 2
        out[(d > max(r, 3.0)) & (d <= r + 4.0) & (out == 0)] = -1
        out[d <= max(r, 3.0)] = 1
    return out


def lesion_samples(
    study: Study,
    rng: np.random.Generator,
    copies: int = 8,
    max_negatives: int | None = None,
    views: Sequence[str] = ("planes",),
    fine_candidates: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion patches (candidates near lesions + jittered truth centres) and normal-candidate patches.

    Every normal candidate is kept by default (``max_negatives`` None): the hard ones are picked during training
    by the model itself (``train_classifier(mine=…)``), so the sample must hold them all. ``views`` are the patch
    views (``models.patches.VIEWS``), ``fine_candidates`` the head's finest-scale extra candidates.
    """
    settings = settings_for(study.body, fine_candidates if study.body == "head" else 0)  # nodules: no small sacs
    geometry = study.geometry
    vol, cands = network_input_and_candidates(study.values, geometry.spacing, study.modality, study.body, settings)
    lab = candidate_labels(study, cands.centres)
    neg = np.flatnonzero(lab == 0)
    if max_negatives is not None and len(neg) > max_negatives:
        neg = np.sort(rng.choice(neg, max_negatives, replace=False))
    pos = cands.centres[lab == 1]
    truth = [(np.asarray(les["center_mm"]), float(les["diameter_mm"])) for les in study.truth["lesions"]]
    jit = [c + rng.normal(0, min(1.5, d / 4), size=(copies, 3)) for c, d in truth]
    jit_idx = study.geometry.patient_to_index(np.concatenate(jit)) if jit else np.zeros((0, 3))
    idx = np.concatenate([pos, jit_idx, cands.centres[neg]])
    y = np.concatenate([np.ones(len(pos) + len(jit_idx), np.int64), np.zeros(len(neg), np.int64)])
    # sampled as the detector samples them (torch grid_sample)
    patches = extract_views(vol, study.geometry.spacing, idx, PATCH_MM[study.body], views, device="cpu")
    return patches.astype(np.float16), y


#: Ranges of the random scanner a CT study is rescanned through (``rescanned``): extra in-plane blur (mm), edge
#: boost, kernel cut-off (cycles/mm) and added pixel noise (HU). They span soft to sharp kernels and routine to
#: low dose around the training scanners, without copying any held-out condition.
RESCAN = {"blur_mm": (0.0, 0.45), "boost": (0.0, 1.2), "cutoff": (0.9, 1.5), "noise_hu": (4.0, 45.0)}
#: How a model card names the rescan augmentation (``training.rescan_augmentation``).
RESCAN_NOTE = (
    f"every CT training study also rescanned through a random kernel and dose {RESCAN} (models.train.rescanned)"
)


def rescanned(study: Study, rng: np.random.Generator) -> Study:
    """Training augmentation (CT): the harmonized study as a scanner of random kernel and dose would show it.

    Harmonization matches intensities, not noise or sharpness, and those are where held-out low-dose and
    sharp-kernel series differ most from the training scanners. The harmonized volume goes through the
    simulator's own reconstruction model (``simulator.scanner.scan_ct``: kernel MTF, ramp-shaped noise) with a condition
    drawn from ``RESCAN``, so candidates and patches are found on a noisier, softer or sharper series. MR studies
    are returned unchanged.
    """
    if study.modality != "CT":
        return study
    from simulator.scanner import ScannerCondition, scan_ct

    def draw(key: str) -> float:
        return float(rng.uniform(*RESCAN[key]))

    cond = ScannerCondition(
        "rescan", "CT", "augmentation", "augmentation",
        mas=100.0, kernel_sigma_mm=draw("blur_mm"), kernel_boost=draw("boost"), kernel_cutoff=draw("cutoff"),
    )  # fmt: skip
    cond = ScannerCondition(**{**asdict(cond), "mas": 100.0 * (cond.noise_std() / draw("noise_hu")) ** 2})
    values = scan_ct(study.values.astype(np.float32, copy=True), cond, study.geometry.spacing, rng)
    return Study(study.kind, study.condition, study.seed, values, study.geometry, study.modality, study.truth)


def collect(
    what: str,
    plan: Sequence[tuple[str, str, int, str]],
    rules: dict | None,
    names: Sequence[str] = (),
    seed: int = 0,
    n_lesions: int | None = None,
    rescan: bool = False,
    views: Sequence[str] = ("planes",),
    fine_candidates: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches and labels from every (kind, condition, seed, size) of ``plan``, harmonized with ``rules``.

    ``n_lesions``: lesions per simulated subject (None: the simulator's default mix). ``rescan`` (lesions only):
    every CT study is also used once more, rescanned through a random kernel and dose (``rescanned``).
    ``views`` and ``fine_candidates`` (lesions only): as ``lesion_samples``.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for kind, cond, s, size in tqdm(plan, desc=f"{what} patches", leave=False):
        study = harmonized(simulated(kind, cond, s, size, n_lesions), rules_for(rules, size))
        if what == "landmarks":
            samples = [landmark_samples(study, names, rng)]
        else:
            options = {"views": views, "fine_candidates": fine_candidates}
            samples = [lesion_samples(study, rng, **options)]  # type: ignore[arg-type]
            if rescan and study.modality == "CT":
                samples.append(lesion_samples(rescanned(study, rng), rng, **options))  # type: ignore[arg-type]
        for x, y in samples:
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def study_plan(
    kinds: Iterable[str], conditions: dict[str, Sequence[str]], per_kind: int, base: int, size: str = "test"
) -> list[tuple[str, str, int, str]]:
    """(kind, condition, seed, size) tuples cycling through the conditions of each kind."""
    plan = []
    for ki, kind in enumerate(kinds):
        conds = conditions[kind]
        plan += [(kind, conds[i % len(conds)], base + 1000 * ki + i, size) for i in range(per_kind)]
    return plan


def fit_rules_by_size(kinds: Iterable[str], sizes: Iterable[str], progress: bool = True) -> dict[str, dict]:
    """``{size: rules}``: a series is harmonized by rules fitted on series of its own resolution (noise and
    partial volume shape the histogram), as a site fits its rules on its own scanner's series."""
    kinds = tuple(kinds)
    return {size: fit_rules(kinds, progress=progress, size=size) for size in dict.fromkeys(sizes)}


def rules_for(rules: dict | None, size: str) -> dict | None:
    """The rules for series of ``size`` out of ``fit_rules_by_size`` (None stays None: no harmonization)."""
    return None if rules is None else rules[size]


# -- training ------------------------------------------------------------------------------------------------------
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

    ``balance`` weights the classes inversely to their frequency; ``flips`` mirrors and turns patches at random
    (lesions have no handedness; landmarks do, so they are never flipped). ``mine`` > 0 (binary tasks): each
    epoch sees every positive and ``mine`` × as many negatives, half of them the negatives the model itself
    scored highest at its last look (every ``mine_every`` epochs), half drawn at random — the normal candidates
    that outrank lesions are what costs false positives (scored on a random pool of 2 × the negatives needed).
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
    history = []
    for epoch in (bar := tqdm(range(epochs), desc=desc, leave=False)):
        if mine:
            if epoch and epoch % mine_every == 0:
                pool = np.sort(rng.choice(neg_idx, min(len(neg_idx), 2 * n_neg), replace=False))
                scores = predict(model, x[pool], device=device)[:, 1]
                hard = pool[np.argsort(-scores, kind="stable")[: n_neg // 2]]
                model.train()
            rest = np.setdiff1d(neg_idx, hard, assume_unique=True)
            chosen = np.concatenate([pos_idx, hard, rng.choice(rest, min(len(rest), n_neg - len(hard)), False)])
        else:
            chosen = np.arange(len(y))
        weight = None
        if balance:
            counts = torch.bincount(yt[chosen], minlength=model.config.n_classes).float().clamp(min=1)
            weight = (counts.sum() / counts / len(counts)).to(device)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        perm = torch.from_numpy(chosen)[torch.randperm(len(chosen), generator=gen)]
        total = 0.0
        for start in range(0, len(perm), batch):
            sel = perm[start : start + batch]
            xb, yb = xt[sel.to(xt.device)].float().to(device), yt[sel].to(device)
            if flips:
                xb = augment(xb, gen)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch < steps - 1:
                sched.step()
            total += float(loss.detach()) * len(sel)
        history.append(total / len(perm))
        bar.set_postfix(loss=f"{history[-1]:.4f}", epoch=epoch)
    model.eval()
    return history


@torch.inference_mode()
def predict(model: MiniVGG, x: np.ndarray, batch: int = 1024, device: str = "cpu") -> np.ndarray:
    """Softmax probabilities (N, n_classes)."""
    model.eval()
    out = [
        torch.softmax(model(torch.from_numpy(x[s : s + batch]).float().to(device)), 1).cpu().numpy()
        for s in range(0, len(x), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), np.float32)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half)."""
    from scipy.stats import rankdata

    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        return float("nan")
    r = rankdata(np.concatenate([scores[pos], scores[neg]]))
    return float((r[: pos.sum()].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


def save_checkpoint(model: MiniVGG, path: Path, extra: dict[str, Any]) -> None:
    """Weights + constructor arguments (+ plain metadata), loadable with ``weights_only=True``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state_dict": state, **extra}, path)


def load_checkpoint(path: Path) -> tuple[MiniVGG, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by ``save_checkpoint``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MiniVGG(NetConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def train_landmarks(
    out: Path, studies: int = 8, epochs: int = 12, seed: int = 0, width: int = 16, harmonize: bool = True
) -> dict[str, Any]:
    """Pretrain on landmark classification; writes ``out`` and returns metrics (held-out top-1)."""
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
    if pretrained is not None:
        model, _ = load_checkpoint(pretrained)
        model.replace_head(2)
        if in_channels != model.config.in_channels:
            model.widen_input(in_channels)  # further views start at zero weight beside the pretrained planes
        return model
    set_determinism(seed)
    return MiniVGG(NetConfig(n_classes=2, width=width, in_channels=in_channels))


def check_subjects_from(base: int) -> None:
    """Refuse a first training subject whose range (``study_plan``: kind k from base + 1000 k) would reach into
    the subjects used for rules, landmarks or evaluation: a network must never train on its own test studies."""
    span = (base, base + 3_000)
    for use in ("rules", "eval", "landmarks"):
        if span[0] < SEEDS[use] + 10_000 and SEEDS[use] < span[1]:
            raise ValueError(
                f"subjects {span[0]}-{span[1] - 1} overlap the {use} subjects ({SEEDS[use]}-{SEEDS[use] + 9_999}); "
                "pick a first subject in a free range, e.g. 30000"
            )


def studies_per_kind(studies: int, head_studies: int | None = None) -> dict[str, int]:
    """Training studies per kind: ``studies``, or ``head_studies`` for the head kinds when given."""
    return {kind: head_studies if head_studies and KIND_BODY[kind] == "head" else studies for kind in KINDS}


def lesion_training_plan(
    studies: int, base: int, size: str = "eval", test_size_studies: int = 6, head_studies: int | None = None
) -> list[tuple[str, str, int, str]]:
    """The lesion networks' training studies: ``studies`` per kind at ``size`` (``head_studies`` per head kind
    when given), kind k from subject ``base`` + 1000 k, then ``test_size_studies`` per kind at size test from
    ``base`` + 500 (+ 1000 k). More than 500 per kind would reach those test-size subjects and is refused."""
    per_kind = studies_per_kind(studies, head_studies)
    if max(per_kind.values()) > 500:
        raise ValueError("at most 500 training studies per kind: subjects from base + 500 are the test-size ones")
    plan = [
        item
        for ki, kind in enumerate(KINDS)
        for item in study_plan((kind,), TRAIN_CONDITIONS, per_kind[kind], base + 1000 * ki, size)
    ]
    if test_size_studies:
        plan += study_plan(KINDS, TRAIN_CONDITIONS, test_size_studies, base + 500, "test")
    return plan


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
) -> dict[str, Any]:
    """Fine-tune the landmark trunk to lesion vs normal (aneurysm and nodule patches in one binary task).

    Training studies are ``studies`` per kind at ``size`` (``head_studies`` per head kind when given) plus
    ``test_size_studies`` per kind at the coarse "test" size (so the model still reads small series), simulated
    subjects numbered from ``subjects_from`` (default ``SEEDS["lesions"]``; another base gives another network
    disjoint subjects); every normal candidate is kept and the hard ones are mined during training. Writes the
    checkpoint to ``out`` and returns metrics: held-out candidate-patch AUC of the transferred model and, with
    ``compare_scratch``, of the same network trained from scratch on the same patches for the same epochs (all the
    data, and a 20 % subset: the seed's few-examples regime). ``views`` (``models.patches.VIEWS``) are what the
    network reads, three channels each; ``fine_candidates`` adds the head's finest-scale extra candidates to
    training, validation and calibration (the card then asks the detector for them). ``device``: where the network
    trains (``cuda`` on a GPU).
    """
    t0 = time.process_time()
    base = SEEDS["lesions"] if subjects_from is None else subjects_from
    check_subjects_from(base)
    train_plan = lesion_training_plan(studies, base, size, test_size_studies, head_studies)
    per_kind = studies_per_kind(studies, head_studies)
    rules = fit_rules_by_size(KINDS, (size, "test")) if harmonize else None
    test_plan = study_plan(KINDS, HELD_OUT_CONDITIONS, eval_studies, SEEDS["eval"], size)
    inputs = {"views": tuple(views), "fine_candidates": fine_candidates}
    n_lesions = lesions_per_study or None
    x, y = collect("lesions", train_plan, rules, seed=seed, n_lesions=n_lesions, rescan=rescan, **inputs)
    xv, yv = collect("lesions", test_plan, rules, seed=seed + 1, **inputs)
    names = ("transfer", "scratch") if compare_scratch and pretrained else ("transfer" if pretrained else "scratch",)
    options = {"lr": 1e-3, "flips": True, "balance": True, "mine": mine, "device": device}
    runs: dict[str, MiniVGG] = {}
    for name in names:
        model = _lesion_model(pretrained if name == "transfer" else None, width, seed, x.shape[1])
        train_classifier(model, x, y, epochs, seed, desc=f"lesions ({name})", **options)  # type: ignore[arg-type]
        runs[name] = model
    runs = {name: m.cpu() for name, m in runs.items()}
    shipped = max(runs, key=lambda name: auc(predict(runs[name], xv)[:, 1], yv))
    aucs = {name: auc(predict(m, xv)[:, 1], yv) for name, m in runs.items()}
    small: dict[str, float] = {}
    if compare_scratch and pretrained is not None:  # the seed's regime: few lesion examples
        sub = np.sort(np.random.default_rng(seed).choice(len(y), len(y) // 5, replace=False))
        for name in ("transfer", "scratch"):
            model = _lesion_model(pretrained if name == "transfer" else None, width, seed, x.shape[1])
            train_classifier(model, x[sub], y[sub], epochs, seed, desc=f"{name} 20%", **options)  # type: ignore[arg-type]
            small[name] = auc(predict(model.cpu(), xv)[:, 1], yv)
    thresholds = calibrate_thresholds(runs[shipped], rules, seed, size=size, **inputs)  # type: ignore[arg-type]
    metrics: dict[str, Any] = {
        "patch_auc_held_out": aucs[shipped],
        "patch_auc_by_init": aucs,
        "patch_auc_by_init_20pct_data": small,
        "shipped_init": shipped,
        "n_train_patches": int(len(y)),
        "n_train_positive": int(y.sum()),
        "n_test_patches": int(len(yv)),
        "n_test_positive": int(yv.sum()),
        "train_studies": len(train_plan),
        "studies_per_kind": per_kind,
        "size": size,
        "test_size_studies_per_kind": test_size_studies,
        "hard_negative_ratio": mine,
        "subjects_from": base,
        "rescan_augmentation": RESCAN if rescan else None,
        "views": list(views),
        "fine_candidates": {"head": fine_candidates} if fine_candidates else {},
        "lesions_per_training_study": lesions_per_study or "simulator default (1-3 aneurysms, 1-4 nodules)",
        "threshold_at_1fp_validation": thresholds,
        "cpu_seconds": time.process_time() - t0,
    }
    save_checkpoint(runs[shipped], out, {"task": "lesion", "init": shipped, "metrics": metrics})
    log.info("lesion model: %s", metrics)
    return metrics


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
    evaluation; for the head the lower of the CTA and MRA thresholds is kept (sensitivity first). ``rules`` is
    ``fit_rules_by_size`` output (or None). ``model`` may be an ensemble (probabilities averaged); ``views`` and
    ``fine_candidates`` as it was trained.
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


# -- evaluation ----------------------------------------------------------------------------------------------------
#: How ``evaluate`` counts a finding as a hit (written into the model card's evaluation).
HIT_RULE = (
    "a finding (after 3D NMS) hits every lesion whose centre lies within max(d/2, 3) + 1.5 mm of it; one finding on"
    " two overlapping sacs finds both (the LUNA16 convention); a lesion counts once, by its best finding"
)


def hit_reach(diameter_mm: float) -> float:
    """How far (mm) from a lesion's centre a finding still hits it (``HIT_RULE``)."""
    return max(diameter_mm / 2, 3.0) + 1.5


def within_lesion(diameter_mm: float) -> float:
    """The sac-tight reach: inside the lesion's own sphere (d/2), as challenges that want a mark on the sac count."""
    return diameter_mm / 2


def lesion_hits(
    points_mm: np.ndarray, lesions: Sequence[dict[str, Any]], reach: Callable[[float], float] = hit_reach
) -> np.ndarray:
    """(points, lesions) boolean matrix: which lesions each point lies within ``reach(diameter)`` of."""
    out = np.zeros((len(points_mm), len(lesions)), bool)
    for li, les in enumerate(lesions):
        d = np.linalg.norm(np.asarray(points_mm, float).reshape(-1, 3) - np.asarray(les["center_mm"]), axis=1)
        out[:, li] = d <= reach(float(les["diameter_mm"]))
    return out


def unmatched(hits: np.ndarray) -> np.ndarray:
    """Per finding, True where it hits no lesion (a false positive); ``hits`` as ``findings_on_lesions`` gives it."""
    return ~np.asarray(hits, bool).any(axis=1)


def threshold_at_1fp(per_study: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The probability above which there is on average one false positive per case (0.5 when there are fewer).

    ``per_study``: (scores of the kept findings, which lesions each hits) per study.
    """
    fp = np.sort(np.concatenate([np.asarray(scores)[unmatched(hits)] for scores, hits in per_study]))[::-1]
    return float(fp[len(per_study) - 1]) if len(fp) >= len(per_study) else 0.5


def froc_points(
    per_study: list[tuple[np.ndarray, np.ndarray, int]], fp_rates: Sequence[float] = (0.5, 1, 2, 4)
) -> dict[str, float]:
    """Sensitivity at each false-positive rate per case.

    ``per_study``: (scores of the findings, which lesions each finding hits as ``findings_on_lesions`` gives it,
    number of lesions) per study, findings already NMS-suppressed. A lesion counts once (its best finding); extra
    hits on it are not FPs; a finding within reach of two lesions finds both (as the LUNA16 evaluation counts a CAD
    mark inside two nodules).
    """
    n_cases = len(per_study)
    n_lesions = sum(n for _, _, n in per_study)
    events = []  # (score, lesion ids the finding hits; empty: a false positive)
    for si, (scores, hits, _) in enumerate(per_study):
        for s, row in zip(scores, np.asarray(hits, bool), strict=True):
            events.append((float(s), [(si, int(li)) for li in np.flatnonzero(row)]))
    events.sort(key=lambda e: -e[0])
    seen: set[tuple[int, int]] = set()
    tps, fps, curve = 0, 0, [(0.0, 0.0)]
    for _, lesion_ids in events:
        if lesion_ids:
            fresh = [lid for lid in lesion_ids if lid not in seen]
            seen.update(fresh)
            tps += len(fresh)
        else:
            fps += 1
        curve.append((fps / max(n_cases, 1), tps / max(n_lesions, 1)))
    out = {}
    for rate in fp_rates:
        ok = [sens for fpr, sens in curve if fpr <= rate]
        out[f"{rate:g}"] = float(max(ok)) if ok else 0.0
    return out


def _score_study(
    detector: Any, kind: str, cond: str, seed: int, size: str, rules: dict | None, threads: int = 0
) -> tuple[str, tuple]:
    """One study's row for ``evaluate_detector``: (key, (finding scores, hits, lesions, probs, labels, found,
    lesion diameters, hits within the lesions' own spheres))."""
    if threads:
        torch.set_num_threads(threads)
    study = harmonized(simulated(kind, cond, seed, size), rules_for(rules, size))
    cands, probs = detector.score(study.values, study.geometry, study.modality, study.body)
    labels = candidate_labels(study, cands.centres)
    mm = study.geometry.index_to_patient(cands.centres) if len(cands) else np.zeros((0, 3))
    keep, hits, with_candidate = findings_on_lesions(mm, probs, cands.diameters_mm, study.body, study.truth["lesions"])
    lesions = study.truth["lesions"]
    diameters = np.array([float(les["diameter_mm"]) for les in lesions])
    inside = lesion_hits(mm[keep], lesions, within_lesion)
    return f"{kind}/{cond}", (probs[keep], hits, len(lesions), probs, labels, with_candidate, diameters, inside)


def findings_on_lesions(
    mm: np.ndarray, probs: np.ndarray, diameters_mm: np.ndarray, body: str, lesions: Sequence[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, int]:
    """The FROC's view of one study: (candidates kept by 3D NMS, best first; which lesions each kept one hits, a
    (kept, lesions) boolean matrix; how many lesions have any candidate at all). A hit lies within max(d/2, 3) +
    1.5 mm of the lesion centre; one finding can hit two lesions whose reaches overlap."""
    from models.detector import nms_3d

    keep = nms_3d(mm, probs, np.maximum(diameters_mm, 6.0 if body == "head" else 10.0))
    near = lesion_hits(mm, lesions)
    return keep, near[keep], int(near.any(axis=0).sum())


#: Lesion size bins (mm) for sensitivity by size: the small aneurysms are where a detector earns its keep
SIZE_BINS_MM = (0.0, 3.0, 5.0, 10.0, float("inf"))


def sensitivity_by_size(
    per_study: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], threshold: float
) -> dict[str, dict[str, Any]]:
    """Lesions found at ``threshold`` per diameter bin (``SIZE_BINS_MM``); empty bins are left out.

    ``per_study``: (scores of the kept findings, which lesions each hits as ``findings_on_lesions`` gives it,
    diameters of the study's lesions). A lesion is found when any finding on it scores at least ``threshold``.
    """
    found, sizes = [], []
    for scores, hits, diameters in per_study:
        on = np.where(np.asarray(hits, bool), np.asarray(scores, float)[:, None], -np.inf)
        best = on.max(axis=0) if len(on) else np.full(len(diameters), -np.inf)
        found.append(best >= threshold)
        sizes.append(np.asarray(diameters, dtype=float))
    hit_all = np.concatenate(found) if found else np.zeros(0, bool)
    size_all = np.concatenate(sizes) if sizes else np.zeros(0)
    out = {}
    for lo, hi in zip(SIZE_BINS_MM[:-1], SIZE_BINS_MM[1:], strict=True):
        sel = (size_all >= lo) & (size_all < hi)
        if sel.any():
            name = f"<{hi:g} mm" if lo == 0 else (f">={lo:g} mm" if hi == float("inf") else f"{lo:g}-{hi:g} mm")
            out[name] = {
                "lesions": int(sel.sum()),
                "found": int(hit_all[sel].sum()),
                "sensitivity": float(hit_all[sel].mean()),
            }
    return out


def evaluate_detector(
    detector: Any,
    plan: Sequence[tuple[str, str, int, str]],
    rules: dict[str, dict[str, Any]] | None,
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """FROC (sensitivity at 0.5/1/2/4 FP per case) and candidate-patch AUC, overall and per condition.

    ``rules``: ``fit_rules_by_size`` output for the sizes in ``plan``, or None (no harmonization). Also counts
    the lesions that have any candidate at all (``candidate_recall``): no classifier can find the others, and
    the lesions found at the 1-FP-per-case threshold by diameter (``sensitivity_at_1fp_by_size``).
    ``jobs`` > 1 scores studies in that many processes (one torch thread each); the result is the same.
    """
    rows: dict[str, list] = {}
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # a forked child cannot use CUDA once the parent has (the detector's networks are there): spawn then
        on_cuda = getattr(getattr(detector, "device", None), "type", "cpu") == "cuda"
        context = multiprocessing.get_context("spawn" if on_cuda else None)
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_score_study, detector, *item, rules, 1) for item in plan]
            for future in tqdm(futures, desc="evaluate", disable=not progress):
                key, row = future.result()
                rows.setdefault(key, []).append(row)
    else:
        for item in tqdm(plan, desc="evaluate", disable=not progress):
            key, row = _score_study(detector, *item, rules)
            rows.setdefault(key, []).append(row)

    def summary(items: list) -> dict[str, Any]:
        s = np.concatenate([it[3] for it in items])
        lab = np.concatenate([it[4] for it in items])
        threshold = threshold_at_1fp([it[:2] for it in items])
        return {
            "sensitivity_at_fp": froc_points([it[:3] for it in items]),
            # the same FROC with a hit only inside the lesion's own sphere (d/2): the sac-tight reading
            "sensitivity_at_fp_within_lesion": froc_points([(it[0], it[7], it[2]) for it in items]),
            "auc": auc(s, lab),
            "cases": len(items),
            "lesions": int(sum(it[2] for it in items)),
            "candidate_recall": float(sum(it[5] for it in items) / max(1, sum(it[2] for it in items))),
            "threshold_at_1fp": threshold,
            "sensitivity_at_1fp_by_size": sensitivity_by_size([(it[0], it[1], it[6]) for it in items], threshold),
        }

    everything = [it for items in rows.values() for it in items]
    result = summary(everything)
    result["per_condition"] = {key: summary(items) for key, items in sorted(rows.items())}
    result["per_kind"] = {
        kind: summary([it for key, items in rows.items() if key.startswith(kind + "/") for it in items])
        for kind in sorted({key.split("/")[0] for key in rows})
    }
    return result
