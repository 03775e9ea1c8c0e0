"""``harmonode rules …``: fit conversion rules per imaging condition, list, show, export, import, activate."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

log = logging.getLogger(__name__)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _load_config(path: Path | None) -> Any:  # noqa: ANN401 - node.config.Config
    from node.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


def _index(config_path: Path | None) -> Any:  # noqa: ANN401 - storage.index.Index
    from storage.index import Index

    cfg = _load_config(config_path)
    return Index(cfg.data_path / "index.sqlite"), cfg


# -- collecting histograms ------------------------------------------------------------------------------------
@dataclass
class SeriesImages:
    """One series' condition and per-image (per-slice) histograms."""

    series_uid: str
    modality: str
    key: str
    histograms: list[np.ndarray] = field(default_factory=list)


def _tags_of(ds: Any) -> dict[str, str]:  # noqa: ANN401 - pydicom Dataset
    from storage.index import CONDITION_KEYWORDS

    out = {}
    for keyword in CONDITION_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element must not stop the others
            continue
        if value is None:
            continue
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            out[keyword] = "\\".join(str(v) for v in value)
        else:
            out[keyword] = str(value).strip()
    return out


def _slice_histograms(ds: Any, spec: Any) -> list[np.ndarray]:  # noqa: ANN401
    from rules.histogram import stored_histogram

    pixels = ds.pixel_array
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    planes = pixels.reshape((-1, *pixels.shape[-2:]))
    return [stored_histogram(p, slope, intercept, spec) for p in planes]


def series_from_dir(directory: Path, show_progress: bool = True) -> list[SeriesImages]:
    """Per-series histograms of every DICOM image file under ``directory`` (others skipped, logged)."""
    from pydicom import dcmread
    from tqdm import tqdm

    from rules.histogram import default_spec
    from rules.keys import ConditionKey

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".txt"))
    series: dict[str, SeriesImages] = {}
    skipped = 0
    for path in tqdm(files, desc="reading", unit="file", disable=not show_progress, leave=False):
        try:
            ds = dcmread(path)
            if "PixelData" not in ds:
                raise ValueError("no pixels")
            modality = str(ds.get("Modality", "") or "")
            uid = str(ds.SeriesInstanceUID)
            if uid not in series:
                series[uid] = SeriesImages(uid, modality, str(ConditionKey.from_tags(_tags_of(ds), modality)))
            series[uid].histograms += _slice_histograms(ds, default_spec(modality))
        except Exception as exc:  # not DICOM, no pixels, undecodable: skip it and say how many
            skipped += 1
            log.debug("skipped %s: %s", path.name, exc)
    if skipped:
        log.warning("%d file(s) under %s were not readable DICOM images and were skipped", skipped, directory)
    return list(series.values())


def series_from_store(
    index: Any,  # noqa: ANN401 - storage.index.Index
    data_dir: Path,
    show_progress: bool = True,
    study_uids: list[str] | None = None,
) -> list[SeriesImages]:
    """Per-series histograms of the received CT/MR series in the node's store (only ``study_uids`` if given)."""
    from pydicom import dcmread
    from tqdm import tqdm

    from rules.histogram import default_spec
    from rules.keys import ConditionKey
    from storage.files import FileStore

    files = FileStore(data_dir, fsync=False)
    sql = (
        "SELECT series_instance_uid, modality, condition_tags FROM series"
        " WHERE (origin IS NULL OR origin = 'received') AND modality IN ('CT', 'MR')"
    )
    params: tuple[str, ...] = ()
    if study_uids is not None:
        if not study_uids:
            return []
        sql += f" AND study_instance_uid IN ({', '.join('?' * len(study_uids))})"
        params = tuple(study_uids)
    rows = index.query(sql, params)
    out = []
    for row in tqdm(rows, desc="series", unit="series", disable=not show_progress, leave=False):
        modality = row["modality"] or ""
        tags = json.loads(row["condition_tags"] or "{}")
        item = SeriesImages(row["series_instance_uid"], modality, str(ConditionKey.from_tags(tags, modality)))
        for inst in index.instances_of_series(row["series_instance_uid"]):
            try:
                item.histograms += _slice_histograms(dcmread(files.abspath(inst["path"])), default_spec(modality))
            except Exception as exc:
                log.warning("instance of series %s skipped: %s", item.series_uid[-8:], exc)
        if item.histograms:
            out.append(item)
    return out


