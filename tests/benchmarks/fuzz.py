"""Fuzz campaign against a running node: mutated datasets over C-STORE and malformed PDUs on raw sockets.

Seeded and bounded. The node runs as its own process (``harmonode listen``) in an empty working directory
with TMPDIR pointing at another empty directory, so anything it writes outside its data_dir is seen.
Prints, for the datasets, the count per outcome (stored, refused with a status by class, no status: the
association was aborted or timed out — the target is 0), for the PDUs the count per outcome, the node's
peak RSS, the time a C-ECHO takes afterwards (target < 1 s) and what was written outside data_dir.

Run: ``.venv/bin/python tests/benchmarks/fuzz.py [--datasets 10000] [--pdus 2000] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from builders import SeriesSpec, synthetic_instance  # noqa: E402
from peers import free_port, peer_env, system_tool, wait_until  # noqa: E402

BAD_UIDS = ("", " ", "\0", "1" * 65, "1.2.abc", "..", "0.01")


def seeds() -> list[bytes]:
    """Valid Part 10 files to mutate: synthetic CT (explicit), MR (implicit), and pydicom's own test files."""
    out = []
    spec = SeriesSpec("FUZZ1", "FUZZ^SEED", "1.2.826.0.1.3680043.8.498.91", "20240101", "120000", "F1",
                      "1.2.826.0.1.3680043.8.498.92", "CT", 1)  # fmt: skip
    for modality in ("CT", "MR"):
        ds = synthetic_instance(SeriesSpec(**{**spec.__dict__, "modality": modality}), 1)
        out.append(_part10(ds))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        out.append(Path(get_testdata_file(name)).read_bytes())
    return out


def _part10(ds) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a Part 10 file."""
    start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[:start], raw[start:]


def fresh_uid(raw: bytes, rng: random.Random) -> bytes:
    """The seed with a new SOP Instance UID of the same length (file meta and dataset alike), so each mutant is
    a new instance rather than the next version of one (the versions limit would answer most of them)."""
    uid = dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID.encode()
    tail = "".join(rng.choice("123456789") for _ in range(min(20, len(uid) - 12)))
    new = uid[: len(uid) - len(tail)] + tail.encode()
    return raw.replace(uid, new)


def mutate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a seed's dataset bytes (the file meta kept, so the sender can name its syntax)."""
    raw = fresh_uid(raw, rng)
    meta, body = _split(raw)
    body = bytearray(body)
    kind = rng.choice(("flip", "truncate", "insert", "length", "duplicate", "zero", "uid", "syntax"))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] = rng.randrange(256)
    elif kind == "truncate":
        body = body[: rng.randrange(len(body))]
    elif kind == "insert":
        at = rng.randrange(len(body))
        body[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == "length":
        at = rng.randrange(max(1, len(body) - 4))
        body[at : at + 4] = struct.pack("<I", rng.choice((0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 31))))
    elif kind == "duplicate":
        a = rng.randrange(len(body))
        b = min(len(body), a + rng.randint(8, 512))
        body[b:b] = body[a:b]
    elif kind == "zero":
        a = rng.randrange(len(body))
        body[a : a + rng.randint(1, 256)] = bytes(min(len(body) - a, 256))
    elif kind == "uid":
        bad = rng.choice(BAD_UIDS).encode("latin-1")
        body = bytearray(bytes(body).replace(b"1.2.826.0.1.3680043.8.498.9", bad, 1))
    elif kind == "syntax":  # the bytes of one syntax under the label of the other
        file_meta = dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta
        implicit = file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if implicit else ImplicitVRLittleEndian
        head = io.BytesIO()
        write_file_meta_info(head, file_meta, enforce_standard=True)
        meta = b"\0" * 128 + b"DICM" + head.getvalue()
    return meta + bytes(body), kind


