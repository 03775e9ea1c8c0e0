"""Detector recipe sweep (issue 6): patch views × fine candidates × landmark negatives × rescans × seeds, on a GPU.

``harmonode train sweep`` (8 minutes on a 16-core machine with one H100/H200; hours on 2 CPU cores). Results go
to the results folder (``--out``, default ``$OUT`` or /tmp/sweep_out): ``log.txt``, ``summary.json`` and
``states.pt`` (every network's weights, ``recipe/seed``), which ``harmonode train card`` ships as a model card.

Phase A (a pool of CPU processes): network a's training studies (``harmonode train lesions`` defaults: 40 subjects
per kind with 4 lesions at size eval + 6 per kind at size test), a selection set (8 studies per held-out condition,
subjects 55000+) and the model card's held-out set (the same plan as ``harmonode evaluate``, subjects 52000+); every
candidate (with the head's 100 fine-scale extras flagged) cut in all twelve channels, plus jittered negatives at the
head's normal vessel landmarks (``landmark_negatives``, flagged). ``head_studies`` and ``lesions`` set the training
data's size (network b: 72 and 5); ``phase_a_device`` cuda finds candidates and cuts patches on the GPU (spawned
workers). Phase B (processes sharing the GPU): one network per recipe and seed, network a's recipe
(``train_classifier``: landmark trunk, 16 epochs, 5 mined negatives per positive, flips). A recipe is views (base,
zoom, mip, all = the three, wide = planes + wide, every = all four) with optional ``+fine`` (fine candidates) and
``+lm`` (landmark negatives) and ``+rs`` (with ``rescan``: every training CT study also rescanned through a random
kernel and dose, ``models.training.data.rescanned``; the held-out low-dose and sharp scanners are noisier than the
training ones even after harmonization). Phase C: FROC per kind on both sets, each network, the mean of each
recipe's seeds, that mean with the shipped networks, and all recipes pooled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.detector import CARD_NAME, WEIGHTS_DIR, WEIGHTS_NAME
from models.training.data import (
    EVAL_SUBJECTS_FROM,
    HELD_OUT_CONDITIONS,
    KINDS,
    Study,
    candidate_labels,
    check_subjects_from,
    harmonized,
    lesion_training_plan,
    load_or_fit_rules,
    rescanned,
    rules_for,
    simulated,
    study_plan,
)
from models.training.evaluate import FP_RATES, findings_on_lesions, froc_points, sensitivity_by_size, threshold_at_1fp

log = logging.getLogger(__name__)

ALL = ("planes", "zoom", "mip", "wide")  # the cached channels: 3 per view, in this order
#: The views each recipe's networks read (``harmonode train card`` writes them into the card).
RECIPE_VIEWS = {
    "base": ("planes",),
    "zoom": ("planes", "zoom"),
    "mip": ("planes", "mip"),
    "all": ("planes", "zoom", "mip"),
    "wide": ("planes", "wide"),
    "every": ALL,
}
#: First subject of the selection set (held-out conditions; the card's held-out set starts at 52000).
SELECT_SUBJECTS_FROM = 55_000


def channels_of(views: Sequence[str]) -> list[int]:
    """The cached channels holding ``views`` (3 per view, in ``ALL``'s order)."""
    return [3 * ALL.index(v) + c for v in views for c in range(3)]


CHANNELS = {name: channels_of(views) for name, views in RECIPE_VIEWS.items()}
RECIPES = {  # name: (channels, fine candidates, landmark negatives, rescanned CT studies)
    f"{views}{fine}{lm}{rs}": (ch, bool(fine), bool(lm), bool(rs))
    for views, ch in CHANNELS.items()
    for fine in ("", "+fine")
    for lm in ("", "+lm")
    for rs in ("", "+rs")
}
#: The head's vessel landmarks (the simulator's names start so): normal branch points and bends, where the
#: shipped networks' top false positives sit. ``landmark_negatives`` adds jittered negatives there.
VESSEL_LANDMARKS = ("ica_", "mca_", "ophthalmic_", "pcomm_", "a1_", "sca_", "pica_", "basilar_", "vertebro", "acomm_")


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """What a sweep trains and scores (``harmonode train sweep --help`` says each in words).

    Raises
    ------
    ValueError
        Training subjects that overlap another use's (``check_subjects_from``), or an unknown recipe.
    """

    studies: int = 40
    head_studies: int | None = None
    lesions: int = 4
    subjects_from: int = 20_000
    pretrained: Path = WEIGHTS_DIR / "landmarks.pt"
    landmark_negatives: int = 3
    rescan: bool = False
    phase_a_device: str = "cpu"
    test_studies: int = 6
    per_cond: int = 8
    fine: int = 100
    epochs: int = 16
    seeds: int = 3
    jobs: int = 16
    gpu_jobs: int = 6
    recipes: tuple[str, ...] = tuple(RECIPES)
    device: str = "cuda"
    work: Path = Path("/tmp/sweep")
    out: Path = Path("/tmp/sweep_out")
    rules: Path | None = None

    def __post_init__(self) -> None:
        check_subjects_from(self.subjects_from)  # never train on the rules', landmarks' or evaluation's subjects
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipes {unknown}: views {', '.join(RECIPE_VIEWS)} with +fine, +lm, +rs")


class SweepLog:
    """The sweep's report lines: each passed to ``echo`` (or logged) and appended to ``log.txt`` in ``folder``."""

    def __init__(self, folder: Path, echo: Callable[[str], None] | None = None) -> None:
        self.folder = folder
        self.echo = echo

    def __call__(self, message: str) -> None:
        """Say one line."""
        if self.echo is not None:
            self.echo(message)
        else:
            log.info("%s", message)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "log.txt", "a") as f:
            f.write(message + "\n")