# -- pulling from a PACS ------------------------------------------------------------------------------------
PACS_QUERY_KEYS = {"StudyDate": "date_range", "PatientID": "patient_id", "StudyInstanceUID": "study_uid"}


def parse_pacs_query(text: str) -> dict[str, str]:
    """``find_studies`` arguments from ``KEY=VALUE`` terms separated by spaces, commas or ``&``.

    Keys are the DICOM keywords ``StudyDate`` (``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, either end open),
    ``PatientID`` and ``StudyInstanceUID``; each at most once.

    Raises
    ------
    ValueError
        Empty query, a term without ``=``, an unknown or repeated key, an empty value.
    """
    terms = [t for t in re.split(r"[\s,&]+", text.strip()) if t]
    if not terms:
        raise ValueError(f"empty PACS query; use e.g. StudyDate=20260101-20261231 ({', '.join(PACS_QUERY_KEYS)})")
    out: dict[str, str] = {}
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep or not value:
            raise ValueError(f"query term {term!r} is not KEY=VALUE")
        if key not in PACS_QUERY_KEYS:
            raise ValueError(f"query key {key!r} is not one of {', '.join(PACS_QUERY_KEYS)}")
        if PACS_QUERY_KEYS[key] in out:
            raise ValueError(f"query key {key} given twice")
        out[PACS_QUERY_KEYS[key]] = value
    return out


def _node_listening(cfg: Any) -> bool:  # noqa: ANN401 - node.config.Config
    """True when something accepts connections on the node's own port (a running ``harmonode serve``)."""
    host = cfg.node.host if cfg.node.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    try:
        with socket.create_connection((host, cfg.node.port), timeout=1.0):
            return True
    except OSError:
        return False


def pull_for_fit(cfg: Any, source_name: str, query: str) -> tuple[str, list[str], int]:  # noqa: ANN401
    """Find the studies matching ``query`` on a configured PACS and C-MOVE them into the node's store.

    The PACS moves the studies to the node's own AE title: when the node is not running, a listener is
    started in this process for the pull (the series it receives are analysed once the node runs).

    Returns
    -------
    tuple[str, list[str], int]
        The source's name, the study UIDs pulled, the number of instances moved.

    Raises
    ------
    ValueError, node.config.ConfigError, node.cli.qr.PullError
        Bad query, unknown source, refused query or move.
    """
    from node.app import Node
    from node.cli.qr import find_studies, pull_study, source_by_name

    terms = parse_pacs_query(query)
    source = source_by_name(cfg, source_name)
    study_uids = find_studies(cfg, source, **terms)
    if not study_uids:
        return source.name, [], 0
    node = None
    if not _node_listening(cfg):
        node = Node(cfg)
        node.start(("listen",))
    try:
        moved = sum(pull_study(cfg, source, uid) for uid in study_uids)
    finally:
        if node is not None:
            node.stop()
    log.info("pulled %d stud(ies), %d instance(s) from %s for fitting", len(study_uids), moved, source.name)
    return source.name, study_uids, moved


def _split(series: list[SeriesImages], holdout: float) -> tuple[dict[str, list], dict[str, list]]:
    """Histograms per key for fitting and for held-out evaluation (whole series held out, deterministic)."""
    by_key: dict[str, list[SeriesImages]] = defaultdict(list)
    for s in sorted(series, key=lambda s: s.series_uid):
        by_key[s.key].append(s)
    fit: dict[str, list] = {}
    held: dict[str, list] = {}
    for key, items in by_key.items():
        n_held = int(round(holdout * len(items))) if len(items) > 1 else 0
        n_held = min(n_held, len(items) - 1)
        fit[key] = [h for s in items[n_held:] for h in s.histograms]
        if n_held:
            held[key] = [h for s in items[:n_held] for h in s.histograms]
    return fit, held


def _compact(hist: np.ndarray) -> list[float]:
    return [float(f"{v:.5g}") for v in np.asarray(hist, float)]


