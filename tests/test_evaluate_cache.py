"""The candidate cache: counting from it reproduces a direct evaluation exactly; parallel and cached runs agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.detector import WEIGHTS_DIR
from models.training.candidate_cache import CacheError, load_candidates, save_candidates
from models.training.evaluate import Reading, Scoring, collect_candidates, summarize
from models.training.hits import REACH, SAC_TIGHT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "lesion.pt").exists(), reason="no shipped weights")
#: Two tiny held-out studies (size test); "harmonized" without rules keeps the test free of rule fitting
PLAN = [("head-cta", "philips-ict-b-lowdose", 52600, "test"), ("chest-ct", "ge-optima-bone-lowdose", 54600, "test")]
READINGS = [Reading("harmonized", None), Reading("raw", None)]


@pytest.fixture(scope="module")
def direct():
    import torch

    from models.detector import Detector

    torch.set_num_threads(1)
    detector = Detector.load(device="cpu")
    return detector, collect_candidates(detector, PLAN, READINGS, progress=False, jobs=1)


def _same(a, b) -> None:
    for name in ("centres_index", "centres_mm", "blob_mm", "probs", "labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.kind, a.condition, a.seed, a.size, a.body) == (b.kind, b.condition, b.seed, b.size, b.body)
    assert json.dumps(a.lesions) == json.dumps(b.lesions) and a.geometry == b.geometry


def test_the_cache_reproduces_a_direct_evaluation_exactly(direct, tmp_path):
    detector, readings = direct
    assert all(len(r.probs) > 0 for r in readings["raw"]) and sum(len(r.lesions) for r in readings["raw"]) > 0
    manifest = {"model": detector.version, "studies": 1, "size": "test", "subjects_from": 52600}
    save_candidates(tmp_path / "cache", readings, manifest)
    back_manifest, back = load_candidates(tmp_path / "cache")
    assert {k: back_manifest[k] for k in manifest} == manifest and list(back) == ["harmonized", "raw"]
    for label in back:
        for a, b in zip(readings[label], back[label], strict=True):
            _same(a, b)
    for scoring in (Scoring(), Scoring(REACH, SAC_TIGHT), Scoring(nms_min_mm={"head": 3.0, "chest": 20.0})):
        expected = json.dumps(summarize(readings["harmonized"], scoring))
        assert json.dumps(summarize(back["harmonized"], scoring)) == expected

    # harmonode evaluate --from-candidates: no simulator, no network; the same figures, by either rule
    def evaluate(*extra):
        args = ["evaluate", "--from-candidates", str(tmp_path / "cache"), "--plot", str(tmp_path / "f.png")]
        r = subprocess.run(
            [sys.executable, "-m", "node.cli", *args, *extra], capture_output=True, text=True, cwd=ROOT, timeout=120
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = json.loads(evaluate("--json"))
    want = json.loads(json.dumps(summarize(readings["harmonized"])))
    assert {k: v for k, v in out.items() if k in want} == want
    assert out["without_harmonization"] == json.loads(json.dumps(summarize(readings["raw"])))
    assert (tmp_path / "f.png").stat().st_size > 1000
    flipped = json.loads(evaluate("--json", "--rule", "reach"))
    assert flipped["hit_rule"]["name"] == "reach"
    assert flipped["sensitivity_at_fp"] == want["second"]["sensitivity_at_fp"]


def test_parallel_studies_and_the_simulation_cache_change_nothing(direct, tmp_path):
    detector, readings = direct
    for _ in range(2):  # the first run simulates into the cache, the second reads it back
        again = collect_candidates(detector, PLAN, READINGS[1:], progress=False, jobs=2, sim_cache=tmp_path / "sim")
        for a, b in zip(readings["raw"], again["raw"], strict=True):
            _same(a, b)
    assert len(list((tmp_path / "sim").rglob("*.pkl"))) == len(PLAN)


def test_a_missing_or_foreign_cache_is_refused(tmp_path):
    with pytest.raises(CacheError, match="manifest.json missing"):
        load_candidates(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CacheError, match="format 99"):
        load_candidates(tmp_path)
    args = ["evaluate", "--from-candidates", str(tmp_path), "--plot", str(tmp_path / "x")]
    r = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "format 99" in r.stderr
