"""The ``export`` job: deliver one export record (seed 004) to the learning folder or the learning server.

The folder gets ``<record_id>.json``, written atomically. The server gets an HTTP POST of the record (JSON)
with ``Authorization: Bearer <token>`` and ``Idempotency-Key: <record_id>``, so a record posted twice (the
node stopped between the server's answer and the job's completion) is one record to a server that keys on
it. A server that cannot be reached, times out or answers 5xx, 408 or 429 means retry with backoff (the
queue's); any other answer but 2xx means the record can never be taken (dead-lettered, with the status).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

from storage.exports import ExportSettings, ExportTarget, export_body, write_record_file
from storage.index import Index
from storage.queue import GiveUp, Job, RetryLater

log = logging.getLogger(__name__)

_RETRY_STATUSES = {408, 425, 429}


def post_record(url: str, record_id: str, body: bytes, token: str = "", timeout_s: float = 10.0) -> int:
    """POST one record to the learning server; return its HTTP status.

    Raises
    ------
    RetryLater
        Unreachable, timed out, or an answer worth retrying (5xx, 408, 425, 429).
    GiveUp
        Any other answer that is not 2xx (a refused token, a malformed URL).
    """
    headers = {"Content-Type": "application/json", "Idempotency-Key": record_id}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    except ValueError as exc:
        raise GiveUp(f"learning server URL {url!r} is invalid: {exc}") from exc
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (configured URL)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in _RETRY_STATUSES:
            raise RetryLater(f"learning server answered {exc.code} {exc.reason}") from exc
        raise GiveUp(f"learning server refused the record: {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RetryLater(f"learning server {url} unreachable: {reason}") from exc


def export_job(job: Job, index: Index, settings: ExportSettings) -> None:
    """The ``export`` job: one record to one target (``folder`` or ``server``), safe to run twice.

    Raises
    ------
    RetryLater, GiveUp
        As ``post_record``; ``GiveUp`` also for a record or target that no longer exists.
    """
    record_id = str(job.payload.get("record_id") or "")
    target = str(job.payload.get("target") or "")
    body = export_body(index, record_id)
    if body is None:
        raise GiveUp(f"export record {record_id!r} is not in the index")
    if target == ExportTarget.FOLDER:
        if not settings.export_dir:
            raise GiveUp("no [learning] export_dir is configured any more")
        try:
            path = write_record_file(settings.export_dir, record_id, body)
        except OSError as exc:
            raise RetryLater(f"cannot write to [learning] export_dir: {exc}") from exc
        log.info("export record %s written to %s", record_id, path.parent)
    elif target == ExportTarget.SERVER:
        if not settings.learning_server:
            raise GiveUp("no [learning] learning_server is configured any more")
        status = post_record(settings.learning_server, record_id, body, settings.token, settings.timeout_s)
        log.info("export record %s delivered to the learning server (%d)", record_id, status)
    else:
        raise GiveUp(f"unknown export target {target!r}")
