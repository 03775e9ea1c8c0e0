"""One completed series, stage by stage: the only place a series' state and outcome change.

Each stage is a plain function that takes what it reads and returns what it writes; ``run_series`` calls
them in order, so what flows from one to the next is visible at the call site, and times each one:

    load → key → rule → harmonize (histogram) → residual → detect → results → deliver

A series that cannot be analysed (a refused volume, an MR series for the CT model, no detector installed)
still gets its results: an SR that says why. A series the residual stage cannot take keeps the histogram
stage's values, and its SR says why. ``analyze_series`` is the ``analyze-series`` job: it moves the
series through ``processing`` to ``done`` or ``failed`` (or ``skipped`` when it holds no image).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from handlers.learning import record_findings, with_finding_ids
from handlers.results import AlgorithmInfo, build_results
from handlers.results.derived import derived_series
from models.findings import Finding
from models.mining import measure
from models.residual import ResidualOutcome, residual_stage
from models.volume import IMAGE_SOP_CLASSES, Volume, VolumeRefused, build_volume, load_datasets
from node.config import PipelineConfig
from rules.apply import apply_rule, apply_rule_stored, map_of
from rules.keys import BodyPart, ConditionKey, body_part_of
from rules.registry import Rule, RuleMatch, RuleRegistry
from storage.deliveries import StoredResult, enqueue_deliveries, store_results
from storage.exports import ExportSettings
from storage.files import FileStore
from storage.index import Index, SeriesState
from storage.maps import MapCache
from storage.meta import series_condition_tags
from storage.parameters import store_parameters
from storage.queue import AnalyzeSeriesPayload, Job, JobQueue

log = logging.getLogger(__name__)

ALGORITHM_NAME = "harmonode"

T = TypeVar("T")


# -- what flows between the stages --------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedSeries:
    """The stored instances of a series: the volume when one could be built, else why not."""

    datasets: list[Dataset]  # the readable instances (the results' sources)
    volume: Volume | None
    refused: str = ""


@dataclass(frozen=True)
class Harmonized:
    """The values the detector reads, and what each harmonization stage did to get them."""

    values: np.ndarray
    residual: ResidualOutcome


@dataclass(frozen=True)
class DetectionOutcome:
    """What the detector made of a series (``refused`` says why it was not analysed)."""

    findings: list[Finding] = field(default_factory=list)
    model_version: str = ""
    task: str = ""
    refused: str = ""
    features: list[Any] = field(default_factory=list)  # models.features.FindingFeatures, as ``findings``


@dataclass(frozen=True)
class SeriesOutcome:
    """What one run of the pipeline produced and recorded for a series."""

    series_uid: str
    condition_key: ConditionKey
    rule_match: RuleMatch
    detection: DetectionOutcome
    results: list[StoredResult]
    timings: dict[str, float]
    residual: ResidualOutcome | None = None

    @property
    def findings(self) -> list[Finding]:
        """The series' findings."""
        return self.detection.findings


class DetectorSlot:
    """The detector, loaded once per worker process on its first series (None when not installed).

    Loaded lazily so that a node that only receives stays small (torch and the weights are ~200 MB).
    """

    what = "detector"

    def __init__(
        self, device: str = "auto", loader: Callable[[str], Any] | None = None, models_dir: Path | None = None
    ) -> None:
        self.device = device
        self._loader = loader
        #: the node's installed models (``models.bundles``): the active one is loaded, else the shipped weights
        self.models_dir = models_dir
        self._detector: Any = None
        self._loaded_from = ""
        self._missing = False
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The loaded detector, or None when no weights are installed (logged once).

        When another installed model was activated since it was loaded (``harmonode models activate``), that
        one is loaded now: a worker switches models between two series, never within one.
        """
        with self._lock:
            wanted = self._source()
            if self._detector is not None and wanted != self._loaded_from:
                log.info("%s: switching to installed model %s", self.what, wanted or "(shipped)")
                self._detector, self._missing = None, False
            if self._detector is None and not self._missing:
                try:
                    self._detector = self._load()
                    self._loaded_from = wanted
                except (FileNotFoundError, ImportError) as exc:
                    log.error("no %s installed (%s): series' SRs will say so", self.what, exc)
                    self._missing = True
            return self._detector

    def _source(self) -> str:
        """The active installed model's version ('' for the shipped weights)."""
        if self.models_dir is None or self._loader is not None:
            return ""
        from models.bundles import active_version

        return active_version(self.models_dir)

    def _load(self) -> Any:
        if self._loader is not None:
            return self._loader(self.device)
        from models.bundles import active_weights_dir
        from models.detector import Detector

        return Detector.load(device=self.device, weights_dir=active_weights_dir(self.models_dir))


