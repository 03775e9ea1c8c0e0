"""The learning server (seed 004, claim 20): a real ``learn serve`` (uvicorn on a free loopback port) receiving
from the node's real export path (``add_export`` → ``export`` jobs → the dispatcher's HTTP POST). Each record is
kept once, across a server restart and a POST repeated under its key; a wrong token is refused (401) and the
node dead-letters it; a record with any key beyond the contract is refused and nothing is stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import make_config
from models.features import compress_features
from node.app import Node
from node.web.learning import learning_server
from peers import free_port, wait_until
from storage.exports import ExportTrigger, add_export, build_record
from storage.learning import RecordStore, token_hash

REPO = Path(__file__).resolve().parents[1]


def _record(n: int, condition: str = "CT|siemens|hr64|chest") -> dict:
    vector = np.random.default_rng(n).random(384).astype(np.float32)
    return build_record(
        ExportTrigger.FEEDBACK,
        compress_features(vector),
        384,
        "float16+zlib",
        {"kind": "nodule", "probability": 0.61, "diameter_mm": 6.0},
        {"assessment": "rejected", "kind": "nodule", "diameter_mm": 6.0},
        0.2,
        "1.4.0",
        condition,
    )


def _post(url: str, body: bytes, token: str, key: str) -> int:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}", "Idempotency-Key": key}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _jobs(node: Node) -> list[dict]:
    return [j for j in node.queue.jobs() if j["kind"] == "export"]


def test_node_delivers_each_record_once_across_a_server_restart(tmp_path):
    port = free_port()
    store = RecordStore(tmp_path / "learn")
    token = store.add_node("site-a")
    server = learning_server(store, port=port)
    server.start()
    cfg = make_config(
        tmp_path / "node", learning={"learning_server": f"http://127.0.0.1:{port}/records", "learning_token": token}
    )
    node = Node(cfg)
    node.start(("dispatch",))
    try:
        settings = cfg.learning.export_settings
        ids = [add_export(node.index, node.queue, settings, _record(n), f"f{n}", f"f{n}:fb") for n in range(2)]
        wait_until(lambda: all(j["state"] == "done" for j in _jobs(node)) and len(_jobs(node)) == 2, timeout=30)
        assert store.count() == 2
        server.stop()
        store.close()
        late = add_export(node.index, node.queue, settings, _record(2), "f2", "f2:fb")
        wait_until(
            lambda: any(j["attempts"] >= 1 and "unreachable" in j["last_error"] for j in _jobs(node)),
            timeout=30,
            what="a failed attempt while the server is down",
        )
        store = RecordStore(tmp_path / "learn")  # the server restarts on its data folder
        server = learning_server(store, port=port)
        server.start()
        wait_until(lambda: all(j["state"] == "done" for j in _jobs(node)), timeout=30, what="delivery after restart")
        # a stray twin of a delivered record: the server answers 200 and stores nothing
        node.queue.enqueue("export", "server:" + ids[0] + ":again", {"record_id": ids[0], "target": "server"})
        wait_until(lambda: all(j["state"] == "done" for j in _jobs(node)), timeout=30, what="the twin")
        sent = {r["record_id"]: json.loads(r["body"]) for r in node.index.query("SELECT record_id, body FROM exports")}
    finally:
        node.stop()
        server.stop()
    kept = list(store.records())
    store.close()
    assert sorted(r.key for r in kept) == sorted([*ids, late])
    assert {r.node for r in kept} == {"site-a"}
    assert all(r.record == sent[r.key] for r in kept)  # as the node made it, field for field


def test_a_wrong_token_is_refused_and_dead_lettered(tmp_path):
    port = free_port()
    store = RecordStore(tmp_path / "learn")
    store.add_node("site-a")
    server = learning_server(store, port=port)
    server.start()
    cfg = make_config(
        tmp_path / "node",
        learning={"learning_server": f"http://127.0.0.1:{port}/records", "learning_token": "not-the-token-of-any-node"},
    )
    node = Node(cfg)
    node.start(("dispatch",))
    try:
        add_export(node.index, node.queue, cfg.learning.export_settings, _record(1), "f1", "f1:fb")
        job = wait_until(lambda: next((j for j in _jobs(node) if j["state"] == "dead"), None), timeout=30)
        assert "401" in job["last_error"]
        assert store.count() == 0
    finally:
        node.stop()
        server.stop()
        store.close()


@pytest.mark.parametrize(
    "change",
    [
        {"patient_id": "PAT-1234"},  # an extra key: the privacy contract
        {"features": "bm90IHpsaWI="},  # not compressed features
        {"feature_length": 100},  # a length the features do not have
        {"changed": {"assessment": "rejected", "center_mm": [1.0, 2.0, 3.0]}},  # a coordinate
        {"reliability": 3.0},
    ],
)
def test_records_outside_the_contract_are_refused_and_nothing_is_kept(tmp_path, change):
    port = free_port()
    store = RecordStore(tmp_path / "learn")
    token = store.add_node("site-a")
    server = learning_server(store, port=port)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}/records"
        body = json.dumps({**_record(0), **change}).encode()
        assert _post(url, body, token, "a" * 32) == 400
        assert _post(url, json.dumps(_record(0)).encode(), token, "b" * 32) == 201
        assert _post(url, json.dumps(_record(0)).encode(), token, "b" * 32) == 200
        assert _post(url, json.dumps(_record(0)).encode(), token, "no key!") == 400
        assert _post(url, json.dumps(_record(0)).encode(), "", "c" * 32) == 401
        assert store.count() == 1
    finally:
        server.stop()
        store.close()


def test_tokens_are_kept_hashed_and_the_cli_serves_from_a_tokens_file(tmp_path):
    data = tmp_path / "learn"
    with RecordStore(data) as store:
        token = store.add_node("site-b")
    raw = (data / "records.sqlite").read_bytes() + b"".join(
        p.read_bytes() for p in data.glob("records.sqlite-*") if p.is_file()
    )
    assert token.encode() not in raw and token_hash(token).encode() in raw
    other = "a-token-given-by-configuration-management"
    (tmp_path / "tokens").write_text(f"# node hash\nsite-c {token_hash(other)}\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "learn", "serve", "--data", str(data), "--port", str(port),
         "--tokens", str(tmp_path / "tokens")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/records"

        def answered() -> int | None:
            try:
                return _post(url, json.dumps(_record(3)).encode(), other, "d" * 32)
            except (urllib.error.URLError, OSError):
                return None

        assert wait_until(answered, timeout=60, what="the learning server's first answer") == 201
        assert _post(url, json.dumps(_record(4)).encode(), token, "e" * 32) == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    with RecordStore(data) as store:
        assert store.summary()["per_node"] == {"site-b": 1, "site-c": 1}
