"""Issue 20 (a): a fixed budget of mined hard examples vs the same budget of randomly converted ones.

The condition: chest-ct/siemens-definition-hr64, the shipped card's weakest (held-out AUC 0.983, sensitivity 0.79
at 1 FP per case). Its parameter store is filled from ``--store`` simulated studies of that condition (subjects
97000+); ``--sources`` labelled studies of the training conditions (subjects 22000+, the chest lesion-training
range) are converted towards the stored sets, harmonized by rules fitted here (``fit_rules``, size test), and
either mined (``models.mining.mine``: kept when the shipped detector's true-class confidence < 0.7, neighbours
within R tried next) or drawn at random (``random_converted``, same budget). A fresh copy of the shipped detector
is fine-tuned on each set (``fine_tune``: the last layers, ``--steps`` steps) and evaluated with
``evaluate_detector`` on ``--held-out`` studies of the condition (subjects 52000+ of the evaluation range).

Not in the default suite. Run (2 cores shared; about 5 minutes)::

    nice -n 10 python tests/benchmarks/mining.py --budget 150 --held-out 6 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.detector import Detector  # noqa: E402
from models.mining import (  # noqa: E402
    MiningOptions,
    candidates_of,
    detector_scorer,
    fine_tune,
    mine,
    random_converted,
    rules_harmonizer,
    store_simulated,
)  # fmt: skip
from models.training.data import TRAIN_CONDITIONS, fit_rules, simulated, study_plan  # noqa: E402
from models.training.evaluate import evaluate_detector  # noqa: E402
from storage.index import Index  # noqa: E402
from storage.parameters import stored_parameters  # noqa: E402


def row(name: str, result: dict, cell: str) -> str:
    r = result["per_condition"][cell]
    s = r["sensitivity_at_fp"]
    return f"| {name} | {r['auc']:.4f} | {s['0.5']:.3f} | {s['1']:.3f} | {s['2']:.3f} | {s['4']:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--condition", default="siemens-definition-hr64")
    parser.add_argument("--store", type=int, default=6, help="simulated studies in the parameter store")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--max-conversions", type=int, default=10)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    kind, cond, size = "chest-ct", args.condition, "test"
    cell = f"{kind}/{cond}"
    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "index.sqlite")
        store_simulated(index, kind, (cond,), args.store, size)
        stored = candidates_of(stored_parameters(index, cell))
        index.close()
    rules = fit_rules((kind,), size=size, progress=False)
    harmonize = rules_harmonizer(rules)
    sources = [simulated(*item) for item in study_plan((kind,), TRAIN_CONDITIONS, args.sources, 22_000, size)]
    held_out = study_plan((kind,), {kind: (cond,)}, args.held_out, 52_000, size)
    options = MiningOptions(budget=args.budget, max_conversions=args.max_conversions, seed=args.seed)
    base = Detector.load("cpu")
    sets = {
        "mined": mine(sources, stored, detector_scorer(base), base.views, options, harmonize, progress=False),
        "random": random_converted(sources, stored, base.views, options, harmonize, progress=False),
    }
    results = {"shipped (before)": evaluate_detector(base, held_out, {size: rules}, progress=False)}
    counts = {}
    for name, mined in sets.items():
        x, y = mined.arrays()
        counts[name] = {"patches": int(len(y)), "lesion_patches": int(y.sum()), "conversions": len(mined.conversions)
                        or args.max_conversions}  # fmt: skip
        detector = Detector.load("cpu")
        fine_tune(detector.models, x, y, args.steps, args.lr, args.seed)
        results[f"+ {name} ({len(y)} patches)"] = evaluate_detector(detector, held_out, {size: rules}, progress=False)
    print(f"cell {cell}; held-out {args.held_out} studies (subjects 52000+, size {size}); seed {args.seed}")
    print(json.dumps(counts))
    print("| model | AUC | sens@0.5FP | @1FP | @2FP | @4FP |\n|---|---|---|---|---|---|")
    for name, result in results.items():
        print(row(name, result, cell))
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
