"""The durable file store: every received instance as a DICOM Part 10 file, written atomically.

Layout under ``data_dir``::

    objects/<study uid>/<series uid>/<sop instance uid>.dcm        first version
    objects/<study uid>/<series uid>/<sop instance uid>.v2.dcm     a different object under the same UID
    results/<study uid>/<series uid>/<sop instance uid>.dcm        objects the node made (SR, SC, GSPS, ...)
    tmp/                                                            partial writes (removed at startup)
    quarantine/<utc time>-<random>.dcm + .json                      refused input and the reason

Received instances and the node's own results live in separate trees, so that startup recovery, which
re-indexes files the index lost, can tell a result from a received instance by where it lies.

A write goes to ``tmp/``, is fsynced, linked into place and the directory is fsynced: after ``write``
returns, the file survives a crash or power loss, and a reader never sees half a file. Where the file system
takes extended attributes, a received instance goes into a pre-made durable slot instead (``storage.slots``):
one fsync makes it safe, and the directory fsyncs of its final name follow in the background, batched;
startup recovery puts back any slot whose final name a crash lost (``settle_slots``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from storage import slots as slot_files

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LOOSE_UID_RE = re.compile(r"^[0-9.]{1,64}$")


class TooManyVersions(Exception):
    """An instance has as many versions as the store keeps of one SOP Instance UID."""


class InvalidUID(ValueError):
    """A UID is not ``0-9`` and ``.`` or is longer than 64 characters, so it cannot become a path."""


def check_uid(uid: object, what: str = "UID") -> str:
    """Return ``uid`` stripped if it is a DICOM UID safe to use in a path, else raise ``InvalidUID``.

    Only digits and dots, at most 64 characters, no empty component (PS3.5 9.1). Leading zeros in a
    component are tolerated (real scanners emit them) but ``.``/``..`` and anything else are not.
    """
    if not isinstance(uid, str):
        raise InvalidUID(f"{what} is missing")
    value = uid.strip().rstrip("\x00").strip()
    if not value:
        raise InvalidUID(f"{what} is empty")
    if not _LOOSE_UID_RE.match(value) or value.startswith(".") or value.endswith(".") or ".." in value:
        raise InvalidUID(f"{what} is not a valid UID (digits and dots, at most 64 characters)")
    return value


def is_strict_uid(uid: str) -> bool:
    """True when ``uid`` also follows the no-leading-zero rule of PS3.5 9.1."""
    return bool(_UID_RE.match(uid)) and len(uid) <= 64


@dataclass(frozen=True)
class StoredFile:
    """Where one stored instance lives and what its bytes are."""

    path: Path
    relpath: str
    size: int
    sha256: str
    version: int
    duplicate: bool  # True: identical bytes were already stored, nothing was written


def sha256_of(chunks: Iterable[bytes]) -> str:
    """Return the hex sha256 of a sequence of byte chunks."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tree(StrEnum):
    """The two trees of stored instances."""

    OBJECTS = "objects"  # received from peers
    RESULTS = "results"  # made by the node



def _write_all(fd: int, data: bytes | Iterable[bytes]) -> tuple[int, str]:
    """Write ``data`` (bytes, or chunks of them) to ``fd`` in full; return its size and sha256."""
    h = hashlib.sha256()
    size = 0
    for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        view = memoryview(chunk)
        h.update(view)
        size += len(view)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    return size, h.hexdigest()

