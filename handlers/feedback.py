"""Radiologist feedback: one store, every way in (an assessment SR by C-STORE, ``harmonode feedback``, the console).

``apply_assessment`` takes one verdict on one finding and, unless it is refused, records it (the feedback and
findings tables), audits it, changes the stored result — a rejected or modified finding gets a corrected SR
(``handlers.results.revision``), the next version of the series' report, stored and queued to every
destination — and makes the finding's export record (seed 004, claim 10). A verdict on a finding the node
does not know, or one naming an SR the node never issued (or not the finding's), is recorded as refused
with the reason, logged, and changes nothing.

``feedback_job`` is the ``feedback`` job: an arrived SR series that holds an assessment SR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread

from handlers.learning import export_assessed
from handlers.results.assessment import NotAnAssessment, read_assessment
from handlers.results.context import AlgorithmInfo
from handlers.results.revision import build_revision
from models.findings import Finding
from models.volume import build_volume, load_datasets
from storage import findings as found
from storage.audit import Code, Outcome, Participant
from storage.deliveries import enqueue_deliveries, store_results
from storage.exports import ExportSettings
from storage.feedback import (
    Assessment,
    FeedbackAction,
    FeedbackSource,
    FeedbackState,
    already_recorded,
    record_feedback,
    set_corrected,
)
from storage.files import FileStore
from storage.index import Index, SeriesState
from storage.queue import Job, JobQueue

log = logging.getLogger(__name__)

INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")  # PS3.15 A.5.3.2, action U: updated
_STATES = {
    FeedbackAction.ACCEPT: found.FindingState.ACCEPTED,
    FeedbackAction.REJECT: found.FindingState.REJECTED,
    FeedbackAction.MODIFY: found.FindingState.MODIFIED,
}


@dataclass(frozen=True)
class FeedbackDesk:
    """The collaborators feedback is given: the node's storage, where results go, the export settings."""

    files: FileStore
    index: Index
    queue: JobQueue
    destinations: tuple[str, ...]
    learning: ExportSettings
    ae_title: str = "HARMONODE"
    audit: Any = None  # storage.audit.AuditTrail, or None (the log line only)


@dataclass(frozen=True)
class FeedbackOutcome:
    """What one verdict did: ``applied`` or ``refused`` (and why), the corrected SR, the export record."""

    state: FeedbackState
    reason: str = ""
    corrected_sr_uid: str = ""
    export_record: str = ""
    feedback_id: int = 0


def _refuse(desk: FeedbackDesk, assessment: Assessment, reason: str) -> FeedbackOutcome:
    log.warning(
        "feedback refused (%s, finding %s, assessment %s): %s",
        assessment.source,
        assessment.finding_id,
        assessment.assessment_sop_instance_uid or "-",
        reason,
    )
    row = record_feedback(desk.index, assessment, FeedbackState.REFUSED, reason)
    _audit(desk, assessment, Outcome.MINOR_FAILURE, "")
    return FeedbackOutcome(FeedbackState.REFUSED, reason, feedback_id=row)


def _audit(desk: FeedbackDesk, assessment: Assessment, outcome: Outcome, study_uid: str) -> None:
    if desk.audit is None:
        return
    try:
        desk.audit.record(
            INSTANCES_ACCESSED,
            "U",
            outcome,
            [Participant(assessment.observer[:64], True), Participant(desk.ae_title, False)],
            studies=[study_uid] if study_uid else [],
        )
    except Exception:  # the audit trail never stops feedback; the log line says what happened
        log.exception("audit: feedback on finding %s could not be recorded", assessment.finding_id)


