"""``harmonode rules …``: fit conversion rules per imaging condition, list, show, export, import, activate.

The work is ``rules.collect`` (series, hold-out, fit, report, store) and ``rules.registry``; pulling for
``fit --from-pacs`` is ``handlers.pull``, wired here with the node's config.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from node.cli import ConfigOption, audit_change, fail, load_or_fail
from node.config import Config, ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rules.collect import Progress, SeriesImages
    from rules.fit import FitOptions
    from rules.registry import Rule, RuleRegistry
    from storage.store import Store

_T = TypeVar("_T")

FromDirOption = Annotated[
    Path | None, typer.Option("--from-dir", help="Fit from a folder of DICOM files (not the store).")
]
MethodOption = Annotated[str, typer.Option(help="seed (a·d + b above c) or piecewise (quantile knots).")]
ReferenceOption = Annotated[
    str | None,
    typer.Option(
        help="Reference condition key; without a region (or region *) that scanner condition in every body "
        "region (default: per modality and region, the condition with most images)."
    ),
]
DivergenceOption = Annotated[str, typer.Option(help="js (1 − Jensen–Shannon) or kl.")]
HoldoutOption = Annotated[
    float, typer.Option(help="Fraction of each group's series held out to report JSD on unseen data.")
]
ActivateOption = Annotated[bool, typer.Option("--activate", help="Make the fitted rules the active ones.")]
FitJsonOption = Annotated[bool, typer.Option("--json", help="Print the per-condition summary as JSON.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Fit and report; store nothing.")]
FromPacsOption = Annotated[
    str | None,
    typer.Option(
        "--from-pacs",
        metavar="QUERY",
        help="Pull the studies matching QUERY from a PACS first and fit on them, e.g. "
        "'StudyDate=20260101-20261231' or 'PatientID=P1' (keys: StudyDate, PatientID, StudyInstanceUID).",
    ),
]
SourceOption = Annotated[
    str, typer.Option("--from", metavar="NAME", help="Configured destination to pull from (default: first).")
]
RuleRefArgument = Annotated[str, typer.Argument(metavar="ID", help="Rule id (latest version) or id@vN.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
ActiveOnlyOption = Annotated[bool, typer.Option("--active", help="Only the active rules.")]


def _progress(enabled: bool) -> Progress:
    """A tqdm bar per long iteration on stderr when ``enabled``, else silent."""
    from tqdm import tqdm

    def progress(items: Iterable[_T], desc: str, unit: str) -> Iterable[_T]:
        return tqdm(items, desc=desc, unit=unit, disable=not enabled, leave=False)

    return progress


@contextmanager
def _registry(config_path: Path | None) -> Iterator[RuleRegistry]:
    """The rule registry of the node's data directory, under the index's lock."""
    from rules.registry import RuleRegistry
    from storage.store import open_store

    cfg = load_or_fail(config_path)
    with open_store(cfg.data_path, cfg.store_settings) as store:
        yield RuleRegistry(store.index.db, store.index.lock)


def _pull_for_fit(cfg: Config, source_name: str, query: str, quiet: bool) -> tuple[str, list[str]]:
    """Pull the studies matching ``query`` from a configured PACS; its name and the studies' UIDs."""
    from handlers.pull import PullError, parse_pacs_query, pull_studies
    from node.cli.qr import receiving, source_by_name

    try:
        terms = parse_pacs_query(query)
        source = source_by_name(cfg, source_name)
        pulled = pull_studies(
            source, cfg.node.ae_title, **terms, timeout=cfg.node.dimse_timeout_s, receiving=lambda: receiving(cfg)
        )
    except (ValueError, ConfigError, PullError) as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"cannot listen for the move on port {cfg.node.port}: {exc} (is the port free?)") from exc
    if not pulled:
        raise fail(f"no study on {source.name} matches {query!r}")
    if not quiet:
        typer.echo(f"pulled {len(pulled)} stud(ies), {sum(pulled.values())} instance(s) from {source.name}")
    return source.name, list(pulled)


def _fit_options(method: str, divergence: str, reference: str | None, holdout: float) -> tuple[FitOptions, str | None]:
    """The fit options and the reference key in its canonical form, or a CLI error."""
    from rules.fit import FitError, FitOptions
    from rules.keys import ConditionKey, KeyParseError

    try:
        options = FitOptions(method=method, divergence=divergence)
        reference = str(ConditionKey.parse(reference)) if reference is not None else None
    except (FitError, KeyParseError) as exc:
        raise fail(str(exc)) from exc
    if not 0.0 <= holdout < 1.0:
        raise fail("--holdout must be in [0, 1)")
    return options, reference


