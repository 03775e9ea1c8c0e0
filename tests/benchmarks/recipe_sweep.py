"""Detector recipe sweep (issue 6): patch views (planes / zoom / mip) × fine candidates × seeds, on one GPU.

Run on demand, not by pytest: ``python tests/benchmarks/recipe_sweep.py [--rules rules.pkl]`` (8 minutes on a
16-core machine with one H100/H200; hours on 2 CPU cores). Results go to ``$OUT`` (default /tmp/sweep_out):
``log.txt``, ``summary.json`` and ``states.pt`` (every network's weights, ``recipe/seed``).

Phase A (a pool of CPU processes): network a's training studies (``harmonode train lesions`` defaults: 40 subjects
per kind with 4 lesions at size eval + 6 per kind at size test), a selection set (8 studies per held-out condition,
subjects 55000+) and the model card's held-out set (the same plan as ``harmonode evaluate``, subjects 52000+); every
candidate (with the head's 100 fine-scale extras flagged) cut in all twelve channels, plus jittered negatives at the
head's normal vessel landmarks (``--landmark-negatives``, flagged). ``--head-studies`` and ``--lesions`` set the
training data's size (network b: 72 and 5); ``--phase-a-device cuda`` finds candidates and cuts patches on the GPU
(spawned workers). Phase B (processes sharing the GPU): one network per recipe and seed, network a's recipe
(``train_classifier``: landmark trunk, 16 epochs, 5 mined negatives per positive, flips). A recipe is views (base,
zoom, mip, all = the three, wide = planes + wide, every = all four) with optional ``+fine`` (fine candidates) and
``+lm`` (landmark negatives) and ``+rs`` (with ``--rescan``: every training CT study also rescanned through a
random kernel and dose, ``models.train.rescanned``; the held-out low-dose and sharp scanners are noisier than the
training ones even after harmonization). Phase C: FROC per kind on both sets, each network, the mean of each
recipe's seeds, that mean with the shipped networks, and all recipes pooled.
"""

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

OUT = os.environ.get("OUT", "/tmp/sweep_out")
_LOG: list = []  # the log file, opened on the first line said (importing this module writes nothing)


