"""Key images: Secondary Capture (RGB) in a new series of the source study.

One image per finding (the slice through its centre, windowed, the finding circled, its kind and
probability and "NOT FOR DIAGNOSIS" burned in), or one summary image (the middle slice) when there is
none. The pixels are enlarged to at least ``MIN_SIZE`` so the labels stay legible on small matrices.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from handlers.results.context import NOT_FOR_DIAGNOSIS, ResultContext
from models.findings import Finding
from models.multiframe import frame_number

log = logging.getLogger(__name__)

MIN_SIZE = 512
CIRCLE_RGB = (255, 64, 32)
TEXT_RGB = (255, 255, 0)
DEFAULT_WINDOWS = {"CT": (300.0, 800.0)}  # (centre, width) when the source names none: vessels and bone


def slice_values(ds: Dataset) -> np.ndarray:
    """One slice in real units (rescale slope and intercept applied)."""
    pixels = ds.pixel_array.astype(np.float32)
    return pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None  # type: ignore[arg-type]
    return float(value)  # type: ignore[arg-type]


def window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Window a slice to uint8: the source's first window, a modality default, or its 1–99 percentiles."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        default = DEFAULT_WINDOWS.get(str(ds.get("Modality", "")))
        if default is not None:
            center, width = default
        else:
            lo, hi = np.percentile(values, [1, 99])
            center, width = (lo + hi) / 2.0, max(float(hi - lo), 1.0)
    lo = center - width / 2.0
    scaled = (values - lo) / width * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row and column directions as L/R, A/P, H/F letters) from the image plane.

    An oblique direction gets more than one letter, the main one first (``PL``), as PS3.3 C.7.6.1.1.1 says.
    """
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letters(vec: list[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = np.argsort(-np.abs(vec))
        out = ""
        for axis in order:
            if abs(vec[axis]) > 0.25:
                out += names[axis][0] if vec[axis] > 0 else names[axis][1]
        return out or "L"

    return letters(iop[:3]), letters(iop[3:])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def render(gray: np.ndarray, circles: list[tuple[float, float, float]], lines: list[str]) -> np.ndarray:
    """An RGB key image: ``gray`` enlarged, ``circles`` (column, row, radius in source pixels), text lines."""
    scale = max(1, int(np.ceil(MIN_SIZE / max(gray.shape))))
    image = Image.fromarray(gray, mode="L").resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.NEAREST)
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    for col, row, radius in circles:
        cx, cy, r = (col + 0.5) * scale, (row + 0.5) * scale, radius * scale * 1.5 + 4  # around, not on it
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=CIRCLE_RGB, width=max(2, scale // 2))
    font_size = max(12, image.height // 32)
    font = _font(font_size)
    y = 4
    for text in lines:
        draw.text((6, y), text, fill=TEXT_RGB, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        y += font_size + 4
    draw.text(
        (6, image.height - font_size - 8),
        NOT_FOR_DIAGNOSIS,
        fill=(255, 0, 0),
        font=font,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return np.asarray(image, dtype=np.uint8)


def _key_image(ctx: ResultContext, k: int, rgb: np.ndarray, number: int, comment: str) -> Dataset:
    ref = ctx.sources[k]
    common = ctx.common("sc")
    orientation = patient_orientation(ref)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=(orientation[0][0], orientation[1][0]),  # highdicom takes one letter each
        sop_instance_uid=ctx.uid("sc", number),
        instance_number=number,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        **common,
    )
    # The SC builder has no arguments for these General Image attributes (nor oblique orientations): set them here.
    sc.PatientOrientation = list(orientation)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = comment[:10240]
    sc.DerivationDescription = f"{ctx.algorithm.name} {ctx.algorithm.version}; {ctx.algorithm.rule_text}"[:1024]
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = ref.SOPClassUID
    source_item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if frame_number(ref) is not None:
        source_item.ReferencedFrameNumber = frame_number(ref)
    sc.SourceImageSequence = DicomSequence([source_item])
    return sc


def build_key_images(ctx: ResultContext, findings: list[Finding], values: np.ndarray | None = None) -> list[Dataset]:
    """Key images of one series: one per finding, or one summary when there is none.

    Parameters
    ----------
    ctx
        Sorted sources, geometry, algorithm.
    findings
        The findings to show.
    values
        The volume in real units, shape (slices, rows, columns); slices are read from the sources if None.

    Returns
    -------
    list[pydicom.Dataset]
        The Secondary Capture instances.
    """

    def plane(k: int) -> np.ndarray:
        if values is not None and values.shape[0] == len(ctx.sources):
            return np.asarray(values[k], dtype=np.float32)
        return slice_values(ctx.sources[k])

    algo = f"{ctx.algorithm.name} {ctx.algorithm.version}, {ctx.algorithm.rule_text}"
    images = []
    if not findings:
        k = len(ctx.sources) // 2
        gray = window(plane(k), ctx.sources[k])
        rgb = render(gray, [], ["No finding", algo])
        images.append(_key_image(ctx, k, rgb, 1, f"No finding. {algo}. {NOT_FOR_DIAGNOSIS}."))
        return images
    for number, finding in enumerate(findings, start=1):
        k = ctx.slice_of(finding)
        col, row = ctx.pixel_of(finding)
        gray = window(plane(k), ctx.sources[k])
        label = f"{finding.kind} {number}: p={finding.probability:.2f}, {finding.diameter_mm:.1f} mm"
        rgb = render(gray, [(col, row, ctx.radius_px(finding))], [label, algo])
        images.append(_key_image(ctx, k, rgb, number, f"{label}. {algo}. {NOT_FOR_DIAGNOSIS}."))
    log.debug("built %d key image(s)", len(images))
    return images
