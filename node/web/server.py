"""The web application under uvicorn, in a thread of the node's process, started and stopped with it.

The listening socket is bound before the thread starts, so a port in use is an ``OSError`` at
``start()`` (the CLI turns it into an error that names the port), and ``[web] port = 0`` gets a free port
that ``start()`` returns.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from node.config import WebConfig

log = logging.getLogger(__name__)


class WebServer:
    """One uvicorn server for one application."""

    def __init__(self, app: Starlette, settings: WebConfig) -> None:
        self.app = app
        self.settings = settings
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        """``https`` when the server holds a certificate, else ``http``."""
        return "https" if self.settings.tls_cert_file and self.settings.tls_key_file else "http"

    def start(self, timeout_s: float = 10.0) -> int:
        """Bind, serve in a thread, and return the port once the server accepts connections.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, no such address).
        RuntimeError
            The server did not start within ``timeout_s``.
        """
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        self.port = int(sock.getsockname()[1])
        tls = {"ssl_certfile": s.tls_cert_file, "ssl_keyfile": s.tls_key_file} if self.scheme == "https" else {}
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,  # paths name study and series UIDs; who did what goes to the audit trail
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            **tls,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"web server on {s.host}:{self.port} did not start")
            time.sleep(0.02)
        log.info("console and metrics on %s://%s:%d/", self.scheme, s.host, self.port)
        return self.port

    def alive(self) -> bool:
        """Whether the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to finish its requests and exit; wait for its thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=2)
        self._server = None
        self._thread = None
