"""``harmonode train sweep`` and ``harmonode train card``: their options, and the runs they refuse before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.training.sweep import RECIPES, SweepOptions, channels_of, froc

ROOT = Path(__file__).parent.parent


def harmonode(*args: str, env_out: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"OUT": str(env_out)} if env_out else {})}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env
    )


def said(r: subprocess.CompletedProcess[str]) -> str:
    return " ".join(r.stderr.replace("│", " ").split())  # typer's error box wraps lines


def test_train_lists_the_sweep_and_the_card():
    out = harmonode("train", "--help").stdout
    for cmd in ("landmarks", "lesions", "sweep", "card"):
        assert cmd in out


@pytest.mark.parametrize(
    "option",
    ["--head-studies", "--lesions", "--landmark-negatives", "--rescan", "--phase-a-device", "--per-cond", "--gpu-jobs",
     "--recipes", "--rules", "--out"],
)  # fmt: skip
def test_the_sweep_takes_the_benchmark_scripts_options(option):
    assert option in " ".join(harmonode("train", "sweep", "--help").stdout.split())


def test_a_sweep_on_the_evaluation_subjects_is_refused(tmp_path: Path):
    r = harmonode("train", "sweep", "--subjects-from", "50500", "--work", str(tmp_path / "w"), env_out=tmp_path / "o")
    assert r.returncode == 2 and "overlap the eval subjects" in said(r)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_an_unknown_recipe_is_refused(tmp_path: Path):
    r = harmonode("train", "sweep", "--recipes", "all,slab", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown recipes ['slab']" in said(r)
    assert not (tmp_path / "o").exists()


def test_only_a_views_recipe_becomes_a_card(tmp_path: Path):
    args = ("--version", "9.0.0", "--sweep-command", "x", "--data", "y", "--weights", str(tmp_path))
    r = harmonode("train", "card", str(tmp_path / "states.pt"), "--recipe", "all+fine", *args)
    assert r.returncode == 2 and "only views recipes (base, zoom, mip, all, wide, every) can be shipped" in said(r)
    assert list(tmp_path.iterdir()) == []


def test_recipes_name_their_channels_and_options():
    assert len(RECIPES) == 6 * 2 * 2 * 2
    assert channels_of(("planes", "mip")) == [0, 1, 2, 6, 7, 8]
    assert RECIPES["all+rs"] == ([0, 1, 2, 3, 4, 5, 6, 7, 8], False, False, True)
    assert SweepOptions().recipes == tuple(RECIPES)


def test_the_sweeps_froc_leaves_the_fine_candidates_out_unless_asked():
    # one head study: a lesion at the origin found only by a fine-scale candidate (0.9); a normal one at 0.5
    row = {
        "kind": "head-cta", "body": "head", "mm": np.array([[0.0, 0, 0], [40.0, 0, 0]]), "diam": np.full(2, 3.0),
        "fine": np.array([True, False]), "lesions": [{"center_mm": [0.0, 0, 0], "diameter_mm": 3.0}],
    }  # fmt: skip
    probs = [np.array([0.9, 0.5])]
    with_fine, without = froc([row], probs, True)["head-cta"], froc([row], probs, False)["head-cta"]
    assert with_fine["1"] == 1.0 and with_fine["by_size"] == {"3-5 mm": "1/1"}
    assert without["1"] == 0.0 and without["by_size"] == {"3-5 mm": "0/1"}
