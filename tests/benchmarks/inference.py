"""Detector inference benchmark: patches per second through the mini-VGG, and seconds per 300-slice series.

Run as a script (not collected by pytest): ``.venv/bin/python tests/benchmarks/inference.py [--device auto]``.
The series is a simulated full-size head CTA (512×512×300, 0.5 mm); the time covers normalisation, candidates,
patch extraction, the network, threshold and NMS (what ``Detector.detect`` does), after one warm-up run. Patches
are sampled in torch (``models.patches_torch``) on either device; on CUDA the candidates' filters run in torch too
(``models.candidates_torch``).
Targets: < 1 s per series on a GPU, < 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from models.detector import Detector


def bench_patches(detector: Detector, n: int, batch: int) -> float:
    """Patches per second through the network (batches of ``batch``), best of three."""
    channels = detector.model.config.in_channels
    x = np.random.default_rng(0).normal(size=(n, channels, 32, 32)).astype(np.float32)
    detector.classify(x[:batch], batch=batch)  # warm-up (CUDA context, cuDNN autotune)
    best = float("inf")
    for _ in range(3):
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        detector.classify(x, batch=batch)
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def bench_series(detector: Detector, kind: str, slices: int) -> dict[str, float]:
    """Seconds for ``detect`` on one full-size simulated series (stages timed separately)."""
    from models.candidates import find_candidates
    from models.patches import extract_views, normalise
    from models.volume import build_volume
    from simulator.studies import simulate_study

    t0 = time.perf_counter()
    study = simulate_study(kind, "ge-revolution-standard", 1, "full", slices=slices)  # type: ignore[arg-type]
    volume = build_volume(study.datasets)
    t_sim = time.perf_counter() - t0
    body = "chest" if kind == "chest-ct" else "head"
    detector.detect(volume.values, volume.geometry, "CT", body)  # warm-up
    t0 = time.perf_counter()
    detection = detector.detect(volume.values, volume.geometry, "CT", body)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    norm = normalise(volume.values, "CT")
    t_norm = time.perf_counter() - t0
    t0 = time.perf_counter()
    on_gpu = detector.torch_device  # as Detector.score does
    cands = find_candidates(norm, volume.geometry.spacing, body, "CT", detector.candidate_settings[body], on_gpu)
    t_cand = time.perf_counter() - t0
    t0 = time.perf_counter()
    spacing, mm = volume.geometry.spacing, detector.patch_mm[body]
    patches = extract_views(norm, spacing, cands.centres, mm, detector.views, device=str(detector.device))
    t_patch = time.perf_counter() - t0
    t0 = time.perf_counter()
    detector.classify(patches, tta=detector.tta[body])
    t_net = time.perf_counter() - t0
    same_as_cpu = None
    if detector.device.type == "cuda":  # the GPU path must find what the CPU path finds
        detection = detector.detect(volume.values, volume.geometry, "CT", body)
        on_cpu = Detector(detector.models, detector.card, torch.device("cpu"))  # moves the shared networks
        cpu = on_cpu.detect(volume.values, volume.geometry, "CT", body)
        same_as_cpu = len(cpu.findings) == len(detection.findings) and all(
            np.allclose(a.center_mm, b.center_mm) and abs(a.probability - b.probability) < 0.02
            for a, b in zip(cpu.findings, detection.findings, strict=True)
        )
        detector.models = [m.to(detector.device) for m in detector.models]  # and back
    return {
        "shape": list(volume.values.shape),
        "seconds_per_series": round(total, 3),
        "normalise_s": round(t_norm, 3),
        "candidates_s": round(t_cand, 3),
        "patches_s": round(t_patch, 3),
        "network_s": round(t_net, 4),
        "candidates": len(cands),
        "findings": len(detection.findings),
        "simulate_s": round(t_sim, 1),
        "findings_same_as_cpu": same_as_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--patches", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--kind", default="head-cta", choices=("head-cta", "chest-ct"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = Detector.load(device=args.device)
    device = torch.cuda.get_device_name(detector.device) if detector.device.type == "cuda" else platform.processor()
    out = {
        "device": f"{detector.device.type}: {device or platform.machine()}",
        "torch_threads": torch.get_num_threads(),
        "patches_per_second": round(bench_patches(detector, args.patches, args.batch)),
        "series": bench_series(detector, args.kind, args.slices),
    }
    print(json.dumps(out, indent=2))  # noqa: T201 - a benchmark script reports on stdout


if __name__ == "__main__":
    main()
