"""Pulling a study from a real Orthanc into the node (C-FIND + C-MOVE), then reprocessing it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from typer.testing import CliRunner

from builders import SeriesSpec, dataset_bytes, encoded, post_instance, synthetic_instance
from conftest import make_config
from handlers.peer import Peer
from handlers.pull import PullError, find_studies, is_listening, pull_studies, pull_study, reprocess_study
from node.app import Node
from node.cli import app
from node.config import Destination
from peers import free_port, running_orthanc, wait_until
from storage.index import instance_meta_from_dataset
from storage.queue import ANALYZE_SERIES
from storage.store import StoreSettings, open_store


@pytest.mark.peers
def test_pull_study_from_orthanc_then_reprocess(tmp_path: Path) -> None:
    node_port = free_port()
    modalities = {"harmonode": ["HARMONODE", "127.0.0.1", node_port]}
    with running_orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        config = make_config(tmp_path / "node", node={"port": node_port}, destinations=[pacs])
        study_uid = generate_uid()
        specs = [
            SeriesSpec("PULL1", "PULL^ONE", study_uid, "20240510", "090000", "A9", generate_uid(), "CT", 3),
            SeriesSpec("PULL2", "PULL^TWO", generate_uid(), "20230101", "090000", "A8", generate_uid(), "CT", 1),
        ]
        sources = {}
        for spec in specs:
            for i in range(spec.count):
                ds = synthetic_instance(spec, i + 1)
                sources[str(ds.SOPInstanceUID)] = raw = encoded(ds)
                post_instance(orthanc.url, raw)
        node = Node(config)
        node.start(("listen",))
        try:
            assert find_studies(pacs, config.node.ae_title, date_range="20240101-20241231") == [study_uid]
            assert pull_study(pacs, config.node.ae_title, study_uid) == 3
            rows = node.index.query("SELECT sop_instance_uid, path FROM instances")
            assert len(rows) == 3
            for row in rows:  # Orthanc stores and sends the bytes as uploaded; the node keeps them as received
                source = tmp_path / "source.dcm"
                source.write_bytes(sources[row["sop_instance_uid"]])
                assert dataset_bytes(node.files.abspath(row["path"])) == dataset_bytes(source)
            series_uid = specs[0].series_uid
            # processing: the quiet period ends and the series becomes an analyze-series job
            wait_until(lambda: node.index.series(series_uid)["state"] != "receiving", timeout=20, what="completion")
            assert [j["key"] for j in node.queue.jobs() if j["kind"] == ANALYZE_SERIES] == [series_uid]
            node.queue.complete(node.queue.claim((ANALYZE_SERIES,)))  # as a worker would
            node.index.update_series(series_uid, state="done")
            assert reprocess_study(node.index, node.queue, study_uid) == [series_uid]
            assert node.index.series(series_uid)["state"] == "complete"
            ready = [j for j in node.queue.jobs(("ready",)) if j["kind"] == ANALYZE_SERIES]
            assert [j["key"] for j in ready] == [series_uid]
            assert pull_studies(pacs, config.node.ae_title, patient_id="PULL2") == {specs[1].study_uid: 1}
        finally:
            node.stop()


def test_cli_pull_and_reprocess_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = ' + str(free_port()) + "\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["pull", "--config", str(cfg)])
    assert result.exit_code == 2 and "say what to pull" in result.output
    result = runner.invoke(app, ["pull", "--date-range", "2024", "--config", str(cfg)])
    assert result.exit_code == 2 and "YYYYMMDD" in result.output
    result = runner.invoke(app, ["pull", "--study", "1.2.3", "--from", "nope", "--config", str(cfg)])
    assert result.exit_code == 2 and "no destination named" in result.output
    result = runner.invoke(app, ["pull", "--study", "1.2.3", "--config", str(cfg)])  # nobody listens there
    assert result.exit_code == 2 and "refused" in result.output
    result = runner.invoke(app, ["reprocess", "1.2.3", "--config", str(cfg)])
    assert result.exit_code == 1 and "not stored" in result.output
    result = runner.invoke(app, ["reprocess", "../etc", "--config", str(cfg)])
    assert result.exit_code == 2


def test_is_listening() -> None:
    port = free_port()
    assert not is_listening("127.0.0.1", port)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert is_listening("0.0.0.0", server.getsockname()[1])  # a wildcard host is asked on loopback


def test_find_and_pull_refuse_before_or_at_the_association() -> None:
    nobody = Peer("pacs", "PACS", "127.0.0.1", free_port())
    with pytest.raises(ValueError, match="YYYYMMDD"):
        find_studies(nobody, "HARMONODE", date_range="2024")
    with pytest.raises(PullError, match="refused the association"):
        find_studies(nobody, "HARMONODE", patient_id="P1", timeout=5)
    with pytest.raises(ValueError, match="UID"):
        pull_study(nobody, "HARMONODE", "../etc")
    with pytest.raises(PullError, match="refused the association"):
        pull_study(nobody, "HARMONODE", "1.2.3", timeout=5)


@contextmanager
def find_scp(answers: list[str]) -> Iterator[Peer]:
    """A Study Root C-FIND SCP on loopback that answers every query with ``answers`` (study UIDs)."""

    def on_find(event: evt.Event):  # noqa: ANN202
        for uid in answers:
            identifier = event.identifier
            identifier.StudyInstanceUID = uid
            yield 0xFF00, identifier
        yield 0x0000, None

    ae = AE(ae_title="FINDSCP")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield Peer("scp", "FINDSCP", "127.0.0.1", port)
    finally:
        server.shutdown()


def test_find_studies_and_a_pull_of_nothing_that_never_listens() -> None:
    entered = []

    @contextmanager
    def receiving() -> Iterator[None]:
        entered.append(True)
        yield

    with find_scp(["1.2.3", "1.2.4"]) as peer:
        assert find_studies(peer, "HARMONODE", date_range="20240101-", timeout=5) == ["1.2.3", "1.2.4"]
    with find_scp([]) as peer:
        assert pull_studies(peer, "HARMONODE", patient_id="NOBODY", timeout=5, receiving=receiving) == {}
    assert entered == []  # no listener is started when nothing matched


def test_reprocess_study_queues_every_received_series(tmp_path: Path) -> None:
    study_uid = generate_uid()
    specs = [
        SeriesSpec("R1", "RE^PROCESS", study_uid, "20240510", "090000", "A1", generate_uid(), "CT", 2),
        SeriesSpec("R1", "RE^PROCESS", study_uid, "20240510", "090000", "A1", generate_uid(), "MR", 1),
    ]
    with open_store(tmp_path, StoreSettings(fsync=False)) as store:
        for spec in specs:
            for i in range(spec.count):
                ds = synthetic_instance(spec, i + 1)
                stored = store.files.write_instance(study_uid, spec.series_uid, ds.SOPInstanceUID, encoded(ds))
                meta = instance_meta_from_dataset(ds)
                store.index.record_instance(
                    meta, store.files.relpath(stored.path), stored.size, stored.sha256, stored.version
                )
        queued = reprocess_study(store.index, store.queue, study_uid)
        assert sorted(queued) == sorted(s.series_uid for s in specs)
        assert {j["key"] for j in store.queue.jobs(("ready",)) if j["kind"] == ANALYZE_SERIES} == set(queued)
        assert {store.index.series(uid)["state"] for uid in queued} == {"complete"}
        assert reprocess_study(store.index, store.queue, generate_uid()) == []
