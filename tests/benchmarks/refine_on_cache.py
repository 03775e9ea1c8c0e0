"""What the sac-tight misses are, and test-time position refinements measured on a saved evaluation.

Run as a script (not collected by pytest), on the caches of one ``harmonode evaluate --save-candidates CACHE
--sim-cache SIMS`` run (README → Detection):
``.venv/bin/python tests/benchmarks/refine_on_cache.py CACHE SIMS``. Prints, for the head aneurysms at the 1 FP
per case threshold, which are found sac-tight, which only by the reach rule (a finding beside the sac) and
whether any candidate lies inside each missed sac; then the sac-tight FROC (1/4 and 1 FP, CPM) with each kept
finding moved (to the probability-weighted centroid of nearby candidates, to the smallest nearby blob, to the
strongest Hessian blob on the harmonized volume) and with other NMS radii. No network runs; the volumes come
from the simulation cache. With ``--network`` instead: each finding moved to the peak of the network's
probability on a 1 mm grid around it (minutes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.training.candidate_cache import cached_rules, cached_simulation, load_candidates
from models.training.data import KINDS, harmonized, rules_for
from models.training.evaluate import Refine, Scoring, StudyCandidates, findings_on_lesions, summarize
from models.training.hits import SAC_TIGHT

HEAD = ("head-cta", "head-mra")


def figures(result: dict[str, Any]) -> dict[str, str]:
    """Sac-tight 1/4 and 1 FP and CPM per head kind, the reach rule's 1 FP beside."""
    out = {}
    for kind in HEAD:
        k = result["per_kind"][kind]
        s = k["sensitivity_at_fp"]
        reach = k["second"]["sensitivity_at_fp"]["1"]
        out[kind] = f"{s['0.25']:.2f}/{s['1']:.2f} cpm {k['cpm']:.3f} (reach {reach:.2f})"
    return out


def misses(records: list[StudyCandidates], thresholds: dict[str, float]) -> None:
    """Print the head lesions found by the reach rule only, and those missed by both, at the 1-FP thresholds."""
    found = {"sac-tight": 0, "reach": 0, "all": 0}
    for rec in records:
        keep, hits, _ = findings_on_lesions(rec.centres_mm, rec.probs, rec.blob_mm, rec.body, rec.lesions, SAC_TIGHT)
        above = rec.probs[keep] >= thresholds[rec.kind]
        for li, les in enumerate(rec.lesions):
            centre, d = np.asarray(les["center_mm"]), float(les["diameter_mm"])
            dist = np.linalg.norm(rec.centres_mm[keep] - centre, axis=1)
            inside = np.linalg.norm(rec.centres_mm - centre, axis=1) < d / 2
            tight, reach = bool((hits[:, li] & above).any()), bool(((dist <= max(d / 2, 3) + 1.5) & above).any())
            found["all"] += 1
            found["sac-tight"] += tight
            found["reach"] += reach
            if not tight:
                nearest = float(dist[above].min()) if above.any() else float("nan")
                print(
                    f"  {'beside' if reach else 'missed'} {rec.kind} {d:4.1f} mm {les.get('place', '')}: nearest "
                    f"finding {nearest:.1f} mm, candidates inside the sac {int(inside.sum())}"
                )
    print("head aneurysms at 1 FP per case:", json.dumps(found))


def centroid(radius_mm: float, share: float) -> Refine:
    """Each head finding to the probability-weighted centroid of the candidates within ``radius_mm`` scoring
    at least ``share`` of its own probability."""

    def refine(rec: StudyCandidates, keep: np.ndarray) -> np.ndarray:
        out = rec.centres_mm[keep].copy()
        if rec.body == "head":
            for n, i in enumerate(keep):
                near = np.linalg.norm(rec.centres_mm - rec.centres_mm[i], axis=1) <= radius_mm
                sel = near & (rec.probs >= share * rec.probs[i])
                w = rec.probs[sel].astype(float)
                if w.sum() > 0:
                    out[n] = (rec.centres_mm[sel] * w[:, None]).sum(0) / w.sum()
        return out

    return refine


def smallest_blob(radius_mm: float, share: float) -> Refine:
    """Each head finding to the smallest candidate blob within ``radius_mm`` scoring ``share`` of it."""

    def refine(rec: StudyCandidates, keep: np.ndarray) -> np.ndarray:
        out = rec.centres_mm[keep].copy()
        if rec.body == "head":
            for n, i in enumerate(keep):
                near = np.linalg.norm(rec.centres_mm - rec.centres_mm[i], axis=1) <= radius_mm
                sel = np.flatnonzero(near & (rec.probs >= share * rec.probs[i]))
                out[n] = rec.centres_mm[sel[np.lexsort((-rec.probs[sel], rec.blob_mm[sel]))[0]]]
        return out

    return refine


