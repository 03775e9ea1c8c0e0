"""Ingest benchmark: 500 synthetic 512×512 CT slices sent by DCMTK storescu to three receivers.

(a) ``harmonode serve`` with durability on (fsync file + directory, index commit before the status),
(b) Orthanc with its defaults (fsyncs every instance: the durable peer),
(c) DCMTK ``storescp -pdu 131072 +B`` (bit-preserving, no fsync: a non-durable upper bound).
Prints inst/s and MB/s of each, the ratios a/b and a/c (median of the runs and each run's, the receivers
measured interleaved: harmonode, Orthanc, storescp, harmonode, ...), the load average, and harmonode's peak RSS
while receiving 2,000 slices. ``--associations 4`` splits the files between 4 concurrent storescu;
``--listeners 1,2`` measures harmonode with ``[node] listeners = 1`` and ``= 2`` in each run, interleaved (the
RSS then sums every listener process's peak).
Run: ``./dev bench`` or ``.venv/bin/python tests/benchmarks/ingest.py [--slices 500] [--runs 3] [--associations 4]
[--listeners 1,2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from peers import free_port, listening_pids, peer_env, running_orthanc, system_tool, wait_until  # noqa: E402


def write_slices(out: Path, n: int, seed: int = 0) -> list[Path]:
    """n CT slices 512×512 int16 of one series (noise over a disc, realistic size: ~0.5 MB each)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 + (xx - 256) ** 2) < 220**2
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = "BENCH^INGEST", "BENCH1", "20261122", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-128.0, -128.0, float(i) * 0.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 0.5
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        px = np.where(body, 1064, 24) + rng.normal(0, 20, (512, 512))
        ds.PixelData = px.astype(np.int16).tobytes()
        p = out / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


ASSOCIATIONS = 1  # set by --associations


def send(paths: list[Path], port: int, aet: str, associations: int | None = None) -> float:
    """Seconds storescu takes to send every file, on ``associations`` concurrent associations."""
    n = associations or ASSOCIATIONS
    t = time.perf_counter()
    if n == 1:
        subprocess.run(
            [system_tool("storescu"), "-aec", aet, "127.0.0.1", str(port), "--scan-directories", str(paths[0].parent)],
            check=True,
            capture_output=True,
            env=peer_env(),
        )
        return time.perf_counter() - t
    senders = [
        subprocess.Popen(
            [system_tool("storescu"), "-aec", aet, "127.0.0.1", str(port), *map(str, paths[i::n])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=peer_env(),
        )
        for i in range(n)
    ]
    for s in senders:
        _, err = s.communicate()
        if s.returncode:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-400:]}")
    return time.perf_counter() - t


def echo_up(port: int, aet: str) -> bool:
    r = subprocess.run(
        [system_tool("echoscu"), "-aec", aet, "127.0.0.1", str(port)], capture_output=True, env=peer_env()
    )
    return r.returncode == 0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the extra listeners, started by one of its threads: every task is read)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += map(int, (task / "children").read_text().split())
        except OSError:
            continue
    return [pid, *kids]