def _fit_series(
    cfg: Config,
    store: Store,
    from_dir: Path | None,
    from_pacs: str | None,
    source_name: str,
    as_json: bool,
    progress: Progress,
) -> tuple[list[SeriesImages], str]:
    """The series to fit on and the provenance ``source`` naming where they came from."""
    from rules.collect import series_from_dir, series_from_store

    if from_dir is not None:
        if not from_dir.is_dir():
            raise fail(f"{from_dir} is not a directory")
        return series_from_dir(from_dir, progress), f"dir:{from_dir.name}"
    if from_pacs is not None:
        pacs, study_uids = _pull_for_fit(cfg, source_name, from_pacs, quiet=as_json)
        return series_from_store(store.index, store.files, study_uids, progress), f"pacs:{pacs}:{from_pacs}"
    return series_from_store(store.index, store.files, progress=progress), "store"


def _residual_strengths(
    drafts: list[Rule], series: list[SeriesImages], summary: list[dict[str, Any]], progress: Progress
) -> dict[str, tuple[Any, dict[str, float]]]:
    """Each fitted rule's proposed residual stage by condition key (empty without a residual model); the
    summary rows get the stage and its figures."""
    try:
        from models.detector import WeightsRefused
        from models.residual_net import ResidualModel
    except ImportError:  # a build without torch: histogram rules only
        return {}
    try:
        model = ResidualModel.load("auto")
    except (FileNotFoundError, WeightsRefused) as exc:
        log.warning("no residual strengths proposed: %s", exc)
        return {}
    from models.residual_fit import propose_stages
    from models.volume import VolumeRefused, build_volume, load_datasets

    by_uid = {s.series_uid: s for s in series}
    keys: dict[str, list[str]] = {}
    for s in series:
        keys.setdefault(s.key, []).append(s.series_uid)

    def volume_of(uid: str) -> Any:
        try:
            return build_volume(load_datasets(by_uid[uid].paths))
        except (VolumeRefused, OSError, ValueError) as exc:
            log.warning("series %s: no volume for the residual strengths (%s)", uid[-8:], exc)
            return None

    rows = {row["key"]: row for row in summary}
    stages = {}
    for p in propose_stages(drafts, keys, volume_of, model, progress):
        row = rows.get(str(p.rule.key), {})
        if p.stage is None:
            row["residual"] = f"none: {p.reason}"
            continue
        stages[str(p.rule.key)] = (p.stage, p.proposal.as_dict())
        row.update(residual=p.stage.text, residual_fit=p.proposal.as_dict())
    return stages


def _fit_table(summary: list[dict[str, Any]]) -> str:
    lines = []
    for row in summary:
        held = (
            f"  held-out JSD {row['heldout_jsd_before']:.4f} → {row['heldout_jsd_after']:.4f}"
            if "heldout_jsd_before" in row
            else ""
        )
        tag = "reference" if row["reference"] else f"{row['similarity_before']:.4f} → {row['similarity_after']:.4f}"
        alt = [k for k in row if k.startswith("similarity_after_")]
        alt_text = f" ({alt[0][17:]}: {row[alt[0]]:.4f})" if alt else ""
        lines.append(
            f"{row.get('rule', '-'):<16} {row.get('region', '-'):<9} {row['key']:<58} n={row['n_images']:<6} "
            f"{tag}{alt_text}{held}"
        )
        if "residual_fit" in row:
            f = row["residual_fit"]
            lines.append(
                f"{'':26} {row['residual']}: noise {f['noise_before']:.1f} → {f['noise_after']:.1f} "
                f"(reference {f['noise_reference']:.1f}), " + (
                    f"edge {f['edge_before']:.2f} → {f['edge_after']:.2f} mm (reference {f['edge_reference']:.2f})"
                    if f["edge_reference"] is not None else "no body outline in view: no blur correction"
                )
            )
        elif row.get("residual"):
            lines.append(f"{'':26} residual stage {row['residual']}")
    return "\n".join(lines)


def _rules_table(rules: list[Rule]) -> str:
    if not rules:
        return "no rules (fit some with `harmonode rules fit`)"
    lines = []
    for r in rules:
        p = r.provenance
        sim = (
            f"{p['similarity_before']:.4f} → {p['similarity_after']:.4f}"
            if "similarity_before" in p and "similarity_after" in p
            else ""
        )
        lines.append(f"{'*' if r.active else ' '} {r.label:<16} {r.method:<9} {str(r.key):<58} {sim}")
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------------------------
rules_app = typer.Typer(help="Conversion rules per imaging condition (seed 000): fit, list, show, exchange.")



