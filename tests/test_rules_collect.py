"""``rules.collect``: series for fitting from a folder and from the store, hold-out splits, fit, report, store."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
from pydicom import dcmwrite

from rules.collect import (
    SeriesImages,
    fit_conditions,
    fit_rules,
    series_from_dir,
    series_from_store,
    split_holdout,
    store_rules,
)
from rules.fit import FitError, FitOptions
from rules.registry import RuleRegistry
from storage.index import instance_meta_from_dataset
from storage.store import StoreSettings, open_store

simulate = pytest.importorskip("simulator.studies")

CT = ("ge-revolution-standard", "ge-optima-bone-lowdose")


def _studies(conditions: tuple[str, ...], per_condition: int = 2, kind: str = "head-cta") -> list:
    return [
        simulate.simulate_study(kind, name, 100 * i + j, "test", slices=6, matrix=48)
        for i, name in enumerate(conditions)
        for j in range(per_condition)
    ]


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[SeriesImages]:
    root = tmp_path_factory.mktemp("ct")
    for k, study in enumerate(_studies(CT)):
        simulate.write_study(study, root / f"s{k}")
    return series_from_dir(root)


def _series(key: str, uid: str, n: int = 1) -> SeriesImages:
    return SeriesImages(uid, key.split("|", 1)[0], key, [np.full(4, float(len(uid)))] * n)


def test_series_from_dir_groups_slices_by_series_and_skips_what_is_not_an_image(tmp_path: Path) -> None:
    for k, study in enumerate(_studies(CT, per_condition=1)):
        simulate.write_study(study, tmp_path / f"s{k}")
    (tmp_path / "notes.bin").write_bytes(b"not dicom")
    shown: list[tuple[str, int]] = []

    def progress(items, desc, unit):  # noqa: ANN001, ANN202
        items = list(items)
        shown.append((desc, len(items)))
        return items

    series = series_from_dir(tmp_path, progress)
    assert len(series) == 2 and all(len(s.histograms) == 6 for s in series)
    assert len({s.key for s in series}) == 2 and all(s.key.startswith("CT|") for s in series)
    assert shown == [("reading", 2 * 6 + 1)]  # the slices and the junk file; the truth JSON is not read


def test_series_from_store_reads_only_the_studies_asked_for(tmp_path: Path) -> None:
    studies = _studies(CT, per_condition=1)
    with open_store(tmp_path, StoreSettings(fsync=False)) as store:
        for study in studies:
            for ds in study.datasets:
                buf = io.BytesIO()
                dcmwrite(buf, ds, enforce_file_format=True)
                stored = store.files.write_instance(
                    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue()
                )
                meta = instance_meta_from_dataset(ds)
                store.index.record_instance(
                    meta, store.files.relpath(stored.path), stored.size, stored.sha256, stored.version
                )
        assert len(series_from_store(store.index, store.files)) == 2
        first = str(studies[0].datasets[0].StudyInstanceUID)
        only = series_from_store(store.index, store.files, [first])
        assert [s.series_uid for s in only] == [str(studies[0].datasets[0].SeriesInstanceUID)]
        assert len(only[0].histograms) == 6
        assert series_from_store(store.index, store.files, []) == []


@pytest.mark.parametrize(
    ("n_series", "holdout", "n_held"),
    [(1, 0.9, 0), (2, 0.5, 1), (4, 0.5, 2), (4, 0.0, 0), (3, 0.99, 2)],
)
def test_split_holdout_holds_out_whole_series_never_the_last(n_series: int, holdout: float, n_held: int) -> None:
    series = [_series("CT|a", f"1.{i}", n=i + 1) for i in range(n_series)]
    fit, held = split_holdout(list(reversed(series)), holdout)
    assert len(held.get("CT|a", [])) == sum(range(1, n_held + 1))  # the series first in UID order, whole
    assert len(fit["CT|a"]) == sum(range(n_held + 1, n_series + 1))


def test_fit_rules_reports_and_stores_one_rule_per_condition(ct_series: list[SeriesImages]) -> None:
    fitted = fit_rules(ct_series, FitOptions(), holdout=0.5)
    rows = {r["key"]: r for r in fitted.summary}
    assert len(rows) == 2 and sum(r["reference"] for r in rows.values()) == 1
    other = next(r for r in rows.values() if not r["reference"])
    assert other["n_series"] == 2 and other["n_images"] == 6  # one of the two series held out
    assert other["similarity_after"] > other["similarity_before"]
    assert "similarity_after_piecewise" in other and other["heldout_jsd_after"] < other["heldout_jsd_before"]
    registry = RuleRegistry(sqlite_utils.Database(memory=True))
    stored = store_rules(registry, fitted, "dir:test", activate=True)
    assert sorted(r.label for r in stored) == sorted(r["rule"] for r in fitted.summary)
    assert {r.provenance["source"] for r in registry.active()} == {"dir:test"}
    assert all(len(r.provenance["histograms"]["group"]) > 0 for r in stored)


def test_fit_conditions_skips_a_lone_modality_and_names_a_missing_reference(
    ct_series: list[SeriesImages], caplog: pytest.LogCaptureFixture
) -> None:
    groups, _ = split_holdout(ct_series, 0.0)
    groups["MR|siemens|skyra|tof|3t|head"] = groups[next(iter(groups))]
    with caplog.at_level(logging.WARNING, logger="rules.collect"):
        results = fit_conditions(groups, FitOptions())
    assert [r.reference_key.split("|")[0] for r in results] == ["CT"]
    assert "MR head: only one condition" in caplog.text
    with pytest.raises(FitError, match="reference MR|.* is not one of the conditions found"):
        fit_conditions(groups, FitOptions(), reference="MR|siemens|skyra|tof|3t|head")
    with pytest.raises(FitError, match="reference CT|acme|.* is not one of the conditions found"):
        fit_conditions(groups, FitOptions(), reference="CT|acme|x|y|z|w")
    with pytest.raises(FitError, match="CT head: reference .* is not one of the groups"):
        fit_conditions(groups, FitOptions(), reference="CT|acme|x|y|z|w|head")
    with pytest.raises(FitError, match="at least two imaging conditions of one modality and body region"):
        fit_conditions({"CT|a": groups[next(iter(groups))]}, FitOptions())


@pytest.mark.parametrize(("holdout", "message"), [(0.0, "no CT or MR images"), (1.0, "must be in")])
def test_fit_rules_refuses_nothing_to_fit_and_a_bad_holdout(
    ct_series: list[SeriesImages], holdout: float, message: str
) -> None:
    with pytest.raises(FitError, match=message):
        fit_rules([] if holdout == 0.0 else ct_series, FitOptions(), holdout=holdout)


@pytest.fixture(scope="module")
def head_and_chest(tmp_path_factory: pytest.TempPathFactory) -> list[SeriesImages]:
    root = tmp_path_factory.mktemp("regions")
    studies = _studies(CT) + _studies(CT, kind="chest-ct") + _studies(("siemens-force-br40",), kind="chest-ct")
    for k, study in enumerate(studies):
        simulate.write_study(study, root / f"s{k}")
    return series_from_dir(root)


def test_fit_groups_by_region_each_against_its_own_reference(head_and_chest: list[SeriesImages]) -> None:
    fitted = fit_rules(head_and_chest, FitOptions(starts=2, max_steps=40))
    assert [(r.reference_key.rsplit("|", 1)[1], len(r.groups)) for r in fitted.results] == [("chest", 3), ("head", 2)]
    assert {(row["region"], row["key"].rsplit("|", 1)[1]) for row in fitted.summary} == {
        ("chest", "chest"),
        ("head", "head"),
    }
    registry = RuleRegistry(sqlite_utils.Database(memory=True))
    stored = store_rules(registry, fitted, "dir:test", activate=True)
    assert len(stored) == 5 and all(r.provenance["reference_key"].endswith("|" + r.key.region) for r in stored)


def test_a_reference_without_region_is_that_condition_in_every_region(head_and_chest: list[SeriesImages]) -> None:
    optima = next(s.key for s in head_and_chest if "optima" in s.key and s.key.endswith("|head"))
    options = FitOptions(starts=2, max_steps=40)
    every = optima.rsplit("|", 1)[0] + "|*"
    fitted = fit_rules(head_and_chest, options, reference=every)
    assert sorted(r.reference_key for r in fitted.results) == sorted([optima, optima[: -len("head")] + "chest"])
    assert fitted.skipped == []
    revolution = next(s.key for s in head_and_chest if "revolution" in s.key and s.key.endswith("|head"))
    only_head = fit_rules(head_and_chest, options, reference=revolution)
    refs = {r.reference_key.rsplit("|", 1)[1]: r.reference_key for r in only_head.results}
    assert refs["head"] == revolution and "revolution" not in refs["chest"]  # chest picks its own reference


def test_a_region_without_the_reference_condition_is_skipped_and_says_what_to_do(
    head_and_chest: list[SeriesImages], caplog: pytest.LogCaptureFixture
) -> None:
    no_optima_chest = [s for s in head_and_chest if not ("optima" in s.key and s.key.endswith("|chest"))]
    every = next(s.key for s in head_and_chest if "optima" in s.key).rsplit("|", 1)[0] + "|*"
    with caplog.at_level(logging.WARNING, logger="rules.collect"):
        fitted = fit_rules(no_optima_chest, FitOptions(starts=2, max_steps=40), reference=every)
    assert [r.reference_key.rsplit("|", 1)[1] for r in fitted.results] == ["head"]
    (message,) = fitted.skipped
    assert message.startswith("CT chest: no chest series of the reference condition") and "--reference" in message
    assert message in caplog.text
    with pytest.raises(FitError, match="is not one of the conditions found"):
        fit_rules([s for s in no_optima_chest if s.key.endswith("|chest")], FitOptions(), reference=every)
