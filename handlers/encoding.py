"""What the C-STORE SCP checks of the bytes before it keeps them: the encoding, inflation, the pixel data.

A peer can send bytes that do not match the presentation context (explicit-VR elements on an implicit-VR
context), a deflated dataset that inflates without bound, or uncompressed pixel data shorter (or longer)
than its image size says. pydicom reads the first kind by guessing and the last as far as it goes, so
such instances would be acknowledged and kept in a form that DCMTK, or the node's own pipeline, cannot
read. Each check raises ``EncodingRefused`` with a reason free of patient identity; the store answers it
with a failure status and quarantines the bytes.
"""

from __future__ import annotations

import zlib
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

_VRS = frozenset(v.value.encode("ascii") for v in VR if len(v.value) == 2)
PREAMBLE_AND_PREFIX = 132  # 128-byte preamble + "DICM"
_META_GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL 4: tag 4 + VR 2 + length 2 + value 4
_INFLATE_CHUNK = 1 << 20


class EncodingRefused(ValueError):
    """The bytes do not hold what their transfer syntax and header say; the message says what is wrong."""


def dataset_offset(encoded: bytes) -> int:
    """Where the dataset starts after the Part 10 preamble and file meta of ``encoded``.

    Read from the file meta's group length, (0002,0000) UL, the first element after the prefix in the
    form the C-STORE SCP builds.

    Raises
    ------
    EncodingRefused
        The bytes do not begin with a preamble, ``DICM`` and a file meta group length.
    """
    head = encoded[PREAMBLE_AND_PREFIX - 4 : PREAMBLE_AND_PREFIX + _META_GROUP_LENGTH_ELEMENT]
    if len(head) < 16 or head[:4] != b"DICM" or head[4:10] != b"\x02\x00\x00\x00UL":
        raise EncodingRefused("the file meta does not start with its group length")
    return PREAMBLE_AND_PREFIX + _META_GROUP_LENGTH_ELEMENT + int.from_bytes(head[12:16], "little")


def check_inflation(encoded: bytes, start: int, transfer_syntax_uid: str, max_bytes: int) -> None:
    """Refuse a deflated dataset that inflates beyond ``max_bytes`` (inflated in bounded steps, then dropped).

    Raises
    ------
    EncodingRefused
        The dataset inflates past the limit or is not a valid deflate stream.
    """
    if transfer_syntax_uid != DeflatedExplicitVRLittleEndian or max_bytes <= 0:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    pending = memoryview(encoded)[start:]
    try:
        while pending:
            size += len(inflater.decompress(pending, _INFLATE_CHUNK))
            pending = memoryview(inflater.unconsumed_tail)
            if size > max_bytes:
                raise EncodingRefused(f"deflated dataset inflates past {max_bytes} bytes")
    except zlib.error as exc:
        raise EncodingRefused("deflated dataset is not a valid deflate stream") from exc


def check_explicitness(encoded: bytes, start: int, transfer_syntax_uid: str) -> None:
    """Refuse a dataset whose first element is not encoded as the transfer syntax says (implicit/explicit VR).

    An explicit-VR element carries a two-letter VR after its tag; read as implicit VR, those letters and
    the short length become a 4-byte length far beyond the data (and the other way round).

    Raises
    ------
    EncodingRefused
        The first element contradicts the negotiated transfer syntax.
    """
    uid = UID(transfer_syntax_uid)
    if uid == DeflatedExplicitVRLittleEndian or not uid.is_transfer_syntax or len(encoded) < start + 8:
        return
    head = encoded[start : start + 8]
    looks_explicit = head[4:6] in _VRS
    if uid == ImplicitVRLittleEndian or uid.is_implicit_VR:
        implicit_length = int.from_bytes(head[4:8], "little")
        if looks_explicit and implicit_length != 0xFFFFFFFF and start + 8 + implicit_length > len(encoded):
            raise EncodingRefused("the dataset is explicit VR but the presentation context is implicit VR")
    elif not looks_explicit:
        raise EncodingRefused("the dataset is not explicit VR as its transfer syntax says")


def check_pixel_data(ds: Dataset, total: int, transfer_syntax_uid: str) -> None:
    """Refuse uncompressed pixel data whose length is not rows × columns × samples × frames × bits.

    Parameters
    ----------
    ds
        The dataset read with ``defer_size`` (so the pixel data's value position and length are known).
    total
        The length of the encoded bytes (a value that runs past them is truncated).
    transfer_syntax_uid
        The negotiated syntax; encapsulated (compressed) pixel data is not checked here.

    Raises
    ------
    EncodingRefused
        Truncated, or of another length than the image attributes say.
    """
    if "PixelData" not in ds:
        return
    element: Any = ds.get_item("PixelData", keep_deferred=True)  # a deferred value keeps its length and position
    length, tell = getattr(element, "length", None), getattr(element, "value_tell", None)
    deflated = transfer_syntax_uid == DeflatedExplicitVRLittleEndian  # positions are in the inflated stream
    if not deflated and length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > total:
        raise EncodingRefused("pixel data is truncated: its length runs past the end of the dataset")
    if UID(transfer_syntax_uid).is_compressed or length in (None, 0xFFFFFFFF):
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodingRefused("pixel data without a readable image size (Rows, Columns, BitsAllocated)") from exc
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if length not in (expected, expected + expected % 2):
        raise EncodingRefused(f"pixel data holds {length} bytes where the image attributes need {expected}")
