"""How much of the detector's miss rate is the scanner shift: the same FROC on training and held-out scanners.

Run as a script (not collected by pytest): ``.venv/bin/python tests/benchmarks/shift_gap.py [--smooth 0 0.4]``.
Scores new head CTA (and TOF) studies of the training conditions (subjects 57000+ or ``--training-from``, never
used in training or calibration) beside the card's held-out plan (subjects 52000+, as ``harmonode evaluate``),
rules applied to both, and prints sensitivity at 1 FP per case per condition. ``--smooth`` also scores the
held-out CTA after a Gaussian smoothing of σ mm (the test-time noise matching measured in README → Detection;
not in the product); ``--noise`` prints each condition's soft-tissue high-pass noise after harmonization.
``--weights-dir`` scores another card, ``--training-only`` the training scanners alone. The anchor is the
training scanners' figure in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from models.detector import Detector
from models.training.data import (
    HELD_OUT_CONDITIONS,
    SEEDS,
    TRAIN_CONDITIONS,
    fit_rules_by_size,
    harmonized,
    simulated,
    study_plan,
)
from models.training.evaluate import evaluate_detector


class SmoothedDetector(Detector):
    """The shipped detector reading a Gaussian-smoothed copy of every series (σ in mm)."""

    sigma_mm = 0.0

    def score(self, values: np.ndarray, geometry: Any, modality: str, body: str) -> tuple:
        """``Detector.score`` of the smoothed values."""
        if self.sigma_mm > 0:
            sigmas = [self.sigma_mm / s for s in geometry.spacing]
            values = ndi.gaussian_filter(np.asarray(values, np.float32), sigmas, mode="nearest")
        return super().score(values, geometry, modality, body)


def soft_tissue_noise(values: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Robust std (HU) of the 1 mm high-pass of the voxels between -50 and 150 HU."""
    v = np.asarray(values, np.float32)
    high = v - ndi.gaussian_filter(v, [1.0 / s for s in spacing])
    sel = high[(v > -50) & (v < 150)]
    return float(1.4826 * np.median(np.abs(sel - np.median(sel))))


def at_1fp(result: dict[str, Any]) -> dict[str, float]:
    """Sensitivity at 1 FP per case: overall, per kind and per condition."""
    out = {"all": round(result["sensitivity_at_fp"]["1"], 3)}
    out.update({k: round(v["sensitivity_at_fp"]["1"], 3) for k, v in result["per_kind"].items()})
    out.update({k: round(v["sensitivity_at_fp"]["1"], 3) for k, v in result["per_condition"].items()})
    return out


def held_out_figures(detector: Detector, rules: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The held-out scanners' figures: sensitivity at 1 FP, with ``--smooth`` and ``--noise`` when asked."""
    n = args.studies
    held_out = study_plan(("head-cta",), HELD_OUT_CONDITIONS, n * 4, SEEDS["eval"] + 2000, "eval")
    held_out += study_plan(("head-mra",), HELD_OUT_CONDITIONS, n * 2, SEEDS["eval"] + 3000, "eval")
    out: dict[str, Any] = {"held_out_scanners": at_1fp(evaluate_detector(detector, held_out, rules, jobs=args.jobs))}
    cta = [item for item in held_out if item[0] == "head-cta"]
    for sigma in args.smooth:
        smoothed = SmoothedDetector(detector.models, detector.card, detector.device)
        smoothed.sigma_mm = sigma
        out[f"held_out_cta_smoothed_{sigma:g}mm"] = at_1fp(evaluate_detector(smoothed, cta, rules, jobs=args.jobs))
    if args.noise:
        conditions = TRAIN_CONDITIONS["head-cta"] + HELD_OUT_CONDITIONS["head-cta"]
        out["soft_tissue_noise_hu"] = {
            c: [
                round(soft_tissue_noise(st.values, st.geometry.spacing), 1)
                for st in (harmonized(simulated("head-cta", c, s, "eval"), rules["eval"]) for s in (57100, 57101))
            ]
            for c in conditions
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8, help="studies per condition")
    parser.add_argument("--smooth", type=float, nargs="*", default=[], help="σ (mm) for the held-out CTA")
    parser.add_argument("--noise", action="store_true", help="soft-tissue noise per condition (2 studies each)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--weights-dir", help="another card's folder (default: the shipped card)")
    parser.add_argument(
        "--training-from", type=int, default=57000, help="first training-scanner subject (TOF from here + 500)"
    )
    parser.add_argument("--training-only", action="store_true", help="score the training scanners only")
    args = parser.parse_args()
    t0 = time.perf_counter()
    detector = Detector.load(device="cpu", weights_dir=args.weights_dir)
    rules = fit_rules_by_size(("head-cta", "head-mra"), ("eval",))
    n = args.studies
    training = study_plan(("head-cta",), TRAIN_CONDITIONS, n * 4, args.training_from, "eval")
    training += study_plan(("head-mra",), TRAIN_CONDITIONS, n * 2, args.training_from + 500, "eval")
    out: dict[str, Any] = {
        "model": detector.version,
        "training_scanners": at_1fp(evaluate_detector(detector, training, rules, jobs=args.jobs)),
    }
    if not args.training_only:
        out.update(held_out_figures(detector, rules, args))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))  # noqa: T201 - a benchmark script reports on stdout


if __name__ == "__main__":
    main()
