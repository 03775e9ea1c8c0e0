"""Startup recovery: the file store is the truth, the index and queue follow it.

Run before the node listens: slots whose final name a crash lost are put back in place
(``FileStore.settle_slots``), partial writes left by a crash are removed, and every stored file the index
does not know (the index commit was lost, or the node died between fsync and commit) is indexed again:
a file of the received tree as a received instance, a file of the results tree as the node's own result
(so it is never completed, analysed or fitted as a scanner's series).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom import dcmread

from storage.files import FileStore, Tree, file_sha256, version_of
from storage.index import Index, Origin, instance_meta_from_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What startup recovery did."""

    partial_files_removed: int
    reindexed: int
    unreadable: int
    restored: int = 0  # written instances whose final name a crash lost, put back from their slot


def recover(files: FileStore, index: Index) -> RecoveryReport:
    """Remove partial writes and index stored files missing from the index.

    Parameters
    ----------
    files, index
        The node's file store and index.

    Returns
    -------
    RecoveryReport
        Counts of what was done; unreadable stored files are quarantined (copied) and logged.
    """
    restored, dropped = files.settle_slots()  # before clean_tmp: a slot may be the only durable copy
    removed = files.clean_tmp() + dropped
    known = index.known_paths()
    reindexed = unreadable = 0
    stored = [(path, Origin.RECEIVED) for path in files.iter_instance_files(Tree.OBJECTS)]
    stored += [(path, Origin.RESULT) for path in files.iter_instance_files(Tree.RESULTS)]
    for path, origin in stored:
        rel = files.relpath(path)
        if rel in known:
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            meta = instance_meta_from_dataset(ds, ts)
            index.record_instance(
                meta,
                rel,
                path.stat().st_size,
                file_sha256(path),
                version_of(path),
                calling_ae="recovered",
                origin=origin,
                received_at=path.stat().st_mtime,
            )
            reindexed += 1
        except Exception as exc:
            unreadable += 1
            log.error("stored file %s cannot be indexed (%s); left in place", rel, type(exc).__name__)
    if reindexed:
        log.warning("recovery: indexed %d stored file(s) the index had lost", reindexed)
    return RecoveryReport(removed, reindexed, unreadable, restored)
