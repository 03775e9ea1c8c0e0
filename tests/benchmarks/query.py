"""Query/retrieve benchmark: C-FIND latency on a large index, C-MOVE throughput against DCMTK storescu.

(1) An index of 10,000 studies / 20,000 series / 1,000,000 instances is generated directly into SQLite
(bulk insert, no files), a node listens on it, and a pynetdicom SCU times C-FIND round trips over one
association (median of N): a STUDY-level wildcard on PatientName (target: under 200 ms), a date range, an
IMAGE-level query in one series; DCMTK findscu's wall time (process start included) for the wildcard.
(2) 500 CT slices 512×512 are stored into a node; the node C-MOVEs the series to DCMTK storescp (which
discards what it receives), and DCMTK storescu sends the same files to the same storescp. Prints both
throughputs and their ratio (C-MOVE / storescu).

Run: ``.venv/bin/python tests/benchmarks/query.py [--studies 10000] [--instances-per-series 50] [--slices 500]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
from ingest import write_slices  # noqa: E402

from conftest import make_config  # noqa: E402
from handlers.transport import tune_socket  # noqa: E402
from node.app import Node  # noqa: E402
from node.config import Destination  # noqa: E402
from peers import free_port, peer_env, running_orthanc, system_tool, wait_until  # noqa: E402
from storage.index import Index  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
STUDIES_PER_PATIENT = 5
SERIES_PER_STUDY = 2


def build_index(path: Path, studies: int, per_series: int) -> float:
    """Bulk-insert a synthetic index; return the seconds it took."""
    t0 = time.perf_counter()
    index = Index(path)
    conn = index.db.conn
    conn.execute("PRAGMA synchronous=OFF")
    now = time.time()
    conn.execute("BEGIN")
    patients = studies // STUDIES_PER_PATIENT
    conn.executemany(
        "INSERT INTO patients (patient_key, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
        " patient_sex, updated_at) VALUES (?,?,?,?,?,?,?)",
        ((f"\\PID{p:05d}", f"PID{p:05d}", "", f"PAT{p:05d}^BENCH", "19600101", "O", now) for p in range(patients)),
    )
    study_cols = (
        "study_instance_uid, patient_key, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
        " patient_sex, study_date, study_time, accession_number, study_id, study_description,"
        " referring_physician_name, modalities, first_received_at, last_received_at"
    )
    conn.executemany(
        f"INSERT INTO studies ({study_cols}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            (
                f"{UID_ROOT}.{s}",
                f"\\PID{s // STUDIES_PER_PATIENT:05d}",
                f"PID{s // STUDIES_PER_PATIENT:05d}",
                "",
                f"PAT{s // STUDIES_PER_PATIENT:05d}^BENCH",
                "19600101",
                "O",
                f"{2020 + s % 5}{1 + s % 12:02d}{1 + s % 28:02d}",
                "120000",
                f"ACC{s:06d}",
                "1",
                "bench",
                "",
                "CT",
                now,
                now,
            )
            for s in range(studies)
        ),
    )
    series_cols = (
        "series_instance_uid, study_instance_uid, modality, series_number, state, instance_count, origin,"
        " first_received_at, last_received_at, updated_at"
    )
    conn.executemany(
        f"INSERT INTO series ({series_cols}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            (f"{UID_ROOT}.{s}.{k}", f"{UID_ROOT}.{s}", "CT", k + 1, "done", per_series, "received", now, now, now)
            for s in range(studies)
            for k in range(SERIES_PER_STUDY)
        ),
    )
    conn.executemany(
        "INSERT INTO instances (sop_instance_uid, version, series_instance_uid, study_instance_uid, sop_class_uid,"
        " transfer_syntax_uid, instance_number, path, size, sha256, received_at, calling_ae)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            (
                f"{UID_ROOT}.{s}.{k}.{i}",
                1,
                f"{UID_ROOT}.{s}.{k}",
                f"{UID_ROOT}.{s}",
                CT,
                EXPLICIT,
                i + 1,
                f"objects/{s}/{k}/{i}.dcm",
                1000,
                "",
                now,
                "BENCH",
            )
            for s in range(studies)
            for k in range(SERIES_PER_STUDY)
            for i in range(per_series)
        ),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("ANALYZE")
    index.close()
    return time.perf_counter() - t0


def _associate(port: int, model: str) -> object:
    ae = AE(ae_title="BENCHSCU")
    ae.maximum_pdu_size = 0
    ae.dimse_timeout = ae.network_timeout = 600
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE", evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)])
    assert assoc.is_established, "the node refused the association"
    return assoc


def time_find(assoc: object, keys: dict[str, str], runs: int) -> tuple[float, int]:
    """Median milliseconds of a C-FIND round trip (all responses received) and the number of matches."""
    query = Dataset()
    for k, v in keys.items():
        setattr(query, k, v)
    times, matches = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        rsps = [i for s, i in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if s and i]
        times.append((time.perf_counter() - t0) * 1000)
        matches = len(rsps)
    return statistics.median(times), matches


def bench_find(work: Path, studies: int, per_series: int, runs: int, every_study: bool = True) -> None:
    data = work / "find"
    seconds = build_index(data / "index.sqlite", studies, per_series)
    total = studies * SERIES_PER_STUDY * per_series
    print(f"index: {studies:,} studies, {studies * SERIES_PER_STUDY:,} series, {total:,} instances in {seconds:.1f} s")
    node = Node(make_config(data))
    port = node.start_listening()  # no recovery walk: the index has no files behind it
    try:
        assoc = _associate(port, StudyRootQueryRetrieveInformationModelFind)
        study_keys = {
            "StudyInstanceUID": "",
            "PatientID": "",
            "StudyDate": "",
            "AccessionNumber": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
        }
        cases = [
            ("STUDY  PatientName=PAT0012* (wildcard)", {"QueryRetrieveLevel": "STUDY", "PatientName": "PAT0012*"}),
            (
                "STUDY  PatientName=pat0012?^bench (PN case)",
                {"QueryRetrieveLevel": "STUDY", "PatientName": "pat0012?^bench"},
            ),
            (
                "STUDY  StudyDate=20230301-20230310 (range)",
                {"QueryRetrieveLevel": "STUDY", "StudyDate": "20230301-20230310"},
            ),
            (
                "STUDY  AccessionNumber=ACC0012* (wildcard)",
                {"QueryRetrieveLevel": "STUDY", "AccessionNumber": "ACC0012*"},
            ),
        ]
        for name, keys in cases:
            ms, n = time_find(assoc, {**study_keys, **keys}, runs)
            flag = "  (target < 200 ms: " + ("met" if ms < 200 else "MISSED") + ")" if "wildcard" in name else ""
            print(f"C-FIND {name:<46} {n:>5} matches  median {ms:7.1f} ms{flag}")
        series_uid = f"{UID_ROOT}.{studies // 2}.0"
        image = {
            "QueryRetrieveLevel": "IMAGE",
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": "",
            "InstanceNumber": "",
        }
        ms, n = time_find(assoc, image, runs)
        print(f"C-FIND {'IMAGE  one series':<46} {n:>5} matches  median {ms:7.1f} ms")
        if every_study:
            ms, n = time_find(assoc, {**study_keys, "QueryRetrieveLevel": "STUDY", "PatientName": "*"}, 3)
            print(f"C-FIND {'STUDY  PatientName=* (every study)':<46} {n:>5} matches  median {ms:7.1f} ms")
        assoc.release()
        for what, key in (("PatientName=PAT0012*", "PatientName"), ("AccessionNumber=ACC0012*", "AccessionNumber")):
            cmd = [system_tool("findscu"), "-aec", "HARMONODE", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", what]
            for k in study_keys:
                cmd += ["-k", k] if k != key else []
            cmd += ["127.0.0.1", str(port)]
            walls, matches = [], 0
            for _ in range(max(5, runs // 2)):
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=peer_env())
                walls.append((time.perf_counter() - t0) * 1000)
                matches = (proc.stdout + proc.stderr).count("Find Response:")
            flag = "met" if statistics.median(walls) < 200 else "MISSED"
            each = ", ".join(f"{w:.0f}" for w in walls)
            print(
                f"findscu STUDY {what:<26} {matches:>4} matches, wall time incl. process start: median"
                f" {statistics.median(walls):6.1f} ms (runs {each}; target < 200 ms: {flag})"
            )
    finally:
        node.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _timed(cmd: list[str], expect: str) -> float:
    """Wall seconds of a DCMTK tool run (process start included); its log must contain ``expect``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=300)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and expect in log, log[-3000:]
    return seconds


