"""``harmonode learn serve|token|fit``: the learning server of seed 004 (claim 20).

``serve`` receives the export records of many nodes (``node.web.learning``), ``token`` gives a node its bearer
token (shown once; only its sha256 is kept), ``fit`` fine-tunes the detector's heads on the pooled records
(``models.training.head``) and writes a new model version.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from node.cli import VerboseOption, fail, setup_logging

DataOption = Annotated[Path, typer.Option("--data", help="The learning server's data folder (records.sqlite).")]


def serve_cmd(
    data: DataOption,
    port: Annotated[int, typer.Option("--port", help="TCP port (0: a free one, printed).")] = 8090,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    tokens: Annotated[
        Path | None, typer.Option("--tokens", help="File of 'NODE-NAME TOKEN-SHA256' lines, added at start.")
    ] = None,
    cert: Annotated[str, typer.Option("--cert", help="TLS certificate (PEM); with --key: HTTPS.")] = "",
    key: Annotated[str, typer.Option("--key", help="TLS private key (PEM).")] = "",
    verbose: VerboseOption = False,
) -> None:
    """Receive export records from nodes (POST /records, a bearer token per node), each kept once."""
    from node.web.learning import learning_server
    from storage.learning import RecordStore, read_tokens_file

    setup_logging(verbose)
    stop = threading.Event()  # handlers installed before the server answers: a stop at any time is clean
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = RecordStore(data)
    try:
        if tokens is not None:
            for name, digest in read_tokens_file(tokens):
                store.add_node_hash(name, digest)
        server = learning_server(store, host, port, cert, key)
        bound = server.start()
    except (ValueError, OSError, RuntimeError) as exc:
        store.close()
        raise fail(f"cannot start the learning server: {exc}") from exc
    if not store.nodes():
        typer.echo("warning: no node has a token yet (harmonode learn token NAME --data DIR)", err=True)
    typer.echo(f"learning server on {server.scheme}://{host}:{bound}/records ({store.count()} records)", err=True)
    try:
        while not stop.wait(0.5) and server.alive():
            pass
    finally:
        server.stop()
        store.close()


def token_cmd(
    name: Annotated[str, typer.Argument(help="The node's name (what the records are counted under).")],
    data: DataOption,
    sha256: Annotated[bool, typer.Option("--sha256", help="Also print the hash, for a --tokens file.")] = False,
) -> None:
    """Give a node a fresh bearer token (printed once: put it in the node's [learning] learning_token)."""
    from storage.learning import RecordStore, token_hash

    try:
        with RecordStore(data) as store:
            token = store.add_node(name)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    typer.echo(token)
    if sha256:
        typer.echo(f"{name} {token_hash(token)}", err=True)


def fit_cmd(
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Folder the new weights and model card go to.")],
    base: Annotated[
        Path | None, typer.Option("--base", help="The weights folder fitted from (default: the shipped ones).")
    ] = None,
    version: Annotated[str, typer.Option(help="The new model version (default: the base's, patch + 1).")] = "",
    epochs: Annotated[int, typer.Option(help="Passes over the records.")] = 200,
    anchor: Annotated[float, typer.Option(help="Pull of the new heads toward the base's (L2).")] = 1e-2,
    seed: Annotated[int, typer.Option(help="Seed of the fit.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was learned as JSON.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Fine-tune the detector's classifier heads on the pooled records and write a new model version."""
    from models.detector import WeightsRefused
    from models.training.head import HeadFitError, fit_heads, labelled_examples
    from storage.learning import RecordStore

    setup_logging(verbose)
    if not (data / "records.sqlite").exists():
        raise fail(f"no learning-server data in {data.resolve()} (harmonode learn serve --data DIR)")
    with RecordStore(data) as store:
        stored = list(store.records())
    examples = labelled_examples(stored)
    try:
        outcome = fit_heads(examples, out, base_dir=base, version=version, epochs=epochs, anchor=anchor, seed=seed)
    except (HeadFitError, WeightsRefused, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(outcome, indent=2))
        return
    typer.echo(
        f"model {outcome['version']} written to {out} from {outcome['learned_from']['examples']} labelled record(s) "
        f"of {outcome['learned_from']['records']} (base {outcome['base_version']})"
    )


def register(app: typer.Typer) -> None:
    """Add ``learn serve|token|fit`` to the CLI."""
    learn_app = typer.Typer(help="The learning server: receive nodes' export records, fit a new model on them.")
    app.add_typer(learn_app, name="learn")
    learn_app.command("serve")(serve_cmd)
    learn_app.command("token")(token_cmd)
    learn_app.command("fit")(fit_cmd)
