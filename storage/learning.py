"""The learning server's store (seed 004, claim 20): the export records many nodes sent, each kept once.

One SQLite file (``records.sqlite`` in the server's data folder) in WAL mode with ``synchronous=FULL``: a
record the server answered for is on disk, whatever happens next. Two tables:

- ``nodes``: one row per sending node, its name and the sha256 of its bearer token (the token itself is
  shown once, when it is made, and never stored);
- ``records``: one row per (node, Idempotency-Key), the record as received (JSON) and its condition key.
  A second POST under the same key is answered as a duplicate and stores nothing.

A record is checked before it is kept (``check_record``): exactly the keys of ``storage.exports.RECORD_KEYS``
(the node's own privacy contract, so an extra key — an identifier, a coordinate — is refused here too), the
known format, a trigger the node makes, features that decompress to ``feature_length`` finite values, a
result and a changed result with only their own keys. The server stores nothing else about a node or a
site: the node's name comes from its token, never from the request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.exports import RECORD_FORMAT, RECORD_KEYS, ExportTrigger

DB_NAME = "records.sqlite"
RESULT_KEYS = frozenset({"kind", "probability", "diameter_mm"})
CHANGED_KEYS = frozenset({"assessment", "kind", "diameter_mm"})
ASSESSMENTS = frozenset({"accepted", "rejected", "modified"})
MAX_FEATURES = 4096  # values a record's vector may hold (the shipped ensemble gives 384)
_KEY_CHARS = frozenset("0123456789abcdefABCDEF-_")


class RecordRefused(ValueError):
    """A record the learning server does not keep (its message says why; no value of the record is in it)."""


class UnknownToken(LookupError):
    """A bearer token no node was given."""


@dataclass(frozen=True)
class StoredRecord:
    """One kept record: who sent it (the node's name), when, and the record."""

    node: str
    key: str
    received_at: float
    record: dict[str, Any]


def token_hash(token: str) -> str:
    """The sha256 (hex) a token is kept as."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_keys(value: Any, allowed: frozenset[str], what: str) -> None:
    if not isinstance(value, Mapping):
        raise RecordRefused(f"{what} is not an object")
    extra = sorted(set(value) - allowed)
    if extra:
        raise RecordRefused(f"{what} has keys outside {sorted(allowed)}: {extra}")


def check_record(record: Any) -> np.ndarray:
    """Check an export record as the node's contract defines it; return its feature vector.

    Parameters
    ----------
    record
        The parsed JSON body of a POST.

    Returns
    -------
    numpy.ndarray
        The decompressed feature vector (float32, ``feature_length`` values).

    Raises
    ------
    RecordRefused
        Not an object; keys other than exactly ``RECORD_KEYS``; another format or trigger; features that are
        not base64 of zlib of ``feature_length`` finite float16 values; a result or changed result with other
        keys or wrong types; a reliability outside [0, 1].
    """
    if not isinstance(record, Mapping):
        raise RecordRefused("a record is a JSON object")
    if set(record) != RECORD_KEYS:
        missing, extra = sorted(RECORD_KEYS - set(record)), sorted(set(record) - RECORD_KEYS)
        raise RecordRefused(f"a record has exactly the keys {sorted(RECORD_KEYS)} (missing {missing}, extra {extra})")
    if record["format"] != RECORD_FORMAT:
        raise RecordRefused(f"record format {record['format']!r} is not {RECORD_FORMAT!r}")
    if record["trigger"] not in {str(t) for t in ExportTrigger}:
        raise RecordRefused(f"unknown trigger {record['trigger']!r}")
    if record["feature_codec"] != "float16+zlib":
        raise RecordRefused(f"unknown feature codec {record['feature_codec']!r}")
    length = record["feature_length"]
    if not isinstance(length, int) or not 0 < length <= MAX_FEATURES:
        raise RecordRefused(f"feature_length must be an integer in 1..{MAX_FEATURES}")
    try:
        raw = zlib.decompress(base64.b64decode(str(record["features"]), validate=True))
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise RecordRefused(f"features are not base64 of zlib data: {exc}") from exc
    if len(raw) != 2 * length:
        raise RecordRefused(f"features hold {len(raw) // 2} values, feature_length says {length}")
    vector = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise RecordRefused("features hold a value that is not finite")
    _check_keys(record["result"], RESULT_KEYS, "result")
    if not isinstance(record["result"].get("kind"), str):
        raise RecordRefused("result.kind is not a string")
    if record["changed"] is not None:
        _check_keys(record["changed"], CHANGED_KEYS, "changed")
        if record["changed"].get("assessment") not in ASSESSMENTS:
            raise RecordRefused(f"changed.assessment is one of {sorted(ASSESSMENTS)}")
    for name, value in (
        ("reliability", record["reliability"]),
        ("result.probability", record["result"].get("probability", 0.0)),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            raise RecordRefused(f"{name} is a number in [0, 1]")
    for name in ("model_version", "condition_key"):
        if not isinstance(record[name], str) or len(record[name]) > 200:
            raise RecordRefused(f"{name} is a string of at most 200 characters")
    return vector


def check_key(key: str) -> str:
    """An Idempotency-Key as the node makes them (a hex token; 8–64 characters of hex, ``-`` or ``_``).

    Raises
    ------
    RecordRefused
        Missing, too short or long, or other characters.
    """
    if not 8 <= len(key) <= 64 or not set(key) <= _KEY_CHARS:
        raise RecordRefused("an Idempotency-Key of 8-64 hex characters is required")
    return key


class RecordStore:
    """The learning server's records and node tokens, in ``<folder>/records.sqlite`` (WAL, synchronous=FULL)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(self.folder / DB_NAME, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # an answered record is on disk
        self.conn.execute("CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, token_sha256 TEXT UNIQUE NOT NULL)")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS records (node TEXT NOT NULL, key TEXT NOT NULL, condition_key TEXT NOT NULL,"
            " body TEXT NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (node, key))"
        )

    def close(self) -> None:
        """Close the database."""
        with self.lock:
            self.conn.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- nodes ----------------------------------------------------------------------------------------------------
    def add_node(self, name: str, token: str | None = None) -> str:
        """Give a node a token (a fresh one unless given); return it. Only its sha256 is kept.

        Raises
        ------
        ValueError
            An empty or over-long name, or a token shorter than 16 characters.
        """
        if not name or len(name) > 64 or not name.isprintable():
            raise ValueError(f"a node name is 1-64 printable characters, got {name!r}")
        token = token or secrets.token_urlsafe(32)
        if len(token) < 16:
            raise ValueError("a node token has at least 16 characters")
        self.add_node_hash(name, token_hash(token))
        return token

    def add_node_hash(self, name: str, sha256_hex: str) -> None:
        """Record a node by the sha256 of its token (a tokens file lists them so); replaces its earlier token."""
        if len(sha256_hex) != 64 or any(c not in "0123456789abcdef" for c in sha256_hex):
            raise ValueError(f"node {name!r}: a token hash is 64 lowercase hex characters")
        with self.lock:
            self.conn.execute(
                "INSERT INTO nodes (name, token_sha256) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET"
                " token_sha256=excluded.token_sha256",
                (name, sha256_hex),
            )

    def node_for(self, token: str) -> str:
        """The name of the node a bearer token was given to.

        Raises
        ------
        UnknownToken
            No node has it.
        """
        with self.lock:
            row = self.conn.execute("SELECT name FROM nodes WHERE token_sha256=?", (token_hash(token),)).fetchone()
        if row is None:
            raise UnknownToken("unknown token")
        return str(row[0])

    def nodes(self) -> list[str]:
        """The names of the nodes that have a token."""
        with self.lock:
            return [r[0] for r in self.conn.execute("SELECT name FROM nodes ORDER BY name")]

    # -- records --------------------------------------------------------------------------------------------------
    def add(self, node: str, key: str, record: Mapping[str, Any]) -> bool:
        """Keep a checked record once per (node, key); True when it is new, False for a duplicate.

        Raises
        ------
        RecordRefused
            A record ``check_record`` refuses, or a bad key.
        """
        check_key(key)
        check_record(record)
        body = json.dumps(record, sort_keys=True)
        with self.lock:
            changed = self.conn.execute(
                "INSERT INTO records (node, key, condition_key, body, received_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(node, key) DO NOTHING",
                (node, key, str(record["condition_key"]), body, time.time()),
            ).rowcount
        return bool(changed)

    def count(self) -> int:
        """How many records are kept."""
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def records(self) -> Iterator[StoredRecord]:
        """Every kept record, in the order received."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT node, key, received_at, body FROM records ORDER BY received_at, rowid"
            ).fetchall()
        for node, key, received_at, body in rows:
            yield StoredRecord(node, key, float(received_at), json.loads(body))

    def summary(self) -> dict[str, Any]:
        """Records per node and per condition key (for ``learn serve``'s health page and the CLI)."""
        with self.lock:
            per_node = dict(self.conn.execute("SELECT node, COUNT(*) FROM records GROUP BY node").fetchall())
            per_condition = dict(
                self.conn.execute("SELECT condition_key, COUNT(*) FROM records GROUP BY condition_key").fetchall()
            )
        return {"records": sum(per_node.values()), "per_node": per_node, "per_condition": per_condition}


def read_tokens_file(path: str | Path) -> list[tuple[str, str]]:
    """The ``(node, token sha256)`` pairs of a tokens file: one ``NAME SHA256HEX`` a line, ``#`` comments.

    Raises
    ------
    ValueError
        A line that is not a name and a 64-character hex hash.
    """
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 64:
            raise ValueError(f"{path}:{n}: expected 'NODE-NAME TOKEN-SHA256' (64 hex characters)")
        pairs.append((parts[0], parts[1].lower()))
    return pairs
