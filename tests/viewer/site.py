"""OHIF's prebuilt ``dist`` served on loopback, with ``/dicom-web`` passed through to the node, as nginx would.

OHIF's bundle refers to its assets from the site root, and a browser sends its Authorization header only
to the origin it fetches from without a CORS preflight the node would refuse; so one small server serves
both: the files of ``dist`` (``app-config.js`` written for the node) and, byte for byte, every
``/dicom-web`` request and answer (the browser's Authorization header included: the node checks it).
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DIST = Path(__file__).parent / "node_modules" / "@ohif" / "app" / "dist"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


def app_config() -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, the node's ``/dicom-web`` on this origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "harmonode",
        "configuration": {
            "friendlyName": "harmonode",
            "name": "harmonode",
            "wadoUriRoot": "/dicom-web",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "strictZSpacingForVolumeViewport": False,
        "defaultDataSourceName": "harmonode",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class ViewerSite:
    """The static server and pass-through, on a free loopback port, in a thread."""

    def __init__(self, dist: Path, node_port: int) -> None:
        self.dist = dist
        self.node_port = node_port
        self.config = app_config().encode()
        self.proxied: list[tuple[str, int]] = []  # (path, status) of every /dicom-web request
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                if self.path.startswith("/dicom-web"):
                    site._pass_through(self)
                else:
                    site._file(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="ohif-site", daemon=True)

    @property
    def url(self) -> str:
        """Where the viewer answers."""
        return f"http://127.0.0.1:{self.port}"

    def _file(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        if path == "/app-config.js":
            body, kind = self.config, "application/javascript"
        else:
            target = (self.dist / path.lstrip("/")).resolve()
            if not target.is_file() or self.dist.resolve() not in target.parents:
                target = self.dist / "index.html"  # the viewer's own routes (/viewer?StudyInstanceUIDs=…)
            body = target.read_bytes()
            kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _pass_through(self, handler: BaseHTTPRequestHandler) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.node_port, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = f"127.0.0.1:{self.port}"
        upstream.request("GET", handler.path, headers=headers)
        answer = upstream.getresponse()
        body = answer.read()
        self.proxied.append((handler.path, answer.status))
        handler.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser dropped the request (a page closed, a prefetch cancelled)
        upstream.close()

    def start(self) -> ViewerSite:
        """Serve in a thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
