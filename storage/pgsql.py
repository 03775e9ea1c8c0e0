"""The SQL the storage modules write for SQLite, run on PostgreSQL: a connection that speaks sqlite3's dialect.

``PgConnection`` wraps one psycopg 3 connection (autocommit) and offers what the modules call on a
``sqlite3.Connection``: ``execute(sql, params)`` returning a cursor (``fetchone``, ``fetchall``, iteration,
``rowcount``, ``lastrowid``, ``description``), ``executemany``, ``in_transaction``, ``close``. Each statement
is translated once (``translate``, cached):

- ``?`` and ``:name`` placeholders become ``%s`` and ``%(name)s``; a literal ``%`` becomes ``%%``. Nothing
  inside a string literal or a quoted identifier is touched but the ``%``.
- ``INSERT OR IGNORE INTO …`` becomes ``INSERT INTO … ON CONFLICT DO NOTHING``.
- ``BEGIN IMMEDIATE`` becomes ``BEGIN`` and ``SELECT pg_advisory_xact_lock(<key of the schema>)``: the writers
  of one schema serialize across processes and machines as SQLite's writers of one file do (the index's
  read-modify-write of patients and studies depends on it). The lock ends with the transaction.
- ``PRAGMA …`` is a no-op.
- In DDL the SQLite type names become PostgreSQL's (``REAL`` → ``DOUBLE PRECISION``, ``INTEGER`` →
  ``BIGINT``, ``BLOB`` → ``BYTEA``, ``TEXT`` → ``TEXT COLLATE "C"``), and a DDL statement run outside a
  transaction takes the schema's advisory lock in one of its own (``CREATE … IF NOT EXISTS`` from two
  processes at once is not safe in PostgreSQL otherwise).
- An ``INSERT`` into a table with an integer ``id`` key gains ``RETURNING id`` so ``lastrowid`` is right.

Text columns are created with the ``"C"`` collation: comparisons and ``ORDER BY`` are by code point as in
SQLite's BINARY collation, and ``lower``/``ILIKE`` fold ASCII letters only, as SQLite's NOCASE and LIKE do.
``numeric`` results (``SUM`` of integers) come back as ``int`` (``float`` when fractional), as SQLite's do.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.adapt import Loader

_LITERAL = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_INSERT = re.compile(r"^\s*INSERT\s+(?:OR\s+(IGNORE|REPLACE)\s+)?INTO\s+\"?(\w+)\"?", re.IGNORECASE)
_BEGIN_IMMEDIATE = re.compile(r"^\s*BEGIN\s+(IMMEDIATE|EXCLUSIVE)(\s+TRANSACTION)?\s*;?\s*$", re.IGNORECASE)
_PRAGMA = re.compile(r"^\s*PRAGMA\b", re.IGNORECASE)
_DDL = re.compile(r"^\s*(CREATE|ALTER|DROP)\b", re.IGNORECASE)
_RETURNING = re.compile(r"\sRETURNING\s", re.IGNORECASE)
_TYPES = (
    (re.compile(r"\bREAL\b|\bFLOAT\b", re.IGNORECASE), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
    (re.compile(r"\bTEXT\b(?!\s+COLLATE)", re.IGNORECASE), 'TEXT COLLATE "C"'),
)


def advisory_key(schema: str) -> int:
    """The advisory lock key of a schema: a signed 64-bit number from its name (the same in every process)."""
    return int.from_bytes(hashlib.sha256(f"harmonode:{schema}".encode()).digest()[:8], "big", signed=True)


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """A statement in SQLite's dialect as psycopg runs it on PostgreSQL (module docstring).

    Raises
    ------
    NotImplementedError
        ``INSERT OR REPLACE`` (it deletes the old row first in SQLite; write ``ON CONFLICT … DO UPDATE``).
    """
    ddl = bool(_DDL.match(sql))
    parts = _LITERAL.split(sql)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a string literal or a quoted identifier: only psycopg's own escape
            out.append(part.replace("%", "%%"))
            continue
        part = part.replace("%", "%%").replace("?", "%s")
        part = _NAMED.sub(r"%(\1)s", part)
        if ddl:
            for pattern, replacement in _TYPES:
                part = pattern.sub(replacement, part)
        out.append(part)
    text = "".join(out)
    insert = _INSERT.match(text)
    if insert and insert.group(1):
        if insert.group(1).upper() == "REPLACE":
            raise NotImplementedError("INSERT OR REPLACE has no PostgreSQL form here: write ON CONFLICT DO UPDATE")
        text = re.sub(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO", "INSERT INTO", text, count=1, flags=re.IGNORECASE)
        text = _before_returning(text.rstrip().rstrip(";"), " ON CONFLICT DO NOTHING")
    return text


def _before_returning(text: str, clause: str) -> str:
    """``text`` with ``clause`` added at its end, or before its RETURNING clause when it has one."""
    found = list(_RETURNING.finditer(text))
    if not found:
        return text + clause
    at = found[-1].start()
    return text[:at] + clause + text[at:]


class _NumericLoader(Loader):
    """``numeric`` as SQLite gives it: an ``int`` when whole (``SUM`` of integers), else a ``float``."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode("ascii")
        return int(text) if text.lstrip("-").isdigit() else float(text)


