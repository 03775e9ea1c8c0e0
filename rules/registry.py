"""Conversion rules stored versioned in the node's index, looked up by condition key, exported and imported.

Table ``rules`` (in the given database, normally the node's index: ``index.sqlite`` or PostgreSQL): one row per
``(id, version)``. ``id`` names a rule for one condition key and method and stays the same when it is fitted
again; each fit adds a version. At most one rule per condition key is active.

Lookup (what the pipeline calls, and what the SR reports as ``match``): the active rule for the exact key
(body region included), then with the region dropped (``drop-region``), then with dose bucket and region
dropped (``drop-dose``, CT only), then with dose, model and region dropped (``drop-model``), then the
manufacturer alone (``manufacturer``), else ``identity`` (no rule). Among several rules that match at one
level (they agree on every part the level keeps), a rule of the series' own region wins, then one for every
region (``*``: rules stored before keys had a region read so), then one of another region; then a rule
written for that level (``*`` in the dropped parts, e.g. a manufacturer-wide rule from a central site) wins
over one fitted for another model, then the latest fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rules.apply import IntensityMap, RuleParameterError, make_map
from rules.keys import ANY, FALLBACKS, ConditionKey, KeyParseError
from rules.strengths import ResidualStage, StageError
from storage.database import Database, like

log = logging.getLogger(__name__)

FORMAT = "harmonode-rules"
#: 2 adds the optional residual stage of a rule (seed 003); files of version 1 are read as without one.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TABLE = "rules"


class RuleError(ValueError):
    """A rule that cannot be stored (bad key, method or parameters)."""


class RuleFileError(ValueError):
    """A rule file that cannot be imported (unreadable, wrong format or version, a bad rule); nothing imported."""


class UnknownRule(LookupError):
    """No rule with that id (and version)."""


@dataclass(frozen=True)
class Rule:
    """One version of a conversion rule for one imaging condition."""

    id: str
    version: int
    key: ConditionKey
    method: str
    parameters: Mapping[str, Any]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    fitted_at: float = 0.0
    active: bool = False
    residual: ResidualStage | None = None  # seed 003's stage after the histogram stage, when fitted

    def __post_init__(self) -> None:
        if self.residual is not None and not isinstance(self.residual, ResidualStage):
            raise RuleError(f"rule residual stage must be a ResidualStage, got {self.residual!r}")
        if not isinstance(self.key, ConditionKey):
            raise RuleError(f"rule key must be a ConditionKey, got {self.key!r}")
        try:
            make_map(self.method, self.parameters)
        except RuleParameterError as exc:
            raise RuleError(str(exc)) from exc
        if int(self.version) < 1:
            raise RuleError(f"rule version must be ≥ 1, got {self.version}")

    @property
    def mapping(self) -> IntensityMap:
        """The intensity map this rule applies."""
        return make_map(self.method, self.parameters)

    @property
    def label(self) -> str:
        """``id@vN``, how results name the rule."""
        return f"{self.id}@v{self.version}"

    def as_dict(self, with_histograms: bool = True) -> dict[str, Any]:
        """Plain JSON-able dict (the export form)."""
        provenance = dict(self.provenance)
        if not with_histograms:
            provenance.pop("histograms", None)
        return {
            "id": self.id,
            "version": int(self.version),
            "key": str(self.key),
            "method": self.method,
            "parameters": dict(self.parameters),
            "provenance": provenance,
            "fitted_at": float(self.fitted_at),
            "active": bool(self.active),
            "residual": self.residual.as_dict() if self.residual is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Inverse of :meth:`as_dict`.

        Raises
        ------
        RuleError
            Missing fields, a key that does not parse, bad parameters.
        """
        try:
            return cls(
                id=str(data["id"]),
                version=int(data["version"]),
                key=ConditionKey.parse(str(data["key"])),
                method=str(data["method"]),
                parameters=dict(data["parameters"]),
                provenance=dict(data.get("provenance") or {}),
                fitted_at=float(data.get("fitted_at") or 0.0),
                active=bool(data.get("active", False)),
                residual=ResidualStage.from_dict(data.get("residual")),
            )
        except (KeyParseError, StageError) as exc:
            raise RuleError(str(exc)) from exc
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RuleError):
                raise
            raise RuleError(f"rule {dict(data).get('id', '?')!r} is incomplete or malformed: {exc!r}") from exc


