"""A corrected findings SR: the next version of one of the node's SRs after a radiologist's assessment.

The corrected report is built as the first one is (``handlers.results.sr.build_sr``: TID 1500, the same
groups per finding, the same Tracking UIDs), with the findings as the radiologist left them (a rejected one
gone, a modified one with its new class, centre or size), and issued as a new instance of the same SR series
with the next Instance Number, whose Predecessor Documents Sequence names the version it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from handlers.results.context import (
    AlgorithmInfo,
    ResultContext,
    copy_patient_module,
    copy_study_module,
    sort_sources,
    source_view,
)
from handlers.results.sr import build_sr
from models.findings import Finding, VolumeGeometry

# The attributes of an SR's root content item (the rest of a built SR is its document: UIDs, modules).
_ROOT_CONTENT = (
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
    "ContentSequence",
)


def build_revision(
    previous: Dataset,
    sources: Sequence[Dataset],
    geometry: VolumeGeometry,
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    version: int,
    note: str,
) -> hd.sr.Comprehensive3DSR:
    """The next version of a findings SR.

    Parameters
    ----------
    previous
        The version it replaces (the node's SR, or an earlier correction).
    sources
        The source series' instances (as the first SR was built from).
    geometry
        Their volume geometry.
    findings
        The findings as they stand after the assessment (each with its Tracking UID).
    algorithm
        What produced the findings (as the first SR names it).
    version
        This version's number (2 for the first correction): its Instance Number.
    note
        What changed, for the report's comment (no patient identity).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        In the previous version's series, naming it in the Predecessor Documents Sequence.

    Raises
    ------
    ValueError
        No source, or a version below 2.
    """
    if not sources:
        raise ValueError("a corrected SR needs its source instances")
    if version < 2:
        raise ValueError(f"a corrected SR is version 2 or later, not {version}")
    views = sort_sources([source_view(ds) for ds in sources], geometry)
    ctx = ResultContext(views, geometry, algorithm, f"{previous.SOPInstanceUID}|revision|{version}")
    draft = build_sr(ctx, list(findings), analysed=True, reason=note)
    content = Dataset()
    for keyword in _ROOT_CONTENT:
        if keyword in draft:
            content[keyword] = draft[keyword]
    sr = hd.sr.Comprehensive3DSR(
        evidence=views,
        content=content,
        series_instance_uid=str(previous.SeriesInstanceUID),
        series_number=int(previous.get("SeriesNumber") or 9901),
        sop_instance_uid=ctx.uid("sr", version),
        instance_number=version,
        is_complete=True,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        previous_versions=[previous],
        series_description=str(previous.get("SeriesDescription", ""))[:64],
        manufacturer=str(draft.get("Manufacturer", "harmonode")),
        manufacturer_model_name=str(draft.get("ManufacturerModelName", algorithm.name))[:64],
        software_versions=str(draft.get("SoftwareVersions", algorithm.version))[:64],
    )
    copy_patient_module(views[0], sr)
    copy_study_module(views[0], sr)
    return sr
