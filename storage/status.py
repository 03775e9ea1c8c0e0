"""What a node's data directory holds right now: studies, series, jobs, deliveries, quarantine (read-only).

The report ``harmonode status --json`` prints for scripts and monitoring; its owners are the tables it reads
(index, queue, deliveries, the file store's quarantine), so it lives with them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from storage.deliveries import delivery_status
from storage.exports import exports_status
from storage.feedback import feedback_rows
from storage.findings import findings_status
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
        ``quarantined`` (number of quarantined files), ``findings`` (every finding with its ``finding_id``, the
        Tracking UID ``harmonode feedback`` takes, its reliability and assessment state), ``feedback`` (the
        latest assessments, applied or refused, and why), ``exports`` (records kept, export jobs per target)
        ``cluster`` (the index's database, the workers seen by their heartbeats with ``alive``, and the jobs
        waiting and running per kind: the queue depths, from the database) and ``generated_at`` (epoch
        seconds): JSON-able.
    """
    studies = store.index.status()
    for study in studies["studies"]:
        for series in study["series"]:
            for f in series["findings"] if isinstance(series["findings"], list) else []:
                if isinstance(f, dict):
                    f["finding_id"] = f.get("tracking_uid", "")
    return {
        "node": {**identity, "data_dir": str(store.root.resolve())},
        "counts": store.index.counts(),
        **studies,
        "jobs": store.queue.jobs(),
        "deliveries": delivery_status(store.index),
        "conflicts": store.index.conflicts(),
        "quarantined": len(store.files.quarantined()),
        "findings": findings_status(store.index),
        "feedback": [{k: v for k, v in row.items()} for row in feedback_rows(store.index, limit=200)],
        "exports": exports_status(store.index, store.queue),
        "cluster": {
            "database": store.index.dialect,
            "workers": store.queue.workers.seen(stale_after_s=store.queue.stale_after_s),
            "queues": store.queue.depths(),
        },
        "generated_at": time.time(),
    }
