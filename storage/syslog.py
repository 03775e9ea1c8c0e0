"""Audit messages forwarded to a syslog collector: RFC 5424 messages over UDP (RFC 5426), as IHE ATNA sends them.

Each message is ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML``: facility 10 (security/authorization),
severity 5 (notice) for a success and 4 (warning) otherwise, MSGID ``IHE+RFC-3881`` (the ATNA profile's). UDP
delivers at most once; the hash-chained file (``storage.audit``) stays the record, the collector a copy.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

FACILITY = 10  # security/authorization messages (RFC 5424 table 1)
MSGID = "IHE+RFC-3881"
MAX_BYTES = 65000  # what one UDP datagram can carry; longer messages are cut (and said so in the log)


class SyslogTarget:
    """Where audit messages are copied: ``udp://HOST:PORT`` (default port 514)."""

    def __init__(self, url: str, app_name: str = "harmonode") -> None:
        parts = urlsplit(url)
        if parts.scheme != "udp" or not parts.hostname:
            raise ValueError(f"audit syslog target {url!r}: give udp://HOST[:PORT]")
        self.address = (parts.hostname, parts.port or 514)
        self.app_name = app_name[:48] or "-"
        self.hostname = (socket.gethostname() or "-")[:255]
        self._sock = socket.socket(socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET, socket.SOCK_DGRAM)

    def frame(self, message: str, ok: bool = True) -> bytes:
        """One RFC 5424 message carrying an audit message (UTF-8, with the BOM RFC 5424 asks for)."""
        pri = FACILITY * 8 + (5 if ok else 4)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        head = f"<{pri}>1 {stamp} {self.hostname} {self.app_name} {os.getpid()} {MSGID} - "
        return head.encode("ascii", "replace") + b"\xef\xbb\xbf" + message.encode("utf-8")

    def send(self, message: str, ok: bool = True) -> None:
        """Send one message; a network error is logged, never raised (the file already holds it)."""
        data = self.frame(message, ok)
        if len(data) > MAX_BYTES:
            log.warning("audit message of %d bytes cut to %d for syslog", len(data), MAX_BYTES)
            data = data[:MAX_BYTES]
        try:
            self._sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("audit message not sent to syslog %s:%d: %s", *self.address, exc)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
