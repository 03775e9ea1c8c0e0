"""Query/retrieve as SCU: pull studies from a configured PACS into the node, and re-run stored studies.

``harmonode pull`` finds studies on a source (C-FIND, Study Root) and asks it to C-MOVE them to the node
itself (its own AE title as move destination): the node must be listening (``harmonode serve`` or
``listen``) and the source must know the node's AE title, host and port. ``harmonode reprocess STUDY``
puts every received series of a stored study back on the queue as an ``analyze-series`` job.

The functions (``find_studies``, ``pull_study``, ``pull_studies``, ``reprocess_study``) are what other
commands call (``rules fit --from-pacs``).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove

from handlers.transport import tune_socket
from node.config import Config, ConfigError, Destination, load_config
from storage.files import InvalidUID, check_uid
from storage.index import SERIES_COMPLETE, Index
from storage.queue import ANALYZE_SERIES, JobQueue

log = logging.getLogger(__name__)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (defaults are embedded; see deploy/node.example.toml)."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")]
_DATE_RANGE_RE = re.compile(r"^(\d{8})?-(\d{8})?$|^\d{8}$")


class PullError(RuntimeError):
    """The source could not be reached or refused a query or a move."""


def source_by_name(config: Config, name: str = "") -> Destination:
    """The configured destination called ``name`` (the first one when ``name`` is empty).

    Raises
    ------
    ConfigError
        No destination of that name (or none at all) is configured.
    """
    if not config.destinations:
        raise ConfigError("no [[destinations]] configured: add the PACS to pull from")
    if not name:
        return config.destinations[0]
    for dest in config.destinations:
        if dest.name == name:
            return dest
    raise ConfigError(f"no destination named {name!r}; configured: {[d.name for d in config.destinations]}")


def _associate(config: Config, source: Destination, model: str) -> Association:
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_pdu_size = config.node.max_pdu_size
    ae.acse_timeout = config.node.acse_timeout_s
    ae.dimse_timeout = config.node.dimse_timeout_s
    ae.network_timeout = config.node.network_timeout_s
    ae.add_requested_context(model)
    assoc = ae.associate(
        source.host, source.port, ae_title=source.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)]
    )
    if not assoc.is_established:
        raise PullError(f"{source.name} ({source.ae_title}@{source.host}:{source.port}) refused the association")
    return assoc


def find_studies(
    config: Config, source: Destination, patient_id: str = "", date_range: str = "", study_uid: str = ""
) -> list[str]:
    """Study Instance UIDs matching a study-level query on ``source``.

    Parameters
    ----------
    config
        The node's config (its AE title calls the source).
    source
        The PACS to query.
    patient_id, date_range, study_uid
        Matching keys; ``date_range`` is ``YYYYMMDD-YYYYMMDD`` (either end may be open) or one date.

    Returns
    -------
    list[str]
        The matching studies' UIDs, in the order the source answered.

    Raises
    ------
    ValueError
        ``date_range`` is malformed.
    PullError
        The source refused the association or answered the query with a failure.
    """
    if date_range and not _DATE_RANGE_RE.match(date_range):
        raise ValueError(f"date range {date_range!r} is not YYYYMMDD-YYYYMMDD")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.PatientID = patient_id
    query.StudyDate = date_range
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(config, source, model)
    uids: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            code = int(status.get("Status", 0xC000)) if status else 0xC000
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid:
                    uids.append(uid)
            elif code != 0x0000:
                raise PullError(f"{source.name} answered the query with status 0x{code:04X}")
    finally:
        assoc.release()
    return uids


def pull_study(config: Config, source: Destination, study_uid: str) -> int:
    """Ask ``source`` to C-MOVE one study to this node; return the number of instances it sent.

    Raises
    ------
    InvalidUID
        ``study_uid`` is not a UID.
    PullError
        The source refused, or reported failed sub-operations.
    """
    uid = check_uid(study_uid, "StudyInstanceUID")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    model = StudyRootQueryRetrieveInformationModelMove
    started = time.monotonic()
    assoc = _associate(config, source, model)
    completed = failed = 0
    final = None
    try:
        for status, _ in assoc.send_c_move(query, config.node.ae_title, model):
            if not status:
                continue
            final = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
    finally:
        assoc.release()
    if final is None:
        raise PullError(f"{source.name} sent no answer to the move request")
    if final not in (0x0000, 0xB000) or failed:
        raise PullError(
            f"{source.name} answered the move with status 0x{final:04X} ({failed} failed, {completed} sent)"
        )
    log.info(
        "pulled study %s from %s: %d instance(s) in %.1f s", uid, source.name, completed, time.monotonic() - started
    )
    return completed


def pull_studies(config: Config, source: Destination, patient_id: str = "", date_range: str = "") -> dict[str, int]:
    """Find studies on ``source`` by patient ID and/or date range and pull each; study UID → instances."""
    return {uid: pull_study(config, source, uid) for uid in find_studies(config, source, patient_id, date_range)}


def reprocess_study(index: Index, queue: JobQueue, study_uid: str) -> list[str]:
    """Queue an ``analyze-series`` job for every received series of a stored study and mark it complete.

    The job is queued before the state changes, as the series watcher does: a crash in between leaves a
    job, never a complete series without one.

    Returns
    -------
    list[str]
        The Series Instance UIDs queued (empty when the study is not stored).
    """
    rows = index.query(
        "SELECT series_instance_uid FROM series WHERE study_instance_uid = ? AND origin = 'received'"
        " ORDER BY series_number, series_instance_uid",
        (study_uid,),
    )
    uids = [r["series_instance_uid"] for r in rows]
    for uid in uids:
        queue.enqueue(ANALYZE_SERIES, uid, {"series_instance_uid": uid})
        index.update_series(uid, state=SERIES_COMPLETE, completed_at=time.time(), error="")
    return uids


def register(app: typer.Typer) -> None:
    """Add ``pull`` and ``reprocess`` to the ``harmonode`` command line."""
    from node.cli import fail, setup_logging  # node.cli imports this module: import it at call time

    @app.command()
    def pull(
        study: Annotated[str, typer.Option("--study", help="Study Instance UID to pull.")] = "",
        patient_id: Annotated[str, typer.Option("--patient-id", help="Pull every study of this patient ID.")] = "",
        date_range: Annotated[str, typer.Option("--date-range", help="Pull studies dated YYYYMMDD-YYYYMMDD.")] = "",
        source: Annotated[str, typer.Option("--from", help="Destination name to pull from (default: first).")] = "",
        config: ConfigOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """Pull studies from a configured PACS into this node (C-FIND + C-MOVE; the node must be listening)."""
        setup_logging(verbose)
        if not (study or patient_id or date_range):
            raise fail("say what to pull: --study UID, --patient-id ID and/or --date-range YYYYMMDD-YYYYMMDD")
        try:
            cfg = load_config(config)
            src = source_by_name(cfg, source)
            pulled = {study: pull_study(cfg, src, study)} if study else pull_studies(cfg, src, patient_id, date_range)
        except (ConfigError, ValueError, InvalidUID, PullError) as exc:
            raise fail(str(exc)) from exc
        for uid, count in pulled.items():
            typer.echo(f"{uid}\t{count}")
        typer.echo(f"pulled {len(pulled)} stud{'y' if len(pulled) == 1 else 'ies'}, {sum(pulled.values())} instance(s)")

    @app.command()
    def reprocess(
        study_uid: Annotated[str, typer.Argument(help="Study Instance UID of a stored study.")],
        config: ConfigOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """Re-run the pipeline on a stored study: one analyze-series job per received series."""
        setup_logging(verbose)
        try:
            cfg = load_config(config)
            uid = check_uid(study_uid, "StudyInstanceUID")
        except (ConfigError, InvalidUID) as exc:
            raise fail(str(exc)) from exc
        q = cfg.queue
        index = Index(cfg.data_path / "index.sqlite")
        queue = JobQueue(
            cfg.data_path / "queue.sqlite", q.lease_seconds, q.max_attempts, q.backoff_base_s, q.backoff_max_s
        )
        try:
            series = reprocess_study(index, queue, uid)
        finally:
            queue.close()
            index.close()
        if not series:
            raise fail(f"study {uid} is not stored in {cfg.data_path} (harmonode status lists what is)", code=1)
        typer.echo(f"queued {len(series)} series of study {uid} for analysis")