class FileStore:
    """Atomic, fsynced, versioned storage of DICOM Part 10 files under one root directory."""

    def __init__(self, root: str | Path, fsync: bool = True, slots: bool = True, background: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.objects = self.root / Tree.OBJECTS
        self.results = self.root / Tree.RESULTS
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.objects, self.results, self.tmp, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Slots only where they save a flush (durable writes) and the file system can hold their records.
        self.slots = slots and fsync and slot_files.supports_slots(self.tmp)
        self._settler: slot_files.Settler | None = None
        self._background = background  # False: final names settle on flush()/close() only (crash tests)
        self._settler_lock = threading.Lock()

    def close(self) -> None:
        """Make every final name durable now and stop the background thread (if one was started)."""
        with self._settler_lock:
            settler, self._settler = self._settler, None
        if settler is not None:
            settler.close()

    def flush(self) -> None:
        """Make the final names of every written instance durable now (the background does it otherwise)."""
        if self._settler is not None:
            self._settler.flush()

    def _take_slot(self) -> Path | None:
        if not self.slots:
            return None
        with self._settler_lock:
            if self._settler is None:  # started on the first write: commands that only read start no thread
                self._settler = slot_files.Settler(self.tmp, background=self._background)
            return self._settler.take()

    def _write_slot(
        self, slot: Path, data: bytes | Iterable[bytes], record: Callable[[int, str], bytes]
    ) -> tuple[int, str]:
        """Write ``data`` into an empty durable slot with its record; one fsync makes both durable."""
        fd = os.open(slot, os.O_WRONLY)
        try:
            size, digest = _write_all(fd, data)
            os.setxattr(fd, slot_files.XATTR, record(size, digest))
            os.fsync(fd)  # not fdatasync: the record is an attribute, not data
        except BaseException:
            os.close(fd)
            slot.unlink(missing_ok=True)
            raise
        os.close(fd)
        return size, digest

    # -- writing ------------------------------------------------------------------------------------
    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_tmp(self, data: bytes | Iterable[bytes]) -> tuple[Path, int, str]:
        tmp = self.tmp / f"{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            size, digest = _write_all(fd, data)
            if self.fsync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp, size, digest

    def instance_dir(self, study_uid: str, series_uid: str, tree: Tree = Tree.OBJECTS) -> Path:
        """Directory of one series (UIDs validated before they become path parts)."""
        return self.root / tree / check_uid(study_uid, "StudyInstanceUID") / check_uid(series_uid, "SeriesInstanceUID")

    def write_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: bytes | Iterable[bytes],
        tree: Tree = Tree.OBJECTS,
        known: Mapping[str, int] | None = None,
        max_versions: int = 0,
    ) -> StoredFile:
        """Store the Part 10 bytes of one instance durably and return where they are.

        Identical bytes under an existing SOP Instance UID are a no-op (``duplicate=True``); different
        bytes become a new version file beside the old one, which is never overwritten. ``known`` (the
        index's versions of this instance by sha256) makes both a lookup instead of reading every older
        version back: only versions the index does not know yet are compared on disk.

        Raises
        ------
        InvalidUID
            One of the UIDs cannot be used as a path component.
        TooManyVersions
            The instance already has ``max_versions`` versions (0: no limit).
        OSError
            The disk refused the write (full, read-only, ...); nothing is left half-written.
        """
        sop = check_uid(sop_uid, "SOPInstanceUID")
        directory = self.instance_dir(study_uid, series_uid, tree)
        slot = self._take_slot()
        if slot is not None:
            study, series = directory.parent.name, directory.name

            def record(size: int, digest: str) -> bytes:
                return slot_files.SlotRecord(str(tree), study, series, sop, size, digest).encode()

            size, digest = self._write_slot(slot, data, record)
            tmp = slot
        else:
            tmp, size, digest = self._write_tmp(data)
        settled = False
        try:
            new_dir = not directory.exists()
            if new_dir:
                directory.mkdir(parents=True, exist_ok=True)
            known = known or {}
            if digest in known and (target := _version_path(directory, sop, known[digest])).is_file():
                return StoredFile(target, self.relpath(target), size, digest, known[digest], True)
            version = max(known.values(), default=0) + 1
            while True:
                target = _version_path(directory, sop, version)
                if not target.exists():
                    break
                if target.stat().st_size == size and file_sha256(target) == digest:
                    return StoredFile(target, self.relpath(target), size, digest, version, True)
                version += 1
            if max_versions and version > max_versions:
                raise TooManyVersions(f"the instance already has {version - 1} versions (limit {max_versions})")
            # link() refuses to replace an existing file, so two racing writers cannot overwrite
            # each other's version: the loser retries with the next version number.
            try:
                os.link(tmp, target)
            except FileExistsError:
                return self.write_instance(study_uid, series_uid, sop_uid, tmp.read_bytes(), tree, known, max_versions)
            directories = (directory, directory.parent, directory.parent.parent) if new_dir else (directory,)
            if slot is not None and self._settler is not None:
                # The slot is durable and names the instance: the final name's fsyncs may come later.
                self._settler.settled(slot, directories)
                settled = True
            else:
                tmp.unlink()
                for d in directories:
                    self._fsync_dir(d)
            return StoredFile(target, self.relpath(target), size, digest, version, False)
        finally:
            if not settled:
                tmp.unlink(missing_ok=True)

    def settle_slots(self) -> tuple[int, int]:
        """Startup recovery of slots a crash left in ``tmp/``: (put back in place, removed as never complete).

        A slot whose final name survived (link count 2) only loses its own name. A slot whose record
        matches its bytes is written to its final name again (the synchronous way, a duplicate of an
        existing version being a no-op); a slot without a matching record was never acknowledged.
        """
        restored = dropped = 0
        for slot in sorted(self.tmp.glob(f"*{slot_files.SUFFIX}")):
            record = slot_files.read_record(slot)
            try:
                if record is not None and slot.stat().st_nlink < 2:
                    data = slot.read_bytes()
                    if len(data) == record.size and hashlib.sha256(data).hexdigest() == record.sha256:
                        tree = Tree(record.tree)
                        previous, self.slots = self.slots, False
                        try:
                            self.write_instance(record.study_uid, record.series_uid, record.sop_uid, data, tree)
                        finally:
                            self.slots = previous
                        restored += 1
                    else:
                        dropped += 1
                elif record is None and slot.stat().st_size:
                    dropped += 1
            except (OSError, ValueError) as exc:
                log.error("slot %s cannot be put back (%s); removed", slot.name, type(exc).__name__)
                dropped += 1
            slot.unlink(missing_ok=True)
        if restored or dropped:
            log.warning(
                "recovery: %d stored file(s) put back in place, %d incomplete write(s) removed", restored, dropped
            )
        return restored, dropped

    def write_result(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Store an object the node made, in the results tree (as ``write_instance`` does)."""
        return self.write_instance(study_uid, series_uid, sop_uid, data, Tree.RESULTS)

    def write_file(self, relpath: str, data: bytes) -> Path:
        """Atomically write (or replace) a non-instance file under the root, e.g. an exported result."""
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, _, _ = self._write_tmp(data)
        os.replace(tmp, target)
        self._fsync_dir(target.parent)
        return target

    def quarantine(self, data: bytes | None, reason: str, context: dict[str, object] | None = None) -> Path:
        """Keep a copy of refused input with the reason beside it; return the copy's path.

        The reason file holds no patient identity: only the reason and the technical context given.
        """
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        stem = f"{stamp}-{secrets.token_hex(4)}"
        path = self.quarantine_dir / f"{stem}.dcm"
        if data is not None:
            tmp, _, _ = self._write_tmp(data)
            os.replace(tmp, path)
        meta = {"reason": reason, "received_at": stamp, **(context or {})}
        tmp, _, _ = self._write_tmp(json.dumps(meta, indent=2, default=str).encode())
        os.replace(tmp, self.quarantine_dir / f"{stem}.json")
        self._fsync_dir(self.quarantine_dir)
        return path

    # -- reading and recovery -----------------------------------------------------------------------
    def relpath(self, path: Path) -> str:
        """Path relative to the store root, as kept in the index."""
        return path.relative_to(self.root).as_posix()

    def abspath(self, relpath: str) -> Path:
        """Absolute path of a stored file from its index entry."""
        return self.root / relpath

    def clean_tmp(self) -> int:
        """Remove leftover partial writes (from a crash); return how many were removed."""
        n = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        if n:
            log.warning("removed %d partial file(s) left by an interrupted write", n)
        return n

    def iter_instance_files(self, tree: Tree = Tree.OBJECTS) -> Iterator[Path]:
        """Every stored instance file of one tree, in no particular order."""
        for study in os.scandir(self.root / tree):
            if not study.is_dir():
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(".dcm"):
                        yield Path(entry.path)

    def quarantined(self) -> list[dict[str, object]]:
        """Reasons of every quarantined item, oldest first."""
        out = []
        for p in sorted(self.quarantine_dir.glob("*.json")):
            try:
                item = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            item["file"] = p.with_suffix(".dcm").name
            out.append(item)
        return out


def _version_path(directory: Path, sop: str, version: int) -> Path:
    return directory / (f"{sop}.dcm" if version == 1 else f"{sop}.v{version}.dcm")


def version_of(path: Path) -> int:
    """Version number encoded in a stored file name (``X.dcm`` → 1, ``X.v3.dcm`` → 3)."""
    m = re.search(r"\.v(\d+)\.dcm$", path.name)
    return int(m.group(1)) if m else 1
