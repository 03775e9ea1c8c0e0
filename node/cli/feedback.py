"""``harmonode feedback FINDING``: a radiologist's accept, reject or modification of one finding.

FINDING is the finding's ``finding_id`` (its Tracking UID, as ``harmonode status --json`` lists it). The
verdict goes through the same path as an assessment SR (``handlers.feedback.apply_assessment``): recorded,
the result corrected (a new SR version queued to the destinations, which a running node's dispatcher sends),
an export record made. An unknown finding is a CLI error and changes nothing.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node.cli import ConfigOption, fail, load_or_fail


def _centre(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise fail(f"--center takes x,y,z in mm (patient coordinates), got {text!r}") from exc
    if len(values) != 3:
        raise fail(f"--center takes three numbers x,y,z, got {len(values)}")
    return values  # type: ignore[return-value]


def feedback_cmd(
    finding: Annotated[str, typer.Argument(help="The finding's ID (its Tracking UID; see `harmonode status --json`).")],
    by: Annotated[str, typer.Option("--by", help="Who assesses it (the radiologist's name).")],
    accept: Annotated[bool, typer.Option("--accept", help="The finding is right.")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="The finding is wrong: removed from the result.")] = False,
    relabel: Annotated[str, typer.Option("--relabel", help="Another class: aneurysm or nodule.")] = "",
    center: Annotated[str, typer.Option("--center", help="Another position x,y,z (mm, patient coordinates).")] = "",
    diameter: Annotated[float, typer.Option("--diameter", help="Another diameter (mm).")] = 0.0,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Accept, reject or modify one finding; the result is corrected and an export record made."""
    from handlers.feedback import FeedbackDesk, apply_assessment
    from models.findings import LESION_KINDS
    from storage.feedback import Assessment, FeedbackAction, FeedbackSource, FeedbackState
    from storage.store import open_store

    modify = bool(relabel or center or diameter)
    if sum((accept, reject, modify)) != 1:
        raise fail("give exactly one of --accept, --reject, or a modification (--relabel/--center/--diameter)")
    if relabel and relabel not in LESION_KINDS:
        raise fail(f"--relabel takes one of {', '.join(LESION_KINDS)}, not {relabel!r}")
    if diameter < 0:
        raise fail(f"--diameter is positive, got {diameter}")
    if not by.strip():
        raise fail("--by names who assesses the finding")
    action = FeedbackAction.ACCEPT if accept else FeedbackAction.REJECT if reject else FeedbackAction.MODIFY
    cfg = load_or_fail(config)
    if not cfg.has_node_data:
        raise fail(f"no node data in {cfg.data_path.resolve()}: pass --config of the node")
    assessment = Assessment(
        finding_id=finding.strip(),
        action=action,
        observer=by.strip(),
        source=FeedbackSource.CLI,
        kind=relabel,
        center_mm=_centre(center) if center else None,
        diameter_mm=diameter,
    )
    with open_store(cfg.data_path, cfg.store_settings) as store:
        desk = FeedbackDesk(
            store.files,
            store.index,
            store.queue,
            cfg.result_destinations,
            cfg.learning.export_settings,
            cfg.node.ae_title,
            cfg.audit_trail(),  # appends under a file lock beside a running node
        )
        outcome = apply_assessment(desk, assessment)
    if outcome.state == FeedbackState.REFUSED:
        raise fail(f"feedback refused: {outcome.reason} (see `harmonode status --json` for the finding IDs)")
    report = {
        "finding_id": assessment.finding_id,
        "action": str(action),
        "state": str(outcome.state),
        "corrected_sr": outcome.corrected_sr_uid,
        "export_record": outcome.export_record,
    }
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(
            f"finding {assessment.finding_id}: {action} recorded"
            + (f"; corrected SR {outcome.corrected_sr_uid} queued" if outcome.corrected_sr_uid else "")
            + (f"; export record {outcome.export_record}" if outcome.export_record else "")
        )


def register(app: typer.Typer) -> None:
    """Add ``feedback`` to the CLI."""
    app.command("feedback")(feedback_cmd)


__all__ = ["register"]
