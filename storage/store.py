"""One ``open_store``: the file store, index and queue of a data directory, opened the same way everywhere.

The node, every command that reads or writes a node's data (status, resend, rules fit, pull, demo) and the
tests open a data directory through here, so every table exists once its owner has created it: the index
(patients, studies, series, instances), the queue (jobs), the deliveries and the rule registry create theirs
here, not on first use.

With a ``database`` URL (``postgresql://…``: a cluster) the index — and every table that lives in it — and the
queue are schemas of that PostgreSQL database (``storage.database``), shared by every process of the cluster;
the file store stays in ``data_dir``, then a filesystem the cluster's machines share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from storage import deliveries, users
from storage.database import is_postgres_url
from storage.files import FileStore
from storage.index import Index
from storage.queue import DELIVERY_POLICY, JobKind, JobQueue, QueueSettings


@dataclass(frozen=True)
class StoreSettings:
    """How a data directory is opened: durability of the file store and the queue's retry policy."""

    fsync: bool = True  # never off in production: the success status promises durability
    queue: QueueSettings = field(default_factory=QueueSettings)  # analysis jobs
    delivery: QueueSettings = DELIVERY_POLICY  # send jobs: retried for hours
    database: str = ""  # a postgresql:// URL: index and queue there ([cluster] database); "": SQLite files


@dataclass
class Store:
    """The three durable parts of one node's data directory."""

    root: Path
    files: FileStore
    index: Index
    queue: JobQueue

    def close(self) -> None:
        """Close the index and queue connections and settle the file store's pending writes."""
        self.files.close()
        self.queue.close()
        self.index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def open_store(data_dir: str | Path, settings: StoreSettings | None = None, database: str | None = None) -> Store:
    """Open (creating where missing) the file store, index and queue under ``data_dir`` (or in ``database``).

    Parameters
    ----------
    data_dir
        The node's data directory (``[node] data_dir``).
    settings
        Durability and queue policy; the embedded defaults when omitted.
    database
        A ``postgresql://`` URL: the index and queue live there (schemas ``harmonode_index`` and
        ``harmonode_queue``) instead of ``index.sqlite`` and ``queue.sqlite``. None: the embedded SQLite files.

    Returns
    -------
    Store
        Close it (or use it as a context manager) when done.
    """
    settings = settings or StoreSettings()
    database = database or settings.database or None
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = FileStore(root, fsync=settings.fsync)
    if database is not None and not is_postgres_url(database):
        raise ValueError("a store's database is a postgresql:// URL (None: SQLite files in the data directory)")
    index = Index(database or root / "index.sqlite")
    with index.lock:
        deliveries.create_table(index.db)
        users.create_tables(index.db)
    # export records to the learning side retry as long as results to PACS do
    policies = {JobKind.SEND: settings.delivery, JobKind.EXPORT: settings.delivery}
    queue = JobQueue(database or root / "queue.sqlite", settings.queue, policies)
    return Store(root, files, index, queue)