class MatchKind(StrEnum):
    """How a lookup found its rule (what the SR reports as the rule's match)."""

    EXACT = "exact"
    DROP_REGION = "drop-region"
    DROP_DOSE = "drop-dose"
    DROP_MODEL = "drop-model"
    MANUFACTURER = "manufacturer"
    IDENTITY = "identity"


@dataclass(frozen=True)
class RuleMatch:
    """The result of a lookup: the rule (None for identity), how it matched, and the key it matched on."""

    rule: Rule | None
    match: MatchKind
    key_used: str

    @property
    def rule_id(self) -> str:
        """``id@vN`` of the rule, or ``identity``."""
        return f"{self.rule.id}@v{self.rule.version}" if self.rule is not None else "identity"


def _serves(rule_key: ConditionKey, wanted: ConditionKey) -> bool:
    """A rule serves a lookup level when it equals the wanted key on every part the level keeps."""
    if rule_key.modality != wanted.modality:
        return False
    return all(w == ANY or r == w for r, w in zip(rule_key.parts().values(), wanted.parts().values(), strict=True))


def _region_rank(rule_key: ConditionKey, region: str) -> int:
    """2 for a rule of the series' own region, 1 for one of every region (``*``), 0 for another region."""
    return 2 if rule_key.region == region else 1 if rule_key.region == ANY else 0


def rule_id_for(key: ConditionKey, method: str) -> str:
    """The stable id of the rule for a condition key and method.

    A key for every region (``*``) is hashed in the form it had before keys had a region, so a rule stored
    then keeps its id when a new version of it is added.
    """
    return "r" + hashlib.sha1(f"{key.stored_forms()[-1]}#{method}".encode()).hexdigest()[:10]


def _row_to_rule(row: Mapping[str, Any]) -> Rule:
    return Rule(
        id=row["id"],
        version=int(row["version"]),
        key=ConditionKey.parse(row["key"]),
        method=row["method"],
        parameters=json.loads(row["parameters"] or "{}"),
        provenance=json.loads(row["provenance"] or "{}"),
        fitted_at=float(row["fitted_at"] or 0.0),
        active=bool(row["active"]),
        residual=ResidualStage.from_dict(json.loads(row.get("residual") or "null")),
    )


