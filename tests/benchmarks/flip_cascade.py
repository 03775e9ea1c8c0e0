"""The detector's flip cascade, measured: what reading only the likely patches in every flip costs and changes.

Run as a script (not collected by pytest): ``.venv/bin/python tests/benchmarks/flip_cascade.py [--studies 8]``.
Chest CT is read with four flips (``models.detector.TTA``); ``Detector.classify`` reads every patch once and the
further flips only where that first probability reaches ``models.detector.TTA_FLOOR``. On held-out chest CTs
(the card's evaluation plan, harmonized) this script reads every candidate in every network and flip once, then
for each floor reports the share of patches read again, the highest full probability among those that were not
(which must stay below the card's chest threshold), and the FROC beside the full reading's.
The anchor is the full reading in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from models.candidates import network_input_and_candidates
from models.detector import TTA_FLOOR, Detector, flipped
from models.patches import extract_views
from models.training.data import (
    HELD_OUT_CONDITIONS,
    SEEDS,
    fit_rules_by_size,
    harmonized,
    rules_for,
    simulated,
    study_plan,
)
from models.training.evaluate import findings_on_lesions, froc_points

FLOORS = (0.005, 0.01, 0.02, 0.05, 0.1)


def every_reading(item: tuple[str, str, int, str], rules: dict) -> tuple:
    """(readings (candidates, networks, flips), candidate centres in mm, diameters, lesions) of one study."""
    torch.set_num_threads(1)
    detector = Detector.load(device="cpu")
    kind, cond, seed, size = item
    study = harmonized(simulated(kind, cond, seed, size), rules_for(rules, size))
    settings = detector.candidate_settings[study.body]
    spacing = study.geometry.spacing
    vol, cands = network_input_and_candidates(study.values, spacing, study.modality, study.body, settings, None)
    mm = detector.patch_mm[study.body]
    x = torch.from_numpy(extract_views(vol, spacing, cands.centres, mm, detector.views, device="cpu"))
    flips = flipped(x, 4)
    reads = np.zeros((len(x), len(detector.models), len(flips)), np.float32)
    with torch.inference_mode():
        for m, model in enumerate(detector.models):
            for f, view in enumerate(flips):
                logits = model(view.contiguous(memory_format=detector.layout)).float()
                reads[:, m, f] = torch.softmax(logits, 1)[:, 1].numpy()
    mm = study.geometry.index_to_patient(cands.centres) if len(cands) else np.zeros((0, 3))
    return reads, mm, cands.diameters_mm, study.truth["lesions"]


def froc(rows: list[tuple], probs: list[np.ndarray]) -> dict[str, float]:
    """Sensitivity at 0.5/1/2/4 FP per case of the studies ``rows`` scored with ``probs``."""
    per_study = []
    for (_, mm, diam, lesions), p in zip(rows, probs, strict=True):
        keep, hits, _ = findings_on_lesions(mm, p, diam, "chest", lesions)
        per_study.append((p[keep], hits, len(lesions)))
    return {k: round(v, 4) for k, v in froc_points(per_study).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8, help="held-out chest CTs per condition")
    parser.add_argument("--base", type=int, default=SEEDS["eval"] + 4000, help="first subject (card's plan)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    plan = study_plan(("chest-ct",), HELD_OUT_CONDITIONS, 4 * args.studies, args.base, "eval")
    rules = fit_rules_by_size(("chest-ct",), ("eval",), progress=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(tqdm(pool.map(every_reading, plan, [rules] * len(plan)), total=len(plan), desc="read"))
    full = [r[0].mean(axis=(1, 2)) for r in rows]
    first = [r[0][:, :, 0].mean(axis=1) for r in rows]
    threshold = Detector.load(device="cpu").thresholds["chest"]
    out = {"studies": len(rows), "candidates": int(sum(len(f) for f in full)), "chest_threshold": threshold}
    out["full_froc"] = froc(rows, full)
    out["floors"] = {}
    for floor in FLOORS:
        again = [f1 >= floor for f1 in first]
        probs = [np.where(a, fu, f1) for a, fu, f1 in zip(again, full, first, strict=True)]
        skipped = np.concatenate([fu[~a] for a, fu in zip(again, full, strict=True)])
        out["floors"][f"{floor:g}"] = {
            "read_again": round(float(np.concatenate(again).mean()), 4),
            "highest_skipped_full_probability": round(float(skipped.max()) if len(skipped) else 0.0, 4),
            "froc": froc(rows, probs),
        }
    out["shipped_floor"] = TTA_FLOOR
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))  # noqa: T201 - a benchmark script reports on stdout


if __name__ == "__main__":
    main()