@rules_app.command("fit")
def fit_cmd(
    config: ConfigOption = None,
    from_dir: FromDirOption = None,
    method: MethodOption = "seed",
    reference: ReferenceOption = None,
    divergence: DivergenceOption = "js",
    holdout: HoldoutOption = 0.0,
    activate: ActivateOption = False,
    as_json: FitJsonOption = False,
    dry_run: DryRunOption = False,
    from_pacs: FromPacsOption = None,
    source_name: SourceOption = "",
    residual: Annotated[
        bool,
        typer.Option(help="Also propose each rule's residual strengths (seed 003) when a residual model is installed."),
    ] = True,
) -> None:
    """Fit one rule per imaging condition against the reference condition of its modality and body region,
    and store them (versioned); with a residual model, each rule also gets the strengths that bring its
    condition's noise level and edge width to the reference's."""
    from rules.collect import draft_rules, fit_rules, store_rules
    from rules.fit import FitError
    from rules.registry import RuleError, RuleRegistry
    from storage.store import open_store

    options, reference = _fit_options(method, divergence, reference, holdout)
    if from_dir is not None and from_pacs is not None:
        raise fail("give --from-dir or --from-pacs, not both")
    if source_name and from_pacs is None:
        raise fail("--from names the PACS for --from-pacs")
    cfg = load_or_fail(config)
    progress = _progress(not as_json and os.isatty(2))
    with open_store(cfg.data_path, cfg.store_settings) as store:
        series, source = _fit_series(cfg, store, from_dir, from_pacs, source_name, as_json, progress)
        try:
            fitted = fit_rules(series, options, reference, holdout, progress)
            if not dry_run:
                stages = _residual_strengths(draft_rules(fitted), series, fitted.summary, progress) if residual else {}
                registry = RuleRegistry(store.index.db, store.index.lock)
                store_rules(registry, fitted, source, activate, stages)
        except (FitError, RuleError) as exc:
            raise fail(str(exc)) from exc
    for message in fitted.skipped:
        typer.echo(f"warning: {message}", err=True)
    typer.echo(json.dumps(fitted.summary, indent=2) if as_json else _fit_table(fitted.summary))

@rules_app.command("list")
def list_cmd(
    config: ConfigOption = None, as_json: JsonOption = False, active_only: ActiveOnlyOption = False
) -> None:
    """List stored rules (every version; the active one per condition is marked)."""
    with _registry(config) as registry:
        rules = registry.active() if active_only else registry.all()
    if as_json:
        typer.echo(json.dumps([r.as_dict(with_histograms=False) for r in rules], indent=2))
    else:
        typer.echo(_rules_table(rules))

@rules_app.command("show")
def show_cmd(
    rule_ref: RuleRefArgument,
    config: ConfigOption = None,
    plot: Annotated[Path | None, typer.Option(help="PNG file for the histogram plot.")] = None,
) -> None:
    """Show a rule and write a PNG of the histograms before and after it."""
    from rules.registry import UnknownRule

    with _registry(config) as registry:
        try:
            rule = registry.get(rule_ref)
        except UnknownRule as exc:
            raise fail(str(exc)) from exc
    typer.echo(json.dumps(rule.as_dict(with_histograms=False), indent=2))
    if not rule.provenance.get("histograms"):
        typer.echo("(no histograms stored with this rule: nothing to plot)")
        return
    out = plot or Path(f"rule-{rule.id}-v{rule.version}.png")
    try:
        plot_rule(rule, out)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc}") from exc
    typer.echo(f"plot: {out}")

@rules_app.command("export")
def export_cmd(
    file: Annotated[Path, typer.Argument(help="JSON file to write.")],
    config: ConfigOption = None,
    active_only: ActiveOnlyOption = False,
) -> None:
    """Write the rules as a JSON rule file (for other nodes: `harmonode rules import`)."""
    with _registry(config) as registry:
        document = registry.export(only_active=active_only)
    try:
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(file)
    except OSError as exc:
        raise fail(f"cannot write {file}: {exc}") from exc
    typer.echo(f"{len(document['rules'])} rule(s) written to {file}")

@rules_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="JSON rule file from `harmonode rules export`.")],
    config: ConfigOption = None,
    activate: Annotated[
        bool | None, typer.Option("--activate/--no-activate", help="Force imported rules (in)active.")
    ] = None,
) -> None:
    """Import a rule file: all rules or none."""
    from rules.registry import RuleFileError

    try:
        document = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read rule file {file}: {exc}") from exc
    with _registry(config) as registry:
        try:
            stored = registry.import_document(document, activate=activate)
        except RuleFileError as exc:
            raise fail(f"{file}: {exc}; nothing imported") from exc
    typer.echo(f"{len(stored)} rule(s) imported from {file}")

@rules_app.command("activate")
def activate_cmd(rule_ref: RuleRefArgument, config: ConfigOption = None) -> None:
    """Make a rule the active one for its imaging condition."""
    from rules.registry import UnknownRule

    with _registry(config) as registry:
        try:
            rule = registry.activate(rule_ref)
        except UnknownRule as exc:
            raise fail(str(exc)) from exc
    audit_change(load_or_fail(config), f"rule {rule.label} activated for {rule.key}")
    typer.echo(f"{rule.label} active for {rule.key}")


def register(app: typer.Typer) -> None:
    """Add the ``rules`` command group to the ``harmonode`` app."""
    app.add_typer(rules_app, name="rules")


def plot_rule(rule: Rule, out: Path) -> None:
    """PNG of a rule's group histogram before and after conversion, over the reference histogram."""
    from rules.plots import rule_histograms_png

    out.write_bytes(rule_histograms_png(rule))
