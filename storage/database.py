"""One way to open a database: a SQLite file (embedded, the default) or a PostgreSQL schema (a cluster).

``open_database(target, schema)`` gives a ``sqlite_utils.Database`` for a filesystem path, exactly as the
storage modules opened their files before, and a ``PgDatabase`` for a ``postgresql://`` URL. A
``PgDatabase`` offers the part of sqlite-utils' API the storage modules use (``conn.execute``, ``query``,
``execute``, ``table_names``, and per table ``create``, ``create_index``, ``insert``, ``upsert``, ``update``,
``count``, ``columns_dict``, ``add_column``), so a module's code is the same for both. Each former SQLite
file is its own PostgreSQL schema (``index`` → ``harmonode_index``, ``queue`` → ``harmonode_queue``,
``commitments`` → ``harmonode_commitments``), set as the connection's ``search_path``, so table names stay
what they are. Both kinds say which they are in ``dialect`` (``"sqlite"`` | ``"postgresql"``), for the few
statements whose dialects must differ. The SQL translation is ``storage.pgsql``'s.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import sqlite_utils
from sqlite_utils.db import NotFoundError
from sqlite_utils.utils import dedupe_keys

from storage.pgsql import Params, PgConnection, PgCursor, quote_identifier

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
Dialect = Literal["sqlite", "postgresql"]
SCHEMA_PREFIX = "harmonode_"

#: sqlite-utils' column types as PostgreSQL types (text compares by code point, as in SQLite).
_PG_TEXT = 'text COLLATE "C"'
_PG_TYPES: dict[Any, str] = {
    str: _PG_TEXT,
    int: "bigint",
    float: "double precision",
    bytes: "bytea",
    bool: "bigint",
    dict: _PG_TEXT,
    list: _PG_TEXT,
}
_PY_TYPES = {
    "text": str,
    "character varying": str,
    "bigint": int,
    "integer": int,
    "smallint": int,
    "double precision": float,
    "real": float,
    "numeric": float,
    "bytea": bytes,
}


class SqliteDatabase(sqlite_utils.Database):
    """``sqlite_utils.Database`` as before, saying its ``dialect``."""

    dialect: Dialect = SQLITE


def is_postgres_url(target: str | Path) -> bool:
    """Whether ``target`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def schema_name(schema: str) -> str:
    """The PostgreSQL schema of one former SQLite file: ``index`` → ``harmonode_index``."""
    return schema if schema.startswith(SCHEMA_PREFIX) else SCHEMA_PREFIX + schema


def dialect_of(db: Any) -> Dialect:
    """The dialect of a database (a plain ``sqlite_utils.Database`` speaks SQLite's)."""
    return getattr(db, "dialect", SQLITE)


def like(db: Any, column: str, escape: str = "") -> str:
    """SQLite's ``<column> LIKE ?`` in the database's dialect: ASCII case folded, ``escape`` or no escape character.

    SQLite's LIKE ignores the case of ASCII letters and has no escape character unless told one; on
    PostgreSQL that is ``ILIKE`` on the ``"C"``-collated text columns, with ``ESCAPE ''`` (its default is a
    backslash).
    """
    clause = "ESCAPE '" + escape.replace("'", "''") + "'"
    if dialect_of(db) == POSTGRESQL:
        return f"{column} ILIKE ? {clause}"
    return f"{column} LIKE ? {clause}" if escape else f"{column} LIKE ?"


def open_database(target: str | Path, schema: str) -> SqliteDatabase | PgDatabase:
    """Open the database of one store part: a SQLite file, or a schema of a PostgreSQL database.

    Parameters
    ----------
    target
        A filesystem path (its folder is created; ``:memory:`` works) or a ``postgresql://`` URL.
    schema
        What the database holds (``index``, ``queue``, ``commitments``): the PostgreSQL schema's name
        (``harmonode_<schema>``, created when missing); unused for SQLite, whose file already says it.

    Returns
    -------
    SqliteDatabase | PgDatabase
        A SQLite connection without implicit transactions, shared by threads (``check_same_thread=False``,
        30 s busy timeout), as the modules opened them; or a ``PgDatabase``. The callers set their PRAGMAs
        (no-ops on PostgreSQL).
    """
    if is_postgres_url(target):
        return PgDatabase(str(target), schema_name(schema))
    path = str(target)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
    return SqliteDatabase(conn)


class PgDatabase:
    """A PostgreSQL schema behind the part of sqlite-utils' ``Database`` API the storage modules use.

    Parameters
    ----------
    url
        ``postgresql://user@host:port/dbname`` (libpq's URL form; a password in it is never logged).
    schema
        The schema that holds the tables (created when missing).
    """

    dialect: Dialect = POSTGRESQL

    def __init__(self, url: str, schema: str) -> None:
        self.schema = schema
        self.conn = PgConnection(url, schema)
        self.pk_cache: dict[str, list[str]] = {}  # a table's key never changes once it exists

    def execute(self, sql: str, params: Params = None) -> PgCursor:
        """Run one statement (SQLite dialect, translated); return its cursor."""
        return self.conn.execute(sql, params)

    def query(self, sql: str, params: Params = None) -> Iterator[dict[str, Any]]:
        """Run a query; yield its rows as dicts (a repeated column name gets ``_2``, ``_3``, as in sqlite-utils)."""
        cur = self.conn.execute(sql, params)
        names = dedupe_keys(c[0] for c in cur.description or ())
        for row in cur.fetchall():
            yield dict(zip(names, row, strict=True))

    def table_names(self) -> list[str]:
        """The tables of the schema, by name."""
        rows = self.conn.raw.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s AND table_type = 'BASE TABLE'"
            " ORDER BY table_name",
            (self.schema,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def table(self, name: str) -> PgTable:
        """One table (it need not exist yet)."""
        return PgTable(self, name)

    def __getitem__(self, name: str) -> PgTable:
        return self.table(name)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def _default_sql(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _jsonify(value: Any) -> Any:
    return json.dumps(value, default=repr) if isinstance(value, dict | list | tuple) else value


class PgTable:
    """One table of a ``PgDatabase``, as sqlite-utils' ``Table`` is used by the storage modules."""

    def __init__(self, db: PgDatabase, name: str) -> None:
        self.db = db
        self.name = name
        self._q = quote_identifier(name)

    def exists(self) -> bool:
        """Whether the table is there."""
        return self.name in self.db.table_names()

    def create(
        self,
        columns: Mapping[str, Any],
        pk: str | Sequence[str] | None = None,
        not_null: Sequence[str] | set[str] | None = None,
        defaults: Mapping[str, Any] | None = None,
        if_not_exists: bool = False,
    ) -> PgTable:
        """``CREATE TABLE`` with sqlite-utils' column types (an ``int`` ``id`` key is generated, as SQLite's is)."""
        pks = [pk] if isinstance(pk, str) else list(pk or [])
        not_null, defaults = set(not_null or ()), dict(defaults or {})
        parts = []
        for name, kind in columns.items():
            if pks == ["id"] and name == "id" and kind is int:
                parts.append(f"{quote_identifier(name)} bigint GENERATED BY DEFAULT AS IDENTITY")
                continue
            part = f"{quote_identifier(name)} {_PG_TYPES.get(kind, _PG_TEXT)}"
            if name in not_null:
                part += " NOT NULL"
            if name in defaults:
                part += f" DEFAULT {_default_sql(defaults[name])}"
            parts.append(part)
        if pks:
            parts.append(f"PRIMARY KEY ({', '.join(quote_identifier(p) for p in pks)})")
        exists = "IF NOT EXISTS " if if_not_exists else ""
        self.db.execute(f"CREATE TABLE {exists}{self._q} ({', '.join(parts)})")
        return self

    def create_index(
        self,
        columns: Sequence[str],
        index_name: str | None = None,
        unique: bool = False,
        if_not_exists: bool = False,
    ) -> PgTable:
        """``CREATE INDEX`` named as sqlite-utils names it (``idx_<table>_<columns>``; a hash when too long)."""
        name = index_name or f"idx_{self.name}_{'_'.join(columns)}"
        if len(name) > 63:  # PostgreSQL cuts longer names: keep them distinct
            name = name[:50] + "_" + hashlib.sha1(name.encode()).hexdigest()[:12]
        cols = ", ".join(quote_identifier(c) for c in columns)
        exists = "IF NOT EXISTS " if if_not_exists else ""
        self.db.execute(
            f"CREATE {'UNIQUE ' if unique else ''}INDEX {exists}{quote_identifier(name)} ON {self._q} ({cols})"
        )
        return self

    @property
    def pks(self) -> list[str]:
        """The primary key's columns, in key order."""
        if self.name not in self.db.pk_cache:
            rows = self.db.conn.raw.execute(
                "SELECT k.column_name FROM information_schema.table_constraints c"
                " JOIN information_schema.key_column_usage k ON k.constraint_name = c.constraint_name"
                " AND k.table_schema = c.table_schema AND k.table_name = c.table_name"
                " WHERE c.table_schema = %s AND c.table_name = %s AND c.constraint_type = 'PRIMARY KEY'"
                " ORDER BY k.ordinal_position",
                (self.db.schema, self.name),
            ).fetchall()
            self.db.pk_cache[self.name] = [str(r[0]) for r in rows]
        return self.db.pk_cache[self.name]

    @property
    def columns_dict(self) -> dict[str, type]:
        """``{column: Python type}``, in table order."""
        rows = self.db.conn.raw.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s"
            " AND table_name = %s ORDER BY ordinal_position",
            (self.db.schema, self.name),
        ).fetchall()
        return {str(name): _PY_TYPES.get(str(kind), str) for name, kind in rows}

    @property
    def count(self) -> int:
        """The number of rows."""
        return int(self.db.execute(f"SELECT COUNT(*) FROM {self._q}").fetchone()[0])  # type: ignore[index]

    def add_column(self, col_name: str, col_type: Any = None, not_null_default: Any = None) -> PgTable:
        """``ALTER TABLE … ADD COLUMN IF NOT EXISTS`` (with ``NOT NULL DEFAULT`` when given one)."""
        kind = _PG_TYPES.get(col_type or str, _PG_TEXT)
        extra = f" NOT NULL DEFAULT {_default_sql(not_null_default)}" if not_null_default is not None else ""
        self.db.execute(f"ALTER TABLE {self._q} ADD COLUMN IF NOT EXISTS {quote_identifier(col_name)} {kind}{extra}")
        return self

    def _insert_sql(self, record: Mapping[str, Any]) -> tuple[str, list[Any]]:
        cols = ", ".join(quote_identifier(c) for c in record)
        marks = ", ".join("?" for _ in record)
        return f"INSERT INTO {self._q} ({cols}) VALUES ({marks})", [_jsonify(v) for v in record.values()]

    def insert(self, record: Mapping[str, Any], ignore: bool = False) -> PgTable:
        """Insert one row (``ignore``: keep an existing row of the same key)."""
        sql, params = self._insert_sql(record)
        self.db.execute(sql + (" ON CONFLICT DO NOTHING" if ignore else ""), params)
        return self

    def upsert(self, record: Mapping[str, Any], pk: str | Sequence[str] | None = None) -> PgTable:
        """Insert one row, or update the row of the same key with the record's other columns."""
        keys = [pk] if isinstance(pk, str) else list(pk or self.pks)
        sql, params = self._insert_sql(record)
        rest = [c for c in record if c not in keys]
        target = ", ".join(quote_identifier(k) for k in keys)
        if rest:
            sets = ", ".join(f"{quote_identifier(c)} = EXCLUDED.{quote_identifier(c)}" for c in rest)
            sql += f" ON CONFLICT ({target}) DO UPDATE SET {sets}"
        else:
            sql += f" ON CONFLICT ({target}) DO NOTHING"
        self.db.execute(sql, params)
        return self

    def update(self, pk_values: Any, updates: Mapping[str, Any] | None = None) -> PgTable:
        """Set columns of the row with this key.

        Raises
        ------
        NotFoundError
            No such row (as sqlite-utils raises it).
        """
        keys = self.pks
        values = list(pk_values) if isinstance(pk_values, list | tuple) else [pk_values]
        where = " AND ".join(f"{quote_identifier(k)} = ?" for k in keys)
        if not updates:
            if self.db.execute(f"SELECT 1 FROM {self._q} WHERE {where}", values).fetchone() is None:
                raise NotFoundError
            return self
        sets = ", ".join(f"{quote_identifier(c)} = ?" for c in updates)
        cur = self.db.execute(
            f"UPDATE {self._q} SET {sets} WHERE {where}", [*(_jsonify(v) for v in updates.values()), *values]
        )
        if cur.rowcount == 0:
            raise NotFoundError
        return self


#: Either kind of database (what the storage modules are given).
Database = sqlite_utils.Database | PgDatabase
