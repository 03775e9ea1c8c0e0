"""The feedback table: every assessment of a finding the node received, applied or refused, from any way in.

One row per finding assessed: ``source`` says how it came (``aira``: an assessment SR by C-STORE, ``cli``:
``harmonode feedback``, ``web``: the console), ``action`` what the radiologist said (accept, reject,
modify), ``state`` whether it was ``applied`` or ``refused`` (and ``reason`` why). An assessment SR that a
feedback job reads twice records each of its findings once (unique on the SR and the finding).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from storage.database import Database

if TYPE_CHECKING:  # the index's schema creates this module's table: no import at run time
    from storage.index import Index


class FeedbackSource(StrEnum):
    """How an assessment reached the node."""

    AIRA = "aira"  # an assessment SR (IHE AI Result Assessment) by C-STORE
    CLI = "cli"
    WEB = "web"


class FeedbackAction(StrEnum):
    """What a radiologist said of a finding."""

    ACCEPT = "accept"
    REJECT = "reject"
    MODIFY = "modify"


class FeedbackState(StrEnum):
    """What the node did with an assessment."""

    APPLIED = "applied"
    REFUSED = "refused"


def create_table(db: Database) -> None:
    """Create the ``feedback`` table where missing (an older index gains it as it opens)."""
    db["feedback"].create(
        {
            "id": int,
            "source": str,
            "finding_id": str,
            "sr_sop_instance_uid": str,  # the node's SR the assessment names ('' from the CLI)
            "assessment_sop_instance_uid": str,  # the assessment SR ('' from the CLI)
            "action": str,
            "kind": str,  # a modification's class ('' when unchanged)
            "center_mm": str,  # JSON, or ''
            "diameter_mm": float,
            "observer": str,
            "state": str,
            "reason": str,
            "corrected_sr_uid": str,  # the SR version it produced, or ''
            "created_at": float,
        },
        pk="id",
        if_not_exists=True,
    )
    db.conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS feedback_once ON feedback (assessment_sop_instance_uid, finding_id)"
        " WHERE assessment_sop_instance_uid != ''"
    )
    db["feedback"].create_index(["finding_id"], if_not_exists=True)


@dataclass(frozen=True)
class Assessment:
    """One radiologist's verdict on one finding, from whichever way it came."""

    finding_id: str
    action: FeedbackAction
    observer: str
    source: FeedbackSource
    kind: str = ""
    center_mm: tuple[float, float, float] | None = None
    diameter_mm: float = 0.0
    sr_sop_instance_uid: str = ""
    assessment_sop_instance_uid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.finding_id:
            raise ValueError("an assessment names the finding (its Tracking UID)")
        if not self.observer.strip():
            raise ValueError("an assessment names its observer")
        if self.action == FeedbackAction.MODIFY and not (self.kind or self.center_mm or self.diameter_mm):
            raise ValueError("a modification gives a new class, centre or diameter")
        if self.diameter_mm < 0:
            raise ValueError(f"a diameter is positive, got {self.diameter_mm}")


def already_recorded(index: Index, assessment: Assessment) -> bool:
    """True when this assessment SR's verdict on this finding was recorded before (a job run twice)."""
    if not assessment.assessment_sop_instance_uid:
        return False
    rows = index.query(
        "SELECT 1 FROM feedback WHERE assessment_sop_instance_uid=? AND finding_id=?",
        (assessment.assessment_sop_instance_uid, assessment.finding_id),
    )
    return bool(rows)


def record_feedback(
    index: Index, assessment: Assessment, state: FeedbackState, reason: str = "", corrected_sr_uid: str = ""
) -> int:
    """Record one assessment and what the node did with it; return its row id."""
    with index.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO feedback (source, finding_id, sr_sop_instance_uid, assessment_sop_instance_uid, action,"
            " kind, center_mm, diameter_mm, observer, state, reason, corrected_sr_uid, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT DO NOTHING",
            (
                str(assessment.source),
                assessment.finding_id,
                assessment.sr_sop_instance_uid,
                assessment.assessment_sop_instance_uid,
                str(assessment.action),
                assessment.kind,
                json.dumps(list(assessment.center_mm)) if assessment.center_mm is not None else "",
                float(assessment.diameter_mm),
                assessment.observer,
                str(state),
                reason[:2000],
                corrected_sr_uid,
                time.time(),
            ),
        )
        return int(cur.lastrowid or 0)


def set_corrected(index: Index, row_ids: Sequence[int], corrected_sr_uid: str) -> None:
    """Name the corrected SR that applied feedback rows produced."""
    with index.transaction() as conn:
        conn.executemany(
            "UPDATE feedback SET corrected_sr_uid=? WHERE id=?", [(corrected_sr_uid, row) for row in row_ids]
        )


def feedback_rows(index: Index, finding_ids: Sequence[str] = (), limit: int = 1000) -> list[dict[str, Any]]:
    """Feedback rows, newest first (optionally of some findings only)."""
    sql, params = "SELECT * FROM feedback", []
    if finding_ids:
        sql += f" WHERE finding_id IN ({','.join('?' for _ in finding_ids)})"
        params.extend(finding_ids)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    return index.query(sql, tuple(params))
