"""Pre-made durable slot files: one flush per received instance instead of two.

Making a new file durable under its final name costs two device flushes: ``fsync`` of the file and
``fsync`` of the directory that names it (about 3.5 ms each on the virtual disks measured). A *slot* is an
empty file in ``tmp/`` whose directory entry was made durable in advance, in batches (one directory fsync
per batch of slots). An instance is written into a slot with a record of what it is (tree, UIDs, size and
sha256) in an extended attribute, and one ``fsync`` of the slot makes data, size and record durable: the
instance is then safe, and the success status may go back. The slot is hard-linked to its final name at
once (readers see the file where the index says it is) and the directory fsyncs of the final names run
later, batched, in the ``Settler``'s thread; only after them is the slot's own name removed.

After a crash, a slot still in ``tmp/`` is either linked elsewhere (its link count is 2: the final name
survived) or is re-linked by startup recovery from its record (``FileStore.settle_slots``); a slot whose
record is missing or whose bytes do not match it was never acknowledged and is removed.

A file system without user extended attributes gets no slots: ``FileStore`` then writes as it always
did (fsync the file, link, fsync the directory, before the status).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

XATTR = "user.harmonode.slot"
POOL_SIZE = 64  # slots made ahead; refilled when half are taken
SETTLE_DELAY_S = 0.05  # how long the settler lets written slots gather before one directory fsync names them
SUFFIX = ".slot"
_FORMAT = "1"  # version of the record's layout


@dataclass(frozen=True)
class SlotRecord:
    """What a written slot holds: enough to put it in place again after a crash."""

    tree: str
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int
    sha256: str

    def encode(self) -> bytes:
        """The record as stored in the slot's extended attribute (UIDs and a digest: no patient identity)."""
        fields = (_FORMAT, self.tree, self.study_uid, self.series_uid, self.sop_uid, str(self.size), self.sha256)
        return " ".join(fields).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> SlotRecord | None:
        """The record of an attribute value, or None when it is not one this code wrote."""
        try:
            fmt, tree, study, series, sop, size, digest = raw.decode("ascii").split(" ")
            if fmt != _FORMAT or len(digest) != 64:
                return None
            return cls(tree, study, series, sop, int(size), digest)
        except (UnicodeDecodeError, ValueError):
            return None


def read_record(path: Path) -> SlotRecord | None:
    """The record of a slot file, or None (no record: the slot was never written completely)."""
    try:
        return SlotRecord.decode(os.getxattr(path, XATTR))
    except OSError:
        return None


def supports_slots(directory: Path) -> bool:
    """Whether files in ``directory`` take user extended attributes (slots need them)."""
    probe = directory / f"probe-{secrets.token_hex(4)}{SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.setxattr(fd, XATTR, b"probe")
            return True
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries become durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Settler:
    """The slot pool and the thread that makes final names durable after the status went back.

    ``take`` hands out a durable empty slot (None when the pool is empty: the caller writes the slow way);
    ``settled`` queues a linked slot with the directories whose fsync makes its final name durable. The
    thread fsyncs each queued directory once per batch, removes the slots' names, and keeps the pool
    filled (one fsync of ``tmp/`` per batch of new slots).
    """

    def __init__(
        self,
        tmp: Path,
        pool_size: int = POOL_SIZE,
        background: bool = True,
        on_error: Callable[[Exception], None] | None = None,
        settle_delay_s: float = SETTLE_DELAY_S,
    ) -> None:
        self.tmp = tmp
        self.pool_size = pool_size
        self.settle_delay_s = settle_delay_s
        self._pool: deque[Path] = deque()
        self._pending: list[tuple[Path, tuple[Path, ...]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._gathering = False  # the thread is letting settled slots gather (no need to wake it)
        self._on_error = on_error
        self._refill()  # the first instance already finds a slot
        self._thread: threading.Thread | None = None
        if background:  # without: settled on flush() and close() only (tests that stage a crash)
            self._thread = threading.Thread(target=self._run, name="harmonode-settler", daemon=True)
            self._thread.start()

    def take(self) -> Path | None:
        """A durable empty slot, or None when none is ready (the pool is refilled in the background)."""
        with self._cond:
            if not self._pool and self._thread is None:
                self._cond.release()
                try:
                    self._refill()
                finally:
                    self._cond.acquire()
            slot = self._pool.popleft() if self._pool else None
            if len(self._pool) < self.pool_size // 2:
                self._cond.notify()
            return slot

    def settled(self, slot: Path, directories: tuple[Path, ...]) -> None:
        """Queue a linked slot: fsync ``directories``, then remove the slot's name."""
        with self._cond:
            self._pending.append((slot, directories))
            if not self._gathering:
                self._cond.notify()

    def flush(self) -> None:
        """Settle every queued slot now, in the calling thread."""
        with self._cond:
            batch, self._pending = self._pending, []
        self._settle(batch)

    def close(self) -> None:
        """Settle what is queued, stop the thread and remove the unused slots."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()
        with self._cond:
            unused, self._pool = list(self._pool), deque()
        for slot in unused:
            slot.unlink(missing_ok=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and len(self._pool) >= self.pool_size // 2:
                    self._cond.wait()
                if self._closed:
                    return
                # Let a burst gather: one fsync of its series directory then names all of it.
                deadline = time.monotonic() + self.settle_delay_s
                self._gathering = True
                while not self._closed and len(self._pool) >= self.pool_size // 2:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
                self._gathering = False
                if self._closed:
                    return
                batch, self._pending = self._pending, []
                refill = len(self._pool) < self.pool_size // 2
            try:
                self._settle(batch)
                if refill:
                    self._refill()
            except Exception as exc:  # a failing disk: slots stay in tmp/, recovery settles them
                log.error("settling stored files failed: %s", type(exc).__name__)
                if self._on_error is not None:
                    self._on_error(exc)
                with self._cond:
                    self._cond.wait(timeout=1.0)

    def _settle(self, batch: list[tuple[Path, tuple[Path, ...]]]) -> None:
        if not batch:
            return
        directories = dict.fromkeys(d for _, dirs in batch for d in dirs)
        for directory in directories:  # children before parents: the order the caller listed them
            fsync_dir(directory)
        for slot, _ in batch:
            slot.unlink(missing_ok=True)

    def _refill(self) -> None:
        made = []
        for _ in range(self.pool_size - len(self._pool)):
            slot = self.tmp / f"{secrets.token_hex(8)}{SUFFIX}"
            os.close(os.open(slot, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
            made.append(slot)
        fsync_dir(self.tmp)
        with self._cond:
            if self._closed:
                for slot in made:
                    slot.unlink(missing_ok=True)
                return
            self._pool.extend(made)
