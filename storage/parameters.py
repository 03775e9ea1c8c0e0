"""The parameter store (seed 001): per-region target (mean, std) of the studies the node has seen, per condition.

One row per source: a series the pipeline read (``source`` ``series:<uid>``, replaced when the series is read
again) or a simulated study a test or benchmark stored (``simulated:<kind>/<condition>/<seed>``). Each row holds a
``rules.transfer.ParameterSet`` (as its ``as_dict``: this lowest layer imports no rule code) measured on the
series' raw (not yet harmonized) values, cut into the regions of ``models.mining.REGION_THRESHOLDS`` for its
modality, and the series' condition key (the cell of the seed's environment table).
Hard-example mining (``models.mining``) converts labelled patches towards these sets and searches near them.

Measuring (``models.mining.measure``) is cheap: the statistics are taken on a strided subsample of the volume,
a thirty-second of its voxels, two ``bincount`` passes over those.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.database import Database, like

if TYPE_CHECKING:  # the index's schema creates this module's table: no import at run time
    from storage.index import Index


def create_table(db: Database) -> None:
    """Create the ``parameter_sets`` table where missing (an older index gains it as it opens)."""
    db["parameter_sets"].create(
        {
            "id": int,
            "source": str,  # series:<uid> or simulated:<kind>/<condition>/<seed>
            "condition_key": str,
            "modality": str,
            "parameters": str,  # JSON of ParameterSet.as_dict()
            "created_at": float,
        },
        pk="id",
        if_not_exists=True,
    )
    db["parameter_sets"].create_index(["source"], unique=True, if_not_exists=True)
    db["parameter_sets"].create_index(["condition_key"], if_not_exists=True)


@dataclass(frozen=True)
class StoredParameters:
    """One stored parameter set with its row id, source and condition cell."""

    id: int
    source: str
    condition_key: str
    modality: str
    parameters: dict[str, Any]  # ParameterSet.as_dict()

    def provenance(self) -> dict[str, Any]:
        """What a mined example records of the set it was converted with."""
        return {"id": self.id, "source": self.source, "condition_key": self.condition_key, **self.parameters}


def store_parameters(index: Index, source: str, condition_key: str, modality: str, parameters: dict[str, Any]) -> int:
    """Store (or replace, for the same ``source``) one parameter set (``ParameterSet.as_dict()``); return its id.

    Raises
    ------
    ValueError
        An empty source or a set without regions.
    """
    if not source or not parameters.get("regions"):
        raise ValueError("a stored parameter set has a source and at least one region")
    row = (source, condition_key, modality, json.dumps(parameters), time.time())
    with index.transaction() as conn:
        conn.execute(
            "INSERT INTO parameter_sets (source, condition_key, modality, parameters, created_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (source) DO UPDATE SET condition_key=excluded.condition_key,"
            " modality=excluded.modality, parameters=excluded.parameters, created_at=excluded.created_at",
            row,
        )
        return int(conn.execute("SELECT id FROM parameter_sets WHERE source=?", (source,)).fetchone()[0])


def stored_parameters(
    index: Index, condition_key: str | None = None, modality: str | None = None
) -> list[StoredParameters]:
    """Stored sets, oldest first; only one condition cell's (exact key, or a ``kind/`` style prefix ending in
    ``*``) and/or one modality's when given."""
    sql, args = "SELECT * FROM parameter_sets WHERE 1=1", []
    if condition_key is not None:
        if condition_key.endswith("*"):
            sql += " AND " + like(index.db, "condition_key", escape="\\")
            prefix = condition_key[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(prefix + "%")
        else:
            sql += " AND condition_key = ?"
            args.append(condition_key)
    if modality is not None:
        sql += " AND modality = ?"
        args.append(modality)
    rows = index.query(sql + " ORDER BY id", tuple(args))
    return [
        StoredParameters(int(r["id"]), r["source"], r["condition_key"], r["modality"], json.loads(r["parameters"]))
        for r in rows
    ]


def conditions(index: Index) -> dict[str, int]:
    """``{condition key: stored sets}``."""
    rows = index.query("SELECT condition_key, count(*) AS n FROM parameter_sets GROUP BY condition_key ORDER BY 1")
    return {r["condition_key"]: int(r["n"]) for r in rows}