def harmonode_run(paths: list[Path], work: Path, listeners: int = 1) -> tuple[float, float]:
    """Seconds to receive ``paths`` and the peak RSS (MB) of the node, summed over its listener processes."""
    port = free_port()
    data = work / f"hn-{time.monotonic_ns()}"
    cfg = work / "bench.toml"
    cfg.write_text(
        f'[node]\nport = {port}\ndata_dir = "{data}"\nlisteners = {listeners}\n[pipeline]\nquiet_seconds = 3600\n'
    )
    log = work / f"{data.name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
        cwd=ROOT,
        stderr=open(log, "wb"),  # noqa: SIM115 - the extra listeners inherit it
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until(lambda: echo_up(port, "HARMONODE"), timeout=60, what="harmonode")
        wait_until(lambda: len(listening_pids(log, port)) >= listeners, timeout=60, what="every listener process")
        seconds = send(paths, port, "HARMONODE")
        return seconds, sum(peak_rss_mb(p) for p in process_tree(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def orthanc_run(paths: list[Path], work: Path) -> float:
    with running_orthanc(work / f"orthanc-{time.monotonic_ns()}") as pacs:
        return send(paths, pacs.dicom_port, pacs.aet)


def storescp_run(paths: list[Path], work: Path) -> float:
    port = free_port()
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    proc = subprocess.Popen(
        [system_tool("storescp"), "-pdu", "131072", "+B", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=peer_env(),
    )
    try:
        wait_until(lambda: echo_up(port, "ANY-SCP"), timeout=30, what="storescp")
        return send(paths, port, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    global ASSOCIATIONS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rss-slices", type=int, default=2000)
    ap.add_argument("--associations", type=int, default=1, help="concurrent storescu, the files split between them")
    ap.add_argument(
        "--listeners",
        default="1",
        help="[node] listeners of harmonode; several, comma-separated (1,2), are measured interleaved in each run",
    )
    ap.add_argument("--no-storescp", action="store_true", help="skip the storescp bound")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ASSOCIATIONS = args.associations
    listeners = [int(n) for n in args.listeners.split(",")]
    names = [f"harmonode-l{n}" for n in listeners]
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="hn-bench-") as tmp:
        work = Path(tmp)
        src = work / "series"
        src.mkdir()
        paths = write_slices(src, args.slices)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        times: dict[str, list[float]] = {**{name: [] for name in names}, "orthanc": [], "storescp": []}
        for _ in range(args.runs):
            for name, n in zip(names, listeners, strict=True):
                times[name].append(harmonode_run(paths, work, n)[0])
            times["orthanc"].append(orthanc_run(paths, work))
            if not args.no_storescp:
                times["storescp"].append(storescp_run(paths, work))
            loads.append(os.getloadavg()[0])
        if args.no_storescp:
            times.pop("storescp")
        rss: dict[str, float] = {}
        if args.rss_slices:  # 0: skip the RSS run
            big = work / "rss"
            big.mkdir()
            rss_paths = write_slices(big, args.rss_slices, seed=1)
            for name, n in zip(names, listeners, strict=True):
                rss[name] = round(harmonode_run(rss_paths, work, n)[1], 1)
    report(args, times, names, mb, rss, loads)


def report(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    names: list[str],
    mb: float,
    rss: dict[str, float],
    loads: list[float],
) -> None:
    """Print the medians, the ratios to Orthanc (median of the runs' ratios, and each run's)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    per_run = {n: [round(o / h, 2) for h, o in zip(times[n], times["orthanc"], strict=True)] for n in names}
    result = {
        "slices": args.slices,
        "associations": args.associations,
        "megabytes": round(mb, 1),
        **{f"{k}_inst_per_s": round(args.slices / v, 1) for k, v in med.items()},
        **{f"{k}_mb_per_s": round(mb / v, 1) for k, v in med.items()},
        **{f"{k}_seconds_per_run": [round(x, 2) for x in v] for k, v in times.items()},
        **{f"ratio_{n}_over_orthanc": round(statistics.median(r), 2) for n, r in per_run.items()},
        **{f"ratio_{n}_over_orthanc_per_run": r for n, r in per_run.items()},
        f"peak_rss_mb_{args.rss_slices}_slices_all_processes": rss,
        "load_average_1min": [round(x, 1) for x in loads],
    }
    if "storescp" in med:
        for n in names:
            result[f"ratio_{n}_over_storescp"] = round(med["storescp"] / med[n], 2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.slices} slices, {mb:.0f} MB, median of {args.runs} interleaved runs, DCMTK storescu,"
        f" {args.associations} association(s); harmonode-lN: [node] listeners = N"
    )
    for k in med:
        print(f"  {k:<13} {result[f'{k}_inst_per_s']:>7} inst/s {result[f'{k}_mb_per_s']:>7} MB/s  runs (s): "
              f"{result[f'{k}_seconds_per_run']}")  # fmt: skip
    for n in names:
        print(f"  {n}/Orthanc (both durable): {result[f'ratio_{n}_over_orthanc']} (runs: {per_run[n]})")
        if "storescp" in med:
            print(f"  {n}/storescp (non-durable bound): {result[f'ratio_{n}_over_storescp']}")
    print(f"  load average (1 min) before and after each run: {result['load_average_1min']}")
    for n, value in rss.items():
        print(f"  {n} peak RSS while receiving {args.rss_slices} slices (all its processes): {value:.0f} MB")


if __name__ == "__main__":
    main()
