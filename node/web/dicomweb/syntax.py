"""Transfer syntaxes of WADO-RS answers: the stored bytes when the client accepts them, else pydicom's transcode.

A stored instance goes out exactly as stored when the client accepts ``transfer-syntax=*`` or the stored
syntax. Otherwise the node converts when pydicom can: any stored syntax it decodes to the uncompressed ones
(Explicit or Implicit VR Little Endian), and uncompressed pixel data to the lossless syntaxes it encodes
(RLE, JPEG-LS, JPEG 2000 lossless); anything else is a 406. Frames go out uncompressed (little endian, the
default of ``application/octet-stream``) unless the client accepts the stored compressed form.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.pixels import get_decoder, get_encoder, pack_bits, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

AS_STORED = "*"
DEFAULT_SYNTAX = str(ExplicitVRLittleEndian)  # PS3.18 8.7.3.5.2: when a range names none
UNCOMPRESSED = frozenset(str(u) for u in (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
NATIVE = UNCOMPRESSED | {str(DeflatedExplicitVRLittleEndian), str(ExplicitVRBigEndian)}
ENCODABLE = frozenset(str(u) for u in (RLELossless, JPEGLSLossless, JPEG2000Lossless))


class NotAcceptable(ValueError):
    """No transfer syntax the client accepts can be produced from what is stored."""


def _decodable(stored: str) -> bool:
    if stored in NATIVE:
        return True
    try:
        return bool(get_decoder(UID(stored)).is_available)
    except (NotImplementedError, ValueError):
        return False


def _encodable(target: str) -> bool:
    try:
        return target in ENCODABLE and bool(get_encoder(UID(target)).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_deliver(stored: str, target: str, has_pixels: bool) -> bool:
    """Whether an instance stored in ``stored`` can be sent in ``target``."""
    if target in (AS_STORED, stored):
        return True
    if target in UNCOMPRESSED:
        return not has_pixels or _decodable(stored)
    return has_pixels and stored in NATIVE and _encodable(target)


def choose(stored: str, wanted: list[str], has_pixels: bool) -> str:
    """The syntax to send: the first of ``wanted`` (in the client's order) that can be delivered.

    ``*`` in ``wanted`` becomes ``stored``.

    Raises
    ------
    NotAcceptable
        None of ``wanted`` can be produced.
    """
    for target in wanted:
        if can_deliver(stored, target, has_pixels):
            return stored if target == AS_STORED else target
    raise NotAcceptable(f"stored as {stored}; none of {', '.join(wanted) or 'the accepted syntaxes'} can be produced")


def transcode(data: bytes, target: str) -> bytes:
    """A Part 10 file re-encoded in ``target`` (decompressed, re-encoded or compressed losslessly)."""
    ds = dcmread(BytesIO(data))
    stored = str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" in ds and UID(stored).is_compressed:
        ds.decompress()  # to Explicit VR Little Endian, PhotometricInterpretation updated
    if target in ENCODABLE:
        ds.compress(UID(target))
    else:
        ds.file_meta.TransferSyntaxUID = UID(target)
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def frame_count(ds: Dataset) -> int:
    """Number of frames of an image (1 when NumberOfFrames is absent)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_bytes(ds: Dataset, number: int, compressed_ok: bool) -> tuple[bytes, str]:
    """One frame (1-based) of a fully read image and the syntax it is in.

    The stored compressed frame when ``compressed_ok``, else the uncompressed little-endian pixels
    (bit-packed for BitsAllocated 1, as in the pixel data element).
    """
    stored = str(ds.file_meta.TransferSyntaxUID)
    count = frame_count(ds)
    if UID(stored).is_compressed and compressed_ok:
        for n, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=count), start=1):
            if n == number:
                return frame, stored
        raise IndexError(number)
    bits = int(ds.BitsAllocated)
    if stored in UNCOMPRESSED | {str(DeflatedExplicitVRLittleEndian)} and bits % 8 == 0:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
        raw = ds.PixelData
        return bytes(raw[(number - 1) * size : number * size]), DEFAULT_SYNTAX
    pixels = pixel_array(ds, index=number - 1, raw=True)
    if bits == 1:
        return pack_bits(pixels), DEFAULT_SYNTAX
    dtype = pixels.dtype.newbyteorder("<")
    return np.ascontiguousarray(pixels, dtype=dtype).tobytes(), DEFAULT_SYNTAX
