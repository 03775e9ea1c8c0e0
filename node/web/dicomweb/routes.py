"""The DICOMweb resources under ``/dicom-web``: QIDO-RS, WADO-RS and STOW-RS bound to the node's storage.

Mounted into the node's one web application, they sit behind its ``AuthMiddleware``: HTTP Basic with a
console user's name and password, a bearer API token, or a console session (with its CSRF token for a
STOW-RS). Searching and retrieving need a user; storing needs the operator role. Each request that reads
or writes instances is one audit message (query, instances transferred) naming its studies by UID.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from handlers.query import BadIdentifier
from handlers.store import StoreLimits
from node.web.auth import caller_of, need
from node.web.dicomweb import qido, syntax, wado
from node.web.dicomweb.media import (
    DICOM,
    DICOM_JSON,
    MULTIPART,
    OCTET_STREAM,
    BadMultipart,
    multipart_content_type,
    multipart_stream,
    new_boundary,
    parse_accept,
    parse_media_range,
    parse_multipart,
)
from node.web.dicomweb.stow import Stow
from storage.audit import DESTINATION_ROLE, INSTANCES_TRANSFERRED, QUERY, SOURCE_ROLE, Outcome, Participant
from storage.files import FileStore, InvalidUID, check_uid
from storage.index import Index
from storage.users import Role

log = logging.getLogger(__name__)

PREFIX = "/dicom-web"


@dataclass
class DicomWebServices:
    """What DICOMweb is given: the storage of C-STORE, its limits, and the node's live parts (never the Node)."""

    files: FileStore
    index: Index
    limits: StoreLimits
    ae_title: str
    max_upload_bytes: int = 1024 * 1024 * 1024
    accepting: Callable[[], bool] = lambda: True  # False under disk back-pressure
    stored: Callable[[str, int], None] = lambda source, nbytes: None  # metrics and disk accounting
    refused: Callable[[int], None] = lambda status: None
    trail: Any = None  # storage.audit.AuditTrail when the audit trail is on


class _Refusal(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"error": detail}, status_code=status)


def _dicom_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type=DICOM_JSON, headers=headers)


def _base_url(request: Request) -> str:
    """The absolute URL of ``/dicom-web`` for Retrieve URLs and BulkDataURIs.

    From the Host header; when it names no port (dicomweb-client sends its host without one), the port
    the server listens on.
    """
    netloc = request.url.netloc
    server = request.scope.get("server")
    if request.url.port is None and server and server[1] not in (80, 443):
        netloc = f"{request.url.hostname}:{server[1]}"
    return f"{request.url.scheme}://{netloc}{PREFIX}"


def _uid(request: Request, name: str) -> str:
    value = request.path_params.get(name, "")
    if not value:
        return ""
    try:
        return check_uid(value, name)
    except InvalidUID as exc:
        raise _Refusal(400, str(exc)) from exc


def _source(request: Request) -> str:
    return f"dicomweb:{caller_of(request).user.name}"


