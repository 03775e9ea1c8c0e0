"""Ship a recipe of a recipe sweep as the detector's weights: checkpoints, calibrated thresholds, model card.

Run on demand: ``python tests/benchmarks/card_from_sweep.py STATES --recipe all --version 1.3.0`` where STATES
is the ``states.pt`` a ``recipe_sweep.py`` run wrote (``recipe/seed`` → weights). Every seed of the recipe
becomes one network of the card (``lesion.pt``, then ``lesion-b.pt``, ``lesion-c.pt`` … as ``members``); the
thresholds are calibrated on validation studies of the training conditions with the networks averaged
(``models.train.calibrate_thresholds``, a few minutes on 2 CPU cores); the card keeps the previous card's
fields that still hold (task, patch size, flips, conditions, the transfer-vs-scratch measurement) and says how
the networks were trained (``--sweep-command``, ``--data``, ``--trained-on``). Then run ``harmonode evaluate
--update-card`` to store the held-out FROC in it. Cards 1.3.0 (``--recipe all``) and 1.4.0 (``--recipe all+rs``,
from a sweep run with ``--rescan``) were made so (README → Detection).
"""

import argparse
import copy
import datetime as dt
import json
import pickle
import string
from pathlib import Path

import torch
from recipe_sweep import RECIPE_VIEWS  # this folder is on sys.path when the script runs

from models import train as T
from models.detector import sha256_of
from models.nets import MiniVGG, NetConfig
from node.cli.models import write_card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("states", type=Path, help="states.pt of a recipe_sweep.py run")
    ap.add_argument("--recipe", default="all", help="the recipe whose seeds become the card's networks")
    ap.add_argument("--version", required=True, help="the card's version")
    ap.add_argument("--weights", type=Path, default=Path("models/weights"), help="folder of the card")
    ap.add_argument("--rules", type=Path, help="pickle of fit_rules_by_size(kinds, ('eval', 'test')) (default: fit)")
    ap.add_argument("--sweep-command", required=True, help="the recipe_sweep.py command that trained them")
    ap.add_argument("--data", required=True, help="what the networks were trained on, in words")
    ap.add_argument("--trained-on", default="", help="the machine, in words")
    ap.add_argument("--studies-per-kind", default="{}", help='JSON, e.g. {"head-cta": 400, "chest-ct": 72}')
    ap.add_argument("--lesions-per-study", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base, fine, lm = args.recipe.partition("+")[0], "+fine" in args.recipe, "+lm" in args.recipe
    if fine or lm or base not in RECIPE_VIEWS:
        raise SystemExit(f"recipe {args.recipe!r}: only views recipes ({', '.join(RECIPE_VIEWS)}) can be shipped")
    views = list(RECIPE_VIEWS[base])
    states = torch.load(args.states, weights_only=False)
    seeds = sorted(int(k.split("/")[1]) for k in states if k.split("/")[0] == args.recipe)
    if not seeds:
        raise SystemExit(f"no networks of recipe {args.recipe!r} in {args.states}: {sorted(states)}")
    files = ["lesion.pt"] + [f"lesion-{string.ascii_lowercase[i]}.pt" for i in range(1, len(seeds))]
    old = json.loads((args.weights / "lesion.json").read_text())
    per_kind = json.loads(args.studies_per_kind)
    models = []
    for seed, name in zip(seeds, files, strict=True):
        state, config = states[f"{args.recipe}/{seed}"]
        model = MiniVGG(NetConfig(**config))
        model.load_state_dict(state)
        models.append(model.eval())
        metrics = {
            "shipped_init": "transfer", "seed": seed, "studies_per_kind": per_kind, "size": "eval",
            "lesions_per_training_study": args.lesions_per_study, "epochs": args.epochs, "views": views,
            "hard_negative_ratio": 5, "trained_on": args.trained_on, "recipe": args.recipe,
        }  # fmt: skip
        T.save_checkpoint(model, args.weights / name, {"task": "lesion", "init": "transfer", "metrics": metrics})
    rules = (
        pickle.load(open(args.rules, "rb"))
        if args.rules
        else T.fit_rules_by_size(("head-cta", "head-mra", "chest-ct"), ("eval", "test"))
    )
    thresholds = T.calibrate_thresholds(models, rules, seed=0, studies=8, size="eval", views=views)
    print("thresholds", thresholds, flush=True)
    _, landmarks = T.load_checkpoint(args.weights / "landmarks.pt")
    drop = ("file", "sha256", "size_bytes", "members", "evaluation", "metrics")
    card = {k: v for k, v in old.items() if k not in drop}
    card.update({
        "version": args.version,
        "created": dt.date.today().isoformat(),
        "threshold": thresholds,
        "threshold_note": (
            "probability at one false positive per case on validation studies of the training conditions (8 per "
            f"kind, size eval; models.train.calibrate_thresholds with the {len(models)} networks averaged; head: "
            "the lower of CTA and MRA)"
        ),
        "views": views,
        "fine_candidates": {},
        "ensemble": (
            f"the probability is the mean of {len(models)} networks trained alike (seeds "
            f"{', '.join(map(str, seeds))}) on the same simulated subjects: {', '.join(files)}"
        ),
    })  # fmt: skip
    training = copy.deepcopy(old.get("training", {}))
    training.update({
        "command": (
            f"harmonode train landmarks --studies 8 --epochs 12 --seed 0 && {args.sweep_command} && "
            f"python tests/benchmarks/card_from_sweep.py states.pt --recipe {args.recipe} --version {args.version}"
        ),
        "data": args.data,
        "studies_per_kind": per_kind,
        "lesions_per_study": args.lesions_per_study,
        "epochs": args.epochs,
        "views": views,
        "trained_on": args.trained_on,
        "rescan_augmentation": T.RESCAN_NOTE if "+rs" in args.recipe else None,
        "landmark_pretraining": landmarks.get("metrics", {}),
    })  # fmt: skip
    card["training"] = training
    card["metrics"] = {
        "threshold_at_1fp_validation": thresholds,
        **{name: torch.load(args.weights / name, weights_only=True)["metrics"] for name in files},
    }
    card["members"] = [
        {"file": n, "sha256": sha256_of(args.weights / n), "size_bytes": (args.weights / n).stat().st_size}
        for n in files[1:]
    ]
    print(write_card(args.weights / "lesion.pt", card))


if __name__ == "__main__":
    main()
