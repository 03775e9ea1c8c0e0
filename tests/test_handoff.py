"""A cluster's analysis cut at the findings (``node.handoff``): the GPU task queues a ``series-results`` job
whose payload carries what the results need, and the CPU task makes the same results the one-job pipeline
makes: the same objects (UIDs), the same findings with their tracking UIDs, the same features.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from builders import encoded
from handlers.store import store_encoded
from models.residual import ResidualOutcome
from node.config import PipelineConfig
from node.handoff import analysed_from, hand_off_to, payload_of, series_results
from node.pipeline import DetectorSlot, Harmonized, Worker, analyse_series, analyze_series
from rules.registry import RuleRegistry
from simulator.studies import simulate_study
from storage import findings as found
from storage.queue import JobKind
from storage.store import Store, open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study():  # noqa: ANN201
    return simulate_study("head-cta", "ge-revolution-standard", seed=11, size="test", lesion_diameters_mm=[8.0])


def _receive(store: Store, datasets) -> str:  # noqa: ANN001
    for ds in datasets:
        store_encoded(encoded(ds), str(ds.file_meta.TransferSyntaxUID), "", "", store.files, store.index)
    return str(datasets[0].SeriesInstanceUID)


def _worker(store: Store, detector: DetectorSlot, split: bool, **settings) -> Worker:  # noqa: ANN003
    hand_off = hand_off_to(store.queue, store.root / "handoff", True) if split else None
    return Worker(
        store.files, store.index, store.queue, PipelineConfig(**settings), (), detector, hand_off=hand_off
    )


def _results(store: Store, series_uid: str) -> set[tuple[str, str]]:
    rows = store.index.query(
        "SELECT i.sop_class_uid, i.sop_instance_uid FROM instances i JOIN series s"
        " ON s.series_instance_uid = i.series_instance_uid WHERE s.origin = 'result'"
    )
    return {(r["sop_class_uid"], r["sop_instance_uid"]) for r in rows}


def test_the_split_analysis_makes_the_results_of_the_one_job_pipeline(study, tmp_path: Path) -> None:  # noqa: ANN001
    detector = DetectorSlot("cpu")
    with open_store(tmp_path / "one") as one, open_store(tmp_path / "two") as two:
        uid = _receive(one, study.datasets)
        assert _receive(two, study.datasets) == uid
        for store in (one, two):
            store.index.update_series(uid, state="complete")
            store.queue.enqueue(JobKind.ANALYZE_SERIES, uid, {"series_instance_uid": uid})
        analyze_series(one.queue.claim([JobKind.ANALYZE_SERIES]), _worker(one, detector, split=False))
        split = _worker(two, detector, split=True)
        analyze_series(two.queue.claim([JobKind.ANALYZE_SERIES]), split)
        assert two.index.series(uid)["state"] == "processing" and _results(two, uid) == set()
        job = two.queue.claim([JobKind.SERIES_RESULTS])
        assert job is not None and job.key == uid
        json.dumps(job.payload)  # what travels is plain JSON
        series_results(job, split)
        assert two.index.series(uid)["state"] == one.index.series(uid)["state"] == "done"
        assert _results(two, uid) == _results(one, uid) and _results(one, uid)
        mine = [(f["finding_id"], f["kind"]) for f in found.findings_of_series(two.index, uid)]
        theirs = [(f["finding_id"], f["kind"]) for f in found.findings_of_series(one.index, uid)]
        assert mine == theirs and mine, "the study's aneurysm is found either way, with the same tracking UID"
        assert json.loads(two.index.series(uid)["findings"]) == json.loads(one.index.series(uid)["findings"])


def test_the_payload_carries_findings_features_and_the_harmonized_values_exactly(study, tmp_path: Path) -> None:  # noqa: ANN001
    with open_store(tmp_path / "node") as store:
        uid = _receive(store, study.datasets)
        worker = _worker(store, DetectorSlot("cpu"), split=True, write_harmonized_series=True)
        analysed = analyse_series(worker, uid)
        values = analysed.loaded.volume.values.astype(np.float32) + 1.5
        analysed = dataclasses.replace(analysed, harmonized=Harmonized(values, ResidualOutcome(values, True, "", True)))
        worker.hand_off(analysed)
        payload = store.queue.claim([JobKind.SERIES_RESULTS]).payload
        assert Path(payload["values_file"]).is_file()
        back = analysed_from(payload, worker, RuleRegistry(store.index.db, store.index.lock))
        assert back.detection.findings == analysed.detection.findings
        for a, b in zip(back.detection.features, analysed.detection.features, strict=True):
            assert np.array_equal(a.vector, b.vector) and a.reliability == b.reliability
        assert np.array_equal(back.harmonized.values, values) and back.harmonized.residual.applied
        assert back.match.rule_id == analysed.match.rule_id and str(back.key) == str(analysed.key)
        assert json.loads(json.dumps(payload_of(back, payload["values_file"])["findings"])) == payload["findings"]
