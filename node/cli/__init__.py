"""The ``harmonode`` command line (typer).

Sub-commands register themselves here; each one loads the config once and passes it down. Each command
parses its options, calls one domain function and prints; the shared pieces (``fail``, ``load_or_fail``,
the common options) are defined before the command modules are imported, which import them from here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from node.config import Config, ConfigError, load_config

app = typer.Typer(
    name="harmonode",
    help="A DICOM node for imaging AI: durable ingest, harmonization per imaging condition, lesion "
    "detection, results back into PACS.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (defaults are embedded; see deploy/node.example.toml)."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")]


class NoDatasetDumps(logging.Filter):
    """Drop pynetdicom's log records that print dataset elements (identifiers, headers: patient identity).

    harmonode's own messages name UIDs, AE titles and counts, never patient values; pynetdicom, at DEBUG,
    prints whole identifiers and command sets element by element, ``(0010,0010) PN [NAME]``. Those records
    are dropped at every level; the rest of pynetdicom's debug output (PDUs, states, timings) stays.
    """

    _ELEMENT = re.compile(r"\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)|\b(PN|LO|SH|DA)\s*\[")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted is not shown either
            return False
        return not self._ELEMENT.search(message)


def setup_logging(verbose: bool = False) -> None:
    """Log lines to stderr: time, level, module, message (never patient identity, at any level)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, NoDatasetDumps) for f in handler.filters):
            handler.addFilter(NoDatasetDumps())
    if not verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error that says what to do next and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load_or_fail(path: Path | None) -> Config:
    """The node's config, or a CLI error naming what is wrong in it."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def audit_change(cfg: Config, what: str) -> None:
    """Record a change of the node's configuration made from the command line (a rule or model activated).

    The requesting user is the operating-system account running the command; the message goes to the node's
    audit trail (a Security Alert of type Software Configuration, as the console's changes) and the log.
    """
    import getpass

    from storage.audit import SECURITY_ALERT, SOFTWARE_CONFIGURATION, Outcome, Participant

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    logging.getLogger("harmonode.audit").info("audit: %s by %s (command line)", what, user)
    cfg.audit_trail().record(
        SECURITY_ALERT,
        "E",
        Outcome.SUCCESS,
        [Participant(user[:64], True), Participant(cfg.node.ae_title, False)],
        SOFTWARE_CONFIGURATION,
    )


def _run_roles(
    config_path: Path | None, roles: tuple[str, ...], verbose: bool, queues: tuple[str, ...] | None = None
) -> None:
    from node.app import Node
    from node.cluster import ROLE_QUEUES

    setup_logging(verbose)
    config = load_or_fail(config_path)
    try:
        node = Node(config)
        node.start(roles)
    except OSError as exc:
        raise fail(
            f"cannot start: {exc} (is the port {config.node.port} free, is {config.node.data_dir} writable?)"
        ) from exc
    extra = None
    if "listen" in roles and config.node.listeners > 1:  # after recovery: the others never recover
        from node.listeners import ExtraListeners, stop_on_sigterm

        stop_on_sigterm()
        dispatcher = node.hand_over_connections()
        port = node.port or config.node.port
        extra = ExtraListeners(config.node.listeners - 1, config_path, port, dispatcher, verbose)
        extra.start()
    consumed = queues or tuple(q for role in roles for q in ROLE_QUEUES.get(role, ()))
    try:
        if config.cluster.enabled and consumed:
            node.consume(consumed)  # a Celery worker in this process until SIGTERM or ^C
        else:
            node.wait()
    finally:
        if extra is not None:  # the node itself has stopped (SIGTERM or ^C: ``Node.wait``)
            extra.stop()


def _run_extra_listener(config_path: Path | None, parent_pid: int, verbose: bool) -> None:
    """One of ``[node] listeners``: serve the parent's port until SIGTERM or the parent's death."""
    from node.app import Node
    from node.listeners import HANDOFF_FD_ENV, die_with_parent, stop_on_sigterm

    setup_logging(verbose)
    die_with_parent(parent_pid)
    stop_on_sigterm()
    config = load_or_fail(config_path)
    if not os.environ.get(HANDOFF_FD_ENV, "").isdigit():
        raise fail(f"an extra listener is started by its parent, which sets {HANDOFF_FD_ENV}")
    handoff = socket.socket(fileno=int(os.environ[HANDOFF_FD_ENV]))
    try:
        node = Node(config)
        node.start_extra_listener(handoff)
    except OSError as exc:
        raise fail(f"extra listener cannot start: {exc}") from exc
    node.wait()


@app.command()
def serve(config: ConfigOption = None, verbose: VerboseOption = False) -> None:
    """Run the whole node in one process: listen (SCPs), work (pipeline), dispatch (delivery) and the console."""
    _run_roles(config, ("listen", "work", "dispatch", "web"), verbose)


ExtraListenerOption = Annotated[
    int, typer.Option("--extra-listener-of", hidden=True, help="Internal: one of [node] listeners, of this parent.")
]


@app.command()
def listen(
    config: ConfigOption = None, verbose: VerboseOption = False, extra_listener_of: ExtraListenerOption = 0
) -> None:
    """Run only the listener: C-ECHO/C-STORE/query SCPs, series completion and the console (in a cluster: the
    receiving host; `work` and `dispatch` run where the config's broker and database reach)."""
    if extra_listener_of:
        _run_extra_listener(config, extra_listener_of, verbose)
        return
    _run_roles(config, ("listen", "web"), verbose)


QueuesOption = Annotated[
    str,
    typer.Option(
        "--queues",
        help="Cluster mode: the broker queues this worker takes, comma-separated: gpu (a series up to its"
        " findings), cpu (the results of those findings, feedback). Default: both.",
    ),
]
GpuOption = Annotated[
    str,
    typer.Option("--gpu", help="Pin this worker to one GPU (sets CUDA_VISIBLE_DEVICES; run one worker per GPU)."),
]


@app.command()
def work(
    config: ConfigOption = None, verbose: VerboseOption = False, queues: QueuesOption = "", gpu: GpuOption = ""
) -> None:
    """Run only a worker: series jobs through the pipeline (embedded: from the queue; cluster: from the broker).

    Cluster example, one process per GPU: `harmonode work --config site.toml --queues gpu --gpu 0`.
    """
    from node.cluster import ROLE_QUEUES

    wanted = tuple(q.strip() for q in queues.split(",") if q.strip()) or ROLE_QUEUES["work"]
    unknown = set(wanted) - set(ROLE_QUEUES["work"])
    if unknown:
        raise fail(f"unknown queue(s) {sorted(unknown)}: a worker takes {', '.join(ROLE_QUEUES['work'])}")
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch is imported: the worker sees that GPU only
    _run_roles(config, ("work",), verbose, wanted)


@app.command()
def dispatch(config: ConfigOption = None, verbose: VerboseOption = False) -> None:
    """Run only the dispatcher: delivers results to destinations, with retries."""
    _run_roles(config, ("dispatch",), verbose)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts and monitoring.")] = False,
) -> None:
    """Show studies, series (state, instances, condition, rule, findings) and jobs; in a cluster also the workers
    seen (alive or silent) and the jobs waiting and running per kind, read from the database."""
    from node.cli.status import format_status
    from storage.status import collect_status
    from storage.store import open_store

    cfg = load_or_fail(config)
    if not cfg.has_node_data:
        raise fail(f"no node data in {cfg.data_path.resolve()}: start `harmonode serve` or pass --config")
    identity = {"ae_title": cfg.node.ae_title, "host": cfg.node.host, "port": cfg.node.port}
    with open_store(cfg.data_path, cfg.store_settings) as store:
        store.queue.stale_after_s = cfg.cluster.stale_after_s
        report = collect_status(store, identity)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else format_status(report))


