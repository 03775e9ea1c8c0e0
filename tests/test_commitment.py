"""Storage commitment SCP (push model) against a pynetdicom SCU over real associations on loopback.

The SCU stores instances (C-STORE), asks for their commitment (N-ACTION) and receives the node's
N-EVENT-REPORT: on its own association when it waits for it, on a new association to where it listens when
it releases at once, and after a restart of the node when the report could not be delivered before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from builders import make_ct_series
from conftest import make_config
from handlers.permissions import PeerPermission
from node.app import Node
from node.config import Destination
from peers import free_port, wait_until
from storage.commitments import CommitmentState

SCU_AE = "MODALITY1"


class Reports:
    """N-EVENT-REPORTs an SCU received (each: event type and event information)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Dataset]] = []
        self.lock = threading.Lock()

    def handle(self, event: evt.Event) -> tuple[int, None]:
        with self.lock:
            self.received.append((int(event.event_type), event.event_information))
        return 0x0000, None

    def of(self, transaction_uid: str) -> tuple[int, Dataset] | None:
        with self.lock:
            return next((r for r in self.received if str(r[1].TransactionUID) == transaction_uid), None)


def scu_ae() -> AE:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StorageCommitmentPushModel)
    return ae


def store(port: int, datasets: list[Dataset]) -> None:
    assoc = scu_ae().associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def request(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def n_action(assoc, info: Dataset, action_type: int = 1) -> int:  # noqa: ANN001
    status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
    return int(status.Status)


def refs_of(ds: Dataset, keyword: str) -> dict[str, int | None]:
    """SOP Instance UID → Failure Reason (None in the Referenced SOP Sequence) of a report's sequence."""
    return {str(i.ReferencedSOPInstanceUID): i.get("FailureReason") for i in ds.get(keyword, [])}


def reported(node: Node, transaction_uid: str) -> dict | None:
    """The transaction's row once its report was answered."""
    row = node.commitments.get(transaction_uid)
    return row if row and row["state"] == CommitmentState.REPORTED else None


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(seed=21, slices=3)


@pytest.fixture
def listener() -> Iterator[tuple[int, Reports]]:
    """The SCU's own SCP: where the node calls back with a report on a new association."""
    reports = Reports()
    ae = AE(ae_title=SCU_AE)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    yield port, reports
    server.shutdown()


def peers_entry(port: int, services: list[str]) -> PeerPermission:
    """The SCU's ``[[peers]]`` entry: its services, and the port it listens on for reports."""
    return PeerPermission.of(SCU_AE, services, ["127.0.0.1"], port=port)


def listening_node(tmp_path: Path, **sections) -> Node:  # noqa: ANN003
    node = Node(make_config(tmp_path / "node", commitment={"backoff_base_s": 0.1, "backoff_max_s": 0.5}, **sections))
    node.start(("listen",))
    return node


def test_report_on_the_same_association_commits_stored_instances(tmp_path: Path, series: list[Dataset]):
    node = listening_node(tmp_path)
    try:
        store(node.port, series)
        reports = Reports()
        ae = scu_ae()
        assoc = ae.associate(
            "127.0.0.1", node.port, ae_title="HARMONODE", evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)]
        )
        assert assoc.is_established
        uid = generate_uid()
        assert n_action(assoc, request(uid, [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in series])) == 0x0000
        event_type, info = wait_until(lambda: reports.of(uid), timeout=10, what="the N-EVENT-REPORT")
        assoc.release()
        assert event_type == 1
        assert refs_of(info, "ReferencedSOPSequence") == {str(ds.SOPInstanceUID): None for ds in series}
        assert "FailedSOPSequence" not in info
        assert str(info.RetrieveAETitle) == "HARMONODE"
        row = wait_until(lambda: reported(node, uid), timeout=5, what="the report recorded")
        assert row["via"] == "same-association"
    finally:
        node.stop()


def where_the_scu_listens(how: str, port: int) -> dict:
    """Config sections naming the SCU's port: its ``[[peers]]`` entry, or a ``[[destinations]]`` entry."""
    if how == "peers":
        return {"peers": [peers_entry(port, ["store", "commitment"])]}
    return {"destinations": [Destination("modality", SCU_AE, "127.0.0.1", port, send_results=False)]}


