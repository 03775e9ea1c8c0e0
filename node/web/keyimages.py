"""A finding's key image for the console: the node's key-image Secondary Capture, rendered as PNG.

``handlers.results.sc`` writes one SC per finding (Instance Number = the finding's number in its series) in a
result series of the source study, each referencing its source slice (Source Image Sequence). The console
finds the SC of finding N of a source series by those two facts and sends its pixels as PNG: the circle,
the label and "NOT FOR DIAGNOSIS" are burned into the image, so what the browser shows is what PACS holds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from storage.files import FileStore
from storage.index import Index

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def key_image_path(index: Index, files: FileStore, series_uid: str, number: int) -> Path | None:
    """The stored key-image SC of finding ``number`` of source series ``series_uid``, or None.

    Parameters
    ----------
    index, files
        The node's index and file store.
    series_uid
        The analysed (source) series.
    number
        The finding's number in that series (1..), as its SR and SC number it.
    """
    series = index.series(series_uid)
    if series is None:
        return None
    sources = {r["sop_instance_uid"] for r in index.instances_of_series(series_uid)}
    candidates = index.query(
        "SELECT i.path, i.version FROM instances i JOIN series s ON s.series_instance_uid = i.series_instance_uid"
        " WHERE s.study_instance_uid = ? AND s.origin = 'result' AND i.sop_class_uid = ? AND i.instance_number = ?"
        " ORDER BY i.version DESC",
        (series["study_instance_uid"], SECONDARY_CAPTURE, number),
    )
    for row in candidates:
        path = files.abspath(row["path"])
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError):
            continue
        refs = ds.get("SourceImageSequence") or []
        if any(str(item.get("ReferencedSOPInstanceUID", "")) in sources for item in refs):
            return path
    return None


def png_of(path: Path) -> bytes:
    """The pixels of a stored key image (RGB or monochrome, 8 bits) as PNG bytes.

    Raises
    ------
    ValueError
        The file holds no pixel data the console can show.
    """
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("the key image has no pixel data")
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 4:  # a multi-frame image: its first frame
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) / max(hi - lo, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
