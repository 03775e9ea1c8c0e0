"""The Key Object Selection document (KOS) of one series' findings, as IHE AI Results lists it.

It flags the key slices (the source slices through each finding) and references the results that show
them (the SR, the SEG when there is one, the key-image Secondary Captures, the GSPS), so that a PACS's
key-image view finds the findings and the objects that carry them. It lies in the source study, in a
series of its own, titled "Of Interest" (CID 7010), with the detector as its observer device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from handlers.results.context import NOT_FOR_DIAGNOSIS, ResultContext
from handlers.results.sr import device_observer
from models.findings import Finding
from models.multiframe import frame_number

log = logging.getLogger(__name__)

TITLE = codes.DCM.OfInterest


def describe(ctx: ResultContext, findings: Sequence[Finding]) -> str:
    """The Key Object Description: what was found, by what, and that it is not for diagnosis (≤ 1024)."""
    names = ", ".join(f"{ctx.tracking_id(f, n)} (p={f.probability:.2f})" for n, f in enumerate(findings, start=1))
    text = f"{len(findings)} finding(s): {names}. {ctx.algorithm.name} {ctx.algorithm.version}, "
    return f"{text}{ctx.algorithm.rule_text}. {NOT_FOR_DIAGNOSIS}."[:1024]


def _reference_frames(kos: Dataset, frames: dict[str, list[int]]) -> None:
    """Name the key frames in the IMAGE items of multi-frame instances (highdicom's KOS has no argument)."""
    for item in kos.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(ref.ReferencedSOPInstanceUID))
        if numbers:
            ref.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]


def build_kos(ctx: ResultContext, findings: Sequence[Finding], results: Sequence[Dataset]) -> Dataset:
    """The key object selection of one series.

    Parameters
    ----------
    ctx
        Sorted sources, geometry, algorithm.
    findings
        At least one finding.
    results
        The other result objects of the series (SR, SC, GSPS, SEG), referenced in this order after the key
        slices; the KOS's evidence is the key slices and these.

    Returns
    -------
    pydicom.Dataset
        The KOS instance.

    Raises
    ------
    ValueError
        No finding given, or a result of another study.
    """
    if not findings:
        raise ValueError("a key object selection needs at least one finding")
    study = ctx.sources[0].StudyInstanceUID
    if any(ds.StudyInstanceUID != study for ds in results):
        raise ValueError("every object a key object selection references lies in the source study")
    device = device_observer(ctx)
    slices = ctx.finding_slices(findings)
    frames: dict[str, list[int]] = {}  # key frames per multi-frame instance
    for ds in slices:
        if frame_number(ds) is not None:
            frames.setdefault(str(ds.SOPInstanceUID), []).append(int(frame_number(ds)))  # type: ignore[arg-type]
    key_images = list({str(ds.SOPInstanceUID): ds for ds in slices}.values())  # one item per instance
    referenced = [*key_images, *results]
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=referenced,
        observer_device_context=device,
        description=describe(ctx, findings),
    )
    common = ctx.common("kos")
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=common.pop("series_instance_uid"),
        series_number=common.pop("series_number"),
        sop_instance_uid=ctx.uid("kos"),
        instance_number=1,
        manufacturer=common.pop("manufacturer"),
        **common,
    )
    _reference_frames(kos, frames)
    log.debug("KOS referencing %d object(s) built", len(referenced))
    return kos