def _by_modality(keys: list[str]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        groups[k.split("|", 1)[0]].append(k)
    yield from sorted(groups.items())


# -- commands -------------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add the ``rules`` command group to the ``harmonode`` app."""
    rules_app = typer.Typer(help="Conversion rules per imaging condition (seed 000): fit, list, show, exchange.")
    app.add_typer(rules_app, name="rules")

    @rules_app.command("fit")
    def fit_cmd(
        config: ConfigOption = None,
        from_dir: Annotated[
            Path | None, typer.Option("--from-dir", help="Fit from a folder of DICOM files (not the store).")
        ] = None,
        method: Annotated[str, typer.Option(help="seed (a·d + b above c) or piecewise (quantile knots).")] = "seed",
        reference: Annotated[
            str | None, typer.Option(help="Reference condition key (default: the group with most images).")
        ] = None,
        divergence: Annotated[str, typer.Option(help="js (1 − Jensen–Shannon) or kl.")] = "js",
        holdout: Annotated[
            float, typer.Option(help="Fraction of each group's series held out to report JSD on unseen data.")
        ] = 0.0,
        activate: Annotated[bool, typer.Option("--activate", help="Make the fitted rules the active ones.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the per-condition summary as JSON.")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Fit and report; store nothing.")] = False,
        from_pacs: Annotated[
            str | None,
            typer.Option(
                "--from-pacs",
                metavar="QUERY",
                help="Pull the studies matching QUERY from a PACS first and fit on them, e.g. "
                "'StudyDate=20260101-20261231' or 'PatientID=P1' (keys: StudyDate, PatientID, StudyInstanceUID).",
            ),
        ] = None,
        source_name: Annotated[
            str, typer.Option("--from", metavar="NAME", help="Configured destination to pull from (default: first).")
        ] = "",
    ) -> None:
        """Fit one rule per imaging condition against the reference condition and store them (versioned)."""
        from rules.fit import FitError, FitOptions, fit_groups, fit_piecewise, fit_seed, transform_histogram
        from rules.histogram import HistogramError, average_histogram, default_spec, js_divergence
        from rules.keys import ConditionKey, KeyParseError
        from rules.registry import RuleRegistry

        show = not as_json and os.isatty(2)
        try:
            options = FitOptions(method=method, divergence=divergence)
            if reference is not None:
                reference = str(ConditionKey.parse(reference))
        except (FitError, KeyParseError) as exc:
            raise _fail(str(exc)) from exc
        if not 0.0 <= holdout < 1.0:
            raise _fail("--holdout must be in [0, 1)")
        if from_dir is not None and from_pacs is not None:
            raise _fail("give --from-dir or --from-pacs, not both")
        if source_name and from_pacs is None:
            raise _fail("--from names the PACS for --from-pacs")
        index, cfg = _index(config)
        source = "store"
        if from_dir is not None:
            if not from_dir.is_dir():
                raise _fail(f"{from_dir} is not a directory")
            series = series_from_dir(from_dir, show)
            source = f"dir:{from_dir.name}"
        elif from_pacs is not None:
            from node.cli.qr import PullError
            from node.config import ConfigError

            try:
                pacs, study_uids, moved = pull_for_fit(cfg, source_name, from_pacs)
            except (ValueError, ConfigError, PullError) as exc:
                raise _fail(str(exc)) from exc
            if not study_uids:
                raise _fail(f"no study on {pacs} matches {from_pacs!r}")
            if not as_json:
                typer.echo(f"pulled {len(study_uids)} stud(ies), {moved} instance(s) from {pacs}")
            series = series_from_store(index, cfg.data_path, show, study_uids=study_uids)
            source = f"pacs:{pacs}:{from_pacs}"
        else:
            series = series_from_store(index, cfg.data_path, show)
        if not series:
            raise _fail("no CT or MR images found to fit from")
        fit_hists, held_hists = _split(series, holdout)
        n_series: dict[str, int] = defaultdict(int)
        for s in series:
            n_series[s.key] += 1
        from tqdm import tqdm

        results = []
        for modality, keys in _by_modality(list(fit_hists)):
            if len(keys) < 2:
                log.warning("%s: only one condition (%s); nothing to fit against", modality, keys[0])
                continue
            ref = reference if reference and reference.startswith(modality + "|") else None
            spec = default_spec(modality)
            # MR has no absolute scale: vendors' stored units differ several-fold, so a needs a wider range
            mod_options = replace(options, scale_bounds=(0.1, 10.0)) if modality == "MR" else options
            try:
                result = fit_groups(
                    {k: fit_hists[k] for k in keys},
                    spec,
                    mod_options,
                    reference=ref,
                    progress=lambda it, m=modality: tqdm(
                        it, desc=f"fit {m}", unit="group", disable=not show, leave=False
                    ),
                )
            except FitError as exc:
                raise _fail(f"{modality}: {exc}") from exc
            results.append((modality, result))
        if not results:
            raise _fail(
                "need images under at least two imaging conditions of one modality to fit rules; found "
                + ", ".join(sorted(fit_hists))
            )
        if reference and not any(r.reference_key == reference for _, r in results):
            raise _fail(f"reference {reference} is not one of the conditions found: {', '.join(sorted(fit_hists))}")

        summary: list[dict[str, Any]] = []
        for _, result in results:
            other = fit_piecewise if options.method == "seed" else fit_seed
            other_name = "piecewise" if options.method == "seed" else "seed"
            ref_held = None
            if result.reference_key in held_hists:
                try:
                    ref_held = average_histogram(held_hists[result.reference_key])[0]
                except HistogramError:
                    ref_held = None
            for g in result.groups:
                row = g.summary()
                row["n_series"] = n_series[g.key]
                if not g.reference:
                    _, _, alt_after, _ = other(g.histogram, result.reference_histogram, result.spec, options)
                    row[f"similarity_after_{other_name}"] = round(alt_after, 6)
                    if ref_held is not None and g.key in held_hists:
                        held, _ = average_histogram(held_hists[g.key])
                        row["heldout_jsd_before"] = round(js_divergence(held, ref_held), 6)
                        row["heldout_jsd_after"] = round(
                            js_divergence(transform_histogram(held, result.spec, g.mapping), ref_held), 6
                        )
                summary.append(row)

        if not dry_run:
            registry = RuleRegistry(index.db)
            rows_by_key = {row["key"]: row for row in summary}
            with index.lock:
                for _, result in results:
                    for g in result.groups:
                        row = rows_by_key[g.key]
                        provenance = {
                            "reference_key": result.reference_key,
                            "reference": g.reference,
                            "n_images": g.n_images,
                            "n_series": n_series[g.key],
                            "similarity_before": g.similarity_before,
                            "similarity_after": g.similarity_after,
                            "divergence": options.divergence,
                            "spec": result.spec.as_dict(),
                            "source": source,
                            "steps": g.steps,
                            "summary": {k: v for k, v in row.items() if k.startswith(("heldout", "similarity_after_"))},
                            "histograms": {
                                "group": _compact(g.histogram),
                                "reference": _compact(result.reference_histogram),
                            },
                        }
                        rule = registry.add(
                            ConditionKey.parse(g.key), g.method, g.parameters, provenance, activate=activate
                        )
                        row["rule"] = rule.label
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        for row in summary:
            held = (
                f"  held-out JSD {row['heldout_jsd_before']:.4f} → {row['heldout_jsd_after']:.4f}"
                if "heldout_jsd_before" in row
                else ""
            )
            tag = "reference" if row["reference"] else f"{row['similarity_before']:.4f} → {row['similarity_after']:.4f}"
            alt = [k for k in row if k.startswith("similarity_after_")]
            alt_text = f" ({alt[0][17:]}: {row[alt[0]]:.4f})" if alt else ""
            typer.echo(f"{row.get('rule', '-'):<16} {row['key']:<52} n={row['n_images']:<6} {tag}{alt_text}{held}")

    @rules_app.command("list")
    def list_cmd(
        config: ConfigOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
        active_only: Annotated[bool, typer.Option("--active", help="Only the active rules.")] = False,
    ) -> None:
        """List stored rules (every version; the active one per condition is marked)."""
        from rules.registry import RuleRegistry

        index, _ = _index(config)
        registry = RuleRegistry(index.db)
        rules = registry.active() if active_only else registry.all()
        if as_json:
            typer.echo(json.dumps([r.as_dict(with_histograms=False) for r in rules], indent=2))
            return
        if not rules:
            typer.echo("no rules (fit some with `harmonode rules fit`)")
        for r in rules:
            p = r.provenance
            sim = (
                f"{p['similarity_before']:.4f} → {p['similarity_after']:.4f}"
                if "similarity_before" in p and "similarity_after" in p
                else ""
            )
            typer.echo(f"{'*' if r.active else ' '} {r.label:<16} {r.method:<9} {str(r.key):<52} {sim}")

    @rules_app.command("show")
    def show_cmd(
        rule_ref: Annotated[str, typer.Argument(metavar="ID", help="Rule id (latest version) or id@vN.")],
        config: ConfigOption = None,
        plot: Annotated[Path | None, typer.Option(help="PNG file for the histogram plot.")] = None,
    ) -> None:
        """Show a rule and write a PNG of the histograms before and after it."""
        from rules.registry import RuleRegistry, UnknownRule

        index, _ = _index(config)
        try:
            rule = RuleRegistry(index.db).get(rule_ref)
        except UnknownRule as exc:
            raise _fail(str(exc)) from exc
        typer.echo(json.dumps(rule.as_dict(with_histograms=False), indent=2))
        hists = rule.provenance.get("histograms")
        if not hists:
            typer.echo("(no histograms stored with this rule: nothing to plot)")
            return
        out = plot or Path(f"rule-{rule.id}-v{rule.version}.png")
        try:
            plot_rule(rule, out)
        except OSError as exc:
            raise _fail(f"cannot write {out}: {exc}") from exc
        typer.echo(f"plot: {out}")

    @rules_app.command("export")
    def export_cmd(
        file: Annotated[Path, typer.Argument(help="JSON file to write.")],
        config: ConfigOption = None,
        active_only: Annotated[bool, typer.Option("--active", help="Only the active rules.")] = False,
    ) -> None:
        """Write the rules as a JSON rule file (for other nodes: `harmonode rules import`)."""
        from rules.registry import RuleRegistry

        index, _ = _index(config)
        document = RuleRegistry(index.db).export(only_active=active_only)
        try:
            tmp = file.with_name(file.name + ".tmp")
            tmp.write_text(json.dumps(document, indent=1))
            tmp.replace(file)
        except OSError as exc:
            raise _fail(f"cannot write {file}: {exc}") from exc
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
        from rules.registry import RuleFileError, RuleRegistry

        try:
            document = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(f"cannot read rule file {file}: {exc}") from exc
        index, _ = _index(config)
        try:
            with index.lock:
                stored = RuleRegistry(index.db).import_document(document, activate=activate)
        except RuleFileError as exc:
            raise _fail(f"{file}: {exc}; nothing imported") from exc
        typer.echo(f"{len(stored)} rule(s) imported from {file}")

    @rules_app.command("activate")
    def activate_cmd(
        rule_ref: Annotated[str, typer.Argument(metavar="ID", help="Rule id (latest version) or id@vN.")],
        config: ConfigOption = None,
    ) -> None:
        """Make a rule the active one for its imaging condition."""
        from rules.registry import RuleRegistry, UnknownRule

        index, _ = _index(config)
        try:
            with index.lock:
                rule = RuleRegistry(index.db).activate(rule_ref)
        except UnknownRule as exc:
            raise _fail(str(exc)) from exc
        typer.echo(f"{rule.label} active for {rule.key}")


def plot_rule(rule: Any, out: Path) -> None:  # noqa: ANN401 - rules.registry.Rule
    """PNG of a rule's group histogram before and after conversion, over the reference histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rules.fit import transform_histogram
    from rules.histogram import HistogramSpec, normalize

    hists = rule.provenance["histograms"]
    spec = HistogramSpec.from_dict(rule.provenance.get("spec", {}))
    group, ref = np.asarray(hists["group"], float), np.asarray(hists["reference"], float)
    after = transform_histogram(group, spec, rule.mapping)
    x = spec.centers
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(x, normalize(ref), color="black", lw=1.2, label="reference")
    ax.plot(x, normalize(group), color="tab:red", lw=1.0, alpha=0.8, label="before")
    ax.plot(x, after, color="tab:blue", lw=1.0, label="after")
    if rule.method == "seed":
        ax.axvline(rule.parameters["c"], color="grey", ls=":", label=f"c = {rule.parameters['c']:.0f}")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, None)
    ax.set_xlabel("value (HU for CT)")
    ax.set_ylabel("fraction of pixels")
    p = rule.provenance
    ax.set_title(
        f"{rule.label} {rule.method}: {rule.key}\nsimilarity {p.get('similarity_before', 0):.4f} → "
        f"{p.get('similarity_after', 0):.4f} to {p.get('reference_key', '?')}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