def landmark_negatives(st: Study, rng: np.random.Generator, copies: int) -> np.ndarray:
    """Voxel indices of ``copies`` jittered points (1 mm) at each vessel landmark clear of every lesion."""
    lms = [lm for lm in st.truth["landmarks"] if lm["name"].startswith(VESSEL_LANDMARKS)]
    if not lms or not copies:
        return np.zeros((0, 3))
    pts = np.repeat(np.array([lm["center_mm"] for lm in lms], float), copies, axis=0)
    pts += rng.normal(0, 1.0, size=pts.shape)
    keep = np.ones(len(pts), bool)
    for les in st.truth["lesions"]:
        keep &= np.linalg.norm(pts - np.asarray(les["center_mm"]), axis=1) > float(les["diameter_mm"]) / 2 + 4.0
    return st.geometry.patient_to_index(pts[keep])


def _flag_fine(n: int, n_fine: int) -> np.ndarray:
    """Which of ``n`` candidates are the ``n_fine`` fine-scale extras at the end."""
    fine = np.zeros(n, bool)
    if n_fine:
        fine[-n_fine:] = True
    return fine


def training_rows(
    st: Study, cfg: Any, rng: np.random.Generator, lm_copies: int, device: str, rescanned: bool = False
) -> dict[str, np.ndarray]:
    """One training study's patches (all twelve channels) and labels, flagged: fine candidates, landmark
    negatives, and whether the study was rescanned."""
    from models.candidates import network_input_and_candidates
    from models.patches import PATCH_MM, extract_views

    vol, c = network_input_and_candidates(st.values, st.geometry.spacing, st.modality, st.body, cfg, device)
    fine = _flag_fine(len(c), c.fine)
    lab = candidate_labels(st, c.centres)
    truth = [(np.asarray(les["center_mm"]), float(les["diameter_mm"])) for les in st.truth["lesions"]]
    jit = [ce + rng.normal(0, min(1.5, d / 4), size=(8, 3)) for ce, d in truth]
    jit_idx = st.geometry.patient_to_index(np.concatenate(jit)) if jit else np.zeros((0, 3))
    pos, neg = lab == 1, lab == 0
    lm_idx = landmark_negatives(st, rng, lm_copies) if st.body == "head" else np.zeros((0, 3))
    idx = np.concatenate([c.centres[pos], jit_idx, c.centres[neg], lm_idx])
    y = np.concatenate([np.ones(pos.sum() + len(jit_idx), np.int64), np.zeros(neg.sum() + len(lm_idx), np.int64)])
    f = np.concatenate([fine[pos], np.zeros(len(jit_idx), bool), fine[neg], np.zeros(len(lm_idx), bool)])
    lm = np.concatenate([np.zeros(len(idx) - len(lm_idx), bool), np.ones(len(lm_idx), bool)])
    x = extract_views(vol, st.geometry.spacing, idx, PATCH_MM[st.body], ALL, device=device).astype(np.float16)
    return dict(x=x, y=y, fine=f, lm=lm, rs=np.full(len(y), rescanned))


