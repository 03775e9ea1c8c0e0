"""The residual-map cache: a series' two residual maps on disk, keyed by what produced them.

The maps depend on the series, the histogram rule applied before (the network's input) and the residual
model's version; the strengths do not enter, so a change of α finds the maps here and never re-runs the
network. Stored as float16 ``.npy`` (half the bytes; 0.5 HU steps at ±1000 HU, below CT noise), written to a
temporary name and renamed, so a crash leaves either the whole entry or none. The oldest entries go when
the cache exceeds its size (the maps can always be recomputed: nothing here is acknowledged data).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 1024**3
_NAMES = ("blur.npy", "noise.npy")


@dataclass(frozen=True)
class CachedMaps:
    """The two residual maps of one series (float32 views of the stored float16)."""

    blur: np.ndarray
    noise: np.ndarray


def entry_name(series_uid: str, rule_label: str, model_version: str) -> str:
    """The folder name of one entry: a digest of what the maps depend on (no UID in the path)."""
    return hashlib.sha256(f"{series_uid}\n{rule_label}\n{model_version}".encode()).hexdigest()[:32]


class MapCache:
    """Residual maps under ``root`` (normally ``<data_dir>/cache/residual``), at most ``max_bytes``.

    Parameters
    ----------
    root
        The cache folder (created on first write).
    max_bytes
        Size above which the least recently used entries are removed.
    """

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()

    def get(self, series_uid: str, rule_label: str, model_version: str) -> CachedMaps | None:
        """The cached maps, or None (absent, or unreadable: then removed)."""
        folder = self.root / entry_name(series_uid, rule_label, model_version)
        if not folder.is_dir():
            return None
        try:
            blur, noise = (np.load(folder / n).astype(np.float32) for n in _NAMES)
        except (OSError, ValueError) as exc:
            log.warning("residual-map cache entry %s unreadable (%s): recomputed", folder.name, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        os.utime(folder)  # recently used
        return CachedMaps(blur, noise)

    def put(self, series_uid: str, rule_label: str, model_version: str, blur: np.ndarray, noise: np.ndarray) -> None:
        """Store the maps of a series (replacing an entry with the same key), then trim the cache."""
        name = entry_name(series_uid, rule_label, model_version)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for filename, array in zip(_NAMES, (blur, noise), strict=True):
            np.save(tmp / filename, np.asarray(array, dtype=np.float16))
        with self._lock:
            final = self.root / name
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._trim()

    def size_bytes(self) -> int:
        """Bytes held by the cache's entries."""
        return sum(f.stat().st_size for f in self.root.glob("*/*.npy")) if self.root.is_dir() else 0

    def _trim(self) -> None:
        entries = [d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        sizes = {d: sum(f.stat().st_size for f in d.glob("*.npy")) for d in entries}
        total = sum(sizes.values())
        for folder in sorted(entries, key=lambda d: d.stat().st_mtime):
            if total <= self.max_bytes:
                break
            unused_since = time.ctime(folder.stat().st_mtime)
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
            log.info("residual-map cache over %d bytes: removed an entry unused since %s", self.max_bytes, unused_since)
