"""Series for fitting: per-image histograms by imaging condition, hold-out splits, one fit per modality and region.

What ``harmonode rules fit`` does between reading its options and printing its table: collect the per-slice
histograms of every series (from a folder of DICOM files or from the node's store), hold whole series out
for evaluation, fit one rule per condition against the reference of its modality and body region
(``rules.fit``: head CT against a head CT of the reference condition, chest against chest), report the
similarity before and after (and with the other method, and on the held-out series), and store the rules
with their provenance (``rules.registry``). Nothing here knows the node's config: the caller passes the
store's index and file store, the registry and plain options.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from pydicom import Dataset, dcmread

from rules.fit import FitError, FitOptions, FitResult, fit_groups, fit_piecewise, fit_seed, transform_histogram
from rules.histogram import (
    HistogramError,
    HistogramSpec,
    average_histogram,
    default_spec,
    js_divergence,
    stored_histogram,
)
from rules.keys import ANY, ConditionKey, KeyParseError
from rules.registry import Rule, RuleRegistry, rule_id_for
from rules.strengths import ResidualStage
from storage.files import FileStore
from storage.index import CONDITION_KEYWORDS, Index
from storage.meta import series_condition_tags

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Progress(Protocol):
    """Wraps an iteration to show progress (``tqdm``-like): ``progress(items, desc, unit)``."""

    def __call__(self, items: Iterable[_T], desc: str, unit: str) -> Iterable[_T]: ...


def no_progress(items: Iterable[_T], desc: str, unit: str) -> Iterable[_T]:
    """The silent :class:`Progress`."""
    return items


@dataclass
class SeriesImages:
    """One series' condition and per-image (per-slice) histograms."""

    series_uid: str
    modality: str
    key: str
    histograms: list[np.ndarray] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # its image files (the residual strengths read them)


@dataclass
class FittedRules:
    """One fit of every condition found: the per-modality-and-region results and the per-condition report rows.

    ``summary`` holds one row per condition (``GroupFit.summary`` plus ``region``, ``n_series``, the other
    method's similarity and, with a hold-out, the held-out JSD before and after); :func:`store_rules` adds
    ``rule``. ``skipped`` says which regions were not fitted and what to do about it.
    """

    results: list[FitResult]
    summary: list[dict[str, Any]]
    n_series: dict[str, int]
    options: FitOptions
    skipped: list[str] = field(default_factory=list)


# -- collecting histograms ------------------------------------------------------------------------------------
def _tags_of(ds: Dataset) -> dict[str, str]:
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


def _slice_histograms(ds: Dataset, spec: HistogramSpec) -> list[np.ndarray]:
    pixels = ds.pixel_array
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    planes = pixels.reshape((-1, *pixels.shape[-2:]))
    return [stored_histogram(p, slope, intercept, spec) for p in planes]


def series_from_dir(directory: Path, progress: Progress = no_progress) -> list[SeriesImages]:
    """Per-series histograms of every DICOM image file under ``directory`` (others skipped, logged).

    Parameters
    ----------
    directory
        Searched recursively; ``.json`` and ``.txt`` files are not read.
    progress
        Wraps the iteration over files.

    Returns
    -------
    list[SeriesImages]
        One per Series Instance UID found, in the order first seen.
    """
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".txt"))
    series: dict[str, SeriesImages] = {}
    skipped = 0
    for path in progress(files, "reading", "file"):
        try:
            ds = dcmread(path)
            if "PixelData" not in ds:
                raise ValueError("no pixels")
            modality = str(ds.get("Modality", "") or "")
            uid = str(ds.SeriesInstanceUID)
            if uid not in series:
                series[uid] = SeriesImages(uid, modality, str(ConditionKey.from_tags(_tags_of(ds), modality)))
            series[uid].histograms += _slice_histograms(ds, default_spec(modality))
            series[uid].paths.append(path)
        except Exception as exc:  # not DICOM, no pixels, undecodable: skip it and say how many
            skipped += 1
            log.debug("skipped %s: %s", path.name, exc)
    if skipped:
        log.warning("%d file(s) under %s were not readable DICOM images and were skipped", skipped, directory)
    return list(series.values())


