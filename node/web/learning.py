"""The learning server (seed 004, claim 20): an HTTP endpoint many nodes POST their export records to.

``learning_app(store)`` is its Starlette application:

- ``POST /records`` (the node's ``[learning] learning_server`` URL): ``Authorization: Bearer <token>`` names the
  node (a token per node, kept hashed in ``storage.learning.RecordStore``), ``Idempotency-Key`` names the
  record. 201: kept; 200: the same key was kept before (nothing is stored twice); 401: no or unknown token;
  400: no key, or a record the contract refuses (``storage.learning.check_record``; the reason, never a
  value); 413: a body over 64 KiB; 415: not JSON.
- ``GET /healthz``: ``{"records": N}`` (no node names: anyone may ask).

``serve_learning`` runs it under uvicorn (``node.web.server.WebServer``), HTTPS when a certificate and key are
given. Nothing about the request but the token's node name and the record is kept: no address, no header.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from node.config import WebConfig
from node.web.server import WebServer
from storage.learning import RecordRefused, RecordStore, UnknownToken, check_key

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # a record is a few hundred bytes of features and a few fields


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def learning_app(store: RecordStore) -> Starlette:
    """The learning server's application over ``store``.

    Parameters
    ----------
    store
        Where records and node tokens are kept.

    Returns
    -------
    starlette.applications.Starlette
    """

    async def receive(request: Request) -> JSONResponse:
        token = _bearer(request)
        try:
            node = store.node_for(token) if token else ""
        except UnknownToken:
            node = ""
        if not node:
            log.warning("record refused: no or unknown bearer token")
            return JSONResponse({"error": "unknown token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            return JSONResponse({"error": f"a record is at most {MAX_BODY} bytes"}, status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": f"a record is at most {MAX_BODY} bytes"}, status_code=413)
        try:
            key = check_key(request.headers.get("idempotency-key", ""))
        except RecordRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            record = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "the body is not JSON"}, status_code=415)
        try:
            new = store.add(node, key, record)
        except RecordRefused as exc:
            log.warning("record %s from node %s refused: %s", key, node, exc)
            return JSONResponse({"error": f"record refused: {exc}"}, status_code=400)
        if new:
            log.info("record %s from node %s kept", key, node)
            return JSONResponse({"record": key, "stored": True}, status_code=201)
        log.info("record %s from node %s was kept before: nothing stored", key, node)
        return JSONResponse({"record": key, "stored": False, "duplicate": True}, status_code=200)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"records": store.count()})

    return Starlette(routes=[Route("/records", receive, methods=["POST"]), Route("/healthz", health)])


def learning_server(
    store: RecordStore, host: str = "127.0.0.1", port: int = 8090, cert_file: str = "", key_file: str = ""
) -> WebServer:
    """The learning server as a ``WebServer`` (not started): HTTPS when ``cert_file`` and ``key_file`` are given.

    Raises
    ------
    ValueError
        Only one of ``cert_file`` and ``key_file``, or one that does not exist.
    """
    if bool(cert_file) != bool(key_file):
        raise ValueError("TLS needs both a certificate (--cert) and its key (--key)")
    for path in (cert_file, key_file):
        if path and not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
    settings = WebConfig(host=host, port=port, tls_cert_file=cert_file, tls_key_file=key_file)
    return WebServer(learning_app(store), settings)
