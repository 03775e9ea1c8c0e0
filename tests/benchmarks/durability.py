"""Durability protocols for a received instance, measured on this disk: why the node keeps its slots.

Issue 24 allowed a second protocol: acknowledge after one ``fdatasync`` of an append-only journal (group
commit across associations), the index in WAL without its own flush, the per-instance file written without
a flush and made durable later. This measures what each costs per 0.5 MB instance, on 1 and on 4 threads,
with the file system calls the two protocols make and nothing else:

- **slots** (the node's): write into a pre-made empty file, set its record attribute, ``fsync``, link the
  final name; the directory fsync that makes the names durable runs every 50 ms, batched, as the settler's;
- **journal**: write the record into a pre-written segment, one ``fdatasync`` shared by the records that
  arrived together, then write the instance into a pre-made file without a flush and link its final name;
  the checkpoint (``syncfs``: the placed files become durable, the segment may be reused) runs every
  ``--segment`` instances, in the background.

Both sides get their files made in advance; the clock stops when everything is durable (the last batched
directory fsync, the last checkpoint), so neither protocol's deferred flush is left off its bill. On the ext4 disk
measured here (no file system journal: ``fsync`` writes data and inode, no journal commit) the slots were
faster on both thread counts (README, Performance). Run:
``.venv/bin/python tests/benchmarks/durability.py [--instances 1000] [--runs 3] [--segment 256] [--dir /tmp]``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from storage.slots import fsync_dir  # noqa: E402 - the settler's own directory fsync

SIZE = 524_288 + 1_200  # a 512×512 16-bit CT slice with its header


class Segment:
    """A pre-written journal segment with group commit: a flush covers every record written before it."""

    def __init__(self, path: Path, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        zeros = bytes(1 << 20)
        for _ in range(size // len(zeros) + 1):
            os.write(self.fd, zeros)
        os.fsync(self.fd)
        self.offset = 0
        self.written = 0  # records complete up to here
        self.synced = 0
        self.lock = threading.Condition()
        self.syncing = False
        self.flushes = 0

    def commit(self, record: bytes) -> None:
        with self.lock:
            start, self.offset = self.offset, self.offset + len(record)
        os.pwrite(self.fd, record, start)
        with self.lock:
            self.written = max(self.written, start + len(record))  # threads finish in order closely enough
            end = start + len(record)
            while self.synced < end:
                if self.syncing:
                    self.lock.wait()
                    continue
                self.syncing, target = True, self.written
                self.lock.release()
                try:
                    os.fdatasync(self.fd)
                finally:
                    self.lock.acquire()
                    self.syncing, self.synced = False, max(self.synced, target)
                    self.flushes += 1
                    self.lock.notify_all()


def run(protocol: str, threads: int, n: int, base: Path, per_segment: int = 256) -> float:
    """Instances per second of one protocol on ``threads`` threads (files made beforehand, not timed)."""
    payloads = [secrets.token_bytes(SIZE) for _ in range(16)]
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        root = Path(tmp)
        (root / "objects").mkdir()
        made = [root / f"pre-{i}" for i in range(n)]
        for path in made:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o640))
        segment = Segment(root / "segment", n * (SIZE + 256)) if protocol == "journal" else None
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

        def receive(i: int) -> None:
            data = payloads[i % len(payloads)]
            digest = hashlib.sha256(data).digest()
            fd = os.open(made[i], os.O_WRONLY)
            os.write(fd, data)
            if segment is None:
                os.setxattr(fd, "user.harmonode.bench", digest)
                os.fsync(fd)
            os.close(fd)
            if segment is not None:
                segment.commit(digest + data)
            os.link(made[i], root / "objects" / f"{i}.dcm")

        done = threading.Event()
        received = [0]

        def worker(k: int) -> None:
            for i in range(k, n, threads):
                receive(i)
                received[0] += 1

        def deferred() -> None:  # the settler's batched directory fsync, or the journal's checkpoints
            checkpointed = 0
            while not done.wait(0.05):
                if segment is None:
                    fsync_dir(root / "objects")
                elif received[0] - checkpointed >= per_segment:
                    checkpointed = received[0]
                    _syncfs(root)

        start = time.perf_counter()
        pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        behind = threading.Thread(target=deferred)
        behind.start()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        done.set()
        behind.join()
        fsync_dir(root / "objects") if segment is None else _syncfs(root)
        return n / (time.perf_counter() - start)


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--segment", type=int, default=256, help="instances per journal segment (one checkpoint each)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write (the data disk)")
    args = ap.parse_args()
    for threads in (1, 4):
        rates: dict[str, list[float]] = {"slots": [], "journal": []}
        for _ in range(args.runs):  # interleaved
            for protocol in rates:
                rates[protocol].append(run(protocol, threads, args.instances, args.dir, args.segment))
        med = {p: statistics.median(r) for p, r in rates.items()}
        runs = {p: [round(x) for x in r] for p, r in rates.items()}
        print(
            f"{threads} thread(s): slots {med['slots']:.0f} inst/s {runs['slots']}, journal {med['journal']:.0f}"
            f" inst/s {runs['journal']}: journal/slots {med['journal'] / med['slots']:.2f}"
        )


if __name__ == "__main__":
    main()
