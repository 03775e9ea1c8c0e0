"""Series completion after a quiet period, late instances reopening, recovery after a lost index."""

from __future__ import annotations

import time

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.app import Node
from node.series import SeriesWatcher
from peers import wait_until
from storage.queue import ANALYZE_SERIES


def push(port: int, series_uid: str, n: int) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = series_uid
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()


def test_series_completes_after_quiet_period_and_job_runs(node):
    uid = generate_uid()
    push(node.port, uid, 3)
    assert node.index.series(uid)["state"] == "receiving"
    wait_until(lambda: node.index.series(uid)["state"] == "done", timeout=20, what="series done")
    # the job is marked done just after the series it analysed: wait for that too
    wait_until(lambda: all(j["state"] == "done" for j in node.queue.jobs() if j["key"] == uid), timeout=20, what="job")
    jobs = [j for j in node.queue.jobs() if j["key"] == uid]
    assert len(jobs) == 1 and jobs[0]["kind"] == ANALYZE_SERIES and jobs[0]["state"] == "done"


def test_late_instance_reopens_a_complete_series(node_config):
    n = Node(node_config)
    n.start(("listen",))
    try:
        uid = generate_uid()
        push(n.port, uid, 2)
        watcher = SeriesWatcher(n.index, n.queue, node_config.pipeline)
        assert watcher.tick(now=time.time() + 100) == [uid]
        push(n.port, uid, 1)  # late
        row = n.index.series(uid)
        assert row["state"] == "receiving" and row["instance_count"] == 3
        assert watcher.tick() == []  # quiet period starts again
        assert watcher.tick(now=time.time() + 100) == [uid]
        assert n.queue.pending_count((ANALYZE_SERIES,)) == 1  # still one job: no duplicate work
    finally:
        n.stop()


def test_recovery_reindexes_files_and_removes_partials(node_config):
    n = Node(node_config)
    n.start(("listen",))
    uid = generate_uid()
    push(n.port, uid, 4)
    n.stop()
    (node_config.data_path / "index.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (node_config.data_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (node_config.data_path / "tmp" / "dead.part").write_bytes(b"half a file")
    n2 = Node(node_config)
    n2.start(("listen",))
    try:
        assert n2.recovery.reindexed == 4 and n2.recovery.partial_files_removed == 1
        assert n2.index.series(uid)["instance_count"] == 4
    finally:
        n2.stop()
