"""Delivery across a crash and a long outage: each result received once by the PACS, nothing dead-lettered.

Receptions are counted at the PACS (an Orthanc Lua callback logs every C-STORE it receives, duplicates too,
which Orthanc's own store would hide by keeping one copy).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from builders import ALGORITHM, geometry_of, make_ct_series, make_findings
from conftest import make_config
from handlers.results import build_results
from handlers.send import DeliveryError, send_job
from node.app import Node
from node.config import Destination
from peers import free_port, running_orthanc, wait_until
from storage.deliveries import DeliveryState, delivery_status, enqueue_deliveries, store_results
from storage.queue import DELIVERY_POLICY, JobKind
from storage.store import open_store

pytestmark = pytest.mark.peers

# A dispatcher that sends one object and is SIGKILLed right after the PACS answered, before it records it.
DIES_AFTER_SENDING = """
import os, signal, sys
from pathlib import Path
from handlers.send import c_store
from handlers.peer import Peer
from storage.store import open_store
from storage.queue import JobKind
store = open_store(sys.argv[1])
job = store.queue.claim((JobKind.SEND,))
peer = Peer("pacs", "ORTHANC", "127.0.0.1", int(sys.argv[2]))
p = job.payload
c_store(store.files.abspath(p["path"]), p["sop_class_uid"], p["transfer_syntax_uid"], peer, "HARMONODE")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def results() -> list[Dataset]:
    series = make_ct_series(seed=3)
    geometry = geometry_of(series)
    return build_results(series, geometry, make_findings(geometry), ALGORITHM, analysed=True)


def test_a_sigkill_right_after_the_pacs_received_a_result_does_not_send_it_twice(results, tmp_path: Path) -> None:
    known = {"harmonode": ["HARMONODE", "127.0.0.1", free_port()]}  # a PACS answers C-FIND to peers it knows
    with running_orthanc(tmp_path / "orthanc", count_receptions=True, modalities=known) as pacs:
        dest = Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)
        config = make_config(tmp_path / "node", destinations=[dest])
        with open_store(config.data_path, config.store_settings) as store:
            records = store_results(store.files, store.index, results)
            assert enqueue_deliveries(store.queue, ["pacs"], records, store.index) == len(results)
        dead = subprocess.run(
            [sys.executable, "-c", DIES_AFTER_SENDING, str(config.data_path), str(pacs.dicom_port)],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            capture_output=True,
        )
        assert dead.returncode == -9, dead.stderr[-2000:]
        wait_until(lambda: len(pacs.receptions()) == 1, timeout=10, what="the PACS to log the first reception")
        started = time.monotonic()
        node = Node(config)
        node.start(("dispatch",))  # the claim of the killed process is released at once, not after its lease
        try:
            wait_until(lambda: delivery_status(node.index)[0]["sent"] == len(results), timeout=30, what="delivery")
            resumed_in = time.monotonic() - started
        finally:
            node.stop()
        receptions = pacs.receptions()
    assert sorted(receptions) == sorted(str(ds.SOPInstanceUID) for ds in results)  # each exactly once
    assert resumed_in < 15  # the lease is 300 s


def test_a_ten_minute_pacs_outage_ends_with_every_result_delivered_once(results, tmp_path: Path) -> None:
    # The dispatcher's loop, run on the queue's clock: ten minutes of outage pass in a second.
    assert DELIVERY_POLICY.retry_window_s > 12 * 3600  # the default keeps retrying through a night
    port = free_port()
    with open_store(tmp_path / "node") as store:  # the default delivery policy
        records = store_results(store.files, store.index, results)
        enqueue_deliveries(store.queue, ["pacs"], records, store.index)
        peers = {"pacs": Destination("pacs", "ORTHANC", "127.0.0.1", port)}
        clock, outage_ends = time.time(), time.time() + 600
        attempts = 0
        while clock < outage_ends:
            job = store.queue.claim((JobKind.SEND,), now=clock)
            if job is None:
                clock = min(r["next_attempt_at"] for r in store.queue.jobs(("ready",)))
                continue
            with pytest.raises(DeliveryError):
                send_job(job, peers, store.files, store.index, "HARMONODE")
            assert store.queue.fail(job, "PACS down", now=clock) == "ready"
            attempts += 1
        assert attempts > len(results) * 5 and delivery_status(store.index)[0]["dead"] == 0
        with running_orthanc(tmp_path / "orthanc", count_receptions=True) as pacs:
            peers = {"pacs": Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)}
            clock += DELIVERY_POLICY.backoff_max_s
            while (job := store.queue.claim((JobKind.SEND,), now=clock)) is not None:
                send_job(job, peers, store.files, store.index, "HARMONODE")
                store.queue.complete(job)
            status = delivery_status(store.index)[0]
            time.sleep(0.5)
            receptions = pacs.receptions()
    assert status["sent"] == len(results) and status["dead"] == 0 and status["failed"] == 0
    assert sorted(receptions) == sorted(str(ds.SOPInstanceUID) for ds in results)
    assert {r["state"] for r in store_rows(tmp_path / "node")} == {DeliveryState.SENT}


def store_rows(data: Path) -> list[dict]:
    with open_store(data) as store:
        return store.index.query("SELECT state FROM deliveries")
