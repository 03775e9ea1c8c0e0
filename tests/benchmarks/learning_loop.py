"""Issue 20 (b): does feedback → export → ``learn fit`` → bundle on a second node improve a weak condition?

For one held-out condition (default head-cta/philips-ict-b-lowdose, the lowest head-CTA sensitivity at 1 FP per
case in the shipped card's per-condition figures, 0.80), the shipped detector reads ``--feedback-studies``
simulated studies (harmonized by rules fitted as ``harmonode evaluate`` fits them); a simulated radiologist
who knows the truth accepts every finding that hits a lesion (the evaluation's hit rule) and rejects the
others; each verdict becomes an export record (``storage.exports.build_record``, trigger ``feedback``) POSTed
by the node's own ``handlers.export.post_record`` to a real learning server (``node.web.learning`` on a free
loopback port). ``models.training.head.fit_heads`` fits the heads on what the server kept, the model goes
through a bundle (``models.bundles``: export, import on a second models folder, activate) and is loaded from
there. Both models are then evaluated (``models.training.evaluate.evaluate_detector``) on ``--held-out``
studies of the same condition from other subjects.

Not in the default suite. Run (2 cores shared; a few minutes at the default size)::

    nice -n 10 python tests/benchmarks/learning_loop.py --feedback-studies 12 --held-out 8 --seed 0

What it does not do: the verdicts go straight to the record builder, not through an assessment SR or
``harmonode feedback`` (tests/test_feedback.py covers that path, which makes the same records).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from handlers.export import post_record  # noqa: E402
from models import bundles  # noqa: E402
from models.detector import Detector  # noqa: E402
from models.features import FEATURE_CODEC  # noqa: E402
from models.training.data import fit_rules_by_size, harmonized, rules_for, simulated  # noqa: E402
from models.training.evaluate import FP_RATES, evaluate_detector, lesion_hits  # noqa: E402
from models.training.head import fit_heads, labelled_examples  # noqa: E402
from node.web.learning import learning_server  # noqa: E402
from storage.exports import ExportTrigger, build_record  # noqa: E402
from storage.learning import RecordStore  # noqa: E402


def feedback_records(detector: Detector, kind: str, condition: str, seeds: list[int], size: str, rules: dict) -> list:
    """(record, verdict) for every finding of the shipped detector on the feedback studies."""
    out = []
    for seed in seeds:
        study = harmonized(simulated(kind, condition, seed, size), rules_for(rules, size))
        detection = detector.detect(study.values, study.geometry, study.modality, study.body)
        lesions = study.truth["lesions"]
        for finding, feat in zip(detection.findings, detection.features, strict=True):
            hit = bool(lesion_hits(np.array([finding.center_mm]), lesions).any())
            changed = {"assessment": "accepted" if hit else "rejected", "kind": finding.kind,
                       "diameter_mm": round(finding.diameter_mm, 1)}  # fmt: skip
            result = {"kind": finding.kind, "probability": round(finding.probability, 4),
                      "diameter_mm": round(finding.diameter_mm, 1)}  # fmt: skip
            record = build_record(
                ExportTrigger.FEEDBACK, feat.compressed(), len(feat.vector), FEATURE_CODEC, result, changed,
                feat.reliability, detector.version, f"{kind}/{condition}",
            )  # fmt: skip
            out.append((record, changed["assessment"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="head-cta")
    parser.add_argument("--condition", default="philips-ict-b-lowdose")
    parser.add_argument("--feedback-studies", type=int, default=12)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--size", default="test")
    parser.add_argument("--feedback-from", type=int, default=57_000, help="first feedback subject")
    parser.add_argument("--held-out-from", type=int, default=52_000, help="first held-out subject")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--anchor", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the head fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rules = fit_rules_by_size([args.kind], [args.size], progress=False)
    shipped = Detector.load(device="cpu")
    seeds = list(range(args.feedback_from, args.feedback_from + args.feedback_studies))
    made = feedback_records(shipped, args.kind, args.condition, seeds, args.size, rules)
    with tempfile.TemporaryDirectory() as tmp:
        store = RecordStore(Path(tmp) / "learn")
        token = store.add_node("site-a")
        server = learning_server(store, port=0)
        port = server.start()
        try:
            url = f"http://127.0.0.1:{port}/records"
            for record, _ in made:
                post_record(url, secrets.token_hex(16), json.dumps(record).encode(), token)
        finally:
            server.stop()
        fitted = fit_heads(labelled_examples(store.records()), Path(tmp) / "fitted", epochs=args.epochs,
                           anchor=args.anchor, seed=args.seed)  # fmt: skip
        store.close()
        bundle = bundles.export_bundle(Path(tmp), Path(tmp) / "fitted")
        second = Path(tmp) / "node-b" / "models"
        installed = bundles.import_bundle(bundle, second)
        bundles.activate(second, installed.version)
        learned = Detector.load(device="cpu", weights_dir=bundles.active_weights_dir(second))
        held_out = range(args.held_out_from, args.held_out_from + args.held_out)
        plan = [(args.kind, args.condition, s, args.size) for s in held_out]
        before = evaluate_detector(shipped, plan, rules, progress=False)
        after = evaluate_detector(learned, plan, rules, progress=False)
    verdicts = [v for _, v in made]
    figures = {
        "condition": f"{args.kind}/{args.condition}",
        "size": args.size,
        "feedback_subjects": [seeds[0], seeds[-1]],
        "held_out_subjects": [args.held_out_from, args.held_out_from + args.held_out - 1],
        "records": len(made),
        "accepted": verdicts.count("accepted"),
        "rejected": verdicts.count("rejected"),
        "fit": {"epochs": args.epochs, "anchor": args.anchor, "seed": args.seed, "version": fitted["version"],
                "loss_before_after": fitted["learned_from"]["loss_before_after"]},  # fmt: skip
        "before": {k: before[k] for k in ("sensitivity_at_fp", "auc", "cases", "lesions")},
        "after": {k: after[k] for k in ("sensitivity_at_fp", "auc", "cases", "lesions")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    head = f"{'model':24s} " + " ".join(f"FP{r:>4s}" for r in FP_RATES) + "     AUC"
    print(
        f"{figures['condition']} size {args.size}: {len(made)} records ({figures['accepted']} accepted, "
        f"{figures['rejected']} rejected) from subjects {seeds[0]}-{seeds[-1]}; held out {plan[0][2]}-{plan[-1][2]}"
    )
    print(head)
    for name, r in ((f"shipped {shipped.version}", before), (f"fitted {learned.version}", after)):
        print(f"{name:24s} " + " ".join(f"{r['sensitivity_at_fp'][k]:6.2f}" for k in FP_RATES) + f" {r['auc']:7.4f}")
    print(f"({figures['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
