"""Series for fitting: per-image histograms by imaging condition, hold-out splits, one fit per modality.

What ``harmonode rules fit`` does between reading its options and printing its table: collect the per-slice
histograms of every series (from a folder of DICOM files or from the node's store), hold whole series out
for evaluation, fit one rule per condition against each modality's reference (``rules.fit``), report the
similarity before and after (and with the other method, and on the held-out series), and store the rules
with their provenance (``rules.registry``). Nothing here knows the node's config: the caller passes the
store's index and file store, the registry and plain options.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
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
from rules.keys import ConditionKey
from rules.registry import Rule, RuleRegistry
from storage.files import FileStore
from storage.index import CONDITION_KEYWORDS, Index

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


@dataclass
class FittedRules:
    """One fit of every condition found: the per-modality results and the per-condition report rows.

    ``summary`` holds one row per condition (``GroupFit.summary`` plus ``n_series``, the other method's
    similarity and, with a hold-out, the held-out JSD before and after); :func:`store_rules` adds ``rule``.
    """

    results: list[FitResult]
    summary: list[dict[str, Any]]
    n_series: dict[str, int]
    options: FitOptions


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
        "SELECT series_instance_uid, modality, condition_tags FROM series"
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
        tags = json.loads(row["condition_tags"] or "{}")
        item = SeriesImages(row["series_instance_uid"], modality, str(ConditionKey.from_tags(tags, modality)))
        for inst in index.instances_of_series(row["series_instance_uid"]):
            try:
                item.histograms += _slice_histograms(dcmread(files.abspath(inst["path"])), default_spec(modality))
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


def _by_modality(keys: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        groups[k.split("|", 1)[0]].append(k)
    yield from sorted(groups.items())


def fit_conditions(
    groups: dict[str, list[np.ndarray]],
    options: FitOptions,
    reference: str | None = None,
    progress: Progress = no_progress,
) -> list[FitResult]:
    """Fit every condition against its modality's reference; a modality with one condition is skipped.

    Parameters
    ----------
    groups
        Per condition key: the histograms to fit on.
    options
        Method and optimizer settings (MR gets a wider scale range: it has no absolute scale).
    reference
        A parsed condition key: the reference of its modality (the others pick the group with most images).
    progress
        Wraps the iteration over each modality's groups.

    Returns
    -------
    list[FitResult]
        One per modality fitted, in modality order.

    Raises
    ------
    FitError
        A modality's groups cannot be fitted, no modality has two conditions, or ``reference`` is not found.
    """
    results = []
    for modality, keys in _by_modality(groups):
        if len(keys) < 2:
            log.warning("%s: only one condition (%s); nothing to fit against", modality, keys[0])
            continue
        ref = reference if reference and reference.startswith(modality + "|") else None
        # MR has no absolute scale: vendors' stored units differ several-fold, so a needs a wider range
        mod_options = replace(options, scale_bounds=(0.1, 10.0)) if modality == "MR" else options
        try:
            result = fit_groups(
                {k: groups[k] for k in keys},
                default_spec(modality),
                mod_options,
                reference=ref,
                progress=lambda it, m=modality: progress(it, f"fit {m}", "group"),
            )
        except FitError as exc:
            raise FitError(f"{modality}: {exc}") from exc
        results.append(result)
    found = ", ".join(sorted(groups))
    if not results:
        raise FitError(f"need images under at least two imaging conditions of one modality to fit rules; found {found}")
    if reference and not any(r.reference_key == reference for r in results):
        raise FitError(f"reference {reference} is not one of the conditions found: {found}")
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
    """Hold out, fit every condition against its modality's reference and report (nothing stored).

    Parameters
    ----------
    series
        From :func:`series_from_dir` or :func:`series_from_store`.
    options
        Method and optimizer settings.
    reference
        A parsed condition key to use as its modality's reference.
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
    return FittedRules(results, report_rows(results, held_hists, n_series, options), dict(n_series), options)


def _compact(hist: np.ndarray) -> list[float]:
    return [float(f"{v:.5g}") for v in np.asarray(hist, float)]


def store_rules(registry: RuleRegistry, fitted: FittedRules, source: str, activate: bool = False) -> list[Rule]:
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
                rule = registry.add(ConditionKey.parse(g.key), g.method, g.parameters, provenance, activate=activate)
                row["rule"] = rule.label
                stored.append(rule)
    return stored
