"""``harmonode models export|import|activate|list``: move a model (card, weights, rule set) between nodes.

The work is ``models.bundles``; the node's installed models live in ``<data_dir>/models`` and the active one is
what the worker's detector loads (between two series: a running node switches without a restart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from node.cli import ConfigOption, audit_change, fail, load_or_fail

SHIPPED = "shipped"


def export_cmd(
    out: Annotated[Path, typer.Argument(help="The bundle file, or a folder for harmonode-model-<version>.tar.gz.")],
    weights: Annotated[
        Path | None, typer.Option("--weights", help="A model folder (default: the node's active model).")
    ] = None,
    rules: Annotated[bool, typer.Option("--rules/--no-rules", help="Include the node's active rule set.")] = True,
    config: ConfigOption = None,
) -> None:
    """Write a versioned bundle of the model card, its weights and the node's active rules."""
    from models.bundles import active_weights_dir, export_bundle
    from models.detector import WeightsRefused
    from rules.registry import RuleRegistry
    from storage.store import open_store

    cfg = load_or_fail(config)
    folder = weights or active_weights_dir(cfg.models_path)
    document = None
    if rules and cfg.has_node_data:
        with open_store(cfg.data_path, cfg.store_settings) as store:
            document = RuleRegistry(store.index.db, store.index.lock).export(only_active=True)
    try:
        path = export_bundle(out, folder, document)
    except (WeightsRefused, FileNotFoundError) as exc:
        raise fail(f"cannot export the model: {exc}") from exc
    n_rules = len(document["rules"]) if document else 0
    typer.echo(f"bundle {path} ({n_rules} rule(s))")


def import_cmd(
    bundle: Annotated[Path, typer.Argument(help="A bundle from `harmonode models export`.")],
    activate: Annotated[bool, typer.Option("--activate", help="Activate the model once installed.")] = False,
    rules: Annotated[bool, typer.Option("--rules/--no-rules", help="Import the bundle's rule set too.")] = True,
    config: ConfigOption = None,
) -> None:
    """Check a bundle (checksums, normalisation) and install its model; refused bundles install nothing."""
    from models import bundles
    from rules.registry import RuleFileError, RuleRegistry
    from storage.store import open_store

    cfg = load_or_fail(config)
    if not bundle.is_file():
        raise fail(f"no bundle file {bundle}")
    try:
        installed = bundles.import_bundle(bundle, cfg.models_path)
    except bundles.BundleRefused as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"model {installed.version} installed in {installed.folder}")
    if rules and installed.rules is not None:
        with open_store(cfg.data_path, cfg.store_settings) as store:
            try:
                stored = RuleRegistry(store.index.db, store.index.lock).import_document(installed.rules)
            except RuleFileError as exc:
                raise fail(f"model installed, but its rule set was refused: {exc}; no rule imported") from exc
        typer.echo(f"{len(stored)} rule(s) imported")
    audit_change(cfg, f"model {installed.version} installed")
    if activate:
        bundles.activate(cfg.models_path, installed.version)
        audit_change(cfg, f"model {installed.version} activated")
        typer.echo(f"model {installed.version} active")


def activate_cmd(
    version: Annotated[str, typer.Argument(help=f"An installed model version, or '{SHIPPED}'.")],
    config: ConfigOption = None,
) -> None:
    """Make an installed model the node's detector (a running worker switches before its next series)."""
    from models import bundles

    cfg = load_or_fail(config)
    if version == SHIPPED:
        (cfg.models_path / bundles.ACTIVE).unlink(missing_ok=True)
        audit_change(cfg, "the shipped model activated")
        typer.echo("the shipped model is active")
        return
    try:
        bundles.activate(cfg.models_path, version)
    except bundles.BundleRefused as exc:
        raise fail(str(exc)) from exc
    audit_change(cfg, f"model {version} activated")
    typer.echo(f"model {version} active")


def list_cmd(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The installed models and the active one."""
    from models import bundles

    cfg = load_or_fail(config)
    report = {
        "installed": bundles.installed_versions(cfg.models_path),
        "active": bundles.active_version(cfg.models_path) or SHIPPED,
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    for version in [SHIPPED, *report["installed"]]:
        typer.echo(("* " if version == report["active"] else "  ") + version)


def register(app: typer.Typer) -> None:
    """Add ``models export|import|activate|list`` to the CLI."""
    models_app = typer.Typer(help="Model bundles: card, weights and rule set, moved between nodes.")
    app.add_typer(models_app, name="models")
    models_app.command("export")(export_cmd)
    models_app.command("import")(import_cmd)
    models_app.command("activate")(activate_cmd)
    models_app.command("list")(list_cmd)