class RuleRegistry:
    """Versioned rules in the index's database, SQLite or PostgreSQL (tables created on first use).

    Parameters
    ----------
    db
        The node's index database (``storage.index.Index.db``), any ``sqlite_utils.Database``, or a
        ``storage.database.PgDatabase``.
    """

    def __init__(self, db: Database, lock: threading.RLock | None = None) -> None:
        self.db = db
        # The node's threads share one connection: every statement of the registry runs under this lock
        # (pass the index's lock when the registry lives in the index database).
        self.lock = lock or threading.RLock()
        with self.lock:  # even reading the schema is a statement on the shared connection (a savepoint)
            if TABLE not in db.table_names():
                db[TABLE].create(
                    {
                        "id": str,
                        "version": int,
                        "key": str,
                        "method": str,
                        "parameters": str,
                        "provenance": str,
                        "fitted_at": float,
                        "active": int,
                        "residual": str,
                    },
                    pk=("id", "version"),
                    if_not_exists=True,
                )
                db[TABLE].create_index(["key", "active"], if_not_exists=True)
            elif "residual" not in db[TABLE].columns_dict:  # a registry from before the residual stage
                db.execute(f"ALTER TABLE {TABLE} ADD COLUMN residual TEXT")

    # -- reading --------------------------------------------------------------------------------------
    def _rows(self, where: str = "", params: Iterable[Any] = ()) -> list[Rule]:
        sql = f"SELECT * FROM {TABLE}" + (f" WHERE {where}" if where else "") + " ORDER BY key, id, version"
        out = []
        with self.lock:
            rows = list(self.db.query(sql, list(params)))
        for row in rows:
            try:
                out.append(_row_to_rule(row))
            except (RuleError, KeyParseError, ValueError) as exc:  # a damaged row must not stop lookups
                log.warning("rule %s@v%s skipped: %s", row.get("id"), row.get("version"), exc)
        return out

    def all(self) -> list[Rule]:
        """Every version of every rule."""
        return self._rows()

    def active(self) -> list[Rule]:
        """The active rules."""
        return self._rows("active = 1")

    def get(self, ref: str) -> Rule:
        """A rule by ``id`` (its latest version) or ``id@vN``.

        Raises
        ------
        UnknownRule
            No such rule.
        """
        rule_id, _, version = ref.partition("@v")
        if version:
            try:
                rules = self._rows("id = ? AND version = ?", (rule_id, int(version)))
            except ValueError:
                rules = []
        else:
            rules = self._rows("id = ?", (rule_id,))
        if not rules:
            raise UnknownRule(f"no rule {ref!r} (see `harmonode rules list`)")
        return max(rules, key=lambda r: r.version)

    def lookup(self, key: ConditionKey) -> RuleMatch:
        """The active rule for a condition: exact key, then the fallbacks, then identity.

        Parameters
        ----------
        key
            The series' condition key.

        Returns
        -------
        RuleMatch
            ``match`` is ``exact``, ``drop-region``, ``drop-dose``, ``drop-model``, ``manufacturer`` or
            ``identity``; among one level's hits the series' region wins (module docstring).
        """
        candidates = [r for r in self._rows(f"active = 1 AND {like(self.db, 'key')}", (key.modality + "|%",))]
        for match, drop in FALLBACKS:
            if match == MatchKind.DROP_DOSE and "dose" not in key.layout:
                continue
            wanted = key.generalize(drop)
            hits = [r for r in candidates if _serves(r.key, wanted)]
            if hits:
                best = max(
                    hits,
                    key=lambda r: (_region_rank(r.key, key.region), -r.key.specificity(), r.fitted_at, r.version),
                )
                return RuleMatch(best, MatchKind(match), str(wanted))
        return RuleMatch(None, MatchKind.IDENTITY, str(key))

    # -- writing --------------------------------------------------------------------------------------
    def add(
        self,
        key: ConditionKey,
        method: str,
        parameters: Mapping[str, Any],
        provenance: Mapping[str, Any] | None = None,
        activate: bool = False,
        fitted_at: float | None = None,
        residual: ResidualStage | None = None,
    ) -> Rule:
        """Store a new version of the rule for ``key`` and ``method`` (with its residual stage, if any).

        Raises
        ------
        RuleError
            Bad method or parameters (nothing stored).
        """
        rule_id = rule_id_for(key, method)
        with self.lock, _transaction(self.db.conn):
            row = next(self.db.query(f"SELECT MAX(version) v FROM {TABLE} WHERE id = ?", [rule_id]))
            rule = Rule(
                id=rule_id,
                version=int(row["v"] or 0) + 1,
                key=key,
                method=method,
                parameters=dict(parameters),
                provenance=dict(provenance or {}),
                fitted_at=time.time() if fitted_at is None else fitted_at,
                active=False,
                residual=residual,
            )
            self._insert(rule)
            if activate:
                self._activate(rule)
        log.info("rule %s stored for %s (%s)%s", rule.label, key, method, ", active" if activate else "")
        return self.get(rule.label)

    def _insert(self, rule: Rule) -> None:
        data = rule.as_dict()
        data["parameters"] = json.dumps(data["parameters"], sort_keys=True)
        data["provenance"] = json.dumps(data["provenance"], sort_keys=True)
        data["residual"] = json.dumps(data["residual"], sort_keys=True) if data["residual"] else None
        data["active"] = int(rule.active)
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        self.db.conn.execute(f"INSERT INTO {TABLE} ({cols}) VALUES ({marks})", list(data.values()))

    def _activate(self, rule: Rule) -> None:
        forms = rule.key.stored_forms()  # a rule stored before keys had a region keeps its old key string
        self.db.execute(f"UPDATE {TABLE} SET active = 0 WHERE key IN ({', '.join('?' * len(forms))})", list(forms))
        self.db.execute(f"UPDATE {TABLE} SET active = 1 WHERE id = ? AND version = ?", [rule.id, rule.version])

    def with_residual(self, ref: str, stage: ResidualStage | None, provenance: Mapping[str, Any] | None = None) -> Rule:
        """A new version of a rule with the same histogram stage and this residual stage (None removes it).

        The new version is active when the rule's current one was. Strengths are versioned like the rest
        of a rule: the SR names the version a series was harmonized with.

        Raises
        ------
        UnknownRule
            No such rule.
        """
        rule = self.get(ref)
        merged = {**dict(rule.provenance), **dict(provenance or {})}
        return self.add(rule.key, rule.method, rule.parameters, merged, activate=rule.active, residual=stage)

    def activate(self, ref: str) -> Rule:
        """Make a rule (``id`` = latest version, or ``id@vN``) the active one for its key.

        Raises
        ------
        UnknownRule
            No such rule (nothing changed).
        """
        rule = self.get(ref)
        with self.lock, _transaction(self.db.conn):
            self._activate(rule)
        log.info("rule %s active for %s", rule.label, rule.key)
        return self.get(rule.label)

    # -- exchange -------------------------------------------------------------------------------------
    def export(self, only_active: bool = False) -> dict[str, Any]:
        """The rules as a JSON-able document (format ``harmonode-rules``, ``format_version`` 1)."""
        rules = self.active() if only_active else self.all()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "exported_at": time.time(),
            "rules": [r.as_dict() for r in rules],
        }

    def import_document(self, document: Any, activate: bool | None = None) -> list[Rule]:
        """Import rules from an exported document: all or nothing.

        A rule already present with the same id, version and parameters is skipped; one with the same id and
        version but different content is stored as a new version.

        Parameters
        ----------
        document
            The parsed JSON document.
        activate
            Force every imported rule active (True) or inactive (False); None keeps each rule's flag.

        Returns
        -------
        list[Rule]
            The rules stored.

        Raises
        ------
        RuleFileError
            Wrong format or version, or any rule invalid (the registry is unchanged).
        """
        if not isinstance(document, Mapping) or document.get("format") != FORMAT:
            raise RuleFileError(f'not a harmonode rule file (expected "format": "{FORMAT}")')
        version = document.get("format_version")
        if version not in READABLE_VERSIONS:
            raise RuleFileError(
                f"rule file format_version {version!r} is not supported (this node reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        items = document.get("rules")
        if not isinstance(items, list):
            raise RuleFileError('rule file has no "rules" list')
        parsed = []
        for i, item in enumerate(items):
            try:
                parsed.append(Rule.from_dict(item if isinstance(item, Mapping) else {}))
            except RuleError as exc:
                raise RuleFileError(f"rule #{i + 1} in the file: {exc}") from exc
        stored: list[Rule] = []
        with self.lock, _transaction(self.db.conn):  # one transaction: all or nothing
            for rule in parsed:
                existing = self._rows("id = ? AND version = ?", (rule.id, rule.version))
                if (
                    existing
                    and dict(existing[0].parameters) == dict(rule.parameters)
                    and existing[0].method == rule.method
                    and existing[0].residual == rule.residual
                ):
                    continue
                if existing:
                    row = next(self.db.query(f"SELECT MAX(version) v FROM {TABLE} WHERE id = ?", [rule.id]))
                    rule = Rule(**{**rule.__dict__, "version": int(row["v"]) + 1})
                want_active = rule.active if activate is None else activate
                rule = Rule(**{**rule.__dict__, "active": False})
                self._insert(rule)
                if want_active:
                    self._activate(rule)
                stored.append(rule)
        log.info("imported %d rule(s) of %d in the file", len(stored), len(parsed))
        return [self.get(r.label) for r in stored]


@contextmanager
def _transaction(conn: Any) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error); joins a transaction already open.

    ``conn`` is a ``sqlite3.Connection`` or a ``storage.pgsql.PgConnection`` (whose BEGIN IMMEDIATE takes the
    schema's advisory lock, and whose ``in_transaction`` is PostgreSQL's own).
    """
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
