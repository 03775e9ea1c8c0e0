"""Result objects for one analysed series, the object set of IHE AI Results: SR (TID 1500), key-image SC,
GSPS, SEG and a KOS.

``build_results`` is the one entry point the pipeline calls. Every object it returns lies in the source
study (same Study Instance UID; Patient module and the study-level attributes copied from the sources as
they have them), in a new series of its own kind, references the source images, and names the algorithm,
its version and the conversion rule used. UIDs are derived from the sources, the algorithm and the rule,
so running a series twice yields the same SOP Instance UIDs (a PACS keeps one copy, a resend never
duplicates).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from handlers.results.context import (
    NOT_FOR_DIAGNOSIS,
    SERIES_NUMBERS,
    AlgorithmInfo,
    ResultContext,
    copy_patient_module,
    copy_series_anatomy,
    copy_study_module,
    sort_sources,
    source_view,
)
from handlers.results.gsps import build_gsps
from handlers.results.kos import build_kos
from handlers.results.sc import build_key_images
from handlers.results.seg import build_seg, can_segment
from handlers.results.sr import build_sr
from models.findings import Finding, VolumeGeometry

log = logging.getLogger(__name__)


def build_results(
    source: list[Dataset],
    geometry: VolumeGeometry | None,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    analysed: bool,
    reason: str = "",
    values: np.ndarray | None = None,
    write_seg: bool = True,
) -> list[Dataset]:
    """Build the result objects of one series.

    Long because most of it is the documented parameters; each object is built by its own module.

    Parameters
    ----------
    source
        The source series' instances (single-frame slices, any order; pixel data needed for key images).
    geometry
        Geometry of the volume the findings refer to (voxel index ``k`` = slice along the normal); may be
        None when the series was not analysed.
    findings
        Detected lesions, in patient coordinates.
    algorithm
        Detector name and version, conversion rule id and match, condition key, more parameters.
    analysed
        False when the series could not be analysed; ``reason`` says why and only an SR is built.
    reason
        Why the series was not analysed (or a note on the analysis, e.g. a stand-in detector).
    values
        The volume in real units (HU), shape ``geometry.shape``, for the key images; read from the
        sources when None.
    write_seg
        Also build a DICOM SEG of the lesions (spheres of the finding diameter, one segment per finding).

    Returns
    -------
    list[pydicom.Dataset]
        SR first, then key-image SC(s), then, when there are findings, GSPS, SEG (when asked) and the KOS
        that flags the finding slices and references the others.

    Raises
    ------
    ValueError
        No source instance, sources of more than one series or study, or no geometry for an analysed series.
    """
    if not source:
        raise ValueError("build_results needs at least one source instance")
    if len({ds.SeriesInstanceUID for ds in source}) != 1 or len({ds.StudyInstanceUID for ds in source}) != 1:
        raise ValueError("build_results needs the instances of exactly one series")
    if analysed and geometry is None:
        raise ValueError("an analysed series needs its volume geometry")
    views = [source_view(ds) for ds in source]
    sources = sort_sources(views, geometry) if geometry is not None and analysed else views
    seed = "|".join(
        [
            sources[0].SeriesInstanceUID,
            algorithm.name,
            algorithm.version,
            algorithm.rule_id,
            *sorted(str(ds.SOPInstanceUID) for ds in sources),
        ]
    )
    ctx = ResultContext(sources, geometry, algorithm, seed)
    findings = list(findings) if analysed else []
    results = [build_sr(ctx, findings, analysed, reason)]
    if analysed:
        results.extend(build_key_images(ctx, findings, values))
        if findings:
            results.append(build_gsps(ctx, findings))
            if write_seg and can_segment(ctx):
                results.append(build_seg(ctx, findings))
            elif write_seg:
                log.warning("no SEG for a series without a Frame of Reference UID (the SEG IOD requires one)")
    for ds in results:
        copy_patient_module(sources[0], ds)
        copy_study_module(sources[0], ds)
        if ds.Modality in ("OT", "PR"):
            copy_series_anatomy(sources[0], ds)
    if analysed and findings:  # last: it references the others, as they are sent
        kos = build_kos(ctx, findings, results)
        copy_patient_module(sources[0], kos)
        copy_study_module(sources[0], kos)
        results.append(kos)
    log.info(
        "built %d result object(s) for a series: %d finding(s), analysed=%s, %s",
        len(results),
        len(findings),
        analysed,
        algorithm.rule_text,
    )
    return results


__all__ = ["AlgorithmInfo", "NOT_FOR_DIAGNOSIS", "SERIES_NUMBERS", "ResultContext", "build_results"]
