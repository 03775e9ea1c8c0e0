"""The rule registry: versions, activation, lookup fallbacks (body region first), export/import all-or-nothing."""

from __future__ import annotations

import copy
import json

import pytest
import sqlite_utils

from rules.keys import ConditionKey
from rules.registry import FORMAT_VERSION, RuleError, RuleFileError, RuleRegistry, UnknownRule

KEY = ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi5-15|100kv|head")
SEED = {"a": 0.9, "b": 15.0, "c": 150.0}


@pytest.fixture
def registry() -> RuleRegistry:
    return RuleRegistry(sqlite_utils.Database(memory=True))


def _snapshot(reg: RuleRegistry) -> list[dict]:
    return list(reg.db.query("SELECT * FROM rules ORDER BY id, version"))


def test_versions_and_activation(registry: RuleRegistry) -> None:
    v1 = registry.add(KEY, "seed", SEED, {"n_images": 10}, activate=True)
    v2 = registry.add(KEY, "seed", {**SEED, "a": 0.95})
    assert (v1.id, v1.version, v2.version) == (v2.id, 1, 2)
    assert registry.lookup(KEY).rule.label == v1.label  # adding does not activate
    registry.activate(v2.id)
    assert registry.lookup(KEY).rule.label == v2.label
    assert [r.label for r in registry.active()] == [v2.label]
    registry.activate(v1.label)
    assert registry.lookup(KEY).rule.parameters == SEED
    other = registry.add(KEY, "piecewise", {"xs": [0, 1], "ys": [0, 1]}, activate=True)
    assert other.id != v1.id and [r.label for r in registry.active()] == [other.label]  # one active per key


def test_lookup_fallbacks(registry: RuleRegistry) -> None:
    assert registry.lookup(KEY).match == "identity" and registry.lookup(KEY).rule is None
    registry.add(KEY, "seed", SEED, activate=True)
    cases = {
        "CT|ge|optima-ct660|bone|ctdi5-15|100kv|head": "exact",
        "CT|ge|optima-ct660|bone|ctdi5-15|100kv|chest": "drop-region",
        "CT|ge|optima-ct660|bone|ctdi30-60|100kv|head": "drop-dose",
        "CT|ge|optima-ct660|bone|ctdi30-60|100kv|chest": "drop-dose",
        "CT|ge|revolution-ct|bone|ctdi30-60|100kv|head": "drop-model",
        "CT|ge|revolution-ct|standard|ctdi30-60|120kv|unknown": "manufacturer",
        "CT|siemens|somatom-force|br40d|ctdi15-30|100kv|head": "identity",
        "MR|ge|signa|1.5t|tof|head": "identity",
    }
    for text, match in cases.items():
        found = registry.lookup(ConditionKey.parse(text))
        assert found.match == match, text
        assert (found.rule is None) == (match == "identity")
    used = registry.lookup(ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi30-60|100kv|head")).key_used
    assert used == "CT|ge|optima-ct660|bone|*|100kv|*"


def test_more_specific_rule_wins(registry: RuleRegistry) -> None:
    registry.add(ConditionKey.parse("CT|ge|*|*|*|*|head"), "seed", {**SEED, "a": 1.2}, activate=True)
    registry.add(KEY, "seed", SEED, activate=True)
    assert registry.lookup(KEY).rule.parameters["a"] == 0.9
    found = registry.lookup(ConditionKey.parse("CT|ge|revolution-ct|standard|ctdi30-60|120kv|head"))
    assert (found.match, found.rule.parameters["a"]) == ("manufacturer", 1.2)


def test_mr_lookup_skips_drop_dose(registry: RuleRegistry) -> None:
    registry.add(ConditionKey.parse("MR|siemens|skyra|3t|tof|head"), "seed", SEED, activate=True)
    assert registry.lookup(ConditionKey.parse("MR|siemens|skyra|3t|tof|neck")).match == "drop-region"
    assert registry.lookup(ConditionKey.parse("MR|siemens|prisma|3t|tof|head")).match == "drop-model"


def test_bad_rules_not_stored(registry: RuleRegistry) -> None:
    with pytest.raises(RuleError):
        registry.add(KEY, "seed", {"a": -1, "b": 0, "c": 0})
    with pytest.raises(RuleError):
        registry.add(KEY, "voodoo", {})
    assert registry.all() == []
    with pytest.raises(UnknownRule):
        registry.get("nope")
    with pytest.raises(UnknownRule):
        registry.activate("nope@vx")


def test_export_import_round_trip(registry: RuleRegistry) -> None:
    registry.add(KEY, "seed", SEED, {"reference_key": "CT|canon|a|b|c|d"}, activate=True)
    registry.add(ConditionKey.parse("MR|siemens|skyra|3t|tof"), "piecewise", {"xs": [0, 100], "ys": [0, 90]})
    document = json.loads(json.dumps(registry.export()))
    assert document["format_version"] == FORMAT_VERSION
    other = RuleRegistry(sqlite_utils.Database(memory=True))
    assert len(other.import_document(document)) == 2
    assert other.lookup(KEY).rule.parameters == SEED and other.lookup(KEY).rule.provenance["reference_key"]
    assert other.import_document(document) == []  # the same rules again: nothing new
    changed = copy.deepcopy(document)
    changed["rules"][0]["parameters"]["a"] = 0.8
    assert [r.version for r in other.import_document(changed)] == [2]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format_version=99),
        lambda d: d.update(format="something-else"),
        lambda d: d.update(rules="nope"),
        lambda d: d["rules"][1].update(key="CT|not a key"),
        lambda d: d["rules"][1].update(key="CT|ge|x"),
        lambda d: d["rules"][1].update(method="voodoo"),
        lambda d: d["rules"][1]["parameters"].pop("a"),
        lambda d: d["rules"][1].pop("version"),
    ],
)
def test_bad_rule_file_leaves_registry_unchanged(registry: RuleRegistry, mutate) -> None:  # noqa: ANN001
    registry.add(KEY, "seed", SEED, activate=True)
    source = RuleRegistry(sqlite_utils.Database(memory=True))
    source.add(ConditionKey.parse("CT|siemens|a|b|c|d"), "seed", SEED)
    source.add(ConditionKey.parse("CT|philips|a|b|c|d"), "seed", SEED)
    document = source.export()
    mutate(document)
    before = _snapshot(registry)
    with pytest.raises(RuleFileError):
        registry.import_document(document)
    assert _snapshot(registry) == before
