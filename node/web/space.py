"""Free space of the store's disk, read cheaply, with the watermarks of disk back-pressure.

``DiskSpace.accepting()`` is asked before every C-STORE: ``os.statvfs`` is read at most once a second and
the answer is a cached boolean otherwise. Once the free space, less the bytes stored since that read
(``consumed``), is within twice the watermark, it is read on every instance, so a burst cannot run past
it. Below the low watermark the node stops accepting; it accepts again only above the high watermark, so
it does not flap around one value.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

GB = 1024**3


class DiskSpace:
    """The free space under one directory, and whether the store accepts instances there."""

    def __init__(self, path: str | Path, min_free_bytes: int, resume_free_bytes: int = 0, cache_s: float = 1.0):
        self.path = str(path)
        self.min_free_bytes = max(0, int(min_free_bytes))
        self.resume_free_bytes = max(self.min_free_bytes, int(resume_free_bytes or self.min_free_bytes * 1.1))
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._free = 0
        self._total = 0
        self._accepting = True
        self._written = 0  # bytes stored since the last statvfs

    def _refresh(self, now: float) -> None:
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            log.error("cannot read the free space of %s: %s", self.path, exc)
            self._read_at = now
            return
        self._free, self._total, self._read_at = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, now
        self._written = 0
        if not self.min_free_bytes:
            return
        if self._accepting and self._free < self.min_free_bytes:
            self._accepting = False
            log.error(
                "disk back-pressure: %.0f MB free under %s, below %.0f MB: C-STORE answers 0xA700 until %.0f MB",
                self._free / 2**20,
                self.path,
                self.min_free_bytes / 2**20,
                self.resume_free_bytes / 2**20,
            )
        elif not self._accepting and self._free >= self.resume_free_bytes:
            self._accepting = True
            log.warning("disk back-pressure over: %.0f MB free, accepting instances again", self._free / 2**20)

    def _current(self) -> None:
        now = time.monotonic()
        # within twice the watermark the disk is read on every instance: the index's WAL and the file
        # system's own blocks grow beside the bytes stored, and a burst must not run past the mark
        near = self._accepting and self.min_free_bytes and self._free - self._written < 2 * self.min_free_bytes
        if near or now - self._read_at >= self.cache_s:
            with self._lock:
                if near or now - self._read_at >= self.cache_s:
                    self._refresh(now)

    def consumed(self, nbytes: int) -> None:
        """Note ``nbytes`` just stored (the free space is read again early when they bring it near the mark)."""
        self._written += nbytes

    def accepting(self) -> bool:
        """Whether instances may be stored now (statvfs read at most every ``cache_s`` seconds)."""
        self._current()
        return self._accepting

    def free_bytes(self) -> int:
        """Bytes available to the node under the path (as of the last read, at most ``cache_s`` old)."""
        self._current()
        return self._free

    def total_bytes(self) -> int:
        """Size of the filesystem holding the path."""
        self._current()
        return self._total