def apply_assessment(desk: FeedbackDesk, assessment: Assessment, correct: bool = True) -> FeedbackOutcome:
    """Record one verdict, change the stored result, export it; or refuse it and change nothing.

    Parameters
    ----------
    desk
        The node's storage and settings.
    assessment
        The verdict (from an assessment SR, the CLI or the console).
    correct
        Issue the corrected SR now (an assessment SR of several verdicts issues one, after the last).

    Returns
    -------
    FeedbackOutcome
        ``refused`` with the reason (an unknown finding or SR), else ``applied`` with the corrected SR's
        SOP Instance UID (none for an acceptance: the result stands) and the export record's id.
    """
    finding = found.finding(desk.index, assessment.finding_id)
    if finding is None:
        return _refuse(desk, assessment, f"no finding with ID {assessment.finding_id} on this node")
    if assessment.sr_sop_instance_uid:
        report = found.report(desk.index, assessment.sr_sop_instance_uid)
        if report is None:
            return _refuse(
                desk, assessment, f"it assesses SR {assessment.sr_sop_instance_uid}, which this node never issued"
            )
        if report["series_instance_uid"] != finding["series_instance_uid"]:
            return _refuse(
                desk, assessment, f"finding {assessment.finding_id} is not in SR {assessment.sr_sop_instance_uid}"
            )
    if already_recorded(desk.index, assessment):
        log.info(
            "feedback on finding %s from assessment %s already recorded",
            assessment.finding_id,
            assessment.assessment_sop_instance_uid,
        )
        return FeedbackOutcome(FeedbackState.APPLIED, "already recorded")
    kind = assessment.kind or finding["kind"]
    centre = assessment.center_mm or tuple(finding["center_mm"])
    diameter = assessment.diameter_mm or float(finding["diameter_mm"])
    found.set_assessment(
        desk.index,
        assessment.finding_id,
        _STATES[assessment.action],
        assessment.observer,
        kind if assessment.action == FeedbackAction.MODIFY else "",
        centre if assessment.action == FeedbackAction.MODIFY else None,
        diameter if assessment.action == FeedbackAction.MODIFY else 0.0,
    )
    corrected = ""
    if correct and assessment.action != FeedbackAction.ACCEPT:
        corrected = issue_corrected_sr(
            desk, finding["series_instance_uid"], f"{assessment.action} {assessment.finding_id}"
        )
    row = record_feedback(desk.index, assessment, FeedbackState.APPLIED, corrected_sr_uid=corrected)
    changed: dict[str, Any] = {"assessment": str(_STATES[assessment.action])}
    if assessment.action == FeedbackAction.MODIFY:
        changed.update(kind=kind, diameter_mm=round(float(diameter), 1))
    record = export_assessed(
        desk.index, desk.queue, desk.learning, found.finding(desk.index, assessment.finding_id) or finding, changed, row
    )
    log.info(
        "audit: feedback %s on finding %s by %s (%s): applied%s",
        assessment.action,
        assessment.finding_id,
        assessment.observer,
        assessment.source,
        f", corrected SR {corrected}" if corrected else "",
    )
    _audit(desk, assessment, Outcome.SUCCESS, finding["study_instance_uid"])
    return FeedbackOutcome(FeedbackState.APPLIED, "", corrected, record or "", row)


def _current_findings(index: Index, series_uid: str) -> list[Finding]:
    """The series' findings as the radiologists left them: rejected ones gone, modified ones changed."""
    out = []
    for f in found.findings_of_series(index, series_uid):
        if f["state"] == found.FindingState.REJECTED:
            continue
        modified = f["state"] == found.FindingState.MODIFIED
        out.append(
            Finding(
                kind=(f["assessed_kind"] if modified and f["assessed_kind"] else f["kind"]),
                center_mm=tuple(f["assessed_center_mm"] if modified and f["assessed_center_mm"] else f["center_mm"]),  # type: ignore[arg-type]
                diameter_mm=float(
                    f["assessed_diameter_mm"] if modified and f["assessed_diameter_mm"] else f["diameter_mm"]
                ),
                probability=float(f["probability"]),
                tracking_id=f["tracking_id"],
                tracking_uid=f["finding_id"],
            )
        )
    return out


