"""Delivery of results: C-STORE SCU from the durable queue, retries, dead letters, and a real Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from builders import ALGORITHM, geometry_of, make_ct_series, make_findings
from conftest import make_config
from handlers.results import build_results
from handlers.send import DeliveryError, c_store
from node.app import Node
from node.config import Destination
from peers import Orthanc, free_port, wait_until
from storage.deliveries import (
    DEAD,
    FAILED,
    SENT,
    deliveries,
    delivery_status,
    enqueue_deliveries,
    retry_dead_deliveries,
    store_results,
)
from storage.queue import DONE, SEND


@pytest.fixture(scope="module")
def results() -> list[Dataset]:
    """SR, two key images, GSPS and SEG of a synthetic CT series."""
    series = make_ct_series(seed=7)
    geometry = geometry_of(series)
    return build_results(series, geometry, make_findings(geometry), ALGORITHM, analysed=True, write_seg=True)


def _node(data: Path, port: int, **queue: float) -> Node:
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port)
    config = make_config(data, destinations=[dest], delivery={"backoff_base_s": 0.1, "backoff_max_s": 0.5, **queue})
    node = Node(config)
    node.start(roles=("dispatch",))
    return node


def _send_jobs(node: Node) -> list[dict]:
    return [j for j in node.queue.jobs() if j["kind"] == SEND]


@pytest.fixture
def recording_scp() -> Iterator[dict]:
    """A pynetdicom storage SCP that records proposed contexts and answers ``state["status"]``."""
    state: dict = {"contexts": [], "stored": [], "status": 0x0000}

    def on_requested(event: evt.Event) -> None:
        state["contexts"].append(
            [(c.abstract_syntax, tuple(c.transfer_syntax)) for c in event.assoc.requestor.requested_contexts]
        )

    def on_store(event: evt.Event) -> int:
        state["stored"].append(event.request.AffectedSOPInstanceUID)
        return state["status"]

    ae = AE(ae_title="RECEIVER")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)]
    )
    state["dest"] = Destination(name="rx", ae_title="RECEIVER", host="127.0.0.1", port=port)
    yield state
    server.shutdown()


def test_c_store_proposes_only_the_object_and_checks_status(
    results: list[Dataset], recording_scp: dict, tmp_path: Path
) -> None:
    records = store_results(*_store(tmp_path), results[:1])
    path = tmp_path / "store" / records[0].path
    sr = results[0]
    c_store(path, sr.SOPClassUID, records[0].transfer_syntax_uid, recording_scp["dest"], "HARMONODE")
    assert recording_scp["contexts"] == [[(sr.SOPClassUID, (records[0].transfer_syntax_uid,))]]
    assert recording_scp["stored"] == [sr.SOPInstanceUID]
    recording_scp["status"] = 0xA700  # out of resources
    with pytest.raises(DeliveryError, match="0xA700"):
        c_store(path, sr.SOPClassUID, records[0].transfer_syntax_uid, recording_scp["dest"], "HARMONODE")


def _store(tmp_path: Path) -> tuple:
    from storage.files import FileStore
    from storage.index import Index

    return FileStore(tmp_path / "store", fsync=False), Index(":memory:")


def test_enqueue_dedupes_per_destination(results: list[Dataset], tmp_path: Path) -> None:
    node = _node(tmp_path / "node", free_port(), max_attempts=50)
    try:
        records = store_results(node.files, node.index, results)
        two = [*node.config.destinations, Destination(name="other", ae_title="OTHER", host="127.0.0.1", port=1)]
        assert enqueue_deliveries(node.queue, [d.name for d in two], records, index=node.index) == 2 * len(results)
        assert enqueue_deliveries(node.queue, [d.name for d in two], records + records, index=node.index) == 0
        assert store_results(node.files, node.index, results) == records  # storing twice is a no-op
        keys = [j["key"] for j in _send_jobs(node)]
        assert len(keys) == len(set(keys)) == 2 * len(results)
        with pytest.raises(ValueError, match="lacks"):
            enqueue_deliveries(node.queue, [d.name for d in two], [{"path": "x"}])
    finally:
        node.stop()


def test_pacs_down_then_up_every_result_arrives_once_across_a_restart(results: list[Dataset], tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.workdir.mkdir(parents=True)
    data = tmp_path / "node"
    node = _node(data, pacs.dicom_port, max_attempts=100)
    try:
        records = store_results(node.files, node.index, results)
        destinations = node.config.result_destinations
        assert enqueue_deliveries(node.queue, destinations, records, index=node.index) == len(results)
        # The PACS is down: every object is tried, fails, and is tried again later.
        wait_until(lambda: all(j["attempts"] >= 3 for j in _send_jobs(node)), timeout=30, what="retries")
        status = delivery_status(node.index)
        assert status[0]["destination"] == "pacs" and status[0]["sent"] == 0
        assert (
            status[0]["failed"] + status[0]["pending"] == len(results) and "peer unreachable" in status[0]["last_error"]
        )
        assert all(j["state"] in ("ready", "running") for j in _send_jobs(node))
    finally:
        node.stop()
    # A restart of the node while the PACS is still down; then the PACS comes back.
    node = _node(data, pacs.dicom_port, max_attempts=100)
    try:
        assert enqueue_deliveries(node.queue, node.config.result_destinations, records, index=node.index) == 0
        pacs.start()
        try:
            wait_until(lambda: delivery_status(node.index)[0]["sent"] == len(results), timeout=40, what="delivery")
            wait_until(lambda: all(j["state"] == DONE for j in _send_jobs(node)), timeout=10, what="jobs done")
        finally:
            node.stop()
        # Another restart, and the pipeline asking again: nothing is sent twice, nothing is lost.
        node = _node(data, pacs.dicom_port, max_attempts=100)
        assert enqueue_deliveries(node.queue, node.config.result_destinations, records, index=node.index) == 0
        jobs = _send_jobs(node)
        assert len(jobs) == len(results) and all(j["state"] == DONE for j in jobs)
        assert {r["sop_instance_uid"] for r in deliveries(node.index, [SENT])} == {ds.SOPInstanceUID for ds in results}
        instances = pacs.get("/instances?expand")
        assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances) == sorted(
            ds.SOPInstanceUID for ds in results
        )
        changes = pacs.get("/changes?limit=1000")["Changes"]
        assert sum(c["ChangeType"] == "NewInstance" for c in changes) == len(results)  # each stored once
        (study,) = pacs.get("/studies?expand")
        assert study["MainDicomTags"]["StudyInstanceUID"] == results[0].StudyInstanceUID
        assert len(study["Series"]) == 5  # SR, key images, GSPS, SEG, KOS
    finally:
        node.stop()
        pacs.stop()


def test_dead_letter_is_visible_and_resend_brings_it_back(results: list[Dataset], tmp_path: Path) -> None:
    node = _node(tmp_path / "node", free_port(), max_attempts=2)
    try:
        records = store_results(node.files, node.index, results[:2])
        enqueue_deliveries(node.queue, node.config.result_destinations, records, index=node.index)
        wait_until(lambda: delivery_status(node.index)[0]["dead"] == 2, timeout=20, what="dead letters")
        assert all(j["state"] == "dead" and j["attempts"] == 2 for j in _send_jobs(node))
        assert {r["state"] for r in deliveries(node.index)} == {DEAD}
        assert retry_dead_deliveries(node.queue, node.index) == 2
        # They are tried again (and, the peer still being down, fail and die again).
        wait_until(lambda: delivery_status(node.index)[0]["dead"] == 2, timeout=20, what="dead again")
        assert all(j["attempts"] == 2 for j in _send_jobs(node))
        assert node.queue.retry_dead(kind=SEND) == 2
        wait_until(
            lambda: any(r["state"] in (FAILED, DEAD) and r["attempts"] >= 1 for r in deliveries(node.index)),
            timeout=20,
            what="retried by the queue",
        )
    finally:
        node.stop()
