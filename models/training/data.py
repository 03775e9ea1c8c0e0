"""The detector's training and evaluation data: simulated studies, their harmonization, study plans, samples.

Simulated subjects are drawn from disjoint seed ranges (``SEEDS``) so that rules, landmarks, lesion training and
evaluation never share a subject; ``study_plan`` and ``lesion_training_plan`` lay the subjects out and
``check_subjects_from`` / ``check_eval_subjects`` refuse plans that would reach into another use's range.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.candidates import network_input_and_candidates, settings_for
from models.findings import VolumeGeometry
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
#: First held-out subject of ``harmonode evaluate`` (``SEEDS["eval"]`` + 2000): the model card's studies.
EVAL_SUBJECTS_FROM = 52_000

#: Ranges of the random scanner a CT study is rescanned through (``rescanned``): extra in-plane blur (mm), edge
#: boost, kernel cut-off (cycles/mm) and added pixel noise (HU). They span soft to sharp kernels and routine to
#: low dose around the training scanners, without copying any held-out condition.
RESCAN = {"blur_mm": (0.0, 0.45), "boost": (0.0, 1.2), "cutoff": (0.9, 1.5), "noise_hu": (4.0, 45.0)}
#: How a model card names the rescan augmentation (``training.rescan_augmentation``).
RESCAN_NOTE = (
    f"every CT training study also rescanned through a random kernel and dose {RESCAN} (models.training.data.rescanned)"
)

#: One study of a plan: (kind, condition, seed, size).
PlanItem = tuple[str, str, int, str]


class SubjectsOutOfRange(ValueError):
    """A plan of held-out studies that reaches outside the evaluation subjects."""


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
        """The body part the study's kind reads (``head`` or ``chest``)."""
        return KIND_BODY[self.kind]


