"""Media types of DICOMweb: the Accept header, multipart/related bodies read and written (PS3.18 8.7, 8.6.1).

An Accept header is a list of media ranges, each with parameters (``type``, ``transfer-syntax``, ``q``);
``multipart/related; type="application/dicom"; transfer-syntax=*`` is one range, quoted or not (OHIF sends
``type=application/octet-stream`` unquoted). A multipart/related body is parsed in memory, binary-safe: the
parts are what lies between ``CRLF--boundary`` delimiters (RFC 2046 5.1.1).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"


class BadMultipart(ValueError):
    """A request body that is not a multipart/related message this server can read."""


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header (or one Content-Type), lower-cased, with its parameters."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def quality(self) -> float:
        """The ``q`` weight (1 when absent or unreadable)."""
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 1.0

    @property
    def part_type(self) -> str:
        """The media type of the parts of a multipart range (its ``type`` parameter), or ``""``."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str:
        """The ``transfer-syntax`` parameter, or ``""`` when absent."""
        return self.params.get("transfer-syntax", "")


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_media_range(text: str) -> MediaRange:
    """One media type with its parameters, e.g. ``multipart/related; type="application/dicom"``."""
    pieces = _split_outside_quotes(text, ";")
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        if name.strip():
            params[name.strip().lower()] = value.strip().strip('"')
    return MediaRange(pieces[0].strip().lower(), params)


def parse_accept(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header, highest ``q`` first (stable otherwise); ``*/*`` when empty."""
    ranges = [parse_media_range(p) for p in _split_outside_quotes(header or "", ",") if p.strip()]
    ranges = [r for r in ranges if r.quality > 0]
    if not header or not header.strip():
        ranges = [MediaRange("*/*")]
    return sorted(ranges, key=lambda r: -r.quality)


def parse_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body: (headers with lower-case names, content) each.

    Raises
    ------
    BadMultipart
        No boundary, no opening delimiter, a part without a header block, or no closing delimiter.
    """
    if not boundary:
        raise BadMultipart("the Content-Type has no boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise BadMultipart("the body does not start with the boundary of its Content-Type")
    parts: list[tuple[dict[str, str], bytes]] = []
    position = start + len(delimiter)
    closed = False
    while True:
        if body[position : position + 2] == b"--":
            closed = True
            break
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            break
        end = body.find(b"\r\n" + delimiter, line_end)
        if end < 0:
            break
        chunk = body[line_end + 2 : end]
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            if not chunk.startswith(b"\r\n"):
                raise BadMultipart(f"part {len(parts) + 1} has no header block")
            head, content = b"", chunk[2:]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
        position = end + 2 + len(delimiter)
    if not closed:
        raise BadMultipart("the body ends before its closing boundary")
    return parts


def new_boundary() -> str:
    """A boundary no stored byte sequence is expected to contain."""
    return "harmonode-" + secrets.token_hex(16)


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str = "") -> str:
    """The Content-Type of a multipart/related answer whose parts are ``part_type``."""
    value = f'{MULTIPART}; type="{part_type}"; boundary={boundary}'
    return value + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def multipart_stream(parts: Iterable[tuple[str, bytes, str]], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related answer: (Content-Type, content, Content-Location) per part, streamed."""
    for content_type, content, location in parts:
        head = f"--{boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        yield (head + f"Content-Length: {len(content)}\r\n\r\n").encode("latin-1")
        yield content
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