class ResidualSlot(DetectorSlot):
    """The residual model of the harmonization stage, loaded on the first series whose rule needs it."""

    what = "residual model"

    def _source(self) -> str:
        return ""  # bundles carry the detector; the residual model is the shipped one

    def _load(self) -> Any:
        if self._loader is not None:
            return self._loader(self.device)
        from models.residual_net import ResidualModel

        return ResidualModel.load(device=self.device)


@dataclass(frozen=True)
class Worker:
    """The collaborators of the ``analyze-series`` job in one worker process."""

    files: FileStore
    index: Index
    queue: JobQueue
    settings: PipelineConfig
    destinations: tuple[str, ...]  # names of the destinations results are sent to
    detector: DetectorSlot
    residual: DetectorSlot | None = None  # the residual model (None: the histogram stage only)
    maps: MapCache | None = None  # residual maps per series, so a change of strength never re-runs the net
    learning: ExportSettings = field(default_factory=ExportSettings)  # [learning]: seed 004's export records
    hand_off: Callable[[Analysed], None] | None = None  # set in a cluster: findings go on to a CPU task


# -- the stages ----------------------------------------------------------------------------------------
def load_series(files: FileStore, rows: Sequence[dict[str, Any]]) -> LoadedSeries:
    """Read the stored instances of a series and build its volume (or record why not)."""
    try:
        datasets = load_datasets([files.abspath(r["path"]) for r in rows])
        return LoadedSeries(datasets, build_volume(datasets))
    except VolumeRefused as exc:
        return LoadedSeries(_readable(files, rows), None, str(exc))


def _readable(files: FileStore, rows: Sequence[dict[str, Any]]) -> list[Dataset]:
    """The instances that can be read at all: the sources an SR that says 'not analysed' refers to."""
    out = []
    for r in rows:
        try:
            out.append(dcmread(files.abspath(r["path"])))
        except Exception:
            continue
    return out


def condition_key(tags: dict[str, Any], modality: str) -> ConditionKey:
    """The imaging condition of a series, from the tags kept at ingest."""
    return ConditionKey.from_tags(tags, modality)


def find_rule(registry: RuleRegistry, key: ConditionKey) -> RuleMatch:
    """The conversion rule for a condition: exact key, then the documented fallbacks, then identity."""
    return registry.lookup(key)


def remember_parameters(index: Index, series_uid: str, key: str, volume: Volume) -> None:
    """Store the raw volume's per-region (mean, std) under its condition key: the parameter store that
    hard-example mining (seed 001, ``harmonode mine``) converts towards. A volume that cannot be measured is
    logged and skipped; it never fails the series."""
    try:
        parameters = measure(volume.values, volume.modality, name=key)
    except ValueError as exc:
        log.info("series %s: no parameter set stored (%s)", series_uid, exc)
        return
    store_parameters(index, f"series:{series_uid}", key, volume.modality, parameters.as_dict())


def harmonize(volume: Volume, rule: Rule | None) -> np.ndarray:
    """Apply the rule to the volume (identity when none applies).

    With the stored 8/16-bit integers at hand (one rescale for the whole series) a rule is a lookup table
    gathered over them: the same float32 values, 0.085 s instead of 0.35 s (seed rule) or 1.2 s (piecewise)
    on a 300×512×512 CT volume. No rule passes the values on as they are (the detector never writes into
    its input).
    """
    stored = volume.stored
    if stored is not None and stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2 and rule is not None:
        if map_of(rule).method != "identity":
            return apply_rule_stored(rule, stored, volume.slope, volume.intercept, np.float32)
    return volume.values if rule is None else apply_rule(rule, volume.values)


def residual(
    values: np.ndarray, volume: Volume, match: RuleMatch, model: Any, maps: MapCache | None, series_uid: str
) -> Harmonized:
    """The rule's residual stage after its histogram stage (seed 003); the histogram output when none runs."""
    stage = match.rule.residual if match.rule is not None else None
    key = (series_uid, match.rule_id)
    outcome = residual_stage(values, volume.geometry, volume.modality, stage, model, maps, key)
    if stage is not None and not outcome.applied:
        log.warning("series %s: residual stage not applied: %s", series_uid, outcome.reason)
    return Harmonized(outcome.values, outcome)


def harmonization_text(match: RuleMatch, outcome: ResidualOutcome | None) -> str:
    """Both stages in one sentence, as the SR records them."""
    if match.rule is None:
        histogram = f"no conversion rule ({match.match})"
    else:
        histogram = f"histogram rule {match.rule_id} ({match.rule.method}, {match.match} match)"
    stage = match.rule.residual if match.rule is not None else None
    if stage is None:
        return f"{histogram}; no residual stage"
    if outcome is not None and not outcome.applied:
        return f"{histogram}; residual stage not applied: {outcome.reason}"
    return f"{histogram}; {stage.text}"