def issue_corrected_sr(desk: FeedbackDesk, series_uid: str, what: str) -> str:
    """Build, store and queue the next version of a series' findings SR; return its SOP Instance UID.

    Raises
    ------
    LookupError
        The series has no report or its sources are gone.
    """
    current = found.current_report(desk.index, series_uid)
    if current is None:
        raise LookupError(f"series {series_uid} has no findings SR to correct")
    previous = dcmread(desk.files.abspath(current["path"]))
    rows = desk.index.instances_of_series(series_uid)
    sources = load_datasets([desk.files.abspath(r["path"]) for r in rows])
    volume = build_volume(sources)
    series = desk.index.series(series_uid) or {}
    algorithm = AlgorithmInfo(
        name="harmonode",
        version=series.get("model_version") or "none",
        rule_id=series.get("rule_id") or "",
        rule_match=series.get("rule_match") or "",
        condition_key=series.get("condition_key") or "",
    )
    version = int(current["version"]) + 1
    note = f"version {version}, revised after a radiologist's assessment ({what})"
    sr = build_revision(
        previous, volume.datasets, volume.geometry, _current_findings(desk.index, series_uid), algorithm, version, note
    )
    stored = store_results(desk.files, desk.index, [sr])
    found.save_report(
        desk.index, str(sr.SOPInstanceUID), series_uid, str(sr.SeriesInstanceUID), stored[0].path, version
    )
    found.supersede(desk.index, current["sop_instance_uid"], str(sr.SOPInstanceUID))
    if desk.destinations:
        enqueue_deliveries(desk.queue, desk.destinations, stored, desk.index)
    return str(sr.SOPInstanceUID)


def feedback_job(job: Job, desk: FeedbackDesk) -> None:
    """The ``feedback`` job: read the SRs of an arrived series and apply the assessments among them.

    A series with no assessment SR is ``skipped``; one whose every verdict was refused is ``failed`` with
    the reason (it changed nothing); otherwise ``done``.
    """
    series_uid = str(job.payload.get("series_instance_uid") or job.key)
    if desk.index.series(series_uid) is None:
        log.warning("job %d: series %s is not in the index; nothing to do", job.id, series_uid)
        return
    applied, refused, why = 0, 0, []
    changed: dict[str, list[int]] = {}  # source series -> feedback rows that change its result
    for row in desk.index.instances_of_series(series_uid):
        try:
            document = read_assessment(dcmread(desk.files.abspath(row["path"])))
        except (NotAnAssessment, OSError) as exc:
            why.append(str(exc))
            continue
        except Exception as exc:  # an unreadable file: the series says so, the worker keeps going
            why.append(f"unreadable: {type(exc).__name__}")
            continue
        for verdict in document.verdicts:
            assessment = Assessment(
                finding_id=verdict.tracking_uid,
                action=FeedbackAction(verdict.action),
                observer=document.observer,
                source=FeedbackSource.AIRA,
                kind=verdict.kind if verdict.action == "modify" else "",
                center_mm=verdict.center_mm,
                diameter_mm=verdict.diameter_mm,
                sr_sop_instance_uid=document.assessed_sr_uids[0] if document.assessed_sr_uids else "",
                assessment_sop_instance_uid=document.sop_instance_uid,
            )
            if not document.assessed_sr_uids:
                outcome = _refuse(desk, assessment, "it names no SR of this node in its evidence")
            else:
                outcome = apply_assessment(desk, assessment, correct=False)
            if outcome.state == FeedbackState.APPLIED:
                applied += 1
                if outcome.feedback_id and assessment.action != FeedbackAction.ACCEPT:
                    series = (found.finding(desk.index, assessment.finding_id) or {}).get("series_instance_uid", "")
                    changed.setdefault(series, []).append(outcome.feedback_id)
            else:
                refused += 1
                why.append(outcome.reason)
    for source_series, rows in changed.items():  # one corrected SR per assessed series, after every verdict
        corrected = issue_corrected_sr(desk, source_series, f"{len(rows)} verdict(s) of one assessment")
        set_corrected(desk.index, rows, corrected)
    if applied:
        error = f"assessment: {applied} verdict(s) applied, {refused} refused" + (f" ({why[-1]})" if refused else "")
        desk.index.update_series(series_uid, state=SeriesState.DONE, error=error if refused else "")
    elif refused:
        desk.index.update_series(series_uid, state=SeriesState.FAILED, error=f"assessment refused: {why[-1]}")
    else:
        reason = why[-1] if why else "no instance"
        desk.index.update_series(series_uid, state=SeriesState.SKIPPED, error=f"not an AI result assessment: {reason}")
