"""What a node's data directory holds right now: studies, series, jobs, deliveries, quarantine (read-only).

The report ``harmonode status --json`` prints for scripts and monitoring; its owners are the tables it reads
(index, queue, deliveries, the file store's quarantine), so it lives with them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from storage.deliveries import delivery_status
from storage.store import Store


def collect_status(store: Store, identity: Mapping[str, Any]) -> dict[str, Any]:
    """Read everything ``harmonode status`` shows from an open store.

    Parameters
    ----------
    store
        The node's data directory, opened with ``storage.store.open_store``.
    identity
        The node's identity as the report names it (``ae_title``, ``host``, ``port``); ``data_dir`` (the
        store's resolved root) is added after it.

    Returns
    -------
    dict
        ``node``, ``counts``, ``studies`` (each with its ``series``), ``jobs``, ``deliveries``, ``conflicts``
        (what arrived disagreeing with the index: kind, UIDs and attribute names, never patient values),
        ``quarantined`` (number of quarantined files) and ``generated_at`` (epoch seconds): JSON-able.
    """
    return {
        "node": {**identity, "data_dir": str(store.root.resolve())},
        "counts": store.index.counts(),
        **store.index.status(),
        "jobs": store.queue.jobs(),
        "deliveries": delivery_status(store.index),
        "conflicts": store.index.conflicts(),
        "quarantined": len(store.files.quarantined()),
        "generated_at": time.time(),
    }