def detect(detector: Any, values: np.ndarray, volume: Volume, body: BodyPart) -> DetectionOutcome:
    """Run the lesion detector on the harmonized values (``detector`` None: not installed)."""
    if detector is None:
        return DetectionOutcome(refused="no detector weights are installed on this node")
    detection = detector.detect(values, volume.geometry, volume.modality, body)
    if not detection.analysed:
        return DetectionOutcome(model_version=detector.version, task=detection.task, refused=detection.reason)
    features = list(getattr(detection, "features", []))
    return DetectionOutcome(list(detection.findings), detector.version, detection.task, features=features)


def identify(detection: DetectionOutcome, series_uid: str, rule_id: str) -> DetectionOutcome:
    """The findings with their Tracking UIDs (``finding_id``), which the SR, GSPS, SEG and the index share."""
    findings = with_finding_ids(detection.findings, series_uid, detection.model_version, rule_id)
    return replace(detection, findings=findings)


def result_objects(
    loaded: LoadedSeries,
    key: ConditionKey,
    match: RuleMatch,
    detection: DetectionOutcome,
    settings: PipelineConfig,
    harmonized: Harmonized | None = None,
) -> list[Dataset]:
    """The SR, key images, GSPS (and SEG, and the harmonized copy when configured) of one series."""
    volume = loaded.volume
    refused = loaded.refused or detection.refused
    outcome = harmonized.residual if harmonized is not None else None
    stage = match.rule.residual if match.rule is not None else None
    residual_parameter = (
        "none"
        if stage is None
        else (
            f"a_blur {stage.alpha_blur:.2f} a_noise {stage.alpha_noise:.2f} {stage.model_version}"
            if outcome is None or outcome.applied
            else "not applied"
        )
    )
    algorithm = AlgorithmInfo(
        name=ALGORITHM_NAME,
        version=detection.model_version or "none",
        rule_id=match.rule_id,
        rule_match=str(match.match),
        condition_key=str(key),
        parameters={"task": detection.task or "none", "residual": residual_parameter},
        harmonization=harmonization_text(match, outcome),
    )
    objects = build_results(
        source=volume.datasets if volume is not None else loaded.datasets,
        geometry=volume.geometry if volume is not None else None,
        findings=detection.findings,
        algorithm=algorithm,
        analysed=not refused,
        reason=refused,
        values=volume.values if volume is not None else None,
        write_seg=settings.write_seg and bool(detection.findings),
    )
    if settings.write_harmonized_series and volume is not None:
        label = f"{match.rule_id} ({match.match}) for {key}"
        values = None
        if outcome is not None and outcome.applied and harmonized is not None:
            label = f"{label}, {stage.text}" if stage is not None else label
            values = harmonized.values
        derived = derived_series(volume.datasets, match.rule, label, values=values)
        objects = [*objects, *derived]
    return objects


# -- the run -------------------------------------------------------------------------------------------
def _timed(timings: dict[str, float], name: str, stage: Callable[..., T], *args: Any) -> T:
    t0 = time.perf_counter()
    try:
        return stage(*args)
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 4)


@dataclass
class Analysed:
    """What the GPU stages leave for the results: the series as loaded, its key, rule, detection, timings."""

    row: dict[str, Any]
    loaded: LoadedSeries
    key: ConditionKey
    match: RuleMatch
    detection: DetectionOutcome
    harmonized: Harmonized | None
    timings: dict[str, float]


def run_series(worker: Worker, series_uid: str) -> SeriesOutcome:
    """Run every stage on one series and record the outcome (safe twice: result UIDs derive from the sources,
    delivery is keyed per object and destination). ``LookupError``: the series is not in the index."""
    return finish_series(worker, analyse_series(worker, series_uid))


def analyse_series(worker: Worker, series_uid: str) -> Analysed:
    """load → key → rule → harmonize → residual → detect: the stages up to the findings (the GPU's part).

    Raises
    ------
    LookupError
        The series is not in the index.
    """
    row = worker.index.series(series_uid)
    if row is None:
        raise LookupError(f"series {series_uid} is not in the index")
    tags = series_condition_tags(row)
    t: dict[str, float] = {}
    loaded = _timed(t, "load", load_series, worker.files, worker.index.instances_of_series(series_uid))
    key = _timed(t, "key", condition_key, tags, row.get("modality") or "")
    match = _timed(t, "rule", find_rule, RuleRegistry(worker.index.db, worker.index.lock), key)
    detection = DetectionOutcome(refused=loaded.refused)
    harmonized = None
    if loaded.volume is not None:
        _timed(t, "parameters", remember_parameters, worker.index, series_uid, str(key), loaded.volume)
        values = _timed(t, "harmonize", harmonize, loaded.volume, match.rule)
        model = worker.residual.get() if worker.residual is not None and _needs_residual(match) else None
        harmonized = _timed(t, "residual", residual, values, loaded.volume, match, model, worker.maps, series_uid)
        del values
        body = body_part_of(tags, row.get("series_description") or "", loaded.volume.modality)
        detection = _timed(t, "detect", detect, worker.detector.get(), harmonized.values, loaded.volume, body)
        detection = identify(detection, series_uid, match.rule_id)
    return Analysed(row, loaded, key, match, detection, harmonized, t)


