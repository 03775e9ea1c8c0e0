"""Per-association socket tuning: Nagle off, a faster receive, and a bound on the PDU size.

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
from typing import Any

from pynetdicom import evt

log = logging.getLogger(__name__)

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