def simulated(kind: str, condition: str, seed: int, size: str = "test", n_lesions: int | None = None) -> Study:
    """Simulate a study and load it through the node's own volume builder (same geometry as in the pipeline).

    Parameters
    ----------
    kind, condition, seed, size
        As ``simulator.studies.simulate_study`` takes them.
    n_lesions
        How many lesions the subject has (default: the simulator's 1–3 aneurysms, 1–4 nodules).

    Returns
    -------
    Study
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

    Parameters
    ----------
    kinds, size
        Study kinds (``KINDS``) and the simulated size of the studies the rules are fitted on.
    per_condition
        Unlabeled studies per condition (twice as many of the reference condition).
    progress
        Show a progress bar per kind.

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


def fit_rules_by_size(kinds: Iterable[str], sizes: Iterable[str], progress: bool = True) -> dict[str, dict]:
    """``{size: fit_rules(kinds, size=size)}`` for each of ``sizes`` (each fitted once).

    A series is harmonized by rules fitted on series of its own resolution (noise and partial volume shape the
    histogram), as a site fits its rules on its own scanner's series.
    """
    kinds = tuple(kinds)
    return {size: fit_rules(kinds, progress=progress, size=size) for size in dict.fromkeys(sizes)}


def load_or_fit_rules(path: Path | None, kinds: Iterable[str], sizes: Iterable[str]) -> dict[str, dict]:
    """``fit_rules_by_size(kinds, sizes)``, or the pickle of it at ``path`` (fitted once, reused by each run).

    Parameters
    ----------
    path
        A pickle an earlier run wrote (your own file: a pickle runs code when loaded), or None to fit.
    kinds, sizes
        As ``fit_rules_by_size``.

    Returns
    -------
    dict
        ``{size: rules}``.
    """
    if path is None:
        return fit_rules_by_size(kinds, sizes)
    with open(path, "rb") as f:
        return pickle.load(f)


def rules_for(rules: dict | None, size: str) -> dict | None:
    """The rules for series of ``size`` out of ``fit_rules_by_size`` (None stays None: no harmonization)."""
    return None if rules is None else rules[size]


def harmonized(study: Study, rules: dict[str, dict[str, Any]] | None) -> Study:
    """The study with its condition's rule applied; ``rules``: ``fit_rules`` output for its size, or None
    (the study unchanged)."""
    if not rules:
        return study
    from rules.apply import apply_rule

    mapping = rules[study.kind].get(study.condition)
    return Study(**{**study.__dict__, "values": apply_rule(mapping, study.values)})


def rescanned(study: Study, rng: np.random.Generator) -> Study:
    """Training augmentation (CT): the harmonized study as a scanner of random kernel and dose would show it.

    Harmonization matches intensities, not noise or sharpness, and those are where held-out low-dose and
    sharp-kernel series differ most from the training scanners. The harmonized volume goes through the
    simulator's own reconstruction model (``simulator.scanner.scan_ct``: kernel MTF, ramp-shaped noise) with a
    condition drawn from ``RESCAN`` (by ``rng``, as the noise), so candidates and patches are found on a noisier,
    softer or sharper series. The truth and geometry stay; MR studies are returned unchanged.
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
    """Patches at the study's landmarks (jittered copies) and as many background patches, with class labels.

    Parameters
    ----------
    study, rng
        A (harmonized) study with landmarks in its truth; the generator of the jitter and background points.
    names
        The classes (``landmark_names``); landmarks not named are skipped.
    copies, jitter_mm
        Patches per landmark (the first unjittered) and the jitter's standard deviation.

    Returns
    -------
    tuple
        (patches (N, 3, 32, 32), class labels (N,); 0 is background).
    """
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
    """Training label (int64) of each candidate (voxel indices (N, 3)) of ``study``: 1 within max(d/2, 3) mm of
    a lesion, 0 beyond d/2 + 4 mm, -1 in between (ignored)."""
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
    by the model itself (``train_classifier(mine=…)``), so the sample must hold them all.

    Parameters
    ----------
    study, rng
        A (harmonized) study; the generator of the jitter (and of the negatives kept, with ``max_negatives``).
    copies, max_negatives
        Jittered copies of every lesion centre; at most this many normal candidates (None: all).
    views, fine_candidates
        The patch views (``models.patches.VIEWS``, three channels each); the head's finest-scale extra
        candidates (nodules get none).

    Returns
    -------
    tuple
        (float16 patches (N, 3 × views, 32, 32), labels (N,): 1 lesion, 0 normal).
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