def finish_series(worker: Worker, analysed: Analysed) -> SeriesOutcome:
    """results → deliver, then the outcome recorded in the index (the CPU's part after the findings)."""
    row, loaded, key, match = analysed.row, analysed.loaded, analysed.key, analysed.match
    detection, harmonized, t = analysed.detection, analysed.harmonized, analysed.timings
    series_uid = row["series_instance_uid"]
    results: list[StoredResult] = []
    if loaded.datasets or loaded.volume is not None:
        objects = _timed(t, "results", result_objects, loaded, key, match, detection, worker.settings, harmonized)
        results = _timed(t, "results", store_results, worker.files, worker.index, objects)
        found = (detection.findings, detection.features, results, detection.model_version, str(key))
        _timed(t, "results", record_findings, worker.index, worker.queue, worker.learning, row, *found)
        if worker.destinations:
            _timed(t, "deliver", enqueue_deliveries, worker.queue, worker.destinations, results, worker.index)
    else:
        log.error("series %s: no readable source instance; no result can reference it", series_uid)
    outcome = SeriesOutcome(series_uid, key, match, detection, results, t, harmonized.residual if harmonized else None)
    _record(worker.index, outcome, loaded)
    return outcome


def _needs_residual(match: RuleMatch) -> bool:
    return match.rule is not None and match.rule.residual is not None


def _record(index: Index, outcome: SeriesOutcome, loaded: LoadedSeries) -> None:
    refused = loaded.refused or outcome.detection.refused
    index.update_series(
        outcome.series_uid,
        condition_key=str(outcome.condition_key),
        rule_id=outcome.rule_match.rule_id,
        rule_match=str(outcome.rule_match.match),
        model_version=outcome.detection.model_version,
        findings=[f.as_dict() for f in outcome.findings],
        timings=outcome.timings,
        error=f"not analysed: {refused}" if refused else "",
    )
    log.info(
        "series %s: key %s, rule %s (%s), %d finding(s)%s in %.2f s",
        outcome.series_uid,
        outcome.condition_key,
        outcome.rule_match.rule_id,
        outcome.rule_match.match,
        len(outcome.findings),
        f", not analysed: {refused}" if refused else "",
        sum(outcome.timings.values()),
    )


def analyze_series(job: Job, worker: Worker) -> None:
    """The ``analyze-series`` job: run the pipeline on one completed series.

    Skipped when the series reopened meanwhile (a late instance: it completes again); a series without an
    image instance is marked ``skipped``. Any failure marks the series ``failed`` and goes to the queue.
    """
    uid = AnalyzeSeriesPayload.from_json(job.payload, job.key).series_instance_uid
    series = worker.index.series(uid)
    if series is None:
        log.warning("job %d: series %s is not in the index; nothing to do", job.id, uid)
        return
    if not _is_image_series(worker.index, uid):
        worker.index.update_series(uid, state=SeriesState.SKIPPED, error="not an image series: nothing to analyse")
        return
    if series["state"] == SeriesState.RECEIVING:
        log.info("job %d: series %s reopened by a late instance; it will complete again", job.id, uid)
        return
    worker.index.update_series(uid, state=SeriesState.PROCESSING, error="")

    def stages() -> bool:
        analysed = analyse_series(worker, uid)
        if worker.hand_off is not None:  # a cluster: the results are a task of the CPU queue (node.handoff)
            worker.hand_off(analysed)
            return False
        finish_series(worker, analysed)
        return True

    settle_series(worker.index, uid, stages)


def settle_series(index: Index, uid: str, stages: Callable[[], bool]) -> None:
    """Run a job's stages on a series: ``failed`` (and re-raised) when they raise; ``done`` when they say they
    finished it and the series is still ``processing`` (a late instance may have reopened it meanwhile)."""
    try:
        finished = stages()
    except Exception as exc:
        index.update_series(uid, state=SeriesState.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    if finished and index.series(uid)["state"] == SeriesState.PROCESSING:
        index.update_series(uid, state=SeriesState.DONE)


def _is_image_series(index: Index, series_uid: str) -> bool:
    rows = index.query("SELECT DISTINCT sop_class_uid FROM instances WHERE series_instance_uid=?", (series_uid,))
    return any(r["sop_class_uid"] in IMAGE_SOP_CLASSES for r in rows)
