"""Data extension (seed 000, 0143): the inverse rule inverts the rule, and the reference studies it converts are
added to training as studies of the scarce condition."""

from __future__ import annotations

import numpy as np
import pytest

from models.training import data, extension
from rules.apply import apply_rule, invert_rule, make_map
from rules.fit import FitOptions, fit_groups
from rules.histogram import default_spec, image_histogram

SCARCE = "siemens-definition-hr64"


@pytest.fixture(scope="module")
def fitted() -> dict:
    """A real seed-000 fit of one scarce chest condition against the reference (two studies each, size test)."""
    spec = default_spec("CT")
    groups = {
        cond: [
            image_histogram(data.simulated("chest-ct", cond, 90_500 + i + 10 * k, "test").values, spec)
            for i in range(2)
        ]
        for k, cond in enumerate((data.REFERENCE["chest-ct"], SCARCE))
    }
    fit = fit_groups(groups, spec, FitOptions(starts=2, max_steps=80), reference=data.REFERENCE["chest-ct"])
    return {"chest-ct": {g.key: g.mapping for g in fit.groups}}


def test_the_inverse_of_a_fitted_rule_round_trips_within_a_hu(fitted: dict) -> None:
    mapping = fitted["chest-ct"][SCARCE]
    assert mapping.method != "identity"
    hu = np.linspace(-1000, 1500, 5001, dtype=np.float32)
    back = apply_rule(mapping, invert_rule(mapping, hu))
    assert np.abs(back - hu).max() < 1.0
    # and the other way: a value of the scarce condition, harmonized, then shown as that condition again
    values = data.simulated("chest-ct", SCARCE, 90_777, "test").values
    assert np.abs(invert_rule(mapping, apply_rule(mapping, values)) - values)[values > -900].max() < 1.0


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("seed", {"a": 1.1, "b": 15.0, "c": 100.0}),
        ("piecewise", {"xs": [-1000, 0, 300, 1500], "ys": [-990, 10, 280, 1600]}),
    ],
)
def test_the_inverse_inverts_each_rule_method(method: str, parameters: dict) -> None:
    mapping = make_map(method, parameters)
    hu = np.linspace(-1200, 2000, 3201, dtype=np.float32)
    assert np.abs(invert_rule(mapping, apply_rule(mapping, hu)) - hu).max() < 1.0
    assert np.abs(apply_rule(mapping, hu) - hu).max() > 5  # not the identity: the test can tell


def test_extension_converts_reference_studies_and_labels_them_scarce(fitted: dict) -> None:
    reference = data.simulated("chest-ct", data.REFERENCE["chest-ct"], 20_002, "test")
    [extra] = extension.extension_studies(reference, {"chest-ct": (SCARCE,)}, fitted)
    assert extra.condition == SCARCE and extra.seed == reference.seed and extra.truth == reference.truth
    assert np.array_equal(extra.values, invert_rule(fitted["chest-ct"][SCARCE], reference.values))
    assert not np.allclose(extra.values, reference.values)
    other = data.simulated("chest-ct", "canon-aquilion-fc43", 20_003, "test")
    assert extension.extension_studies(other, {"chest-ct": (SCARCE,)}, fitted) == []  # only the reference is extended
    assert extension.extension_studies(reference, None, fitted) == []


def test_collect_adds_the_extended_studies(fitted: dict) -> None:
    plan = [("chest-ct", data.REFERENCE["chest-ct"], 20_002, "test")]
    _, y = data.collect("lesions", plan, None, seed=0, n_lesions=2)
    _, y_ext = data.collect("lesions", plan, None, seed=0, n_lesions=2, extend={"chest-ct": (SCARCE,)},
                            extend_rules={"test": fitted})  # fmt: skip
    assert len(y_ext) > len(y) and y_ext.sum() > y.sum()
