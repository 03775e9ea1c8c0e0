"""Hard-example mining (seed 001): the parameter store, the keep rule with the shipped detector, the
neighbourhood search (select stored sets, generate when none is near), the mined set on disk, train reading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.mining import (
    Candidate,
    MinedSetError,
    MiningOptions,
    candidates_of,
    detector_scorer,
    load_mined,
    manifest_of,
    measure,
    mine,
    next_candidates,
    true_class_confidence,
    write_mined,
)
from rules.transfer import ParameterSet, parameter_distance
from storage.index import Index
from storage.parameters import conditions, store_parameters, stored_parameters

CT = (-400.0, 200.0)


def pset(soft: tuple[float, float], contrast: tuple[float, float], name: str = "") -> ParameterSet:
    return ParameterSet.of([(-900.0, 60.0), soft, contrast], CT, name)


def cand(p: ParameterSet, key: str = "chest-ct/x", ident: int = 0) -> Candidate:
    return Candidate(p, key, "stored", {"id": ident, "condition_key": key, **p.as_dict()})


@pytest.fixture
def index(tmp_path: Path) -> Index:
    db = Index(tmp_path / "index.sqlite")
    yield db
    db.close()


def test_store_keeps_one_set_per_source_and_filters_by_cell(index: Index) -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 10, size=(8, 32, 32)).astype(np.float32)
    volume[:, :8] = -1000
    measured = measure(volume, "CT", name="a")
    assert measured.thresholds == CT and measured.n_regions == 3
    assert measured.regions[1].mean == pytest.approx(40, abs=2)
    store_parameters(index, "series:1", "chest-ct/a", "CT", measured.as_dict())
    store_parameters(index, "series:1", "chest-ct/b", "CT", measured.as_dict())  # the series read again
    store_parameters(index, "simulated:x", "head-cta/a", "CT", pset((50, 20), (400, 90)).as_dict())
    assert conditions(index) == {"chest-ct/b": 1, "head-cta/a": 1}
    assert [s.source for s in stored_parameters(index, "chest-ct/*")] == ["series:1"]
    assert [s.source for s in stored_parameters(index, "head-cta/a")] == ["simulated:x"]
    assert stored_parameters(index, "chest_ct/*") == []  # the prefix's _ is no wildcard
    back = candidates_of(stored_parameters(index, "head-cta/a"))[0]
    assert back.parameters.vector.tolist() == pset((50, 20), (400, 90)).vector.tolist()
    assert back.provenance["source"] == "simulated:x"


def test_stored_sets_within_r_are_selected_nearest_first() -> None:
    centre = cand(pset((40, 30), (400, 100)))
    near, nearer, far = (cand(pset((40, 30), (410, 100)), ident=1), cand(pset((42, 30), (400, 100)), ident=2),
                         cand(pset((90, 30), (400, 100)), ident=3))  # fmt: skip
    unused = [near, nearer, far]
    chosen = next_candidates(
        centre, unused, MiningOptions(radius=25.0, neighbours_per_hard=2), np.random.default_rng(0)
    )
    assert chosen == [nearer, near]
    assert unused == [far]  # selected sets are not tried twice


@pytest.mark.parametrize("bounds", [{"radius": 15.0}, {"radius": None, "mean_tolerance": 5.0, "std_tolerance": 3.0}])
def test_sets_are_generated_within_r_when_none_is_near(bounds: dict) -> None:
    centre = cand(pset((40, 30), (400, 100)))
    far = cand(pset((140, 30), (400, 100)))
    options = MiningOptions(neighbours_per_hard=6, **bounds)
    made = next_candidates(centre, [far], options, np.random.default_rng(1))
    assert len(made) == 6 and all(m.origin == "generated" for m in made)
    for m in made:
        delta = np.abs(m.parameters.vector - centre.parameters.vector)
        if bounds["radius"]:
            assert 0 < parameter_distance(m.parameters, centre.parameters) < bounds["radius"]
        else:
            assert (delta[:, 0] < 5.0).all() and (delta[:, 1] < 3.0).all() and delta.sum() > 0


def test_true_class_confidence() -> None:
    assert true_class_confidence(np.array([0.9, 0.9, 0.2]), np.array([1, 0, 0])).tolist() == pytest.approx(
        [0.9, 0.1, 0.8]
    )


@pytest.fixture(scope="module")
def mined_run() -> tuple:
    """Two conversions of one simulated chest study, scored by the shipped detector; every sample and score
    the run saw is recorded."""
    import torch

    import models.training.data as data
    from models.detector import Detector

    torch.set_num_threads(1)
    detector = Detector.load("cpu")
    study = data.simulated("chest-ct", "ge-revolution-standard", 20_001, "test")
    base = measure(study.values, "CT")
    soft, contrast = base.regions[1], base.regions[2]
    # a dim, low-contrast target: lesions read closer to soft tissue, so some patches are hard
    stored = [cand(pset((soft.mean - 30, soft.std * 0.6), (contrast.mean - 150, contrast.std)), ident=7)]
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    scores: list[np.ndarray] = []
    score, sample = detector_scorer(detector), data.lesion_samples

    def recording_samples(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        samples.append(sample(*args, **kwargs))
        return samples[-1]

    def recording_score(x: np.ndarray, body: str) -> np.ndarray:
        scores.append(score(x, body))
        return scores[-1]

    options = MiningOptions(threshold=0.7, radius=20.0, budget=10_000, max_conversions=2, max_negatives=150, copies=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "lesion_samples", recording_samples)
        out = mine([study], stored, recording_score, detector.views, options, progress=False)
    return out, samples, scores, options


def test_mining_keeps_exactly_the_patches_under_the_threshold(mined_run: tuple) -> None:
    out, samples, scores, options = mined_run
    assert len(samples) == len(scores) == len(out.conversions) == 2  # a hard conversion led to a second one
    x, y = out.arrays()
    expected = [true_class_confidence(p, lab) < options.threshold for (_, lab), p in zip(samples, scores, strict=True)]
    assert all(e.any() and not e.all() for e in expected)  # some hard, some easy: the test can tell
    want_x = np.concatenate([patches[e] for (patches, _), e in zip(samples, expected, strict=True)])
    want_y = np.concatenate([lab[e] for (_, lab), e in zip(samples, expected, strict=True)])
    assert np.array_equal(x, want_x.astype(np.float16)) and np.array_equal(y, want_y)
    conf = np.array([r["confidence"] for r in out.provenance])
    assert (conf < options.threshold).all() and len(conf) == len(y)
    assert out.conversions[1]["origin"] == "generated"  # the only stored set was used: the next one was made near it


def test_the_mined_set_on_disk_has_provenance_and_train_reads_it(mined_run: tuple, tmp_path: Path) -> None:
    out, _, _, options = mined_run
    folder = write_mined(tmp_path / "mined", out, manifest_of(options, ("planes", "zoom", "mip"), "1.4.0"))
    lines = [json.loads(line) for line in (folder / "provenance.jsonl").read_text().splitlines()]
    assert len(lines) == len(out)
    first = lines[0]
    assert first["source"] == "simulated:chest-ct/ge-revolution-standard/20001"
    assert first["parameters"]["id"] == 7 and len(first["parameters"]["regions"]) == 3
    assert 0 <= first["confidence"] < 0.7 and first["label"] in (0, 1)
    assert {line["origin"] for line in lines} <= {"stored", "generated"}
    x, y, manifest = load_mined(folder, channels=9)
    assert len(x) == len(y) == len(out) and manifest["patches"] == len(out)
    with pytest.raises(MinedSetError, match="channels"):
        load_mined(folder, channels=3)
    with pytest.raises(MinedSetError, match="not a mined set"):
        load_mined(tmp_path)


def test_train_lesions_adds_the_mined_set(mined_run: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training.train as train

    out, _, _, options = mined_run
    folder = write_mined(tmp_path / "mined", out, manifest_of(options, ("planes", "zoom", "mip"), "1.4.0"))
    rng = np.random.default_rng(0)
    base_x = rng.normal(size=(40, 9, 32, 32)).astype(np.float16)
    base_y = np.array([0, 1] * 20, np.int64)
    monkeypatch.setattr(train, "collect", lambda *a, **k: (base_x, base_y))
    monkeypatch.setattr(train, "calibrate_thresholds", lambda *a, **k: {"head": 0.5, "chest": 0.5})
    metrics = train.train_lesions(tmp_path / "net.pt", None, studies=1, epochs=1, harmonize=False, width=4,
                                  test_size_studies=0, mine=0, extra_patches=folder, size="test")  # fmt: skip
    assert metrics["n_train_patches_before_extra"] == 40
    assert metrics["n_train_patches"] == 40 + len(out)
    assert metrics["extra_patches"]["patches"] == len(out)