def study_rows(item: tuple, rules: dict | None) -> dict[str, Any]:
    """Phase A for one study of ``plans``: its training rows, or its candidates' patches and what scores them."""
    import torch

    torch.set_num_threads(1)
    from models.candidates import network_input_and_candidates, settings_for
    from models.patches import PATCH_MM, extract_views

    role, kind, cond, seed, size, n_les, fine_n, lm_copies, rescan, device = item
    st = harmonized(simulated(kind, cond, seed, size, n_les), rules_for(rules, size))
    cfg = settings_for(st.body, fine_n if st.body == "head" else 0)
    if role == "train":
        rng = np.random.default_rng(seed)
        parts = [training_rows(st, cfg, rng, lm_copies, device)]
        if rescan and st.modality == "CT":  # the same subject once more, through a random kernel and dose
            parts.append(training_rows(rescanned(st, rng), cfg, rng, lm_copies, device, rescanned=True))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    vol, c = network_input_and_candidates(st.values, st.geometry.spacing, st.modality, st.body, cfg, device)
    x = extract_views(vol, st.geometry.spacing, c.centres, PATCH_MM[st.body], ALL, device=device).astype(np.float16)
    mm = st.geometry.index_to_patient(c.centres) if len(c) else np.zeros((0, 3))
    return {
        "role": role, "kind": kind, "cond": cond, "body": st.body, "x": x, "mm": mm, "diam": c.diameters_mm,
        "fine": _flag_fine(len(c), c.fine), "labels": candidate_labels(st, c.centres), "lesions": st.truth["lesions"],
    }  # fmt: skip


def plans(options: SweepOptions) -> tuple[list[tuple], list[tuple]]:
    """Phase A's studies: (training items, selection + evaluation items), each as ``study_rows`` takes it."""
    extra = (options.fine, options.landmark_negatives, options.rescan, options.phase_a_device)
    tr = [
        ("train", k, c, s, z, options.lesions, *extra)
        for k, c, s, z in lesion_training_plan(
            options.studies, options.subjects_from, "eval", options.test_studies, options.head_studies
        )
    ]
    ev = []
    for role, base in (("select", SELECT_SUBJECTS_FROM), ("eval", EVAL_SUBJECTS_FROM)):
        for ki, kind in enumerate(KINDS):
            n = options.per_cond * len(HELD_OUT_CONDITIONS[kind])
            ev += [
                (role, k, c, s, z, None, *extra)
                for k, c, s, z in study_plan((kind,), HELD_OUT_CONDITIONS, n, base + 1000 * ki, "eval")
            ]
    return tr, ev


def train_one(job: tuple) -> tuple[str, int, dict, dict, float]:
    """Phase B for one (recipe, seed): the landmark trunk trained on the recipe's rows of the cached patches."""
    recipe, seed, device, data, epochs, pretrained = job
    import torch

    from models.training.train import load_checkpoint, train_classifier

    torch.set_num_threads(2)
    ch, use_fine, use_lm, use_rs = RECIPES[recipe]
    d = np.load(data, mmap_mode="r")
    y = np.load(data.replace("x.npy", "y.npy"))
    f = np.load(data.replace("x.npy", "f.npy"))
    lm = np.load(data.replace("x.npy", "lm.npy"))
    rs = np.load(data.replace("x.npy", "rs.npy"))
    rows = np.flatnonzero((use_fine | ~f) & (use_lm | ~lm) & (use_rs | ~rs))
    x = np.ascontiguousarray(d[rows][:, ch])
    y = y[rows]
    model, _ = load_checkpoint(pretrained)
    model.replace_head(2)
    if len(ch) > 3:
        model.widen_input(len(ch))
    t0 = time.time()
    train_classifier(
        model, x, y, epochs, seed, lr=1e-3, flips=True, balance=True, mine=5, device=device, desc=f"{recipe}/{seed}"
    )
    model.cpu()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return recipe, seed, state, dataclasses.asdict(model.config), time.time() - t0


