"""The learning loop's side of a series' results: keep every finding with its features, export what seed 004
asks for.

``record_findings`` is the pipeline's results stage for the learning loop: each finding goes into the findings
table by its ``finding_id`` (its Tracking UID) with its compressed feature vector and reliability, the series'
SR into the reports table, and a finding whose reliability is under ``[learning] reliability_threshold`` gets
an export record (claim 7). ``export_assessed`` makes the record of a finding a radiologist assessed (claim
10). Records are built by ``storage.exports.build_record`` from the fields it names, nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydicom.uid import generate_uid

from models.features import FEATURE_CODEC, FindingFeatures
from models.findings import Finding
from storage.deliveries import StoredResult
from storage.exports import ExportSettings, ExportTrigger, add_export, build_record
from storage.findings import FindingRecord, save_findings, save_report
from storage.index import Index
from storage.queue import JobQueue

log = logging.getLogger(__name__)

SR_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22")  # Comprehensive 3D, Enhanced


def finding_uid(series_uid: str, model_version: str, rule_id: str, number: int) -> str:
    """The Tracking UID of a series' ``number``-th finding: stable across reruns of the same model and rule."""
    return generate_uid(entropy_srcs=[series_uid, model_version, rule_id, "finding", str(number)])


def with_finding_ids(findings: Sequence[Finding], series_uid: str, model_version: str, rule_id: str) -> list[Finding]:
    """The findings, each with its Tracking UID (its ``finding_id``) and identifier set."""
    out = []
    for n, f in enumerate(findings, start=1):
        uid = f.tracking_uid or finding_uid(series_uid, model_version, rule_id, n)
        out.append(
            Finding(
                f.kind,
                f.center_mm,
                f.diameter_mm,
                f.probability,
                f.center_index,
                f.tracking_id or f"{f.kind}-{n}",
                uid,
                dict(f.extra),
            )
        )
    return out


def result_of(finding: Mapping[str, Any]) -> dict[str, Any]:
    """The recognition result of a stored finding as a record carries it."""
    return {
        "kind": finding["kind"],
        "probability": round(float(finding["probability"]), 4),
        "diameter_mm": round(float(finding["diameter_mm"]), 1),
    }


def _finding_record(
    series: Mapping[str, Any],
    f: Finding,
    number: int,
    feat: FindingFeatures | None,
    model_version: str,
    condition_key: str,
) -> FindingRecord:
    """The findings-table row of one finding (a detector that gives no features: kept without)."""
    return FindingRecord(
        finding_id=f.tracking_uid,
        series_instance_uid=series["series_instance_uid"],
        study_instance_uid=series["study_instance_uid"],
        number=number,
        tracking_id=f.tracking_id,
        kind=f.kind,
        center_mm=f.center_mm,
        diameter_mm=f.diameter_mm,
        probability=f.probability,
        reliability=feat.reliability if feat is not None else 1.0,
        member_probabilities=feat.member_probabilities if feat is not None else (),
        features=feat.compressed() if feat is not None else b"",
        feature_codec=FEATURE_CODEC if feat is not None else "",
        model_version=model_version,
        condition_key=condition_key,
    )


def record_findings(
    index: Index,
    queue: JobQueue,
    settings: ExportSettings,
    series: Mapping[str, Any],
    findings: Sequence[Finding],
    features: Sequence[FindingFeatures],
    results: Sequence[StoredResult],
    model_version: str,
    condition_key: str,
) -> int:
    """Keep a series' findings and its SR; export the findings under the reliability threshold.

    Parameters
    ----------
    index, queue
        The node's index and durable queue.
    settings
        ``[learning]``: the threshold and the targets.
    series
        The source series' index row.
    findings, features
        The findings (with their Tracking UIDs) and, in the same order, their seed-004 features (empty for a
        detector that gives none: the findings are kept without).
    results
        The stored result objects; the SR among them becomes the series' report (version 1).
    model_version, condition_key
        What recognised them, under which imaging condition.

    Returns
    -------
    int
        How many export records were made.
    """
    series_uid = series["series_instance_uid"]
    for r in results:
        if r.sop_class_uid in SR_SOP_CLASSES:
            save_report(index, r.sop_instance_uid, series_uid, r.series_instance_uid, r.path, version=1)
    records = [
        _finding_record(series, f, n, features[n - 1] if n - 1 < len(features) else None, model_version, condition_key)
        for n, f in enumerate(findings, start=1)
    ]
    save_findings(index, records)
    exported = 0
    for record, feat in zip(records, features, strict=False):
        if feat.reliability >= settings.reliability_threshold:
            continue
        body = build_record(
            ExportTrigger.LOW_RELIABILITY,
            record.features,
            len(feat.vector),
            FEATURE_CODEC,
            {
                "kind": record.kind,
                "probability": round(record.probability, 4),
                "diameter_mm": round(record.diameter_mm, 1),
            },
            None,
            feat.reliability,
            model_version,
            condition_key,
        )
        if add_export(index, queue, settings, body, record.finding_id, f"{record.finding_id}:detected"):
            exported += 1
    if exported:
        log.info("series %s: %d low-reliability finding(s) exported", series_uid, exported)
    return exported


def export_assessed(
    index: Index,
    queue: JobQueue,
    settings: ExportSettings,
    finding: Mapping[str, Any],
    changed: Mapping[str, Any],
    feedback_id: int,
) -> str | None:
    """The export record of a finding a radiologist assessed (``changed``: assessment, kind, diameter_mm).

    Returns the record id (None for a finding kept without features: nothing to learn from).
    """
    if not finding.get("features"):
        log.warning("finding %s has no stored features: its assessment is not exported", finding["finding_id"])
        return None
    from models.features import decompress_features

    length = len(decompress_features(finding["features"]))
    body = build_record(
        ExportTrigger.FEEDBACK,
        finding["features"],
        length,
        finding["feature_codec"] or FEATURE_CODEC,
        result_of(finding),
        changed,
        float(finding["reliability"]),
        finding["model_version"],
        finding["condition_key"],
    )
    return add_export(
        index, queue, settings, body, finding["finding_id"], f"{finding['finding_id']}:feedback:{feedback_id}"
    )
