"""Every patch the node applies to pynetdicom, in one place, each checked by tests/test_transport.py.

pynetdicom stays the DICOM library; what the node changes in it is here and nowhere else, and each patch has
a test that fails when an upgrade changes what the patch relies on (``PYNETDICOM_CHECKED`` names the
versions they were checked against):

1. Per-association socket tuning (``tune_socket``): Nagle off, a faster receive, a bound on the PDU size.
2. Sending stored files as stored (``send_stored_files``, ``StoredInstance``, ``enable_raw_sending``).

Socket tuning:

pynetdicom reads each PDU in 4 KiB ``recv`` calls from Python and trusts the length a peer declares;
a 128 KiB P-DATA PDU costs 32 calls, and a peer that declares a 4 GiB PDU can make it buffer whatever
it streams. On each new association socket (``EVT_CONN_OPEN``) the node sets TCP_NODELAY and replaces
that socket's ``recv`` with one that reads into a preallocated buffer in large chunks and refuses a
declared length above ``max_pdu_bytes`` (the connection is then closed as a transport error).
"""

from __future__ import annotations

import logging
import socket
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: The pynetdicom releases whose internals the patches below were read against (``major.minor``).
PYNETDICOM_CHECKED = ("3.0",)

DEFAULT_MAX_PDU_BYTES = 64 * 1024 * 1024  # far above any real PDU (DCMTK's largest is 128 KiB)


DUL_POLL_SECONDS = 0.0002


class PduTooLarge(OSError):
    """A peer declared a PDU larger than the node accepts."""


def _make_recv(max_pdu_bytes: int):  # noqa: ANN202 - returns a bound-method-shaped function
    def recv(self: Any, nr_bytes: int) -> bytearray:
        if nr_bytes > max_pdu_bytes:
            log.warning("peer declared a %d-byte PDU (limit %d): closing the connection", nr_bytes, max_pdu_bytes)
            raise PduTooLarge(f"PDU of {nr_bytes} bytes refused")
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock: socket.socket = self.socket
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:  # connection closed: return what arrived, as pynetdicom does
                return buf[:got]
            got += n
        return buf

    return recv


def tune_socket(event: evt.Event, max_pdu_bytes: int = DEFAULT_MAX_PDU_BYTES) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY, fast bounded receive (plain TCP; TLS sockets keep their own)."""
    assoc_sock = getattr(event.assoc.dul, "socket", None)
    raw = getattr(assoc_sock, "socket", None)
    if assoc_sock is None or raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    if type(raw) is socket.socket:  # an SSLSocket buffers internally; leave it to pynetdicom
        assoc_sock.recv = types.MethodType(_make_recv(max_pdu_bytes), assoc_sock)
    # The DUL thread sleeps this long whenever it finds nothing to do (1 ms by default): a store
    # response waits for it. A shorter poll costs some idle CPU per open association, which is short-lived.
    dul = event.assoc.dul
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_POLL_SECONDS


# -- sending stored files as stored -----------------------------------------------------------------------
def enable_raw_sending() -> None:
    """Make pynetdicom send a file path's encoded dataset as is (process-wide; set once by the node).

    pynetdicom sends a Part 10 file's bytes without decoding them only in its chunked mode
    (``_config.STORE_SEND_CHUNKED_DATASET``); every object the node sends (delivery, C-MOVE, C-GET) is a
    stored file.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True


class StoredInstance(Dataset):
    """A sub-operation's instance, named by its stored file; sent as the file's bytes, never re-encoded."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "stored_path", path)
        object.__setattr__(self, "stored_syntax", transfer_syntax_uid)


def _send_stored(original: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Wrap an association's ``send_c_store`` so a ``StoredInstance`` goes as its file's encoded bytes."""

    def send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if not isinstance(dataset, StoredInstance):
            return original(dataset, *args, **kwargs)
        path = dataset.stored_path
        exact = any(
            cx.as_scu and cx.abstract_syntax == dataset.SOPClassUID and cx.transfer_syntax[0] == dataset.stored_syntax
            for cx in self.accepted_contexts
        )
        if not exact:  # the peer accepted another transfer syntax: decode once and let pynetdicom convert
            log.debug("no exact presentation context for %s: sending converted", dataset.SOPInstanceUID)
            return original(dcmread(path), *args, **kwargs)
        enable_raw_sending()  # the exact context exists: the file's dataset goes as encoded
        return original(path, *args, **kwargs)

    return send_c_store


def send_stored_files(assoc: Association) -> None:
    """Let ``assoc.send_c_store`` take ``StoredInstance`` markers (idempotent: once per association)."""
    if getattr(assoc, "_harmonode_raw_send", False):
        return
    assoc.send_c_store = types.MethodType(_send_stored(assoc.send_c_store), assoc)  # type: ignore[method-assign]
    assoc._harmonode_raw_send = True  # type: ignore[attr-defined]


def prepare_store_association(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations that carry sub-operations (C-MOVE): socket tuning, raw sending."""
    tune_socket(event)
    send_stored_files(event.assoc)