def froc(rows: Sequence[dict[str, Any]], probs: Sequence[np.ndarray], use_fine: bool) -> dict[str, Any]:
    """Per kind: sensitivity at 0.5/1/2/4 FP per case and lesions found at 1 FP by size (``by_size``)."""
    by: dict[str, list] = {}
    for r, p in zip(rows, probs, strict=True):
        sel = np.ones(len(p), bool) if use_fine else ~r["fine"]
        mm, pp, diam = r["mm"][sel], p[sel], r["diam"][sel]
        keep, hits, _ = findings_on_lesions(mm, pp, diam, r["body"], r["lesions"])
        diams = np.array([float(les["diameter_mm"]) for les in r["lesions"]])
        by.setdefault(r["kind"], []).append((pp[keep], hits, len(r["lesions"]), diams))
    out = {}
    for k, items in by.items():
        res: dict[str, Any] = froc_points([it[:3] for it in items])
        thr = threshold_at_1fp([it[:2] for it in items])
        res["by_size"] = {
            b: f"{v['found']}/{v['lesions']}"
            for b, v in sensitivity_by_size([(it[0], it[1], it[3]) for it in items], thr).items()
        }
        out[k] = res
    return out


def _froc_task(task: tuple[list[dict[str, Any]], list[np.ndarray], bool]) -> dict[str, Any]:
    """``froc`` of one (rows, probabilities, fine candidates used) in a pool process."""
    return froc(*task)


def score(state: dict, config: dict, rows: Sequence[dict[str, Any]], ch: Sequence[int], device: str) -> list:
    """Lesion probability of every cached candidate of ``rows`` by one network reading channels ``ch``."""
    import torch

    from models.detector import flipped
    from models.nets import MiniVGG, NetConfig

    m = MiniVGG(NetConfig(**config))
    m.load_state_dict(state)
    m.to(device).eval()
    out = []
    with torch.inference_mode():
        for r in rows:
            x = torch.from_numpy(np.ascontiguousarray(r["x"][:, ch])).float().to(device)
            tta = 4 if r["body"] == "chest" else 1
            views = flipped(x, tta)
            p = sum(torch.softmax(m(v), 1)[:, 1] for v in views) / tta
            out.append(p.float().cpu().numpy())
    return out


def collect_patches(options: SweepOptions, rules: dict | None, say: SweepLog) -> list[dict[str, Any]]:
    """Phase A: the training rows cached as ``.npy`` files in ``options.work``; returns the scoring rows."""
    t0 = time.time()
    tr, ev = plans(options)
    say(f"plan: {len(tr)} training studies, {len(ev)} selection+eval studies")
    context = mp.get_context("fork" if options.phase_a_device == "cpu" else "spawn")  # CUDA needs spawned workers
    with ProcessPoolExecutor(options.jobs, mp_context=context) as pool:
        rows = list(pool.map(partial(study_rows, rules=rules), tr + ev, chunksize=1))
    train_rows, eval_rows = rows[: len(tr)], rows[len(tr) :]
    cached = {"x": "x", "y": "y", "f": "fine", "lm": "lm", "rs": "rs"}  # file name: training-row key
    columns = {name: np.concatenate([r[key] for r in train_rows]) for name, key in cached.items()}
    options.work.mkdir(parents=True, exist_ok=True)
    for name, arr in columns.items():
        np.save(f"{options.work}/{name}.npy", arr)
    y, f, lm, rs = columns["y"], columns["f"], columns["lm"], columns["rs"]
    say(
        f"phase A {time.time() - t0:.0f} s: {len(y)} training patches ({int(y.sum())} positive, "
        f"{int(f.sum())} fine rows, {int(lm.sum())} landmark negatives, {int(rs.sum())} rescanned); "
        f"eval candidates {sum(len(r['x']) for r in eval_rows)}"
    )
    return eval_rows


def train_recipes(options: SweepOptions, say: SweepLog, t0: float) -> dict[str, dict[int, tuple[dict, dict]]]:
    """Phase B: every recipe × seed trained on the cached rows; ``states.pt`` rewritten after each network."""
    import torch

    data = f"{options.work}/x.npy"
    jobs = [
        (r, s, options.device, data, options.epochs, str(options.pretrained))
        for s in range(options.seeds)
        for r in options.recipes
    ]
    results: dict[str, dict[int, tuple[dict, dict]]] = {}
    t1 = time.time()
    with ProcessPoolExecutor(options.gpu_jobs, mp_context=mp.get_context("spawn")) as pool:
        for recipe, seed, state, config, secs in pool.map(train_one, jobs):
            results.setdefault(recipe, {})[seed] = (state, config)
            say(f"trained {recipe} seed {seed} in {secs:.0f} s ({time.time() - t0:.0f} s total)")
            torch.save({f"{r}/{s}": v for r, d in results.items() for s, v in d.items()}, options.out / "states.pt")
    say(f"phase B {time.time() - t1:.0f} s")
    return results