def series_from_store(
    index: Index,
    files: FileStore,
    study_uids: Sequence[str] | None = None,
    progress: Progress = no_progress,
) -> list[SeriesImages]:
    """Per-series histograms of the received CT/MR series in the node's store.

    Parameters
    ----------
    index, files
        The node's index and file store (``storage.store.open_store``).
    study_uids
        Only these studies (none at all when empty); every stored study when ``None``.
    progress
        Wraps the iteration over series.

    Returns
    -------
    list[SeriesImages]
        The series with at least one readable image (unreadable instances are skipped with a warning).
    """
    sql = (
        "SELECT series_instance_uid, modality, condition_tags, series_description, body_part_examined FROM series"
        " WHERE (origin IS NULL OR origin = 'received') AND modality IN ('CT', 'MR')"
    )
    params: tuple[str, ...] = ()
    if study_uids is not None:
        if not study_uids:
            return []
        sql += f" AND study_instance_uid IN ({', '.join('?' * len(study_uids))})"
        params = tuple(study_uids)
    out = []
    for row in progress(index.query(sql, params), "series", "series"):
        modality = row["modality"] or ""
        tags = series_condition_tags(row)
        item = SeriesImages(row["series_instance_uid"], modality, str(ConditionKey.from_tags(tags, modality)))
        for inst in index.instances_of_series(row["series_instance_uid"]):
            try:
                path = files.abspath(inst["path"])
                item.histograms += _slice_histograms(dcmread(path), default_spec(modality))
                item.paths.append(Path(path))
            except Exception as exc:  # one unreadable instance must not stop the fit
                log.warning("instance of series %s skipped: %s", item.series_uid[-8:], exc)
        if item.histograms:
            out.append(item)
    return out


