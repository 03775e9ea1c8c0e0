"""A series analysis cut in two for a cluster's queues: the GPU task's findings carried to a CPU task.

In a cluster the ``analyze-series`` task (the ``gpu`` queue) runs load → key → rule → harmonize → residual →
detect and stops at the findings; what the results need of its work travels in the payload of a
``series-results`` job (the ``cpu`` queue): the findings with their tracking UIDs, the seed-004 features, the
rule the series was harmonized with (``id@vN``, so a rule activated in between does not change a result
half-way) and what the residual stage did. The CPU task reads the stored source instances again, builds
and stores the SR, SEG, KOS, key images and GSPS, records the findings and queues the deliveries, so a GPU
never waits for result objects. The harmonized values travel only when a harmonized copy is written
(``[pipeline] write_harmonized_series``): as a ``.npy`` in the shared store, written like any file of it
(fsync, rename), deleted when the results are stored.

The embedded node runs both halves in one job (``node.pipeline.run_series``): nothing to carry.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.features import FindingFeatures
from models.findings import Finding
from models.residual import ResidualOutcome
from node.pipeline import (
    Analysed,
    DetectionOutcome,
    Harmonized,
    Worker,
    finish_series,
    load_series,
    settle_series,
)
from rules.keys import ConditionKey
from rules.registry import MatchKind, RuleMatch, RuleRegistry
from storage.index import SeriesState
from storage.queue import Job, JobKind, JobQueue

log = logging.getLogger(__name__)


def _features_json(features: FindingFeatures) -> dict[str, Any]:
    vector = np.ascontiguousarray(features.vector, dtype=np.float32)
    return {
        "vector": base64.b64encode(vector.tobytes()).decode("ascii"),
        "member_probabilities": list(features.member_probabilities),
        "reliability": features.reliability,
    }


def _features_of(doc: dict[str, Any]) -> FindingFeatures:
    vector = np.frombuffer(base64.b64decode(doc["vector"]), dtype=np.float32).copy()
    return FindingFeatures(vector, tuple(doc["member_probabilities"]), float(doc["reliability"]))


def _finding_of(doc: dict[str, Any]) -> Finding:
    return Finding(**{**doc, "center_mm": tuple(doc["center_mm"]), "center_index": tuple(doc["center_index"])})


def payload_of(analysed: Analysed, values_file: str = "") -> dict[str, Any]:
    """The ``series-results`` payload of an analysis (JSON-able; floats exact, features as float32 bytes)."""
    detection, harmonized = analysed.detection, analysed.harmonized
    residual = harmonized.residual if harmonized is not None else None
    return {
        "series_instance_uid": analysed.row["series_instance_uid"],
        "condition_key": str(analysed.key),
        "rule": analysed.match.rule_id,
        "match": str(analysed.match.match),
        "key_used": analysed.match.key_used,
        "findings": [dataclasses.asdict(f) for f in detection.findings],
        "features": [_features_json(f) for f in detection.features],
        "model_version": detection.model_version,
        "task": detection.task,
        "refused": detection.refused,
        "residual": None
        if residual is None
        else {"applied": residual.applied, "reason": residual.reason, "cached": residual.cached},
        "values_file": values_file,
        "timings": analysed.timings,
    }


def analysed_from(payload: dict[str, Any], worker: Worker, registry: RuleRegistry) -> Analysed | None:
    """The analysis a payload carries, with the series' stored instances read again; None when it is gone."""
    uid = payload["series_instance_uid"]
    row = worker.index.series(uid)
    if row is None:
        return None
    timings = dict(payload.get("timings") or {})
    loaded = load_series(worker.files, worker.index.instances_of_series(uid))
    rule = None if payload["rule"] == "identity" else registry.get(payload["rule"])
    match = RuleMatch(rule, MatchKind(payload["match"]), payload["key_used"])
    detection = DetectionOutcome(
        findings=[_finding_of(f) for f in payload["findings"]],
        model_version=payload["model_version"],
        task=payload["task"],
        refused=payload["refused"],
        features=[_features_of(f) for f in payload["features"]],
    )
    harmonized = None
    if payload["residual"] is not None:
        values = np.load(payload["values_file"]) if payload["values_file"] else np.empty(0, dtype=np.float32)
        residual = ResidualOutcome(values, **payload["residual"])
        harmonized = Harmonized(values, residual)
    key = ConditionKey.parse(payload["condition_key"])
    return Analysed(row, loaded, key, match, detection, harmonized, timings)


def _save_values(values: np.ndarray, folder: Path, series_uid: str) -> str:
    """The harmonized values as ``folder/<series>.npy``, durable before the job that names them exists."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{series_uid}.npy"
    partial = folder / f".{series_uid}.{os.getpid()}.npy"
    with open(partial, "wb") as out:
        np.save(out, values)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, final)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return str(final)


def hand_off_to(queue: JobQueue, folder: Path, keep_values: bool) -> Callable[[Analysed], None]:
    """What a cluster's GPU worker does after the detector: queue the ``series-results`` job of the CPU queue."""

    def hand_off(analysed: Analysed) -> None:
        uid = analysed.row["series_instance_uid"]
        values_file = ""
        harmonized = analysed.harmonized
        if keep_values and harmonized is not None and harmonized.residual.applied:
            values_file = _save_values(harmonized.values, folder, uid)
        queue.enqueue(JobKind.SERIES_RESULTS, uid, payload_of(analysed, values_file))
        log.info("series %s: %d finding(s); results queued for the CPU", uid, len(analysed.detection.findings))

    return hand_off


def series_results(job: Job, worker: Worker) -> None:
    """The ``series-results`` job: build, store and queue the results of a carried analysis, then ``done``.

    Skipped when the series reopened meanwhile (a late instance: it is analysed again). Any failure marks
    the series ``failed`` and goes to the queue, as the analysis does.
    """
    uid = job.payload.get("series_instance_uid") or job.key
    series = worker.index.series(uid)
    if series is None or series["state"] == SeriesState.RECEIVING:
        log.info("job %d: series %s is gone or reopened; its results wait for the next analysis", job.id, uid)
        return

    def stages() -> bool:
        analysed = analysed_from(job.payload, worker, RuleRegistry(worker.index.db, worker.index.lock))
        if analysed is None:
            return False
        finish_series(worker, analysed)
        return True

    settle_series(worker.index, uid, stages)
    if job.payload.get("values_file"):
        Path(job.payload["values_file"]).unlink(missing_ok=True)
