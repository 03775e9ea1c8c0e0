"""Versions of one SOP Instance UID: does the 600th store cost what the first did?

Each store of different bytes under one UID becomes a new version. The store finds the existing versions
in the index (by sha256) instead of reading every older file back, so the cost per store should stay
flat. Prints the median store time of the first and the last 50 versions and their ratio (the anchor is
the same store's first versions, in the same run). ``max_versions`` is lifted for the run.

Run: ``.venv/bin/python tests/benchmarks/versions.py [--versions 600]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from builders import SeriesSpec, synthetic_instance  # noqa: E402
from handlers.store import StoreLimits, store_encoded  # noqa: E402
from storage.store import open_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=600)
    args = parser.parse_args()
    spec = SeriesSpec("V1", "VERSIONS^BENCH", "1.2.826.0.1.3680043.8.498.71", "20240101", "120000", "V",
                      "1.2.826.0.1.3680043.8.498.72", "CT", 1)  # fmt: skip
    ds = synthetic_instance(spec, 1)
    ds.Rows = ds.Columns = 512
    rng = np.random.default_rng(0)
    times = []
    with tempfile.TemporaryDirectory() as tmp, open_store(Path(tmp) / "node") as store:
        for _ in range(args.versions):
            ds.PixelData = rng.integers(0, 4000, (512, 512), dtype=np.int16).tobytes()  # 0.5 MB, all one size
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            t0 = time.perf_counter()
            status, _ = store_encoded(buffer.getvalue(), ExplicitVRLittleEndian, "", "", store.files, store.index,
                                      "BENCH", StoreLimits(max_versions=0))  # fmt: skip
            times.append(time.perf_counter() - t0)
            assert status == 0x0000
    first, last = statistics.median(times[:50]) * 1000, statistics.median(times[-50:]) * 1000
    print(f"{args.versions} versions of one SOP Instance UID (0.5 MB each, fsync on)")
    print(f"  median store, versions 1-50:   {first:.1f} ms")
    print(f"  median store, last 50:          {last:.1f} ms")
    print(f"  ratio last/first:               {last / first:.2f} (flat: 1.0)")


if __name__ == "__main__":
    main()
