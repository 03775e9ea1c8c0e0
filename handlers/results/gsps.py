"""A Grayscale Softcopy Presentation State over the original slices with the findings as annotations.

Viewers that support GSPS show a circle and a label over each finding on the real images, without
changing them. The state references only the slices through a finding (one graphic annotation each).
The graphic layer recommends yellow (CIELab; white on grayscale displays) and each circle carries a line
style, yellow outlined in black. The labels sit in boxes along the image's top edge, where a head or
body scan shows air, with a visible anchor line to their circle: over the skull, text of any colour is
hard to read. (A Text Style Sequence would give the text an outline too, but PS3.3 and dciodvfy allow it
only in compound graphics, not in text objects.)
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from handlers.results.context import NOT_FOR_DIAGNOSIS, ResultContext
from models.findings import Finding
from models.multiframe import frame_number

log = logging.getLogger(__name__)

LAYER = "FINDINGS"
COLOUR = hd.color.CIELabColor.from_string("yellow")
SHADOW = hd.color.CIELabColor.from_string("black")


def line_style() -> Dataset:
    """A Line Style Sequence item (PS3.3 C.10.5) for the circles: yellow, 2 display pixels, black outline."""
    style = Dataset()
    style.PatternOnColorCIELabValue = list(COLOUR.value)
    style.PatternOnOpacity = 1.0
    style.LineThickness = 2.0
    style.LineDashingStyle = "SOLID"
    style.ShadowStyle = "OUTLINED"
    style.ShadowOffsetX = 1.0
    style.ShadowOffsetY = 1.0
    style.ShadowColorCIELabValue = list(SHADOW.value)
    style.ShadowOpacity = 1.0
    return style


def _inside(x: float, y: float, ds: Dataset) -> tuple[float, float]:
    """Clip a PIXEL point into the image (an anchor outside the image is invalid)."""
    return float(np.clip(x, 1.0, float(ds.Columns) - 1.0)), float(np.clip(y, 1.0, float(ds.Rows) - 1.0))


def label_box(ds: Dataset, line: int) -> tuple[float, float, float, float]:
    """The PIXEL bounding box (left, top, right, bottom) of the ``line``-th label on a slice, along its top."""
    rows, columns = float(ds.Rows), float(ds.Columns)
    height = max(4.0, rows / 14.0)
    top = max(0.0, min(1.0 + line * height, rows - height - 1.0))
    return 0.0, top, columns, min(top + height, rows)


def slice_annotation(
    ctx: ResultContext, ds: Dataset, numbered: list[tuple[int, Finding]], layer: hd.pr.GraphicLayer
) -> hd.pr.GraphicAnnotation:
    """The annotation of one slice: a circle per finding (line style) and its label in a box on top."""
    graphics, texts = [], []
    for line, (number, finding) in enumerate(numbered):
        col, row = ctx.pixel_of(finding)
        cx, cy = _inside(col + 0.5, row + 0.5, ds)  # PIXEL units: (0, 0) is the top left pixel's corner
        radius = ctx.radius_px(finding)
        tracking = {"tracking_id": ctx.tracking_id(finding, number), "tracking_uid": ctx.tracking_uid(finding, number)}
        circle = hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
            graphic_data=np.array([[cx, cy], [cx + radius, cy]]),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            **tracking,
        )
        circle.LineStyleSequence = DicomSequence([line_style()])  # highdicom has no argument for it
        graphics.append(circle)
        texts.append(
            hd.pr.TextObject(
                text_value=f"{finding.kind} {number} p={finding.probability:.2f} ({NOT_FOR_DIAGNOSIS})"[:64],
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=label_box(ds, line),
                text_justification=hd.pr.TextJustificationValues.LEFT,
                anchor_point=_inside(cx, cy - radius, ds),
                anchor_point_visible=True,
                **tracking,
            )
        )
    return hd.pr.GraphicAnnotation(
        referenced_images=[ds],
        graphic_layer=layer,
        referenced_frame_number=frame_number(ds),  # None for a single-frame slice
        graphic_objects=graphics,
        text_objects=texts,
    )


def build_gsps(ctx: ResultContext, findings: list[Finding]) -> Dataset:
    """The presentation state of one series' findings.

    Parameters
    ----------
    ctx
        Sorted sources, geometry, algorithm.
    findings
        At least one finding.

    Returns
    -------
    pydicom.Dataset
        The GSPS instance.

    Raises
    ------
    ValueError
        No finding given.
    """
    if not findings:
        raise ValueError("a presentation state needs at least one finding")
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description="harmonode findings, " + NOT_FOR_DIAGNOSIS, display_color=COLOUR
    )
    by_slice: dict[int, list[tuple[int, Finding]]] = {}
    for number, finding in enumerate(findings, start=1):
        by_slice.setdefault(ctx.slice_of(finding), []).append((number, finding))
    annotations = [slice_annotation(ctx, ctx.sources[k], by_slice[k], layer) for k in sorted(by_slice)]
    # one reference per instance: the frames of a multi-frame source are named in the annotations
    referenced = list({str(ctx.sources[k].SOPInstanceUID): ctx.sources[k] for k in sorted(by_slice)}.values())
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=referenced,
        sop_instance_uid=ctx.uid("gsps"),
        instance_number=1,
        device_serial_number=ctx.algorithm.version[:64],
        content_label="HARMONODE",
        content_description=f"{ctx.algorithm.name} {ctx.algorithm.version}, {ctx.algorithm.rule_text}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        **ctx.common("gsps"),  # type: ignore[arg-type]
    )
    # Monochrome displays have no colour: white is the most visible grey (Type 3, beside the CIELab value).
    gsps.GraphicLayerSequence[0].GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    log.debug("GSPS over %d slice(s) built", len(referenced))
    return gsps