class PgCursor:
    """The result of one statement, fetched at once (so one connection serves the node's threads)."""

    def __init__(
        self,
        rows: list[tuple[Any, ...]],
        description: list[tuple[Any, ...]] | None,
        rowcount: int,
        lastrowid: int | None = None,
    ) -> None:
        self._rows = rows
        self._at = 0
        self.description = description
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row, or None."""
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self) -> list[tuple[Any, ...]]:
        """The rows not yet fetched."""
        rest = self._rows[self._at :]
        self._at = len(self._rows)
        return rest

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        """Up to ``size`` of the rows not yet fetched."""
        rest = self._rows[self._at : self._at + size]
        self._at += len(rest)
        return rest

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while (row := self.fetchone()) is not None:
            yield row

    def close(self) -> None:
        """Nothing to release: the rows are already here."""


Params = Sequence[Any] | Mapping[str, Any] | None


class PgConnection:
    """A psycopg connection (autocommit, ``search_path`` = one schema) that runs sqlite3-dialect statements.

    Parameters
    ----------
    url
        ``postgresql://…`` (libpq's URL form).
    schema
        The PostgreSQL schema every table of this connection lives in (created when missing).
    lock_timeout_s
        How long a statement waits for a lock (the advisory lock included) before it fails, as SQLite's
        ``busy_timeout`` does.
    """

    def __init__(self, url: str, schema: str, lock_timeout_s: float = 30.0) -> None:
        self.schema = schema
        self.lock_key = advisory_key(schema)
        # no server-side prepared statements: a column another process adds (a migration) would break a
        # prepared ``SELECT *`` here ("cached plan must not change result type"); SQLite re-prepares itself
        self.raw = psycopg.connect(url, autocommit=True, prepare_threshold=None)
        self.raw.adapters.register_loader("numeric", _NumericLoader)
        self._id_tables: set[str] | None = None
        quoted = quote_identifier(schema)
        self.raw.execute(f"SET lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
        with self.raw.transaction():
            self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key,))
            self.raw.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        self.raw.execute(f"SET search_path TO {quoted}")

    @property
    def in_transaction(self) -> bool:
        """True between an explicit BEGIN and its COMMIT or ROLLBACK (as ``sqlite3.Connection``'s)."""
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def execute(self, sql: str, params: Params = None) -> PgCursor:
        """Run one statement in SQLite's dialect (module docstring); return its fetched result."""
        if _PRAGMA.match(sql):
            return PgCursor([], None, -1)
        if _BEGIN_IMMEDIATE.match(sql):
            self.raw.execute("BEGIN")
            self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key,))
            return PgCursor([], None, -1)
        text = translate(sql)
        if _DDL.match(text):
            self._id_tables = None
            if not self.in_transaction:
                with self.raw.transaction():
                    self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key,))
                    return self._run(text, params)
        insert = _INSERT.match(text)
        if insert and insert.group(2).lower() in self.id_tables() and not _RETURNING.search(text):
            cur = self._run(text.rstrip().rstrip(";") + " RETURNING id", params)
            rows = cur.fetchall()
            return PgCursor([], None, len(rows), int(rows[-1][0]) if rows else None)
        return self._run(text, params)

    def _run(self, text: str, params: Params) -> PgCursor:
        args: Any = params if params is not None else ()
        if isinstance(args, Iterator):
            args = list(args)
        with self.raw.cursor() as cur:
            cur.execute(text, args)  # type: ignore[arg-type]  # translated at run time: not a LiteralString
            description = None
            rows: list[tuple[Any, ...]] = []
            if cur.description is not None:
                description = [(c.name, None, None, None, None, None, None) for c in cur.description]
                rows = cur.fetchall()
            return PgCursor(rows, description, cur.rowcount)

    def executemany(self, sql: str, seq_of_params: Iterable[Params]) -> PgCursor:
        """Run one statement once per parameter set; ``rowcount`` is their sum."""
        total = 0
        for params in seq_of_params:
            total += max(0, self.execute(sql, params).rowcount)
        return PgCursor([], None, total)

    def id_tables(self) -> set[str]:
        """The tables of this schema whose ``id`` column is generated (``lastrowid`` is known for them)."""
        if self._id_tables is None:
            rows = self.raw.execute(
                "SELECT table_name FROM information_schema.columns WHERE table_schema = %s AND column_name = 'id'"
                " AND (is_identity = 'YES' OR column_default LIKE 'nextval%%')",
                (self.schema,),
            ).fetchall()
            self._id_tables = {str(r[0]).lower() for r in rows}
        return self._id_tables

    def commit(self) -> None:
        """Commit an open transaction (as ``sqlite3.Connection.commit``: nothing when none is open)."""
        if self.in_transaction:
            self.raw.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back an open transaction (nothing when none is open)."""
        if self.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
