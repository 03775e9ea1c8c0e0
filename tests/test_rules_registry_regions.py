"""Lookup by body region: a series' own region first at every level, rules stored before keys had a region."""

from __future__ import annotations

import hashlib

import pytest
import sqlite_utils

from rules.keys import ConditionKey
from rules.registry import FORMAT, FORMAT_VERSION, MatchKind, RuleRegistry

SCANNER = "CT|ge|optima-ct660|bone|ctdi5-15|100kv"
SEED = {"a": 0.9, "b": 15.0, "c": 150.0}


@pytest.fixture
def registry() -> RuleRegistry:
    return RuleRegistry(sqlite_utils.Database(memory=True))


def _add(registry: RuleRegistry, key: str, a: float, fitted_at: float) -> None:
    registry.add(ConditionKey.parse(key), "seed", {**SEED, "a": a}, activate=True, fitted_at=fitted_at)


def _stored_before_regions(registry: RuleRegistry, old_key: str, a: float, versions: int = 1) -> str:
    """A rule as a node wrote it before keys had a region: its key string without the region part."""
    for _ in range(versions):
        rule = registry.add(ConditionKey.parse(old_key), "seed", {**SEED, "a": a}, activate=True)
    registry.db.execute("UPDATE rules SET key = ? WHERE id = ?", [old_key, rule.id])
    return rule.id


def test_head_and_chest_of_one_scanner_each_get_their_own_rule(registry: RuleRegistry) -> None:
    _add(registry, f"{SCANNER}|head", 1.1, 1.0)
    _add(registry, f"{SCANNER}|chest", 1.2, 2.0)
    head = registry.lookup(ConditionKey.parse(f"{SCANNER}|head"))
    chest = registry.lookup(ConditionKey.parse(f"{SCANNER}|chest"))
    assert (head.match, head.rule.parameters["a"]) == (MatchKind.EXACT, 1.1)
    assert (chest.match, chest.rule.parameters["a"]) == (MatchKind.EXACT, 1.2)
    assert [r.key.region for r in registry.active()] == ["chest", "head"]  # activating one left the other active


@pytest.mark.parametrize(
    ("own", "other", "wanted", "match"),
    [
        # the same scanner condition: the rule for every region wins over the other region's, though older
        (f"{SCANNER}|*", f"{SCANNER}|head", f"{SCANNER}|chest", MatchKind.DROP_REGION),
        (
            "CT|ge|optima-ct660|bone|ctdi15-30|100kv|chest",
            "CT|ge|optima-ct660|bone|ctdi30-60|100kv|head",
            f"{SCANNER}|chest",
            MatchKind.DROP_DOSE,
        ),
        (
            "CT|ge|revolution-ct|bone|ctdi15-30|100kv|chest",
            "CT|ge|discovery|bone|ctdi30-60|100kv|head",
            f"{SCANNER}|chest",
            MatchKind.DROP_MODEL,
        ),
        (
            "CT|ge|revolution-ct|standard|ctdi15-30|120kv|chest",
            "CT|ge|discovery|lung|ctdi30-60|80kv|head",
            f"{SCANNER}|chest",
            MatchKind.MANUFACTURER,
        ),
        ("MR|siemens|prisma|3t|tof|head", "MR|siemens|aera|3t|tof|neck", "MR|siemens|skyra|3t|tof|head", "drop-model"),
    ],
)
def test_the_series_region_wins_at_every_level(
    registry: RuleRegistry, own: str, other: str, wanted: str, match: str
) -> None:
    _add(registry, own, 1.1, fitted_at=1.0)
    _add(registry, other, 1.3, fitted_at=2.0)  # later: the latest fit would win without the region
    found = registry.lookup(ConditionKey.parse(wanted))
    assert (found.match, found.rule.parameters["a"]) == (match, 1.1)
    assert found.key_used.endswith("|*")


def test_another_region_of_the_same_condition_serves_before_a_coarser_level(registry: RuleRegistry) -> None:
    _add(registry, f"{SCANNER}|head", 1.1, 1.0)
    found = registry.lookup(ConditionKey.parse(f"{SCANNER}|chest"))
    assert (found.match, found.rule.parameters["a"]) == (MatchKind.DROP_REGION, 1.1)
    _add(registry, "CT|ge|optima-ct660|bone|ctdi15-30|100kv|chest", 1.2, 2.0)  # own region, another dose
    found = registry.lookup(ConditionKey.parse(f"{SCANNER}|chest"))
    assert (found.match, found.rule.parameters["a"]) == (MatchKind.DROP_REGION, 1.1)  # drop-region comes first


def test_a_rule_stored_before_regions_is_found_at_drop_region(registry: RuleRegistry) -> None:
    _stored_before_regions(registry, SCANNER, 1.4)
    assert registry.db.execute("SELECT key FROM rules").fetchall() == [(SCANNER,)]
    for region in ("head", "chest", "unknown"):
        found = registry.lookup(ConditionKey.parse(f"{SCANNER}|{region}"))
        assert (found.match, found.rule.parameters["a"]) == (MatchKind.DROP_REGION, 1.4)
        assert str(found.rule.key) == f"{SCANNER}|*"
    assert registry.lookup(ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi30-60|100kv|head")).match == "drop-dose"
    _add(registry, f"{SCANNER}|head", 1.1, 1.0)  # a region's own fit takes over for that region only
    assert registry.lookup(ConditionKey.parse(f"{SCANNER}|head")).match == MatchKind.EXACT
    assert registry.lookup(ConditionKey.parse(f"{SCANNER}|chest")).rule.parameters["a"] == 1.4


def test_activating_a_rule_stored_before_regions_keeps_one_active_version(registry: RuleRegistry) -> None:
    rule_id = _stored_before_regions(registry, SCANNER, 1.4, versions=2)
    registry.activate(f"{rule_id}@v1")
    assert [r.label for r in registry.active()] == [f"{rule_id}@v1"]
    registry.activate(rule_id)
    assert [r.label for r in registry.active()] == [f"{rule_id}@v2"]


def test_a_rule_file_written_before_regions_imports_for_every_region(registry: RuleRegistry) -> None:
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rules": [{"id": "r0123456789", "version": 1, "key": SCANNER, "method": "seed", "parameters": SEED}],
    }
    (rule,) = registry.import_document(document, activate=True)
    assert str(rule.key) == f"{SCANNER}|*"
    assert registry.lookup(ConditionKey.parse(f"{SCANNER}|chest")).rule.id == "r0123456789"


def test_a_new_version_of_a_rule_stored_before_regions_keeps_its_id(registry: RuleRegistry) -> None:
    rule_id = _stored_before_regions(registry, SCANNER, 1.4)
    assert rule_id == "r" + hashlib.sha1(f"{SCANNER}#seed".encode()).hexdigest()[:10]  # as the old node named it
    again = registry.add(ConditionKey.parse(SCANNER), "seed", {**SEED, "a": 1.5}, activate=True)
    assert (again.id, again.version) == (rule_id, 2)
    assert [r.label for r in registry.active()] == [f"{rule_id}@v2"]
    assert registry.add(ConditionKey.parse(f"{SCANNER}|head"), "seed", SEED).id != rule_id