def blobness(crop: np.ndarray, spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """σ²-normalised Hessian blob response: minus the largest eigenvalue where all three are negative."""
    sig = [sigma_mm / s for s in spacing]
    hessian = np.empty(crop.shape + (3, 3))
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            d2 = ndimage.gaussian_filter(crop, sig, order=order) / (spacing[i] * spacing[j])
            hessian[..., i, j] = hessian[..., j, i] = d2
    top = np.linalg.eigvalsh(hessian)[..., 2]
    return np.where(top < 0, -top, 0.0) * sigma_mm**2


def hessian_blob(sims: Path, rules: dict, radius_mm: float, sigma_mm: float, gain: float, max_blob_mm: float) -> Refine:
    """Each head finding (blob ≤ ``max_blob_mm``) to the strongest Hessian blob within ``radius_mm`` on the
    harmonized volume, when it is ``gain`` times the response at the finding."""
    loaded: dict[tuple, Any] = {}

    def refine(rec: StudyCandidates, keep: np.ndarray) -> np.ndarray:
        out = rec.centres_mm[keep].copy()
        if rec.body != "head":
            return out
        key = (rec.kind, rec.condition, rec.seed, rec.size)
        if key not in loaded:
            loaded.clear()
            source = cached_simulation(rec.kind, rec.condition, rec.seed, rec.size, sims)
            loaded[key] = harmonized(source, rules_for(rules, rec.size))
        study = loaded[key]
        values, spacing = study.values.astype(np.float32), np.asarray(study.geometry.spacing, float)
        half = np.ceil((radius_mm + 3 * sigma_mm) / spacing).astype(int)
        for n, i in enumerate(keep):
            if rec.probs[i] < 0.05 or rec.blob_mm[i] > max_blob_mm:
                continue
            c = np.round(rec.centres_index[i]).astype(int)
            lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, values.shape)
            b = blobness(values[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], spacing, sigma_mm)
            grid = np.stack(np.meshgrid(*[np.arange(a, z) for a, z in zip(lo, hi, strict=True)], indexing="ij"), -1)
            at = b[tuple(np.clip(c - lo, 0, np.array(b.shape) - 1))]
            b = np.where(np.linalg.norm((grid - rec.centres_index[i]) * spacing, axis=-1) <= radius_mm, b, -1.0)
            if b.max() > 0 and b.max() > gain * at:
                best = grid[np.unravel_index(np.argmax(b), b.shape)]
                out[n] = study.geometry.index_to_patient(np.asarray(best, float)[None])[0]
        return out

    return refine


def probability_peak(detector: Any, sims: Path, rules: dict, radius_mm: float, step_mm: float, min_p: float) -> Refine:
    """Each head finding scoring ``min_p`` or more to the maximum of the network's probability on a grid of
    ``step_mm`` within ``radius_mm`` around it (the finding's own score stays: only its position moves)."""
    from models.candidates import network_input_and_candidates
    from models.patches import extract_views

    span = np.arange(-radius_mm, radius_mm + 1e-6, step_mm)
    offsets = np.stack(np.meshgrid(span, span, span, indexing="ij"), -1).reshape(-1, 3)
    offsets = offsets[np.linalg.norm(offsets, axis=1) <= radius_mm + 1e-6]

    def refine(rec: StudyCandidates, keep: np.ndarray) -> np.ndarray:
        out = rec.centres_mm[keep].copy()
        chosen = [n for n, i in enumerate(keep) if rec.probs[i] >= min_p]
        if rec.body != "head" or not chosen:
            return out
        source = cached_simulation(rec.kind, rec.condition, rec.seed, rec.size, sims)
        study = harmonized(source, rules_for(rules, rec.size))
        spacing = np.asarray(study.geometry.spacing, float)
        settings = detector.candidate_settings[rec.body]
        volume, _ = network_input_and_candidates(study.values, spacing, study.modality, rec.body, settings)
        points = np.concatenate([rec.centres_index[keep[n]] + offsets / spacing for n in chosen])
        patches = extract_views(volume, spacing, points, detector.patch_mm[rec.body], detector.views)
        probs = detector.classify(patches, tta=detector.tta[rec.body]).reshape(len(chosen), len(offsets))
        best = points.reshape(len(chosen), len(offsets), 3)[np.arange(len(chosen)), probs.argmax(axis=1)]
        out[chosen] = study.geometry.index_to_patient(best)
        return out

    return refine


def main(cache: Path, sims: Path) -> None:
    manifest, readings = load_candidates(cache)
    head = [r for r in readings["harmonized"] if r.kind in HEAD]
    base = summarize(head)
    print("baseline", json.dumps(figures(base)))
    misses(head, {kind: base["per_kind"][kind]["threshold_at_1fp"] for kind in HEAD})
    rules = cached_rules(KINDS, (manifest["size"],), sims, progress=False)
    variants: dict[str, Scoring] = {}
    for radius in (3.0, 4.5):
        for share in (0.5, 0.95):
            variants[f"centroid {radius} mm, p >= {share} p"] = Scoring(refine=centroid(radius, share))
            variants[f"smallest blob {radius} mm, p >= {share} p"] = Scoring(refine=smallest_blob(radius, share))
    blobs = ((2, 0.8, 0, 99), (3, 1.2, 0, 99), (4.5, 2.0, 0, 99), (3, 0.8, 2, 5), (4, 0.8, 4, 5))
    for radius, sigma, gain, max_blob in blobs:
        name = f"hessian blob {radius} mm, sigma {sigma} mm, gain {gain}, blob <= {max_blob} mm"
        variants[name] = Scoring(refine=hessian_blob(sims, rules, radius, sigma, gain, max_blob))
    for floor in (3.0, 4.0, 8.0):
        variants[f"NMS floor {floor} mm (head)"] = Scoring(nms_min_mm={"head": floor, "chest": 10.0})
    if "--network" in sys.argv:  # the probability map around each finding: the network runs (minutes)
        from models.detector import Detector

        variants = {}
        detector = Detector.load(device="auto")
        for radius, step, min_p in ((2.0, 1.0, 0.3), (3.0, 1.0, 0.3)):
            name = f"probability peak {radius} mm, step {step} mm, p >= {min_p}"
            variants[name] = Scoring(refine=probability_peak(detector, sims, rules, radius, step, min_p))
    for name, scoring in variants.items():
        print(f"{name:58s}", json.dumps(figures(summarize(head, scoring))), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))  # [--network]
