"""Harmonization benchmark: applying a rule to 512×512 int16 slices next to ``numpy.copyto`` of the same data
(the memory-bandwidth limit, same run), and fitting 6 condition groups × 200 slices.

Run as a script (not collected by pytest): ``.venv/bin/python tests/benchmarks/harmonize.py [--slices N]``.
Targets: apply ≥ 0.5 × copy speed; fit < 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rules.apply import SeedMap, apply_lut, apply_rule, stored_lut
from rules.fit import FitOptions, fit_groups
from rules.histogram import CT_SPEC, stored_histogram


def _slices(n: int, rng: np.random.Generator) -> np.ndarray:
    """CT-like stored slices (RescaleIntercept −1024): air, soft tissue, some bone."""
    base = rng.normal(1064, 15, (n, 512, 512))
    base[:, :40] = 0
    yy, xx = np.mgrid[:512, :512]
    r = np.hypot(yy - 256, xx - 256)
    base[:, (r > 200) & (r < 225)] = rng.normal(2000, 200, (n, int(((r > 200) & (r < 225)).sum())))  # skull
    base[:, 200:220, 200:300] = rng.normal(1400, 60, (n, 20, 100))  # contrast
    return np.clip(base, 0, 4095).astype(np.int16)


def _best(fn, repeat: int = 5) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_apply(n: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    stored = _slices(n, rng)
    print(f"(fraction of pixels above c: {(stored > 1144).mean():.2f})")
    rule = SeedMap(0.92, 12.0, 120.0)
    copy_out = np.empty_like(stored)
    lut_out = np.empty(stored.shape, np.float32)
    lut16 = stored_lut(rule, np.int16, 1.0, -1024.0, out_dtype=np.int16)
    lut32 = stored_lut(rule, np.int16, 1.0, -1024.0)
    stored_out = np.empty_like(stored)
    t_copy = _best(lambda: np.copyto(copy_out, stored))
    t_lut16 = _best(lambda: apply_lut(lut16, stored, out=stored_out))
    t_lut32 = _best(lambda: apply_lut(lut32, stored, out=lut_out))
    real = stored.astype(np.float32) - 1024.0
    t_float = _best(lambda: apply_rule(rule, real), repeat=3)
    return {
        "copy": n / t_copy,
        "lut_int16": n / t_lut16,
        "lut_float32": n / t_lut32,
        "float_apply": n / t_float,
    }


def bench_fit(groups: int = 6, slices: int = 200) -> tuple[float, float, list]:
    rng = np.random.default_rng(1)
    hists: dict[str, list[np.ndarray]] = {}
    t_hist = 0.0
    for g in range(groups):
        a, c = 1.0 + 0.04 * (g - 2.5), 100.0 + 10 * g
        truth = SeedMap(a, c * (1.0 - a), c)
        stored = _slices(slices, rng)
        real = truth.inverse(stored.astype(np.float32) - 1024.0)
        stored = np.rint(real + 1024.0).astype(np.int16)
        t0 = time.perf_counter()
        hists[f"CT|v{g}|m|k|d|120kv"] = [stored_histogram(s, 1.0, -1024.0, CT_SPEC) for s in stored]
        t_hist += time.perf_counter() - t0
        if g == 0:
            hists["CT|v0|m|k|d|120kv"] += hists["CT|v0|m|k|d|120kv"][:10]  # the reference: most images
    t0 = time.perf_counter()
    result = fit_groups(hists, CT_SPEC, FitOptions())
    t_fit = time.perf_counter() - t0
    return t_hist, t_fit, [(g.key, g.similarity_before, g.similarity_after) for g in result.groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=100, help="512×512 slices per apply run")
    args = parser.parse_args()
    rates = bench_apply(args.slices)
    print(f"apply, {args.slices} slices of 512×512 int16 (slices/s, best of 5):")
    for name, rate in rates.items():
        print(f"  {name:<12} {rate:10.0f} slices/s   {rate / rates['copy']:.2f} × copyto")
    t_hist, t_fit, groups = bench_fit()
    print(f"fit, 6 groups × 200 slices: histograms {t_hist:.2f} s, fit {t_fit:.2f} s")
    for key, before, after in groups:
        print(f"  {key:<22} similarity {before:.4f} → {after:.4f}")


if __name__ == "__main__":
    main()