@pytest.mark.parametrize("how", ["peers", "destinations"])
def test_mixed_request_reports_failures_on_a_new_association(tmp_path: Path, series, listener, how):  # noqa: ANN001
    port, reports = listener
    node = listening_node(tmp_path, **where_the_scu_listens(how, port))
    try:
        store(node.port, series)
        unknown, conflict, lost = generate_uid(), series[1], series[2]
        (row,) = [r for r in node.index.instances_of_series(lost.SeriesInstanceUID)
                  if r["sop_instance_uid"] == lost.SOPInstanceUID]  # fmt: skip
        node.files.abspath(row["path"]).unlink()  # indexed, but its file is gone
        refs = [
            (series[0].SOPClassUID, series[0].SOPInstanceUID),
            (CTImageStorage, unknown),  # never stored
            (MRImageStorage, conflict.SOPInstanceUID),  # stored as CT, asked as MR
            (lost.SOPClassUID, lost.SOPInstanceUID),
        ]
        assoc = scu_ae().associate("127.0.0.1", node.port, ae_title="HARMONODE")
        uid = generate_uid()
        assert n_action(assoc, request(uid, refs)) == 0x0000
        assoc.release()  # at once: the report must come on a new association
        event_type, info = wait_until(lambda: reports.of(uid), timeout=10, what="the N-EVENT-REPORT")
        assert event_type == 2
        assert refs_of(info, "ReferencedSOPSequence") == {str(series[0].SOPInstanceUID): None}
        assert refs_of(info, "FailedSOPSequence") == {
            unknown: 0x0112,
            str(conflict.SOPInstanceUID): 0x0119,
            str(lost.SOPInstanceUID): 0x0110,
        }
        row = wait_until(lambda: reported(node, uid), timeout=5, what="the report recorded")
        assert row["via"] == "new-association" and row["failed_count"] == 3
    finally:
        node.stop()


def test_acknowledged_request_is_reported_after_a_restart(tmp_path: Path, series, listener):  # noqa: ANN001
    port, reports = listener
    closed = free_port()  # where the SCU says it listens, at first: nobody does
    first = listening_node(tmp_path, peers=[peers_entry(closed, ["store", "commitment"])])
    try:
        store(first.port, series)
        assoc = scu_ae().associate("127.0.0.1", first.port, ae_title="HARMONODE")
        uid = generate_uid()
        assert n_action(assoc, request(uid, [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in series])) == 0x0000
        assoc.release()
        wait_until(lambda: (first.commitments.get(uid) or {}).get("attempts", 0) >= 1, timeout=10,
                   what="a failed attempt")  # fmt: skip
        assert first.commitments.get(uid)["state"] == CommitmentState.PENDING
    finally:
        first.stop()
    assert reports.of(uid) is None
    second = listening_node(tmp_path, peers=[peers_entry(port, ["store", "commitment"])])  # same data dir
    try:
        event_type, info = wait_until(lambda: reports.of(uid), timeout=10, what="the report after the restart")
        assert event_type == 1 and len(info.ReferencedSOPSequence) == len(series)
        wait_until(lambda: reported(second, uid), timeout=5, what="the report recorded")
    finally:
        second.stop()


@pytest.mark.parametrize(
    ("services", "action_type", "info", "status"),
    [
        (["store"], 1, request("1.2.3.4", [(CTImageStorage, "1.2.3.5")]), 0x0124),  # not allowed to ask
        (["commitment"], 2, request("1.2.3.4", [(CTImageStorage, "1.2.3.5")]), 0x0123),  # no such action
        (["commitment"], 1, request("", [(CTImageStorage, "1.2.3.5")]), 0x0115),  # no Transaction UID
        (["commitment"], 1, request("1.2.3.4", []), 0x0115),  # nothing to commit
        (["commitment"], 1, request("1.2.3.4", [(CTImageStorage, "not a uid")]), 0x0115),
    ],
)
def test_bad_requests_get_a_failure_status(tmp_path: Path, services, action_type, info, status):  # noqa: ANN001
    node = listening_node(tmp_path, peers=[peers_entry(free_port(), services)])
    try:
        assoc = scu_ae().associate("127.0.0.1", node.port, ae_title="HARMONODE")
        assert assoc.is_established
        assert n_action(assoc, info, action_type) == status
        assoc.release()
        assert node.commitments.counts()[CommitmentState.PENDING] == 0
    finally:
        node.stop()