# -- fitting ----------------------------------------------------------------------------------------------
def split_holdout(
    series: Sequence[SeriesImages], holdout: float
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Histograms per condition key for fitting and for held-out evaluation.

    Whole series are held out, the first ``round(holdout · n)`` of each condition's series in UID order
    (deterministic), and never a condition's last series: a condition with one series is never held out.
    """
    by_key: dict[str, list[SeriesImages]] = defaultdict(list)
    for s in sorted(series, key=lambda s: s.series_uid):
        by_key[s.key].append(s)
    fit: dict[str, list[np.ndarray]] = {}
    held: dict[str, list[np.ndarray]] = {}
    for key, items in by_key.items():
        n_held = int(round(holdout * len(items))) if len(items) > 1 else 0
        n_held = min(n_held, len(items) - 1)
        fit[key] = [h for s in items[n_held:] for h in s.histograms]
        if n_held:
            held[key] = [h for s in items[:n_held] for h in s.histograms]
    return fit, held


def _modality_region(key: str) -> tuple[str, str]:
    """The modality and region of a condition key string (``*`` for one that does not parse)."""
    try:
        parsed = ConditionKey.parse(key)
    except KeyParseError:
        return key.split("|", 1)[0], ANY
    return parsed.modality, parsed.region


def _by_modality_region(keys: Iterable[str]) -> Iterator[tuple[str, str, list[str]]]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for k in keys:
        groups[_modality_region(k)].append(k)
    for (modality, region), members in sorted(groups.items()):
        yield modality, region, sorted(members)


def _reference_in(reference: ConditionKey | None, modality: str, region: str) -> str | None:
    """The reference key of one modality and region: ``reference`` itself, or for region ``*`` that scanner
    condition in ``region``; None when ``reference`` is of another modality or region (the group picks its own)."""
    if reference is None or reference.modality != modality:
        return None
    if reference.region == ANY:
        return str(replace(reference, region=region))
    return str(reference) if reference.region == region else None


def regions_without_reference(groups: Iterable[str], reference: str | None) -> dict[tuple[str, str], str]:
    """The (modality, region) groups a reference for every region (``…|*``) has no series in, with what to do.

    Parameters
    ----------
    groups
        The condition keys found.
    reference
        The ``--reference`` key in its canonical form, or None (then nothing is missing).

    Returns
    -------
    dict
        ``(modality, region)`` → the message that says why the region is not fitted and what to do.
    """
    ref = ConditionKey.parse(reference) if reference else None
    if ref is None or ref.region != ANY:
        return {}
    out = {}
    for modality, region, keys in _by_modality_region(groups):
        wanted = _reference_in(ref, modality, region)
        if wanted is not None and wanted not in keys and len(keys) > 1:
            out[(modality, region)] = (
                f"{modality} {region}: no {region} series of the reference condition {reference}, so its "
                f"{len(keys)} conditions were not fitted; add {region} series of that scanner condition, or fit "
                f"the region against one of its own conditions with --reference (one of {', '.join(keys)})"
            )
    return out


def fit_conditions(
    groups: dict[str, list[np.ndarray]],
    options: FitOptions,
    reference: str | None = None,
    progress: Progress = no_progress,
) -> list[FitResult]:
    """Fit every condition against the reference of its modality and region; a lone condition is skipped.

    Parameters
    ----------
    groups
        Per condition key: the histograms to fit on.
    options
        Method and optimizer settings (MR gets a wider scale range: it has no absolute scale).
    reference
        A parsed condition key: the reference of its modality and region; with region ``*`` that scanner
        condition is the reference in every region (a region without it is skipped with a warning,
        :func:`regions_without_reference`). Other groups pick the condition with most images.
    progress
        Wraps the iteration over each group's conditions.

    Returns
    -------
    list[FitResult]
        One per modality and region fitted, in that order.

    Raises
    ------
    FitError
        A group cannot be fitted, no modality and region has two conditions, or ``reference`` is not found.
    """
    ref_key = ConditionKey.parse(reference) if reference else None
    missing = regions_without_reference(groups, reference)
    results = []
    for modality, region, keys in _by_modality_region(groups):
        if len(keys) < 2:
            log.warning("%s %s: only one condition (%s); nothing to fit against", modality, region, keys[0])
            continue
        if (modality, region) in missing:
            log.warning("%s", missing[(modality, region)])
            continue
        # MR has no absolute scale: vendors' stored units differ several-fold, so a needs a wider range
        mod_options = replace(options, scale_bounds=(0.1, 10.0)) if modality == "MR" else options
        try:
            result = fit_groups(
                {k: groups[k] for k in keys},
                default_spec(modality),
                mod_options,
                reference=_reference_in(ref_key, modality, region),
                progress=lambda it, m=f"{modality} {region}": progress(it, f"fit {m}", "group"),
            )
        except FitError as exc:
            raise FitError(f"{modality} {region}: {exc}") from exc
        results.append(result)
    found = ", ".join(sorted(groups))
    if ref_key is not None and not any(
        _reference_in(ref_key, *_modality_region(r.reference_key)) == r.reference_key for r in results
    ):
        raise FitError(f"reference {reference} is not one of the conditions found: {found}")
    if not results:
        raise FitError(
            "need images under at least two imaging conditions of one modality and body region to fit rules; "
            f"found {found}"
        )
    return results


def report_rows(
    results: Sequence[FitResult],
    held: dict[str, list[np.ndarray]],
    n_series: dict[str, int],
    options: FitOptions,
) -> list[dict[str, Any]]:
    """One summary row per condition: the fit, the other method's similarity, the held-out JSD.

    ``similarity_after_<other>`` is the similarity the other method (``piecewise`` for ``seed`` and back)
    reaches on the same histograms; ``heldout_jsd_before``/``_after`` appear when both the condition and
    its reference have held-out series.
    """
    other = fit_piecewise if options.method == "seed" else fit_seed
    other_name = "piecewise" if options.method == "seed" else "seed"
    rows: list[dict[str, Any]] = []
    for result in results:
        ref_held = None
        if result.reference_key in held:
            try:
                ref_held = average_histogram(held[result.reference_key])[0]
            except HistogramError:
                ref_held = None
        for g in result.groups:
            row = g.summary()
            row["region"] = _modality_region(g.key)[1]
            row["n_series"] = n_series[g.key]
            if not g.reference:
                _, _, alt_after, _ = other(g.histogram, result.reference_histogram, result.spec, options)
                row[f"similarity_after_{other_name}"] = round(alt_after, 6)
                if ref_held is not None and g.key in held:
                    held_hist, _ = average_histogram(held[g.key])
                    row["heldout_jsd_before"] = round(js_divergence(held_hist, ref_held), 6)
                    row["heldout_jsd_after"] = round(
                        js_divergence(transform_histogram(held_hist, result.spec, g.mapping), ref_held), 6
                    )
            rows.append(row)
    return rows


def fit_rules(
    series: Sequence[SeriesImages],
    options: FitOptions,
    reference: str | None = None,
    holdout: float = 0.0,
    progress: Progress = no_progress,
) -> FittedRules:
    """Hold out, fit every condition against the reference of its modality and region, report (nothing stored).

    Parameters
    ----------
    series
        From :func:`series_from_dir` or :func:`series_from_store`.
    options
        Method and optimizer settings.
    reference
        A parsed condition key to use as the reference of its modality and region (region ``*``: every region).
    holdout
        Fraction of each condition's series held out to report the JSD on unseen data, in [0, 1).
    progress
        Wraps the long iterations.

    Raises
    ------
    FitError
        No series, a bad ``holdout``, or as :func:`fit_conditions`.
    """
    if not series:
        raise FitError("no CT or MR images found to fit from")
    if not 0.0 <= holdout < 1.0:
        raise FitError(f"holdout {holdout} must be in [0, 1)")
    fit_hists, held_hists = split_holdout(series, holdout)
    n_series: dict[str, int] = defaultdict(int)
    for s in series:
        n_series[s.key] += 1
    results = fit_conditions(fit_hists, options, reference, progress)
    skipped = list(regions_without_reference(fit_hists, reference).values())
    rows = report_rows(results, held_hists, n_series, options)
    return FittedRules(results, rows, dict(n_series), options, skipped)


def _compact(hist: np.ndarray) -> list[float]:
    return [float(f"{v:.5g}") for v in np.asarray(hist, float)]


def draft_rules(fitted: FittedRules) -> list[Rule]:
    """The fitted groups as unsaved rules (version 1, id by key and method): what strengths are proposed for."""
    return [
        Rule(
            rule_id_for(ConditionKey.parse(g.key), g.method), 1, ConditionKey.parse(g.key), g.method, g.parameters,
            {"reference_key": result.reference_key, "reference": g.reference},
        )
        for result in fitted.results
        for g in result.groups
    ]


def store_rules(
    registry: RuleRegistry,
    fitted: FittedRules,
    source: str,
    activate: bool = False,
    residual: Mapping[str, tuple[ResidualStage, Mapping[str, Any]]] | None = None,
) -> list[Rule]:
    """Store every fitted group as a new rule version, with its provenance; label each summary row.

    Parameters
    ----------
    registry
        Where the rules go (one lock held for the whole batch).
    fitted
        From :func:`fit_rules`; each of its ``summary`` rows gets ``rule`` (the stored rule's label).
    source
        Where the images came from, kept in the provenance (``store``, ``dir:NAME``, ``pacs:NAME:QUERY``).
    activate
        Make the new rules the active ones for their conditions.
    residual
        Condition key → (residual stage, the figures it was proposed with) for the rules that get one.

    Raises
    ------
    rules.registry.RuleError
        A rule the registry refuses (the rules stored before it stay).
    """
    rows_by_key = {row["key"]: row for row in fitted.summary}
    stored = []
    with registry.lock:
        for result in fitted.results:
            for g in result.groups:
                row = rows_by_key[g.key]
                provenance = {
                    "reference_key": result.reference_key,
                    "reference": g.reference,
                    "n_images": g.n_images,
                    "n_series": fitted.n_series[g.key],
                    "similarity_before": g.similarity_before,
                    "similarity_after": g.similarity_after,
                    "divergence": fitted.options.divergence,
                    "spec": result.spec.as_dict(),
                    "source": source,
                    "steps": g.steps,
                    "summary": {k: v for k, v in row.items() if k.startswith(("heldout", "similarity_after_"))},
                    "histograms": {"group": _compact(g.histogram), "reference": _compact(result.reference_histogram)},
                }
                stage, figures = (residual or {}).get(g.key, (None, None))
                if figures:
                    provenance["residual_fit"] = dict(figures)
                key = ConditionKey.parse(g.key)
                rule = registry.add(key, g.method, g.parameters, provenance, activate=activate, residual=stage)
                row["rule"] = rule.label
                stored.append(rule)
    return stored
