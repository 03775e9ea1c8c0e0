"""``harmonode pull`` and ``harmonode reprocess``: bring studies in from a configured PACS, re-run stored ones.

``pull`` finds studies on a source (C-FIND, Study Root) and asks it to C-MOVE them to the node itself (its own
AE title as move destination): the node must be listening (``harmonode serve`` or ``listen``) and the source
must know the node's AE title, host and port. ``reprocess STUDY`` puts every received series of a stored
study back on the queue as an ``analyze-series`` job. The DICOM work is ``handlers.pull``; this module picks
the source from the config and, for ``rules fit --from-pacs``, listens for the move when the node does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from handlers.pull import PullError, is_listening, pull_studies, pull_study, reprocess_study
from node.cli import ConfigOption, VerboseOption, fail, load_or_fail, setup_logging
from node.config import Config, ConfigError, Destination
from storage.files import InvalidUID, check_uid
from storage.store import open_store


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


@contextmanager
def receiving(config: Config) -> Iterator[None]:
    """Listen for the node's AE title while a pull's moves run, unless the node itself is listening.

    The series a listener started here receives are analysed once the node runs.

    Raises
    ------
    OSError
        The node's port cannot be opened.
    """
    if is_listening(config.node.host, config.node.port):
        yield
        return
    from node.app import Node  # the whole node only when a listener is needed

    node = Node(config)
    node.start(("listen",))
    try:
        yield
    finally:
        node.stop()


def register(app: typer.Typer) -> None:
    """Add ``pull`` and ``reprocess`` to the ``harmonode`` command line."""

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
        cfg = load_or_fail(config)
        ae, timeout = cfg.node.ae_title, cfg.node.dimse_timeout_s
        try:
            src = source_by_name(cfg, source)
            if study:
                pulled = {study: pull_study(src, ae, study, timeout)}
            else:
                pulled = pull_studies(src, ae, patient_id, date_range, timeout=timeout)
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
        cfg = load_or_fail(config)
        try:
            uid = check_uid(study_uid, "StudyInstanceUID")
        except InvalidUID as exc:
            raise fail(str(exc)) from exc
        with open_store(cfg.data_path, cfg.store_settings) as store:
            series = reprocess_study(store.index, store.queue, uid)
        if not series:
            raise fail(f"study {uid} is not stored in {cfg.data_path} (harmonode status lists what is)", code=1)
        typer.echo(f"queued {len(series)} series of study {uid} for analysis")