def say(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    if not _LOG:
        os.makedirs(OUT, exist_ok=True)
        _LOG.append(open(os.path.join(OUT, "log.txt"), "a"))
    _LOG[0].write(msg + "\n")
    _LOG[0].flush()


RULES: dict = {}
ALL = ("planes", "zoom", "mip", "wide")  # the cached channels: 3 per view, in this order
#: The views each recipe's networks read (``card_from_sweep.py`` writes them into the card).
RECIPE_VIEWS = {
    "base": ("planes",),
    "zoom": ("planes", "zoom"),
    "mip": ("planes", "mip"),
    "all": ("planes", "zoom", "mip"),
    "wide": ("planes", "wide"),
    "every": ALL,
}


def channels_of(views):
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
#: shipped networks' top false positives sit. ``--landmark-negatives`` adds jittered negatives there.
VESSEL_LANDMARKS = ("ica_", "mca_", "ophthalmic_", "pcomm_", "a1_", "sca_", "pica_", "basilar_", "vertebro", "acomm_")


def init_worker(rules):
    """Pool initializer: spawned workers get the rules (forked ones have them already)."""
    RULES.update(rules)


def landmark_negatives(st, rng, copies):
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


def training_rows(st, cfg, rng, lm_copies, device, rescanned=False):
    """One training study's patches (all twelve channels) and labels, flagged: fine candidates, landmark
    negatives, and whether the study was rescanned (``--rescan``)."""
    from models import train as T
    from models.candidates import network_input_and_candidates
    from models.patches import PATCH_MM, extract_views

    vol, c = network_input_and_candidates(st.values, st.geometry.spacing, st.modality, st.body, cfg, device)
    fine = np.zeros(len(c), bool)
    if c.fine:
        fine[-c.fine :] = True
    lab = T.candidate_labels(st, c.centres)
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


def study_rows(item):
    import torch

    torch.set_num_threads(1)
    from models import train as T
    from models.candidates import network_input_and_candidates, settings_for
    from models.patches import PATCH_MM, extract_views

    role, kind, cond, seed, size, n_les, fine_n, lm_copies, rescan, device = item
    st = T.harmonized(T.simulated(kind, cond, seed, size, n_les), T.rules_for(RULES, size))
    cfg = settings_for(st.body, fine_n if st.body == "head" else 0)
    if role == "train":
        rng = np.random.default_rng(seed)
        parts = [training_rows(st, cfg, rng, lm_copies, device)]
        if rescan and st.modality == "CT":  # the same subject once more, through a random kernel and dose
            parts.append(training_rows(T.rescanned(st, rng), cfg, rng, lm_copies, device, rescanned=True))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    vol, c = network_input_and_candidates(st.values, st.geometry.spacing, st.modality, st.body, cfg, device)
    fine = np.zeros(len(c), bool)
    if c.fine:
        fine[-c.fine :] = True
    lab = T.candidate_labels(st, c.centres)
    x = extract_views(vol, st.geometry.spacing, c.centres, PATCH_MM[st.body], ALL, device=device).astype(np.float16)
    mm = st.geometry.index_to_patient(c.centres) if len(c) else np.zeros((0, 3))
    return dict(
        role=role,
        kind=kind,
        cond=cond,
        body=st.body,
        x=x,
        mm=mm,
        diam=c.diameters_mm,
        fine=fine,
        labels=lab,
        lesions=st.truth["lesions"],
    )


def plans(args):
    from models import train as T

    kinds = ("head-cta", "head-mra", "chest-ct")
    extra = (args.fine, args.landmark_negatives, args.rescan, args.phase_a_device)
    tr = [
        ("train", k, c, s, z, args.lesions, *extra)
        for k, c, s, z in T.lesion_training_plan(
            args.studies, args.subjects_from, "eval", args.test_studies, args.head_studies
        )
    ]
    ev = []
    for role, base in (("select", 55000), ("eval", 52000)):
        for ki, kind in enumerate(kinds):
            n = args.per_cond * len(T.HELD_OUT_CONDITIONS[kind])
            ev += [
                (role, k, c, s, z, None, *extra)
                for k, c, s, z in T.study_plan((kind,), T.HELD_OUT_CONDITIONS, n, base + 1000 * ki, "eval")
            ]
    return tr, ev


def train_one(job):
    recipe, seed, device, data, epochs, pretrained = job
    import torch

    torch.set_num_threads(2)
    from models import train as T

    ch, use_fine, use_lm, use_rs = RECIPES[recipe]
    d = np.load(data, mmap_mode="r")
    y = np.load(data.replace("x.npy", "y.npy"))
    f = np.load(data.replace("x.npy", "f.npy"))
    lm = np.load(data.replace("x.npy", "lm.npy"))
    rs = np.load(data.replace("x.npy", "rs.npy"))
    rows = np.flatnonzero((use_fine | ~f) & (use_lm | ~lm) & (use_rs | ~rs))
    x = np.ascontiguousarray(d[rows][:, ch])
    y = y[rows]
    model, _ = T.load_checkpoint(pretrained)
    model.replace_head(2)
    if len(ch) > 3:
        model.widen_input(len(ch))
    t0 = time.time()
    T.train_classifier(
        model, x, y, epochs, seed, lr=1e-3, flips=True, balance=True, mine=5, device=device, desc=f"{recipe}/{seed}"
    )
    model.cpu()
    return (
        recipe,
        seed,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        dataclasses.asdict(model.config),
        time.time() - t0,
    )


def froc(rows, probs, use_fine):
    from models import train as T

    by = {}
    for r, p in zip(rows, probs, strict=True):
        sel = np.ones(len(p), bool) if use_fine else ~r["fine"]
        mm, pp, diam = r["mm"][sel], p[sel], r["diam"][sel]
        keep, hits, _ = T.findings_on_lesions(mm, pp, diam, r["body"], r["lesions"])
        diams = np.array([float(les["diameter_mm"]) for les in r["lesions"]])
        by.setdefault(r["kind"], []).append((pp[keep], hits, len(r["lesions"]), diams))
    out = {}
    for k, items in by.items():
        res = T.froc_points([it[:3] for it in items])
        thr = T.threshold_at_1fp([it[:2] for it in items])
        res["by_size"] = {
            b: f"{v['found']}/{v['lesions']}"
            for b, v in T.sensitivity_by_size([(it[0], it[1], it[3]) for it in items], thr).items()
        }
        out[k] = res
    return out


def score(state, config, rows, ch, device):
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


EVAL_ROWS, PROBS = [], {}


def froc_task(key):
    recipe, role, _ = key
    rr = [r for r in EVAL_ROWS if r["role"] == role]
    return froc(rr, PROBS[key], RECIPES.get(recipe, ([], False, False, False))[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=40, help="training subjects per kind")
    ap.add_argument("--head-studies", type=int, help="training subjects per head kind (default: --studies)")
    ap.add_argument("--lesions", type=int, default=4, help="lesions per training subject")
    ap.add_argument("--subjects-from", type=int, default=20000, help="first training subject (as train lesions)")
    ap.add_argument("--pretrained", default="models/weights/landmarks.pt", help="landmark trunk to start from")
    ap.add_argument("--landmark-negatives", type=int, default=3, help="jittered negatives per vessel landmark")
    ap.add_argument(
        "--rescan", action="store_true", help="each training CT study also rescanned (recipes +rs train on both)"
    )
    ap.add_argument("--phase-a-device", default="cpu", help="candidates and patches on this device (cuda: GPU)")
    ap.add_argument("--test-studies", type=int, default=6)
    ap.add_argument("--per-cond", type=int, default=8)
    ap.add_argument("--fine", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--gpu-jobs", type=int, default=6)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/sweep")
    ap.add_argument("--rules", help="pickle of fit_rules_by_size(kinds, ('eval', 'test')) (default: fit them)")
    args = ap.parse_args()
    from models import train as T

    T.check_subjects_from(args.subjects_from)  # never train on the rules', landmarks' or evaluation's subjects

    RULES.update(
        pickle.load(open(args.rules, "rb"))
        if args.rules
        else T.fit_rules_by_size(("head-cta", "head-mra", "chest-ct"), ("eval", "test"))
    )
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    tr, ev = plans(args)
    say(f"plan: {len(tr)} training studies, {len(ev)} selection+eval studies")
    context = mp.get_context("fork" if args.phase_a_device == "cpu" else "spawn")  # CUDA needs spawned workers
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=init_worker, initargs=(RULES,)) as pool:
        rows = list(pool.map(study_rows, tr + ev, chunksize=1))
    train_rows, eval_rows = rows[: len(tr)], rows[len(tr) :]
    x = np.concatenate([r["x"] for r in train_rows])
    y = np.concatenate([r["y"] for r in train_rows])
    f = np.concatenate([r["fine"] for r in train_rows])
    lm = np.concatenate([r["lm"] for r in train_rows])
    rs = np.concatenate([r["rs"] for r in train_rows])
    for name, arr in (("x", x), ("y", y), ("f", f), ("lm", lm), ("rs", rs)):
        np.save(f"{args.work}/{name}.npy", arr)
    say(
        f"phase A {time.time() - t0:.0f} s: {len(y)} training patches ({int(y.sum())} positive, "
        f"{int(f.sum())} fine rows, {int(lm.sum())} landmark negatives, {int(rs.sum())} rescanned); "
        f"eval candidates {sum(len(r['x']) for r in eval_rows)}"
    )
    del x, rows
    recipes = args.recipes.split(",")
    data = f"{args.work}/x.npy"
    jobs = [(r, s, args.device, data, args.epochs, args.pretrained) for s in range(args.seeds) for r in recipes]
    results = {}
    t1 = time.time()
    with ProcessPoolExecutor(args.gpu_jobs, mp_context=mp.get_context("spawn")) as pool:
        for recipe, seed, state, config, secs in pool.map(train_one, jobs):
            results.setdefault(recipe, {})[seed] = (state, config)
            say(f"trained {recipe} seed {seed} in {secs:.0f} s ({time.time() - t0:.0f} s total)")
            import torch

            torch.save({f"{r}/{s}": v for r, d in results.items() for s, v in d.items()}, f"{OUT}/states.pt")
    say(f"phase B {time.time() - t1:.0f} s")
    global EVAL_ROWS, PROBS
    EVAL_ROWS = eval_rows
    PROBS = {}
    card = json.load(open("models/weights/lesion.json"))  # the shipped networks, read with the card's views
    files = ["lesion.pt", *(m["file"] for m in card.get("members", []))]
    shipped = [T.load_checkpoint(f"models/weights/{n}")[0] for n in files]
    shipped = [(m.state_dict(), dataclasses.asdict(m.config)) for m in shipped]
    shipped_channels = channels_of(card.get("views", ["planes"]))

    def mean(prob_lists):
        return [np.mean([ps[i] for ps in prob_lists], axis=0) for i in range(len(prob_lists[0]))]

    for role in ("select", "eval"):
        rr = [r for r in eval_rows if r["role"] == role]
        ours = [score(*net, rr, shipped_channels, args.device) for net in shipped]
        PROBS[("shipped", role, "ensemble")] = mean(ours)
        pooled = []
        for recipe in recipes:
            ch = RECIPES[recipe][0]
            per_seed = [score(*results[recipe][s], rr, ch, args.device) for s in sorted(results[recipe])]
            for s, probs in enumerate(per_seed):
                PROBS[(recipe, role, f"seed{s}")] = probs
            PROBS[(recipe, role, "ensemble")] = mean(per_seed)
            PROBS[(recipe, role, "+shipped")] = mean(per_seed + ours)
            pooled += per_seed
        if len(recipes) > 1:
            PROBS[("pooled", role, "ensemble")] = mean(pooled)
            PROBS[("pooled", role, "+shipped")] = mean(pooled + ours)
    say(f"scored {time.time() - t0:.0f} s")
    summary = {}
    keys = list(PROBS)
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
        for key, res in zip(keys, pool.map(froc_task, keys), strict=True):
            recipe, role, name = key
            summary.setdefault(recipe, {}).setdefault(role, {})[name] = res
            say(
                f"{recipe:10s} {role:6s} {name:9s} "
                + "  ".join(
                    f"{k}: " + "/".join(f"{res[k][q]:.2f}" for q in ("0.5", "1", "2", "4")) for k in sorted(res)
                )
                + f"  cta@1fp by size {res.get('head-cta', {}).get('by_size')}"
            )
    json.dump(summary, open(f"{OUT}/summary.json", "w"), indent=1)
    say(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
