"""Hard-example mining (seed 001): convert labelled studies with stored parameters, keep what the model finds hard.

The loop of the seed's first embodiment, on simulated labelled studies (``models.training.data``):

1. a labelled study is converted towards a stored parameter set (``storage.parameters``: per-region target
   (mean, std) of a condition cell) by the per-region Reinhard transfer (``rules.transfer``, Expressions 1–2;
   air is kept), then harmonized as the pipeline would harmonize a series of that condition;
2. its candidate and lesion patches are scored by the current detector;
3. the patches whose confidence on their true class (``p`` for a lesion, ``1 − p`` for a normal candidate) is
   below ``threshold`` (default 0.7) are kept, with their provenance (source study, parameter set, confidence);
4. a conversion that gave hard patches makes its neighbours the next to try: stored sets within distance ``R``
   of it (Expression 3, or per-component tolerances: Expression 4) are selected first; when none is near, sets
   within that distance are generated (``(t_mean1 + α, t_std1 + β)``).

The second embodiment (``update_every`` > 0) also updates the model online: after every ``update_every`` kept
examples, a few steps of the last layers (``MiniVGG.embed`` and ``head``; the convolutional trunk stays) on
the examples kept so far, so that what the updated model already gets right is no longer kept.

The result is a training set on disk (``write_mined``: ``patches.npz``, ``provenance.jsonl``, ``manifest.json``)
that ``harmonode train lesions --extra-patches DIR`` adds to its data (``load_mined``).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from rules.transfer import ParameterSet, neighbours, region_statistics, reinhard_transfer, sample_neighbours

if TYPE_CHECKING:
    from models.nets import MiniVGG
    from models.training.data import Study
    from storage.parameters import StoredParameters

log = logging.getLogger(__name__)

#: Intensity cuts of the regions per modality: CT air and lung / soft tissue / contrast and bone (HU); MR one
#: region (its units are each scanner's own: a fixed cut would mean something else on every scanner).
REGION_THRESHOLDS: dict[str, tuple[float, ...]] = {"CT": (-400.0, 200.0), "MR": ()}
#: Subsampling of the volume (slices, rows, columns) the stored statistics are measured on.
STRIDE = (2, 4, 4)
#: Regions copied unchanged by the conversion, per modality (CT air: the seed-000 rules leave it too).
KEEP_REGIONS: dict[str, tuple[int, ...]] = {"CT": (0,), "MR": ()}

#: lesion probabilities of (N, C, 32, 32) patches of one body part: ``scorer(patches, body)``
Scorer = Callable[[np.ndarray, str], np.ndarray]
#: harmonized values of a converted volume of a condition cell: ``harmonize(values, condition_key)``
Harmonizer = Callable[[np.ndarray, str], np.ndarray]
#: the online update: ``update(patches, labels)`` trains the scorer's model in place
Updater = Callable[[np.ndarray, np.ndarray], None]


def measure(values: np.ndarray, modality: str, name: str = "") -> ParameterSet:
    """Per-region (mean, std) of a raw volume on its strided subsample (``STRIDE``), regions of
    ``REGION_THRESHOLDS``.

    Raises
    ------
    ValueError
        A modality without regions, an empty or non-finite volume.
    """
    if modality not in REGION_THRESHOLDS:
        raise ValueError(f"no parameter regions for modality {modality!r}; known: {sorted(REGION_THRESHOLDS)}")
    v = np.asarray(values)
    sub = v[tuple(slice(None, None, s) for s in STRIDE[-v.ndim :])] if 1 <= v.ndim <= 3 else v
    return region_statistics(sub, thresholds=REGION_THRESHOLDS[modality], name=name)


@dataclass(frozen=True)
class MiningOptions:
    """How ``mine`` searches.

    Parameters
    ----------
    threshold
        Keep a patch whose confidence on its true class is below this (the seed's first threshold Th1).
    radius
        ``R`` of Expression 3 (Euclidean over every region's (mean, std), in the volume's units).
    mean_tolerance, std_tolerance
        Instead of ``radius``: Expression 4's per-component bounds ``M`` and ``S`` (both or neither).
    budget
        Stop after this many kept patches.
    max_conversions
        Stop after this many conversions (each: one study towards one parameter set).
    neighbours_per_hard
        Sets tried next after a conversion that gave hard patches (selected or generated).
    max_negatives, copies
        Normal candidates per converted study (at most) and jittered copies per lesion (``lesion_samples``).
    update_every, update_steps, update_lr
        Second embodiment: after every ``update_every`` kept patches (0: never), ``update_steps`` steps at
        ``update_lr`` of the last layers on the patches kept so far.
    seed
        The search's random generator (order of stored sets, generated sets, patch sampling).
    """

    threshold: float = 0.7
    radius: float | None = 25.0
    mean_tolerance: float | None = None
    std_tolerance: float | None = None
    budget: int = 200
    max_conversions: int = 24
    neighbours_per_hard: int = 2
    max_negatives: int = 300
    copies: int = 4
    update_every: int = 0
    update_steps: int = 20
    update_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1]; got {self.threshold}")
        box = (self.mean_tolerance, self.std_tolerance)
        if (self.radius is None) == (box == (None, None)) or (None in box and box != (None, None)):
            raise ValueError("give either radius, or both mean_tolerance and std_tolerance")
        for value in (self.radius, *box):
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"neighbourhood bounds must be finite and > 0; got {value}")
        if self.budget < 1 or self.max_conversions < 1 or self.neighbours_per_hard < 0 or self.update_every < 0:
            raise ValueError("budget and max_conversions ≥ 1; neighbours_per_hard and update_every ≥ 0")


@dataclass(frozen=True)
class Candidate:
    """A parameter set to convert with: its condition cell and where it came from (stored row or generated)."""

    parameters: ParameterSet
    condition_key: str
    origin: str  # "stored" | "generated" | "random"
    provenance: dict[str, Any]


@dataclass
class MinedSet:
    """The kept patches, their labels and one provenance record each, and how the search went."""

    patches: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    conversions: list[dict[str, Any]] = field(default_factory=list)
    updates: int = 0

    def __len__(self) -> int:
        return len(self.provenance)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(float16 patches (N, C, 32, 32), int64 labels (N,))."""
        if not self.patches:
            return np.zeros((0, 0, 32, 32), np.float16), np.zeros(0, np.int64)
        return np.concatenate(self.patches).astype(np.float16), np.concatenate(self.labels).astype(np.int64)


def candidates_of(stored: Sequence[StoredParameters]) -> list[Candidate]:
    """The stored sets as candidates to convert with."""
    return [Candidate(ParameterSet.from_dict(s.parameters), s.condition_key, "stored", s.provenance()) for s in stored]


def true_class_confidence(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confidence on the true class: the lesion probability for a lesion (label 1), its complement otherwise."""
    p = np.asarray(probabilities, np.float64)
    return np.where(np.asarray(labels) == 1, p, 1.0 - p)


def converted(study: Study, target: Candidate, harmonize: Harmonizer | None) -> Study:
    """The study converted towards ``target`` (per region, air kept) and harmonized as its condition would be."""
    from models.training.data import Study

    thresholds = REGION_THRESHOLDS[study.modality]
    if target.parameters.thresholds != thresholds:
        got = target.parameters.thresholds
        raise ValueError(f"parameter set regions {got} are not {study.modality}'s {thresholds}")
    values = reinhard_transfer(study.values, target.parameters, keep_regions=KEEP_REGIONS[study.modality])
    if harmonize is not None:
        values = harmonize(values, target.condition_key)
    return Study(**{**study.__dict__, "values": values.astype(np.float32, copy=False)})


def _generated(centre: Candidate, options: MiningOptions, count: int, rng: np.random.Generator) -> list[Candidate]:
    """``count`` sets near ``centre``: in the ball of Expression 3 or the box of Expression 4."""
    if options.radius is not None:
        sets = sample_neighbours(centre.parameters, options.radius, count, rng, name=f"near-{centre.parameters.name}")
    else:
        half = np.array([options.mean_tolerance, options.std_tolerance]) * 0.999
        sets = []
        for i in range(count):
            v = centre.parameters.vector + rng.uniform(-1, 1, size=centre.parameters.vector.shape) * half
            v[:, 1] = np.abs(v[:, 1])
            sets.append(ParameterSet.of([tuple(r) for r in v], centre.parameters.thresholds, f"near-{i}"))
    base = {"generated_from": centre.provenance.get("id", centre.provenance.get("name", ""))}
    return [
        Candidate(s, centre.condition_key, "generated", {**base, "condition_key": centre.condition_key, **s.as_dict()})
        for s in sets
    ]


def next_candidates(
    centre: Candidate, unused: list[Candidate], options: MiningOptions, rng: np.random.Generator
) -> list[Candidate]:
    """The sets to try after ``centre`` gave hard patches: the nearest unused stored ones within the bound
    (removed from ``unused``), else generated ones (``neighbours_per_hard`` of them)."""
    want = options.neighbours_per_hard
    if want == 0:
        return []
    same = [c for c in unused if c.parameters.n_regions == centre.parameters.n_regions]
    near = neighbours(
        centre.parameters, [c.parameters for c in same], options.radius, options.mean_tolerance, options.std_tolerance
    )
    chosen = [same[i] for i, _ in near[:want]]
    for c in chosen:
        unused.remove(c)
    return chosen or _generated(centre, options, want, rng)


def _kept_record(study: Study, cand: Candidate, conversion: int, confidence: float, label: int) -> dict[str, Any]:
    return {
        "source": f"simulated:{study.kind}/{study.condition}/{study.seed}",
        "parameters": cand.provenance,
        "origin": cand.origin,
        "conversion": conversion,
        "confidence": round(float(confidence), 6),
        "label": int(label),
    }


def mine(
    studies: Sequence[Study],
    stored: Sequence[Candidate],
    scorer: Scorer,
    views: Sequence[str],
    options: MiningOptions = MiningOptions(),
    harmonize: Harmonizer | None = None,
    update: Updater | None = None,
    progress: bool = True,
) -> MinedSet:
    """Search conversions of ``studies`` for the patches ``scorer`` finds hard (the module's loop).

    Parameters
    ----------
    studies
        Labelled source studies (one per conversion, in turn).
    stored
        Parameter sets to start from (``candidates_of(stored_parameters(…))``), tried in a random order.
    scorer, views
        Lesion probability of patches (``detector_scorer``); the views its patches have.
    options
        ``MiningOptions``.
    harmonize
        The rule of the target's condition cell (None: the converted values are read as they are).
    update
        The online update (second embodiment, with ``options.update_every``).
    progress
        Show a progress bar.

    Returns
    -------
    MinedSet

    Raises
    ------
    ValueError
        No study or no stored set.
    """
    from models.training.data import lesion_samples

    if not studies or not stored:
        raise ValueError("mining needs at least one labelled study and one stored parameter set")
    rng = np.random.default_rng(options.seed)
    unused = [stored[i] for i in rng.permutation(len(stored))]
    frontier: deque[Candidate] = deque()
    out = MinedSet()
    since_update = 0
    bar = tqdm(total=options.budget, desc="mined", disable=not progress)
    for conversion in range(options.max_conversions):
        if len(out) >= options.budget or not (frontier or unused):
            break
        cand = frontier.popleft() if frontier else unused.pop(0)
        study = studies[conversion % len(studies)]
        conv = converted(study, cand, harmonize)
        x, y = lesion_samples(conv, rng, copies=options.copies, max_negatives=options.max_negatives, views=views)
        conf = true_class_confidence(scorer(x, study.body), y)
        hard = np.flatnonzero(conf < options.threshold)[: options.budget - len(out)]
        out.patches.append(x[hard])
        out.labels.append(y[hard])
        out.provenance += [_kept_record(study, cand, conversion, conf[i], y[i]) for i in hard]
        out.conversions.append(
            {"conversion": conversion, "origin": cand.origin, "condition_key": cand.condition_key,
             "patches": int(len(y)), "kept": int(len(hard)), "kept_lesions": int(y[hard].sum())}
        )  # fmt: skip
        bar.update(len(hard))
        if len(hard):
            frontier.extend(next_candidates(cand, unused, options, rng))
        since_update += len(hard)
        if update is not None and options.update_every and since_update >= options.update_every:
            update(*out.arrays())
            out.updates += 1
            since_update = 0
    bar.close()
    return out


def random_converted(
    studies: Sequence[Study],
    stored: Sequence[Candidate],
    views: Sequence[str],
    options: MiningOptions = MiningOptions(),
    harmonize: Harmonizer | None = None,
    progress: bool = True,
) -> MinedSet:
    """The control of a mining run: the same budget of patches converted with randomly drawn stored sets and
    kept regardless of the model (no scoring, no neighbourhood search)."""
    from models.training.data import lesion_samples

    rng = np.random.default_rng(options.seed)
    out = MinedSet()
    per = max(1, -(-options.budget // max(1, min(options.max_conversions, len(stored) * len(studies)))))
    for conversion in tqdm(range(options.max_conversions), desc="random", disable=not progress):
        if len(out) >= options.budget:
            break
        base = stored[int(rng.integers(len(stored)))]
        cand = Candidate(base.parameters, base.condition_key, "random", base.provenance)
        study = studies[conversion % len(studies)]
        x, y = lesion_samples(converted(study, cand, harmonize), rng, copies=options.copies,
                              max_negatives=options.max_negatives, views=views)  # fmt: skip
        take = np.sort(rng.choice(len(y), min(len(y), per, options.budget - len(out)), replace=False))
        out.patches.append(x[take])
        out.labels.append(y[take])
        out.provenance += [_kept_record(study, cand, conversion, float("nan"), y[i]) for i in take]
    return out


# -- the model ------------------------------------------------------------------------------------------------------
def detector_scorer(detector: Any) -> Scorer:
    """``Detector.classify`` with the card's test-time flips per body part."""

    def score(patches: np.ndarray, body: str) -> np.ndarray:
        return detector.classify(np.asarray(patches, np.float32), tta=detector.tta[body])

    return score


def fine_tune(
    models: Sequence[MiniVGG],
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    batch: int = 64,
) -> list[float]:
    """Train the last layers (``embed`` and ``head``) of each network on ``(x, y)``; the trunk stays as it is.

    The trunk's output is computed once (it does not change), so a step costs two small matrix products.
    Classes are weighted to equal total weight. The networks are left in eval mode.

    Returns
    -------
    list
        Final mean loss per network.
    """
    import torch
    from torch import nn

    if len(y) == 0 or steps <= 0:
        return []
    losses = []
    for k, model in enumerate(models):
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed + k)
        model.eval()
        with torch.no_grad():
            feats = torch.cat([model.features(torch.from_numpy(np.asarray(x[s : s + 256], np.float32)).to(device))
                               for s in range(0, len(x), 256)])  # fmt: skip
        yt = torch.from_numpy(np.asarray(y, np.int64)).to(device)
        counts = torch.bincount(yt, minlength=2).float().clamp(min=1)
        loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / counts / 2)
        params = [*model.embed.parameters(), *model.head.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        model.embed.train()
        total = 0.0
        for _ in range(steps):
            sel = torch.randint(len(yt), (min(batch, len(yt)),), generator=gen).to(device)
            loss = loss_fn(model.head(model.embed(feats[sel])), yt[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total = float(loss.detach())
        model.eval()
        losses.append(total)
    return losses


def online_updater(detector: Any, options: MiningOptions) -> Updater:
    """The second embodiment's update of ``detector``'s networks (``fine_tune``, ``update_steps`` steps)."""

    def update(x: np.ndarray, y: np.ndarray) -> None:
        fine_tune(detector.models, x, y, options.update_steps, options.update_lr, options.seed)

    return update


# -- on disk --------------------------------------------------------------------------------------------------------
PATCHES, PROVENANCE, MANIFEST = "patches.npz", "provenance.jsonl", "manifest.json"


def write_mined(folder: Path, mined: MinedSet, manifest: dict[str, Any]) -> Path:
    """Write a mined set: ``patches.npz`` (x, y), ``provenance.jsonl`` (one line per patch, same order) and
    ``manifest.json`` (``manifest`` + counts and the conversions). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = mined.arrays()
    np.savez_compressed(folder / PATCHES, x=x, y=y)
    with open(folder / PROVENANCE, "w") as f:
        for record in mined.provenance:
            f.write(json.dumps(record, allow_nan=True) + "\n")
    full = {**manifest, "patches": int(len(y)), "lesion_patches": int(y.sum()), "online_updates": mined.updates,
            "conversions": mined.conversions}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return folder


class MinedSetError(ValueError):
    """A folder that is not a mined set, or one whose patches do not fit the network being trained."""


def load_mined(folder: Path, channels: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(patches, labels, manifest) of a mined set written by ``write_mined``.

    Raises
    ------
    MinedSetError
        Missing files, patches and provenance of different lengths, or patches with other than ``channels``
        channels (another set of views than the network's).
    """
    try:
        with np.load(folder / PATCHES) as data:
            x, y = data["x"], data["y"]
        manifest = json.loads((folder / MANIFEST).read_text())
        lines = (folder / PROVENANCE).read_text().splitlines()
    except (OSError, KeyError, ValueError) as exc:
        raise MinedSetError(f"{folder} is not a mined set (harmonode mine --out): {exc}") from exc
    if len(lines) != len(y) or len(x) != len(y):
        raise MinedSetError(f"{folder}: {len(x)} patches, {len(y)} labels, {len(lines)} provenance lines")
    if channels is not None and len(x) and x.shape[1] != channels:
        raise MinedSetError(
            f"{folder}: patches have {x.shape[1]} channels (views {manifest.get('views')}),"
            f" the network reads {channels}"
        )
    return x, y, manifest


def manifest_of(options: MiningOptions, views: Sequence[str], model_version: str, **extra: Any) -> dict[str, Any]:
    """The manifest ``write_mined`` stores: options, views, the model that scored, anything else named."""
    return {"options": asdict(options), "views": list(views), "model_version": model_version, **extra}


# -- the simulated world (the CLI, tests and benchmarks) ----------------------------------------------------------
#: First subject of the simulated studies whose parameters fill the store (in the rules' range, unused by them).
STORE_SUBJECTS_FROM = 97_000


def store_simulated(
    index: Any, kind: str, conditions: Sequence[str], per_condition: int, size: str = "test", base: int | None = None
) -> list[int]:
    """Measure ``per_condition`` simulated studies of each condition and store them (``simulated:`` sources),
    under the condition key ``kind/condition``; returns the row ids."""
    from models.training.data import simulated
    from storage.parameters import store_parameters

    base = STORE_SUBJECTS_FROM if base is None else base
    ids = []
    for ci, cond in enumerate(conditions):
        for s in range(per_condition):
            seed = base + 100 * ci + s
            study = simulated(kind, cond, seed, size)
            params = measure(study.values, study.modality, name=f"{kind}/{cond}/{seed}")
            ids.append(store_parameters(index, f"simulated:{kind}/{cond}/{seed}", f"{kind}/{cond}", study.modality,
                                        params.as_dict()))  # fmt: skip
    return ids


def rules_harmonizer(rules: dict[str, dict[str, Any]]) -> Harmonizer:
    """Harmonize a converted volume of cell ``kind/condition`` with that condition's fitted rule
    (``models.training.data.fit_rules`` output); another key, or a condition without a rule, stays as it is."""
    from rules.apply import apply_rule

    def harmonize(values: np.ndarray, condition_key: str) -> np.ndarray:
        kind, _, cond = condition_key.partition("/")
        mapping = rules.get(kind, {}).get(cond)
        return values if mapping is None else apply_rule(mapping, values)

    return harmonize