@app.command()
def resend(
    config: ConfigOption = None,
    destination: Annotated[str, typer.Option(help="Only deliveries to this destination name.")] = "",
) -> None:
    """Put dead-lettered deliveries back in the queue (a running dispatcher picks them up)."""
    from storage.deliveries import retry_dead_deliveries
    from storage.store import open_store

    cfg = load_or_fail(config)
    if not cfg.has_node_data:
        raise fail(f"no node data in {cfg.data_path.resolve()}: pass --config of the node")
    with open_store(cfg.data_path, cfg.store_settings) as store:
        n = retry_dead_deliveries(store.queue, store.index, destination=destination)
    typer.echo(f"{n} delivery job(s) back in the queue")


@app.command()
def demo(
    studies: Annotated[int, typer.Option(help="Studies the synthetic scanner sends.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic scanner.")] = 7,
    data_dir: Annotated[Path | None, typer.Option(help="Keep the node's data here (default: a temp dir).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Fit rules from unlabeled studies, then run a node, a local PACS and a synthetic scanner.

    About a minute on 2 cores. The PACS is Orthanc when installed, else a built-in storage SCP.
    """
    from node.cli.demo import run_demo

    setup_logging(verbose)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        code = run_demo(studies=studies, seed=seed, data_dir=data_dir)
    except (RuntimeError, OSError) as exc:
        raise fail(f"demo stopped: {exc} (run again with --verbose for the node's log)") from exc
    raise typer.Exit(code)


def _register_optional_commands() -> None:
    """Sub-command groups that live in their own modules (simulate, rules, train, evaluate, pull, ...)."""
    import importlib

    for module, attr in (
        ("node.cli.simulate", "register"),
        ("node.cli.rules", "register"),
        ("node.cli.models", "register"),
        ("node.cli.qr", "register"),
        ("node.cli.harmonize", "register"),
        ("node.cli.users", "register"),
        ("node.cli.feedback", "register"),
        ("node.cli.learn", "register"),
        ("node.cli.bundles", "register"),
        ("node.cli.mine", "register"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # that part of the node is not installed in this build
            raise
        getattr(mod, attr)(app)


_register_optional_commands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