def send_datasets(port: int, n: int, rng: random.Random, work: Path) -> collections.Counter:
    """C-STORE ``n`` mutated datasets (the bytes as mutated: pynetdicom's chunked sending reads the file)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    outcomes: collections.Counter = collections.Counter()
    base = seeds()
    ae = AE(ae_title="FUZZER")
    for sop in (CTImageStorage, MRImageStorage):  # one context per syntax: each file goes as it is labelled
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
            ae.add_requested_context(sop, [syntax])
        ae.add_requested_context(sop, [DeflatedExplicitVRLittleEndian])
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 10
    path = work / "mutated.dcm"
    assoc = None
    for i in range(n):
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
            if not assoc.is_established:
                outcomes["association refused"] += 1
                assoc = None
                continue
        data, kind = mutate(rng.choice(base), rng)
        path.write_bytes(data)
        try:
            status = assoc.send_c_store(path, msg_id=i % 65535 + 1)
        except Exception as exc:  # the sender itself refused the file (pynetdicom checks its file meta)
            outcomes[f"not sent: {kind}: {str(exc)[:60]}"] += 1
            continue
        code = int(status.Status) if status and "Status" in status else None
        outcomes[_outcome(code)] += 1
        if i and i % 1000 == 0:
            print(f"  {i} datasets: {dict(outcomes)}", flush=True)
    if assoc is not None and assoc.is_established:
        assoc.release()
    return outcomes


def _outcome(code: int | None) -> str:
    if code is None:
        return "NO STATUS (aborted or timed out)"
    if code in (0x0000, 0xB000, 0xB006, 0xB007):
        return "stored"
    return f"refused 0x{code:04X}" if code >> 8 in (0xA7, 0xA9, 0xC0, 0xC2, 0x01) else f"other 0x{code:04X}"


def malformed_pdu(rng: random.Random) -> bytes:
    """A PDU a broken or hostile peer might send first."""
    kind = rng.randrange(6)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randint(1, 256))
    if kind == 1:  # a known PDU type with a random length and too little body
        return bytes([rng.choice((1, 2, 3, 4, 5, 6, 7))]) + b"\0" + struct.pack(">I", rng.randrange(1 << 32))
    if kind == 2:  # an A-ASSOCIATE-RQ header with garbage variable items
        body = b"\x00\x01\x00\x00" + b"HARMONODE".ljust(16) + b"FUZZ".ljust(16) + bytes(32) + rng.randbytes(64)
        return b"\x01\x00" + struct.pack(">I", len(body)) + body
    if kind == 3:  # a P-DATA before any association
        return b"\x04\x00" + struct.pack(">I", 12) + struct.pack(">I", 6) + b"\x01\x03" + rng.randbytes(4)
    if kind == 4:  # an unknown PDU type
        return bytes([rng.randrange(8, 256)]) + b"\0" + struct.pack(">I", 4) + rng.randbytes(4)
    return b"\x01\x00\x00\x00"  # cut inside the header


def send_pdus(port: int, n: int, rng: random.Random) -> collections.Counter:
    outcomes: collections.Counter = collections.Counter()
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(malformed_pdu(rng))
                s.shutdown(socket.SHUT_WR)  # the peer has said all it will say (a silent one: tests/test_door.py)
                s.settimeout(5)
                reply = s.recv(16)
            outcomes["closed by the node" if not reply else f"answered PDU type {reply[0]}"] += 1
        except TimeoutError:
            outcomes["no answer in 5 s"] += 1
        except OSError as exc:
            outcomes[f"{type(exc).__name__}"] += 1
    return outcomes


def echo_seconds(port: int) -> float:
    t0 = time.perf_counter()
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
    if assoc.is_established:
        assoc.release()
    return time.perf_counter() - t0 if ok else float("inf")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=10_000)
    parser.add_argument("--pdus", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work, cwd, tmpdir = Path(tmp), Path(tmp) / "cwd", Path(tmp) / "tmpdir"
        for d in (cwd, tmpdir):
            d.mkdir()
        port = free_port()
        cfg = work / "node.toml"
        cfg.write_text(f'[node]\nport = {port}\ndata_dir = "{work / "data"}"\n[pipeline]\nquiet_seconds = 3600\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)}
        node = subprocess.Popen([sys.executable, "-m", "node.cli", "listen", "--config", str(cfg)], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "wb"))  # noqa: SIM115  # fmt: skip
        try:
            echo = [system_tool("echoscu"), "-aec", "HARMONODE", "127.0.0.1", str(port)]
            wait_until(lambda: subprocess.run(echo, capture_output=True, env=peer_env()).returncode == 0, timeout=60)
            rss_before = peak_rss_mb(node.pid)
            t0 = time.perf_counter()
            datasets = send_datasets(port, args.datasets, rng, work)
            t_datasets = time.perf_counter() - t0
            t0 = time.perf_counter()
            pdus = send_pdus(port, args.pdus, rng)
            t_pdus = time.perf_counter() - t0
            echo_after = echo_seconds(port)
            rss_peak = peak_rss_mb(node.pid)
        finally:
            node.terminate()
            node.wait(timeout=30)
        outside = sorted(str(p.relative_to(work)) for d in (cwd, tmpdir) for p in d.rglob("*"))
    print(f"\nmutated datasets: {args.datasets} in {t_datasets:.0f} s")
    for outcome, count in sorted(datasets.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>6}  {outcome}")
    print(f"  without a DIMSE status: {datasets['NO STATUS (aborted or timed out)']} (target 0)")
    print(f"malformed PDUs: {args.pdus} in {t_pdus:.0f} s")
    for outcome, count in sorted(pdus.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>6}  {outcome}")
    print(f"node peak RSS: {rss_peak:.0f} MB (at start {rss_before:.0f} MB)")
    print(f"C-ECHO afterwards: {echo_after:.3f} s (target < 1 s)")
    print(f"written outside data_dir: {outside or 'nothing'}")


if __name__ == "__main__":
    main()