def _mean(prob_lists: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per study, the mean of several networks' probabilities."""
    return [np.mean([ps[i] for ps in prob_lists], axis=0) for i in range(len(prob_lists[0]))]


def score_recipes(
    options: SweepOptions, results: dict[str, dict[int, tuple[dict, dict]]], eval_rows: list[dict[str, Any]]
) -> dict[tuple[str, str, str], list[np.ndarray]]:
    """Phase C's probabilities: per (recipe, set, network or mean), every scoring row's candidates."""
    from models.training.train import load_checkpoint

    card = json.loads((WEIGHTS_DIR / CARD_NAME).read_text())  # the shipped networks, read with the card's views
    files = [WEIGHTS_NAME, *(m["file"] for m in card.get("members", []))]
    shipped_models = [load_checkpoint(WEIGHTS_DIR / n)[0] for n in files]
    shipped = [(m.state_dict(), dataclasses.asdict(m.config)) for m in shipped_models]
    shipped_channels = channels_of(card.get("views", ["planes"]))
    probs: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for role in ("select", "eval"):
        rr = [r for r in eval_rows if r["role"] == role]
        ours = [score(*net, rr, shipped_channels, options.device) for net in shipped]
        probs[("shipped", role, "ensemble")] = _mean(ours)
        pooled = []
        for recipe in options.recipes:
            ch = RECIPES[recipe][0]
            per_seed = [score(*results[recipe][s], rr, ch, options.device) for s in sorted(results[recipe])]
            for s, p in enumerate(per_seed):
                probs[(recipe, role, f"seed{s}")] = p
            probs[(recipe, role, "ensemble")] = _mean(per_seed)
            probs[(recipe, role, "+shipped")] = _mean(per_seed + ours)
            pooled += per_seed
        if len(options.recipes) > 1:
            probs[("pooled", role, "ensemble")] = _mean(pooled)
            probs[("pooled", role, "+shipped")] = _mean(pooled + ours)
    return probs


def run_sweep(options: SweepOptions, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run phases A, B and C; write ``log.txt``, ``states.pt`` and ``summary.json`` to ``options.out``.

    Parameters
    ----------
    options
        The sweep.
    echo
        Where each report line goes besides ``log.txt`` (the CLI prints it; None: the log).

    Returns
    -------
    dict
        ``{recipe: {set: {network or mean: {kind: FROC and by_size}}}}``, as ``summary.json`` holds it.

    """
    say = SweepLog(options.out, echo)
    rules = load_or_fit_rules(options.rules, KINDS, ("eval", "test"))
    t0 = time.time()
    eval_rows = collect_patches(options, rules, say)
    results = train_recipes(options, say, t0)
    probs = score_recipes(options, results, eval_rows)
    say(f"scored {time.time() - t0:.0f} s")
    rows_of = {  # what the FROC reads, without the patches
        role: [{k: v for k, v in r.items() if k != "x"} for r in eval_rows if r["role"] == role]
        for role in ("select", "eval")
    }
    keys = list(probs)
    # the shipped and pooled networks are scored without the fine candidates
    tasks = [(rows_of[role], probs[(recipe, role, name)], recipe in RECIPES and RECIPES[recipe][1])
             for recipe, role, name in keys]  # fmt: skip
    summary: dict[str, Any] = {}
    with ProcessPoolExecutor(options.jobs, mp_context=mp.get_context("fork")) as pool:
        for (recipe, role, name), res in zip(keys, pool.map(_froc_task, tasks), strict=True):
            summary.setdefault(recipe, {}).setdefault(role, {})[name] = res
            say(
                f"{recipe:10s} {role:6s} {name:9s} "
                + "  ".join(f"{k}: " + "/".join(f"{res[k][q]:.2f}" for q in FP_RATES) for k in sorted(res))
                + f"  cta@1fp by size {res.get('head-cta', {}).get('by_size')}"
            )
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"done in {time.time() - t0:.0f} s")
    return summary
