"""The export queue: a record survives a learning-server outage and a node restart and is delivered once; the
folder target writes atomically. The learning server is a real HTTP server (``http.server`` in a thread)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_config
from node.app import Node
from peers import free_port, wait_until
from storage.exports import ExportSettings, ExportTrigger, add_export, build_record, write_record_file

TOKEN = "node-a-secret"


class LearningServer:
    """A tiny learning server: records every POST (path, headers, body) and answers 201."""

    def __init__(self, port: int) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(201 if self.headers.get("Authorization") == f"Bearer {TOKEN}" else 401)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LearningServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _record(n: int) -> dict:
    return build_record(
        ExportTrigger.LOW_RELIABILITY,
        bytes([n]) * 8,
        4,
        "float16+zlib",
        {"kind": "aneurysm", "probability": 0.7},
        None,
        0.1,
        "1.4.0",
        "CT|ge|standard",
    )


def _export_jobs(node: Node) -> list[dict]:
    return [j for j in node.queue.jobs() if j["kind"] == "export"]


def test_export_survives_a_server_outage_and_a_node_restart_and_is_delivered_once(tmp_path):
    port = free_port()
    cfg = make_config(
        tmp_path / "node", learning={"learning_server": f"http://127.0.0.1:{port}/records", "learning_token": TOKEN}
    )
    node = Node(cfg)
    node.start(("dispatch",))
    try:
        ids = [
            add_export(node.index, node.queue, cfg.learning.export_settings, _record(n), f"f{n}", f"f{n}:detected")
            for n in range(2)
        ]
        assert all(ids)
        # the server is down: the jobs fail, and wait to be retried
        wait_until(
            lambda: (
                all(j["attempts"] >= 1 and "unreachable" in j["last_error"] for j in _export_jobs(node))
                and len(_export_jobs(node)) == 2
            ),
            timeout=30,
            what="failed attempts while the server is down",
        )
    finally:
        node.stop()
    # the node restarts, and the server comes up
    with LearningServer(port) as server:
        node = Node(cfg)
        node.start(("dispatch",))
        try:
            wait_until(lambda: all(j["state"] == "done" for j in _export_jobs(node)), timeout=30, what="delivery")
            assert (
                add_export(node.index, node.queue, cfg.learning.export_settings, _record(0), "f0", "f0:detected")
                is None
            )
            node.queue.enqueue("export", "server:" + ids[0], {"record_id": ids[0], "target": "server"})  # a stray twin
            wait_until(lambda: all(j["state"] == "done" for j in _export_jobs(node)), timeout=30, what="the twin")
        finally:
            node.stop()
    keys = [r["headers"]["Idempotency-Key"] for r in server.received]
    assert sorted(set(keys)) == sorted(ids)
    # exactly once per record, except the twin queued by hand above, which carries the same key for the server
    assert keys.count(ids[1]) == 1 and keys.count(ids[0]) == 2
    for r in server.received:
        assert r["path"] == "/records" and r["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert json.loads(r["body"])["trigger"] == "low-reliability"


def test_a_refused_token_is_dead_lettered_with_the_status(tmp_path):
    port = free_port()
    cfg = make_config(
        tmp_path / "node", learning={"learning_server": f"http://127.0.0.1:{port}/", "learning_token": "x"}
    )
    with LearningServer(port):
        node = Node(cfg)
        node.start(("dispatch",))
        try:
            add_export(node.index, node.queue, cfg.learning.export_settings, _record(1), "f1", "f1:detected")
            job = wait_until(
                lambda: next((j for j in _export_jobs(node) if j["state"] == "dead"), None),
                timeout=30,
                what="the refused record dead-lettered",
            )
            assert "401" in job["last_error"]
        finally:
            node.stop()


def test_folder_target_writes_each_record_once_and_atomically(tmp_path):
    cfg = make_config(tmp_path / "node", learning={"export_dir": str(tmp_path / "out")})
    node = Node(cfg)
    node.start(("dispatch",))
    try:
        rid = add_export(node.index, node.queue, cfg.learning.export_settings, _record(2), "f2", "f2:detected")
        wait_until(lambda: (tmp_path / "out" / f"{rid}.json").exists(), timeout=30, what="the record file")
    finally:
        node.stop()
    assert json.loads((tmp_path / "out" / f"{rid}.json").read_text()) == _record(2)
    write_record_file(tmp_path / "out", rid, b"{}")  # a rerun replaces it whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{rid}.json"]  # no temp file left
    with pytest.raises(ValueError):
        write_record_file(tmp_path / "out", "../escape", b"{}")


def test_a_record_with_any_other_key_is_refused(tmp_path):
    from storage.index import Index
    from storage.queue import JobQueue

    index, queue = Index(tmp_path / "i.sqlite"), JobQueue(tmp_path / "q.sqlite")
    record = {**_record(3), "patient_id": "P1"}
    with pytest.raises(ValueError, match="exactly the keys"):
        add_export(index, queue, ExportSettings(export_dir=str(tmp_path)), record, "f3", "f3:detected")