def collect(
    what: str,
    plan: Sequence[PlanItem],
    rules: dict | None,
    names: Sequence[str] = (),
    seed: int = 0,
    n_lesions: int | None = None,
    rescan: bool = False,
    views: Sequence[str] = ("planes",),
    fine_candidates: int = 0,
    extend: dict[str, Sequence[str]] | None = None,
    extend_rules: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches and labels from every (kind, condition, seed, size) of ``plan``, harmonized with ``rules``.

    Parameters
    ----------
    what, plan, rules
        ``landmarks`` or ``lesions``; the studies (``study_plan``); ``fit_rules_by_size`` output or None.
    names, seed
        Landmark classes (landmarks only); the sampling's seed.
    n_lesions
        Lesions per simulated subject (None: the simulator's default mix).
    rescan
        Lesions only: every CT study is also used once more, rescanned through a random kernel and dose.
    views, fine_candidates
        Lesions only: as ``lesion_samples``.
    extend, extend_rules
        Lesions only, data extension: every reference-condition study is also used once per scarce condition
        ``extend[kind]``, inverse-converted by that condition's rule in ``extend_rules`` (``fit_rules_by_size``
        output) and then harmonized with ``rules`` as a study of that condition.

    Returns
    -------
    tuple
        (patches, labels) of every study, concatenated.
    """
    from models.training.extension import extension_studies  # it builds on this module's studies

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for kind, cond, s, size in tqdm(plan, desc=f"{what} patches", leave=False):
        raw = simulated(kind, cond, s, size, n_lesions)
        study = harmonized(raw, rules_for(rules, size))
        if what == "landmarks":
            samples = [landmark_samples(study, names, rng)]
        else:
            options = {"views": views, "fine_candidates": fine_candidates}
            samples = [lesion_samples(study, rng, **options)]  # type: ignore[arg-type]
            for extra in extension_studies(raw, extend, rules_for(extend_rules, size)):
                samples.append(lesion_samples(harmonized(extra, rules_for(rules, size)), rng, **options))  # type: ignore[arg-type]
            if rescan and study.modality == "CT":
                samples.append(lesion_samples(rescanned(study, rng), rng, **options))  # type: ignore[arg-type]
        for x, y in samples:
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# -- study plans ---------------------------------------------------------------------------------------------------
def study_plan(
    kinds: Iterable[str], conditions: dict[str, Sequence[str]], per_kind: int, base: int, size: str = "test"
) -> list[PlanItem]:
    """(kind, condition, seed, size) tuples: ``per_kind`` studies of each kind at ``size``, cycling through its
    ``conditions`` (``TRAIN_CONDITIONS`` or ``HELD_OUT_CONDITIONS``), kind k from subject ``base`` + 1000 k."""
    plan = []
    for ki, kind in enumerate(kinds):
        conds = conditions[kind]
        plan += [(kind, conds[i % len(conds)], base + 1000 * ki + i, size) for i in range(per_kind)]
    return plan


def check_subjects_from(base: int) -> None:
    """Refuse a first training subject whose range would reach into the rules', landmarks' or evaluation's.

    A network must never train on its own test studies; ``study_plan`` gives kind k the subjects from
    base + 1000 k.

    Raises
    ------
    ValueError
        The range ``base`` … ``base`` + 2999 overlaps another use's subjects.
    """
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
) -> list[PlanItem]:
    """The lesion networks' training studies.

    ``studies`` per kind at ``size`` (``head_studies`` per head kind when given), kind k from subject ``base`` +
    1000 k, then ``test_size_studies`` per kind at size test from ``base`` + 500 (+ 1000 k).

    Raises
    ------
    ValueError
        More than 500 studies per kind: they would reach the test-size subjects.
    """
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


def held_out_studies_per_kind(studies: int) -> dict[str, int]:
    """Held-out studies per kind when every held-out condition gets ``studies``."""
    return {kind: studies * len(HELD_OUT_CONDITIONS[kind]) for kind in KINDS}


def check_eval_subjects(subjects_from: int, studies: int) -> None:
    """Refuse a held-out plan (``held_out_plan``) that reaches outside the evaluation subjects.

    Raises
    ------
    SubjectsOutOfRange
        A subject of the plan lies outside ``SEEDS["eval"]`` … + 9999, where no network trains.
    """
    per_kind = held_out_studies_per_kind(studies)
    first, last = SEEDS["eval"], SEEDS["eval"] + 9_999
    top = max(subjects_from + 1000 * ki + per_kind[kind] - 1 for ki, kind in enumerate(KINDS))
    if subjects_from < first or top > last:
        raise SubjectsOutOfRange(
            f"--subjects-from {subjects_from} with --studies {studies} uses subjects {subjects_from}-{top};"
            f" held-out subjects must lie in {first}-{last} (no network trains there). Try --subjects-from"
            f" {EVAL_SUBJECTS_FROM} (the card's studies) or 52500."
        )


def held_out_plan(studies: int, size: str, subjects_from: int = EVAL_SUBJECTS_FROM) -> list[PlanItem]:
    """The held-out studies ``harmonode evaluate`` scores: ``studies`` per held-out condition of every kind at
    ``size``, kind k from subject ``subjects_from`` + 1000 k (``check_eval_subjects`` keeps them in range)."""
    per_kind = held_out_studies_per_kind(studies)
    return [
        item
        for ki, kind in enumerate(KINDS)
        for item in study_plan((kind,), HELD_OUT_CONDITIONS, per_kind[kind], subjects_from + 1000 * ki, size)
    ]