class DicomWeb:
    """The endpoints, bound to their services."""

    def __init__(self, services: DicomWebServices) -> None:
        self.s = services
        self.stow = Stow(services.files, services.index, services.limits, services.accepting)

    # -- audit --------------------------------------------------------------------------------------------
    def _audit(self, request: Request, event: Any, action: str, studies: set[str], user_is_source: bool) -> None:
        if self.s.trail is None:
            return
        client = request.client.host if request.client else ""
        user_role = SOURCE_ROLE if user_is_source else DESTINATION_ROLE
        node_role = DESTINATION_ROLE if user_is_source else SOURCE_ROLE
        user = Participant(caller_of(request).user.name, True, client, user_role if event != QUERY else None)
        node = Participant(self.s.ae_title, False, role=node_role if event != QUERY else None)
        try:
            self.s.trail.record(event, action, Outcome.SUCCESS, [user, node], studies=sorted(studies))
        except Exception:
            log.exception("audit: a DICOMweb request could not be recorded")

    # -- QIDO-RS ------------------------------------------------------------------------------------------
    def _search(self, level: str) -> Callable[[Request], Response]:
        def search(request: Request) -> Response:
            # always dicom+json: a browser asking for text/html gets it too rather than a 406
            try:
                fixed = {
                    k: v
                    for k, v in (
                        ("StudyInstanceUID", _uid(request, "study")),
                        ("SeriesInstanceUID", _uid(request, "series")),
                    )
                    if v
                }
                query = qido.build_search(level, list(request.query_params.multi_items()), fixed)
                base = _base_url(request)
                found = qido.run_search(self.s.index, query, lambda *uids: _retrieve_url(base, *uids))
            except _Refusal as exc:
                return _error(exc.status, exc.detail)
            except BadIdentifier as exc:
                return _error(400, str(exc))
            studies = {str(m.get("0020000D", {}).get("Value", [""])[0]) for m in found} - {""}
            self._audit(request, QUERY, "E", studies, user_is_source=True)
            headers = {"Warning": ", ".join(query.warnings)} if query.warnings else None
            return _dicom_json(found, headers=headers)

        return search

    # -- WADO-RS ------------------------------------------------------------------------------------------
    def _stored(self, request: Request) -> list[wado.StoredInstance]:
        items = wado.instances(
            self.s.index, self.s.files, _uid(request, "study"), _uid(request, "series"), _uid(request, "instance")
        )
        if not items:
            raise _Refusal(404, "no such study, series or instance")
        return items

    def retrieve(self, request: Request) -> Response:
        """Instances of a study, series or instance as multipart/related application/dicom."""
        try:
            items = self._stored(request)
            wanted, single = wado.wanted_syntaxes(parse_accept(request.headers.get("accept", "")), DICOM)
            if not wanted:
                raise _Refusal(406, f"instances are sent as {MULTIPART}; type={DICOM}")
            wado.check_deliverable(items, wanted)
        except _Refusal as exc:
            return _error(exc.status, exc.detail)
        except syntax.NotAcceptable as exc:
            return _error(406, str(exc))
        self._audit(request, INSTANCES_TRANSFERRED, "R", {i.study_uid for i in items}, user_is_source=False)
        parts = wado.instance_parts(items, wanted, _base_url(request))
        if single and len(items) == 1 and request.headers.get("accept", "").strip().lower().startswith(DICOM):
            content_type, data, _ = next(parts)
            return Response(data, media_type=content_type)
        boundary = new_boundary()
        return StreamingResponse(
            _logged(multipart_stream(parts, boundary)), media_type=multipart_content_type(DICOM, boundary)
        )

    def metadata(self, request: Request) -> Response:
        """The stored headers of a study, series or instance as a dicom+json array."""
        try:
            items = self._stored(request)
        except _Refusal as exc:
            return _error(exc.status, exc.detail)
        base = _base_url(request)
        return _dicom_json([wado.metadata(item, base) for item in items])

    def frames(self, request: Request) -> Response:
        """Frames of an instance as multipart/related application/octet-stream."""
        try:
            item = self._stored(request)[0]
            numbers = wado.parse_frame_numbers(request.path_params["frames"])
            wanted, _ = wado.wanted_syntaxes(parse_accept(request.headers.get("accept", "")), OCTET_STREAM)
            if not wanted:
                raise _Refusal(406, f"frames are sent as {MULTIPART}; type={OCTET_STREAM}")
            parts = wado.frame_parts(item, numbers, wanted)
        except _Refusal as exc:
            return _error(exc.status, exc.detail)
        except ValueError as exc:
            if isinstance(exc, syntax.NotAcceptable):
                return _error(406, str(exc))
            return _error(400, str(exc))
        except IndexError as exc:
            return _error(404, f"the instance has no frame {exc}")
        return _multipart(parts, OCTET_STREAM)

    def bulk(self, request: Request) -> Response:
        """A top-level binary value of an instance (a metadata BulkDataURI) as application/octet-stream."""
        try:
            item = self._stored(request)[0]
            tag = int(request.path_params["tag"], 16)
            value = wado.bulk_value(item, tag)
        except _Refusal as exc:
            return _error(exc.status, exc.detail)
        except (ValueError, KeyError):
            return _error(404, "the instance has no such binary element")
        return _multipart([(OCTET_STREAM, value, "")], OCTET_STREAM)

    # -- STOW-RS ------------------------------------------------------------------------------------------
    async def store(self, request: Request) -> Response:
        """Store the application/dicom parts of a multipart/related request."""
        need(request, Role.OPERATOR)
        content_type = parse_media_range(request.headers.get("content-type", ""))
        if content_type.media_type != MULTIPART or content_type.part_type not in ("", DICOM):
            return _error(415, f"STOW-RS takes {MULTIPART}; type={DICOM}")
        try:
            study_uid = _uid(request, "study")
            body = await _read_body(request, self.s.max_upload_bytes)
            parts = parse_multipart(body, content_type.params.get("boundary", ""))
        except _Refusal as exc:
            return _error(exc.status, exc.detail)
        except BadMultipart as exc:
            return _error(400, str(exc))
        if not parts:
            return _error(400, "the request holds no part")
        source = _source(request)
        result = await run_in_threadpool(self.stow.store, parts, study_uid, source)
        for outcome in result.parts:
            if outcome.stored:
                self.s.stored(source, outcome.nbytes)
            else:
                self.s.refused(outcome.status)
        stored_studies = {p.study_uid for p in result.parts if p.stored}
        if stored_studies:
            self._audit(request, INSTANCES_TRANSFERRED, "C", stored_studies, user_is_source=True)
        return _dicom_json(result.body(_base_url(request), study_uid), status=result.http_status)

    # -- routes -------------------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """Every DICOMweb route, relative to the mount point."""
        study = "/studies/{study}"
        series = study + "/series/{series}"
        instance = series + "/instances/{instance}"
        return [
            Route("/studies", self._search("STUDY"), methods=["GET"]),
            Route("/studies", self.store, methods=["POST"]),
            Route("/series", self._search("SERIES"), methods=["GET"]),
            Route("/instances", self._search("IMAGE"), methods=["GET"]),
            Route(study, self.retrieve, methods=["GET"]),
            Route(study, self.store, methods=["POST"]),
            Route(study + "/metadata", self.metadata, methods=["GET"]),
            Route(study + "/series", self._search("SERIES"), methods=["GET"]),
            Route(study + "/instances", self._search("IMAGE"), methods=["GET"]),
            Route(series, self.retrieve, methods=["GET"]),
            Route(series + "/metadata", self.metadata, methods=["GET"]),
            Route(series + "/instances", self._search("IMAGE"), methods=["GET"]),
            Route(instance, self.retrieve, methods=["GET"]),
            Route(instance + "/metadata", self.metadata, methods=["GET"]),
            Route(instance + "/frames/{frames}", self.frames, methods=["GET"]),
            Route(instance + "/bulk/{tag}", self.bulk, methods=["GET"]),
        ]


