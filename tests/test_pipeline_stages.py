"""Each pipeline stage on its own (what it reads in, what it gives back), and a run without a whole Node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from builders import encoded
from handlers.store import store_encoded
from models.volume import build_volume
from node.config import PipelineConfig
from node.pipeline import (
    DetectorSlot,
    LoadedSeries,
    Worker,
    condition_key,
    detect,
    find_rule,
    harmonize,
    load_series,
    result_objects,
    run_series,
)
from rules.apply import apply_rule
from rules.keys import BodyPart, ConditionKey, body_part_of
from rules.registry import MatchKind, RuleRegistry
from simulator.studies import simulate_study
from storage.index import Origin
from storage.recovery import recover
from storage.store import Store, open_store

SEED_RULE = {"a": 0.9, "b": 12.0, "c": -200.0}


@pytest.fixture(scope="module")
def study():  # noqa: ANN201
    """A small head CTA of a GE scanner with one 8 mm aneurysm."""
    return simulate_study("head-cta", "ge-revolution-standard", seed=11, size="test", lesion_diameters_mm=[8.0])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "node") as s:
        yield s


def _receive(store: Store, datasets) -> str:  # noqa: ANN001
    """Store instances as a C-STORE would (bytes as encoded); return their series UID."""
    for ds in datasets:
        store_encoded(encoded(ds), str(ds.file_meta.TransferSyntaxUID), "", "", store.files, store.index)
    return str(datasets[0].SeriesInstanceUID)


def _worker(store: Store, **settings) -> Worker:  # noqa: ANN003
    """A worker without detector weights (a node where none are installed): every other stage runs."""

    def no_weights(device: str) -> None:
        raise FileNotFoundError("no weights in this test")

    return Worker(
        store.files, store.index, store.queue, PipelineConfig(**settings), (), DetectorSlot(loader=no_weights)
    )


def test_condition_key_from_the_tags_kept_at_ingest(study) -> None:  # noqa: ANN001
    tags = {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "Revolution CT",
        "ConvolutionKernel": "STANDARD",
    }
    key = condition_key(tags, "CT")
    assert isinstance(key, ConditionKey) and str(key).startswith("CT|ge|revolution-ct|standard|")


def test_find_rule_exact_then_identity(store: Store) -> None:
    key = ConditionKey.parse("CT|ge|revolution-ct|standard|ctdi5-15|120kv")
    registry = RuleRegistry(store.index.db, store.index.lock)
    assert find_rule(registry, key).match is MatchKind.IDENTITY
    rule = registry.add(key, "seed", SEED_RULE, activate=True)
    match = find_rule(registry, key)
    assert match.match is MatchKind.EXACT and match.rule_id == f"{rule.id}@v1"


def test_harmonize_is_identity_without_a_rule_and_the_rule_with_one(study, store: Store) -> None:  # noqa: ANN001
    volume = build_volume(study.datasets)
    assert harmonize(volume, None) is volume.values
    rule = RuleRegistry(store.index.db).add(ConditionKey.parse("CT|ge|*|*|*|*"), "seed", SEED_RULE)
    assert np.allclose(harmonize(volume, rule), apply_rule(rule, volume.values), atol=1e-3)


def test_load_series_builds_the_volume_or_says_why_not(study, store: Store) -> None:  # noqa: ANN001
    uid = _receive(store, study.datasets)
    loaded = load_series(store.files, store.index.instances_of_series(uid))
    assert loaded.volume is not None and loaded.volume.values.shape[0] == len(study.datasets) and not loaded.refused
    few = load_series(store.files, store.index.instances_of_series(uid)[:3])
    assert few.volume is None and "3 slice(s)" in few.refused and len(few.datasets) == 3


def test_detect_without_weights_says_so(study) -> None:  # noqa: ANN001
    volume = build_volume(study.datasets)
    outcome = detect(None, volume.values, volume, BodyPart.HEAD)
    assert outcome.refused == "no detector weights are installed on this node" and outcome.findings == []


def test_body_part_from_the_header() -> None:
    assert body_part_of({"BodyPartExamined": "CHEST"}, "", "CT") is BodyPart.CHEST
    assert body_part_of({}, "CT THORAX low dose", "CT") is BodyPart.CHEST
    assert body_part_of({"BodyPartExamined": "CHEST"}, "", "MR") is BodyPart.HEAD
    assert body_part_of({"BodyPartExamined": "HEAD"}, "", "CT") is BodyPart.HEAD


def test_result_objects_of_a_refused_series_is_one_sr(study, store: Store) -> None:  # noqa: ANN001
    key = ConditionKey.parse("CT|ge|revolution-ct|standard|ctdi5-15|120kv")
    match = find_rule(RuleRegistry(store.index.db), key)
    loaded = LoadedSeries(study.datasets[:3], None, "3 slices: a volume needs at least 8")
    from node.pipeline import DetectionOutcome

    (sr,) = result_objects(loaded, key, match, DetectionOutcome(refused=loaded.refused), PipelineConfig())
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study.datasets[0].StudyInstanceUID


def test_rerun_with_harmonized_series_adds_no_second_set_of_instances(study, store: Store) -> None:  # noqa: ANN001
    # Defect of review: the harmonized copy had random SOP Instance UIDs under a stable series UID.
    uid = _receive(store, study.datasets)
    worker = _worker(store, write_harmonized_series=True)
    first = run_series(worker, uid)
    second = run_series(worker, uid)
    assert [r.sop_instance_uid for r in first.results] == [r.sop_instance_uid for r in second.results]
    derived = store.index.query("SELECT series_instance_uid FROM series WHERE series_number = 9900")
    assert len(derived) == 1
    instances = store.index.instances_of_series(derived[0]["series_instance_uid"], latest_only=False)
    assert len(instances) == len(study.datasets)
    assert first.timings.keys() == {"load", "key", "rule", "parameters", "harmonize", "residual", "detect", "results"}


def test_recovery_keeps_results_as_results(study, tmp_path: Path) -> None:  # noqa: ANN001
    # Defect of review: recovery re-indexed the node's own results as received instances, state receiving.
    with open_store(tmp_path / "node") as store:
        uid = _receive(store, study.datasets)
        outcome = run_series(_worker(store, write_harmonized_series=True), uid)
        result_series = {r.series_instance_uid for r in outcome.results}
    (tmp_path / "node" / "index.sqlite").unlink()  # the index lost; the files are the truth
    for leftover in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "node" / leftover).unlink(missing_ok=True)
    with open_store(tmp_path / "node") as store:
        report = recover(store.files, store.index)
        assert report.reindexed == len(study.datasets) + len(outcome.results)
        rows = {r["series_instance_uid"]: r for r in store.index.query("SELECT * FROM series")}
        assert rows[uid]["origin"] == Origin.RECEIVED and rows[uid]["state"] == "receiving"
        for series_uid in result_series:
            assert rows[series_uid]["origin"] == Origin.RESULT and rows[series_uid]["state"] == "done"
