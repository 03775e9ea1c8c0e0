"""``storage.status.collect_status``: what ``harmonode status`` reports, read from an open store."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.uid import generate_uid

from builders import SeriesSpec, encoded, synthetic_instance
from storage.index import instance_meta_from_dataset
from storage.queue import ANALYZE_SERIES
from storage.status import collect_status
from storage.store import StoreSettings, open_store

IDENTITY = {"ae_title": "HARMONODE", "host": "127.0.0.1", "port": 11112}


def test_an_empty_store_reports_its_identity_and_nothing_else(tmp_path: Path) -> None:
    with open_store(tmp_path / "var", StoreSettings(fsync=False)) as store:
        report = collect_status(store, IDENTITY)
    assert report["node"] == {**IDENTITY, "data_dir": str((tmp_path / "var").resolve())}
    assert list(report["node"]) == ["ae_title", "host", "port", "data_dir"]
    assert report["counts"] == {"patients": 0, "studies": 0, "series": 0, "instances": 0, "conflicts": 0}
    assert (report["studies"], report["jobs"], report["deliveries"], report["quarantined"]) == ([], [], [], 0)


def test_a_received_series_its_job_and_a_quarantined_file(tmp_path: Path) -> None:
    spec = SeriesSpec("S1", "STATUS^ONE", generate_uid(), "20240510", "090000", "A1", generate_uid(), "CT", 1)
    ds = synthetic_instance(spec, 1)
    with open_store(tmp_path, StoreSettings(fsync=False)) as store:
        stored = store.files.write_instance(spec.study_uid, spec.series_uid, ds.SOPInstanceUID, encoded(ds))
        store.index.record_instance(
            instance_meta_from_dataset(ds), store.files.relpath(stored.path), stored.size, stored.sha256, stored.version
        )
        store.queue.enqueue(ANALYZE_SERIES, spec.series_uid, {"series_instance_uid": spec.series_uid})
        store.files.quarantine(b"junk", "not DICOM")
        report = collect_status(store, IDENTITY)
    assert report["counts"]["instances"] == 1
    (study,) = report["studies"]
    assert study["study_instance_uid"] == spec.study_uid
    assert [(s["series_instance_uid"], s["instance_count"]) for s in study["series"]] == [(spec.series_uid, 1)]
    assert [(j["kind"], j["key"]) for j in report["jobs"]] == [(ANALYZE_SERIES, spec.series_uid)]
    assert report["quarantined"] == 1
    json.dumps(report)  # JSON-able for `status --json`
    assert "STATUS^ONE" not in json.dumps(report)  # no patient identity in the report