def _retrieve_url(base: str, level: str, study: str, series: str, sop: str) -> str:
    if level == "STUDY":
        return f"{base}/studies/{study}"
    if level == "SERIES":
        return f"{base}/studies/{study}/series/{series}"
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def _multipart(parts: list[tuple[str, bytes, str]], part_type: str) -> Response:
    boundary = new_boundary()
    return Response(b"".join(multipart_stream(parts, boundary)), media_type=multipart_content_type(part_type, boundary))


def _logged(stream: Iterator[bytes]) -> Iterator[bytes]:
    """The stream, with a failure half-way (a file gone, a transcode error) logged before the connection drops."""
    try:
        yield from stream
    except Exception as exc:
        log.error("WADO-RS answer broken off: %s", type(exc).__name__)
        raise


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Refusal(413, f"a STOW-RS request may hold at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refusal(413, f"a STOW-RS request may hold at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def dicomweb_mount(services: DicomWebServices) -> Mount:
    """The DICOMweb routes mounted at ``/dicom-web``, for ``node.web.app.build_app(context, mounts)``."""
    return Mount(PREFIX, routes=DicomWeb(services).routes())


def node_dicomweb(
    files: FileStore,
    index: Index,
    limits: StoreLimits,
    ae_title: str,
    max_upload_bytes: int,
    disk: Any,
    metrics: Any,
    trail: Any = None,
) -> Mount:
    """The mount as the node wires it: disk back-pressure, metrics and the audit trail of its C-STORE path.

    Parameters
    ----------
    files, index, limits
        The file store, index and store limits the C-STORE SCP uses.
    ae_title
        The node's AE title (the audit trail names it).
    max_upload_bytes
        The largest STOW-RS request body (the DIMSE side's ``max_dataset_mb``).
    disk
        ``node.web.space.DiskSpace``: ``accepting()`` and ``consumed(nbytes)``.
    metrics
        ``node.web.metrics.NodeMetrics``: ``stored(source, nbytes)`` and ``refused(status)``.
    trail
        ``storage.audit.AuditTrail``, or None.
    """

    def stored(source: str, nbytes: int) -> None:
        metrics.stored(source, nbytes)
        disk.consumed(nbytes)

    services = DicomWebServices(
        files, index, limits, ae_title, max_upload_bytes, disk.accepting, stored, metrics.refused, trail
    )
    return dicomweb_mount(services)