def _retrieve_commands(study: str, port: int, called: str, out: Path) -> tuple[list[str], list[str]]:
    """movescu (to SINK) and getscu (into ``out``) of ``study`` from the SCP on ``port``."""
    keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    common = ["-aet", "BENCHSCU", "-aec", called, "-to", "60", "-td", "600"]
    move = [system_tool("movescu"), "-v", *common, "-aem", "SINK", *keys, "127.0.0.1", str(port)]
    get = [system_tool("getscu"), "-v", *common, "+B", "-od", str(out), *keys, "127.0.0.1", str(port)]
    return move, get


def bench_move(work: Path, slices: int, runs: int) -> dict[str, list[float]]:
    """C-MOVE to DCMTK ``storescp +B`` and C-GET into DCMTK ``getscu +B``: the node and Orthanc, interleaved.

    The same DCMTK movescu/getscu ask both; the same storescp receives both moves (a DicomModalities entry of
    Orthanc, a destination of the node). Prints each run, the medians and harmonode / Orthanc speed ratios.
    """
    src = work / "slices"
    src.mkdir()
    files = write_slices(src, slices)
    mb = sum(p.stat().st_size for p in files) / 1e6
    scp_port = free_port()
    dest = Destination(name="sink", ae_title="SINK", host="127.0.0.1", port=scp_port, send_results=False)
    node = Node(make_config(work / "move", destinations=[dest], node={"fsync": False}))
    port = node.start_listening()
    sink = work / "sink"
    sink.mkdir()
    scp = subprocess.Popen(
        [system_tool("storescp"), "-aet", "SINK", "+B", "-od", str(sink), str(scp_port)],
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    modalities = {"sink": ["SINK", "127.0.0.1", scp_port], "bench": ["BENCHSCU", "127.0.0.1", free_port()]}
    times: dict[str, list[float]] = {"node_move": [], "orthanc_move": [], "node_get": [], "orthanc_get": []}
    try:
        with running_orthanc(work / "orthanc", modalities=modalities) as pacs:
            wait_until(lambda: _listening(scp_port), timeout=20, what="storescp")
            for target, aec in ((port, "HARMONODE"), (pacs.dicom_port, pacs.aet)):
                storescu = [system_tool("storescu"), "-aec", aec, "127.0.0.1", str(target), *map(str, files)]
                subprocess.run(storescu, check=True, capture_output=True, env=peer_env())
            study = node.index.query("SELECT study_instance_uid FROM studies")[0]["study_instance_uid"]
            assert node.index.counts()["instances"] == slices
            assert pacs.get("/statistics")["CountInstances"] == slices
            done = "Received Final Move Response (Success)"
            for run in range(runs):
                for who, scp_port_, aec in (("node", port, "HARMONODE"), ("orthanc", pacs.dicom_port, pacs.aet)):
                    got = work / f"got-{who}-{run}"
                    got.mkdir()
                    move, get = _retrieve_commands(study, scp_port_, aec, got)
                    times[f"{who}_move"].append(_timed(move, done))
                    times[f"{who}_get"].append(_timed(get, "Received C-GET Response (Success)"))
                    assert len(list(got.iterdir())) == slices, f"{who}: C-GET delivered {len(list(got.iterdir()))}"
                    shutil.rmtree(got)
                last = {k: f"{v[-1]:.2f} s" for k, v in times.items()}
                print(f"run {run + 1}: " + ", ".join(f"{k} {v}" for k, v in last.items()), flush=True)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
        node.stop()
    for kind in ("move", "get"):
        node_s, orthanc_s = statistics.median(times[f"node_{kind}"]), statistics.median(times[f"orthanc_{kind}"])
        per_run = [round(o / n, 2) for n, o in zip(times[f"node_{kind}"], times[f"orthanc_{kind}"], strict=True)]
        print(
            f"C-{kind.upper()} {slices} slices ({mb:.0f} MB): harmonode {node_s:.2f} s ({slices / node_s:.0f} inst/s),"
            f" Orthanc {orthanc_s:.2f} s ({slices / orthanc_s:.0f} inst/s); speed harmonode/Orthanc"
            f" {orthanc_s / node_s:.2f}x (per run {per_run}; bar >= 0.5x, goal >= 1.0x; medians of {runs})"
        )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--instances-per-series", type=int, default=50)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20, help="C-FIND repetitions (C-MOVE runs: 3)")
    parser.add_argument("--move-runs", type=int, default=3, help="interleaved C-MOVE/C-GET runs (node, Orthanc)")
    parser.add_argument("--skip-move", action="store_true")
    parser.add_argument("--skip-find", action="store_true")
    parser.add_argument("--no-every-study", action="store_true", help="skip the 10,000-match C-FIND")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TCP_NODELAY", "1")
    with tempfile.TemporaryDirectory(prefix="harmonode-qr-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_find:
            bench_find(work, args.studies, args.instances_per_series, args.runs, not args.no_every_study)
        if not args.skip_move:
            bench_move(work, args.slices, args.move_runs)


if __name__ == "__main__":
    main()
