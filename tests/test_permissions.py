"""Per-peer permissions ([[peers]]): each AE title uses only its services; a C-MOVE only to its destinations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from builders import SeriesSpec, synthetic_instance
from conftest import make_config
from handlers.permissions import NOT_AUTHORIZED, PeerPermission
from handlers.retrieve import MOVE_DESTINATION_UNKNOWN
from node.app import Node
from node.config import ConfigError, Destination, load_config
from peers import free_port, run_tool

STUDY = generate_uid()
PEERS = (
    PeerPermission.of("CT_ROOM1", ["echo", "store"]),
    PeerPermission.of("PACS", ["echo", "find", "move"], move_destinations=["VIEWER"]),
    PeerPermission.of("VIEWER", ["get"], addresses=["127.0.0.1"]),
    PeerPermission.of("ELSEWHERE", ["echo"], addresses=["10.9.9.9"]),
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    destinations = [
        Destination("viewer", "VIEWER", "127.0.0.1", free_port(), send_results=False),
        Destination("archive", "ARCHIVE", "127.0.0.1", free_port(), send_results=False),
    ]
    config = make_config(tmp_path_factory.mktemp("perm") / "node", destinations=destinations, peers=PEERS)
    n = Node(config)
    n.start(("listen",))
    ds = synthetic_instance(SeriesSpec("P1", "PERM^ONE", STUDY, "20240101", "120000", "A1", generate_uid(), "CT", 1), 1)
    assert store(n.port, "CT_ROOM1", ds) == 0x0000
    yield n
    n.stop()


def associate(port: int, calling: str, *contexts: str):  # noqa: ANN201
    ae = AE(ae_title=calling)
    for cx in contexts or (Verification,):
        ae.add_requested_context(cx, [ExplicitVRLittleEndian] if cx == CTImageStorage else None)
    return ae.associate("127.0.0.1", port, ae_title="HARMONODE")


def store(port: int, calling: str, ds: Dataset) -> int:
    assoc = associate(port, calling, CTImageStorage)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def study_query() -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = STUDY
    return q


def last_status(responses) -> int:  # noqa: ANN001
    return [int(status.Status) for status, _ in responses if status][-1]


def test_unlisted_ae_titles_and_wrong_addresses_are_rejected(node: Node) -> None:
    assert not associate(node.port, "INTRUDER").is_established
    assert not associate(node.port, "ELSEWHERE").is_established  # listed, but only from 10.9.9.9
    assoc = associate(node.port, "CT_ROOM1")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_scanner_may_store_but_not_query_or_retrieve(node: Node) -> None:
    assoc = associate(node.port, "CT_ROOM1", StudyRootQueryRetrieveInformationModelFind)
    assert last_status(assoc.send_c_find(study_query(), StudyRootQueryRetrieveInformationModelFind)) == NOT_AUTHORIZED
    assoc.release()


def test_a_viewer_may_get_but_not_store_or_find(node: Node, tmp_path: Path) -> None:
    out = tmp_path / "get"
    out.mkdir()
    run_tool(["getscu", "-aet", "VIEWER", "-aec", "HARMONODE", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={STUDY}", "127.0.0.1", str(node.port)])  # fmt: skip
    assert len(list(out.iterdir())) == 1
    before = len(node.files.quarantined())
    ds = synthetic_instance(
        SeriesSpec("P2", "PERM^TWO", generate_uid(), "20240101", "1", "A", generate_uid(), "CT", 1), 1
    )
    assert store(node.port, "VIEWER", ds) == NOT_AUTHORIZED
    assert len(node.files.quarantined()) == before + 1  # what arrived is kept, not indexed
    assert node.index.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,)) == []
    assoc = associate(node.port, "VIEWER", StudyRootQueryRetrieveInformationModelFind)
    assert last_status(assoc.send_c_find(study_query(), StudyRootQueryRetrieveInformationModelFind)) == NOT_AUTHORIZED
    assoc.release()


def test_a_pacs_may_find_and_move_only_to_its_destinations(node: Node, tmp_path: Path) -> None:
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}", "127.0.0.1", str(node.port)]
    refused = run_tool(["findscu", "-aec", "HARMONODE", "-S", *keys], check=False)
    assert refused.returncode != 0  # findscu's default calling AE is not a listed peer: refused at association
    run_tool(["findscu", "-aet", "PACS", "-aec", "HARMONODE", "-S", "-X", "-od", str(tmp_path), "-k",
              "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}", "127.0.0.1", str(node.port)])  # fmt: skip
    assert len(list(tmp_path.glob("rsp*.dcm"))) == 1
    assoc = associate(
        node.port, "PACS", StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet
    )
    move = assoc.send_c_move(study_query(), "ARCHIVE", StudyRootQueryRetrieveInformationModelMove)
    assert last_status(move) == MOVE_DESTINATION_UNKNOWN  # ARCHIVE is configured, but not one PACS may use
    assert last_status(assoc.send_c_get(study_query(), StudyRootQueryRetrieveInformationModelGet)) == NOT_AUTHORIZED
    assoc.release()


def test_peers_in_the_config_file_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    base = '[[destinations]]\nname = "viewer"\nae_title = "VIEWER"\nport = 104\n'
    cfg.write_text(base + '[[peers]]\nae_title = "CT1"\nservices = ["store", "echo"]\n')
    (peer,) = load_config(cfg, env={}).peers
    assert peer.ae_title == "CT1" and {str(s) for s in peer.services} == {"store", "echo"}
    cfg.write_text(base + '[[peers]]\nae_title = "CT1"\nservices = ["stor"]\n')
    with pytest.raises(ConfigError, match="unknown service"):
        load_config(cfg, env={})
    cfg.write_text(base + '[[peers]]\nae_title = "PACS"\nservices = ["move"]\nmove_destinations = ["NOWHERE"]\n')
    with pytest.raises(ConfigError, match="NOWHERE"):
        load_config(cfg, env={})
