"""The harmonized copy of a series, for PACS (``[pipeline] write_harmonized_series``).

A derived series with the rule's pixels: new series, each instance referencing its source. Its UIDs are
derived from the sources and the rule, as every result's are, so re-running a series replaces nothing and
adds nothing: the same rule over the same sources gives the same series and the same instances.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.multiframe import FrameView
from rules.apply import RuleLike, apply_rule_stored

log = logging.getLogger(__name__)

SERIES_NUMBER = 9900  # beside the result series 9901-9904


def derived_uids(sources: Sequence[Dataset], rule_label: str) -> tuple[str, list[str]]:
    """The Series Instance UID and the SOP Instance UIDs (in source order) of a harmonized copy.

    Both are functions of the source series, the source instances and the rule label only.
    """
    series_uid = generate_uid(entropy_srcs=[str(sources[0].SeriesInstanceUID), rule_label, "harmonized"])
    return series_uid, [generate_uid(entropy_srcs=[series_uid, str(src.SOPInstanceUID)]) for src in sources]


def derived_series(
    sources: Sequence[Dataset],
    rule: RuleLike | None,
    rule_label: str,
    series_number: int = SERIES_NUMBER,
    values: np.ndarray | None = None,
) -> list[Dataset]:
    """A derived copy of a series with harmonized pixels: new series, references to its sources.

    Pixels keep the stored type and rescale of each source (rounded, clipped). Each instance gets its own
    derived SOP Instance UID, ImageType ``DERIVED\\SECONDARY``, a DerivationDescription naming the rule,
    and a SourceImageSequence item pointing at its source.

    Parameters
    ----------
    sources
        The source instances of one series (pixel data included).
    rule
        The rule applied (None: identity, still derived so that radiologists see what the model saw).
    rule_label
        How the rule is named in DerivationDescription (``id@vN (match) for <condition key>``); it is part
        of the UIDs, so another rule gives another series.
    series_number
        The new series' Series Number.
    values
        The harmonized real values (slices in the order of ``sources``) when a stage after the histogram
        rule changed them (the residual stage); None applies ``rule`` to each source's stored pixels.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        Empty for the frames of a multi-frame instance: no multi-frame derived object is written yet (the
        SR, SEG, GSPS and key images still reference its frames); a warning says so.

    Raises
    ------
    ValueError
        No source instance, or ``values`` whose slices do not match the sources.
    """
    if not sources:
        raise ValueError("a derived series needs at least one source instance")
    if values is not None and len(values) != len(sources):
        raise ValueError(f"{len(values)} harmonized slices for {len(sources)} source instances")
    if any(isinstance(src, FrameView) for src in sources):
        log.warning("no harmonized copy of a multi-frame series: a multi-frame derived object is not written yet")
        return []
    series_uid, sop_uids = derived_uids(sources, rule_label)
    out = []
    for k, (src, sop_uid) in enumerate(zip(sources, sop_uids, strict=True)):
        ds = copy.deepcopy(src)
        stored = src.pixel_array
        slope, intercept = float(src.get("RescaleSlope", 1) or 1), float(src.get("RescaleIntercept", 0) or 0)
        if values is None:
            pixels = apply_rule_stored(rule, stored, slope, intercept, out_dtype=stored.dtype)
        else:
            pixels = _stored_from_values(values[k], slope, intercept, stored.dtype)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.ImageType = ["DERIVED", "SECONDARY", *list(src.get("ImageType", ["AXIAL"]))[2:]]
        ds.DerivationDescription = f"harmonode harmonization, rule {rule_label}"[:1024]
        ds.SeriesDescription = ("HARMONIZED " + str(src.get("SeriesDescription", "")))[:64].strip()
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = [ref]
        out.append(ds)
    return out


def _stored_from_values(values: np.ndarray, slope: float, intercept: float, dtype: np.dtype) -> np.ndarray:
    """Real values back to the source's stored type through its rescale (rounded, clipped to the type)."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / (slope or 1.0))
    if info is not None:
        stored = np.clip(stored, info.min, info.max)
    return stored.astype(dtype)
