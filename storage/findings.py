"""The findings table: every finding the node reported, by its ``finding_id`` (the Tracking UID its SR, GSPS
and SEG carry), with its seed-004 features and reliability and what a radiologist made of it; and the
``reports`` table: every findings SR the node issued (each version), so that an assessment names one.

``harmonode status --json`` lists the findings; ``harmonode feedback FINDING`` and an assessment SR name one.
Features are stored compressed (``models.features.compress_features``). A rerun of a series writes the same
finding IDs again and keeps what a radiologist said of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from storage.database import Database

if TYPE_CHECKING:  # the index's schema creates this module's tables: no import at run time
    from storage.index import Index


class FindingState(StrEnum):
    """What a radiologist made of a finding (``detected``: nothing yet)."""

    DETECTED = "detected"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    MODIFIED = "modified"


_FINDING_COLUMNS = {
    "finding_id": str,  # the Tracking UID
    "series_instance_uid": str,  # the source series
    "study_instance_uid": str,
    "number": int,  # 1.. within the series, as the SR numbers them
    "tracking_id": str,
    "kind": str,
    "center_mm": str,  # JSON [x, y, z], patient coordinates (never exported)
    "diameter_mm": float,
    "probability": float,
    "reliability": float,
    "member_probabilities": str,  # JSON list
    "features": bytes,  # compressed feature vector
    "feature_codec": str,
    "model_version": str,
    "condition_key": str,
    "state": str,  # FindingState
    "assessed_kind": str,
    "assessed_center_mm": str,  # JSON, or ''
    "assessed_diameter_mm": float,
    "assessed_by": str,
    "assessed_at": float,
    "created_at": float,
    "updated_at": float,
}
_REPORT_COLUMNS = {
    "sop_instance_uid": str,  # the SR's
    "series_instance_uid": str,  # the source series it reports on
    "sr_series_instance_uid": str,
    "version": int,  # 1: the pipeline's; 2..: corrected after feedback
    "superseded_by": str,  # the SOP Instance UID of the next version, or ''
    "path": str,  # in the file store
    "created_at": float,
}


def create_tables(db: Database) -> None:
    """Create the ``findings`` and ``reports`` tables where missing (an older index gains them as it opens)."""
    db["findings"].create(_FINDING_COLUMNS, pk="finding_id", defaults={"state": "detected"}, if_not_exists=True)
    db["findings"].create_index(["series_instance_uid"], if_not_exists=True)
    db["reports"].create(_REPORT_COLUMNS, pk="sop_instance_uid", if_not_exists=True)
    db["reports"].create_index(["series_instance_uid"], if_not_exists=True)


@dataclass(frozen=True)
class FindingRecord:
    """One finding as the pipeline stores it."""

    finding_id: str
    series_instance_uid: str
    study_instance_uid: str
    number: int
    tracking_id: str
    kind: str
    center_mm: tuple[float, float, float]
    diameter_mm: float
    probability: float
    reliability: float
    member_probabilities: tuple[float, ...]
    features: bytes
    feature_codec: str
    model_version: str
    condition_key: str

    def __post_init__(self) -> None:
        if not self.finding_id or not self.series_instance_uid:
            raise ValueError("a finding record needs its finding ID (Tracking UID) and series")


def save_findings(index: Index, records: Sequence[FindingRecord]) -> None:
    """Insert or refresh the findings of a series (a radiologist's assessment of one is kept)."""
    now = time.time()
    with index.transaction() as conn:
        for r in records:
            conn.execute(
                "INSERT INTO findings (finding_id, series_instance_uid, study_instance_uid, number, tracking_id,"
                " kind, center_mm, diameter_mm, probability, reliability, member_probabilities, features,"
                " feature_codec, model_version, condition_key, state, assessed_kind, assessed_center_mm,"
                " assessed_diameter_mm, assessed_by, assessed_at, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'','',0,'',0,?,?)"
                " ON CONFLICT(finding_id) DO UPDATE SET probability=excluded.probability,"
                " reliability=excluded.reliability, member_probabilities=excluded.member_probabilities,"
                " features=excluded.features, updated_at=excluded.updated_at",
                (
                    r.finding_id,
                    r.series_instance_uid,
                    r.study_instance_uid,
                    r.number,
                    r.tracking_id,
                    r.kind,
                    json.dumps([round(float(v), 3) for v in r.center_mm]),
                    float(r.diameter_mm),
                    float(r.probability),
                    float(r.reliability),
                    json.dumps(list(r.member_probabilities)),
                    r.features,
                    r.feature_codec,
                    r.model_version,
                    r.condition_key,
                    str(FindingState.DETECTED),
                    now,
                    now,
                ),
            )


def finding(index: Index, finding_id: str) -> dict[str, Any] | None:
    """The stored finding (JSON columns decoded), or None."""
    rows = index.query("SELECT * FROM findings WHERE finding_id=?", (finding_id,))
    return _decoded(rows[0]) if rows else None


def findings_of_series(index: Index, series_uid: str) -> list[dict[str, Any]]:
    """The findings of a source series, in their SR order."""
    rows = index.query("SELECT * FROM findings WHERE series_instance_uid=? ORDER BY number", (series_uid,))
    return [_decoded(r) for r in rows]


def set_assessment(
    index: Index,
    finding_id: str,
    state: FindingState,
    observer: str,
    kind: str = "",
    center_mm: Sequence[float] | None = None,
    diameter_mm: float = 0.0,
) -> None:
    """Record what a radiologist made of a finding (the latest assessment wins)."""
    now = time.time()
    with index.transaction() as conn:
        conn.execute(
            "UPDATE findings SET state=?, assessed_kind=?, assessed_center_mm=?, assessed_diameter_mm=?,"
            " assessed_by=?, assessed_at=?, updated_at=? WHERE finding_id=?",
            (
                str(state),
                kind,
                json.dumps([float(v) for v in center_mm]) if center_mm is not None else "",
                float(diameter_mm),
                observer,
                now,
                now,
                finding_id,
            ),
        )


def findings_status(index: Index, limit: int = 10000) -> list[dict[str, Any]]:
    """Every finding for ``status --json``: ID, series, kind, probability, reliability, state (no features)."""
    rows = index.query(
        "SELECT finding_id, series_instance_uid, study_instance_uid, number, tracking_id, kind, center_mm,"
        " diameter_mm, probability, reliability, model_version, condition_key, state, assessed_kind,"
        " assessed_by FROM findings ORDER BY created_at, series_instance_uid, number LIMIT ?",
        (limit,),
    )
    for r in rows:
        r["center_mm"] = json.loads(r["center_mm"] or "[]")
    return rows


# -- reports: the SR versions ------------------------------------------------------------------------
def save_report(index: Index, sop_uid: str, series_uid: str, sr_series_uid: str, path: str, version: int = 1) -> None:
    """Record a findings SR the node issued (a rerun records the same one again)."""
    with index.transaction() as conn:
        conn.execute(
            "INSERT INTO reports (sop_instance_uid, series_instance_uid, sr_series_instance_uid, version,"
            " superseded_by, path, created_at) VALUES (?,?,?,?,'',?,?) ON CONFLICT(sop_instance_uid) DO NOTHING",
            (sop_uid, series_uid, sr_series_uid, version, path, time.time()),
        )


def supersede(index: Index, old_sop_uid: str, new_sop_uid: str) -> None:
    """Mark a report as replaced by its next version."""
    with index.transaction() as conn:
        conn.execute("UPDATE reports SET superseded_by=? WHERE sop_instance_uid=?", (new_sop_uid, old_sop_uid))


def report(index: Index, sop_uid: str) -> dict[str, Any] | None:
    """The report with this SOP Instance UID, or None when the node never issued it."""
    rows = index.query("SELECT * FROM reports WHERE sop_instance_uid=?", (sop_uid,))
    return rows[0] if rows else None


def current_report(index: Index, series_uid: str) -> dict[str, Any] | None:
    """The latest version of a series' findings SR, or None."""
    rows = index.query(
        "SELECT * FROM reports WHERE series_instance_uid=? AND superseded_by='' ORDER BY version DESC LIMIT 1",
        (series_uid,),
    )
    return rows[0] if rows else None


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("center_mm", "assessed_center_mm", "member_probabilities"):
        row[key] = json.loads(row[key]) if row.get(key) else None
    return row
