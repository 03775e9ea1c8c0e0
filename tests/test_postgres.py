"""The index, queue, workers, registry, commitments and C-FIND matcher on PostgreSQL, the same as on SQLite.

Each test gets a fresh database (``pg_url``) on the PostgreSQL at 127.0.0.1:5432, or on one started for the
session (``tests/pg.py``); nothing is skipped. Where it is cheap a test runs on both backends (``target``)
and the two must agree.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pg
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from builders import SeriesSpec, synthetic_instance
from handlers.query import STUDY_ROOT, find, handle_find
from handlers.retrieve import retrieve_instances
from peers import free_port
from rules.keys import ConditionKey
from rules.registry import RuleRegistry
from storage import deliveries, exports, feedback, findings, parameters, users
from storage.commitments import Commitments, CommitmentState, Outcome, SopReference
from storage.database import PgDatabase, open_database
from storage.index import ConflictKind, Index, Origin, instance_meta_from_dataset
from storage.pgsql import translate
from storage.queue import DEAD, DONE, READY, RUNNING, JobQueue, QueueSettings, worker_id
from storage.schema import SCHEMA_VERSION, migrate, schema_version
from storage.status import collect_status
from storage.store import open_store


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.Server]:
    try:
        server = pg.server()
    except RuntimeError as exc:
        pytest.fail(f"no PostgreSQL for the tests: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: pg.Server) -> Iterator[str]:
    url = pg.fresh_database(pg_server.base)
    yield url
    pg.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store part lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "db.sqlite")
    return request.getfixturevalue("pg_url")


def _instance(patient_id: str, name: str, study: str, series: str, number: int, modality: str = "CT") -> Dataset:
    spec = SeriesSpec(patient_id, name, study, "20240115", "101500", "ACC1", series, modality, 1)
    return synthetic_instance(spec, number)


def _record(index: Index, ds: Dataset, version: int = 1, origin: Origin = Origin.RECEIVED) -> None:
    meta = instance_meta_from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
    path = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.v{version}.dcm"
    index.record_instance(meta, path, 1234, "ab" * 32, version, calling_ae="SCANNER", origin=origin)


# -- the SQL translation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sqlite", "postgres"),
    [
        ("SELECT * FROM t WHERE a=? AND b=?", "SELECT * FROM t WHERE a=%s AND b=%s"),
        ("SELECT 'a?b:c%' , x FROM t WHERE y=:name", "SELECT 'a?b:c%%' , x FROM t WHERE y=%(name)s"),
        ("SELECT x::text FROM t WHERE k LIKE ?", "SELECT x::text FROM t WHERE k LIKE %s"),
        ("INSERT OR IGNORE INTO t (a) VALUES (?)", "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"),
        ("INSERT OR IGNORE INTO t (a) VALUES (?) RETURNING id",
         "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING RETURNING id"),
        ("CREATE TABLE t (a TEXT PRIMARY KEY, b REAL, c INTEGER NOT NULL DEFAULT 0, d BLOB, e TEXT DEFAULT 'REAL')",
         'CREATE TABLE t (a TEXT COLLATE "C" PRIMARY KEY, b DOUBLE PRECISION, c BIGINT NOT NULL DEFAULT 0,'
         " d BYTEA, e TEXT COLLATE \"C\" DEFAULT 'REAL')"),
    ],
)  # fmt: skip
def test_translation(sqlite: str, postgres: str) -> None:
    assert translate(sqlite) == postgres


def test_insert_or_replace_is_refused() -> None:
    with pytest.raises(NotImplementedError):
        translate("INSERT OR REPLACE INTO t (a) VALUES (?)")


# -- the index ----------------------------------------------------------------------------------------
def test_record_instance_and_every_read(target: str) -> None:
    index = Index(target)
    assert index.dialect == ("postgresql" if target.startswith("postgresql") else "sqlite")
    study, series = generate_uid(), generate_uid()
    first, second = _instance("P1", "DOE^JOHN", study, series, 1), _instance("P1", "DOE^JOHN", study, series, 2)
    _record(index, first)
    _record(index, second)
    _record(index, second, version=2)  # the same SOP Instance UID stored again: a new version
    row = index.series(series)
    assert row["instance_count"] == 3 and row["state"] == "receiving" and row["modality"] == "CT"
    assert isinstance(row["last_received_at"], float) and "StudyDescription" in json.loads(row["condition_tags"])
    st = index.study(study)
    assert st["patient_name"] == "DOE^JOHN" and st["modalities"] == "CT" and st["patient_id"] == "P1"
    latest = index.instances_of_series(series)
    assert [(r["instance_number"], r["version"]) for r in latest] == [(1, 1), (2, 2)]
    assert len(index.instances_of_series(series, latest_only=False)) == 3
    assert index.has_instance(study, series, str(second.SOPInstanceUID), 2)
    assert not index.has_instance(study, series, str(second.SOPInstanceUID), 3)
    assert index.versions(study, series, str(second.SOPInstanceUID)) == {"ab" * 32: 2}
    assert len(index.known_paths()) == 3
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 3, "conflicts": 0}
    index.update_series(series, state="done", findings=[{"n": 1}], timings={"load": 0.5})
    status = index.status()["studies"][0]["series"][0]
    assert status["state"] == "done" and status["findings"] == [{"n": 1}] and status["timings"] == {"load": 0.5}
    assert index.query("SELECT COUNT(*) n FROM instances WHERE series_instance_uid = :s", {"s": series}) == [{"n": 3}]
    assert index.series("nope") is None and index.study("nope") is None
    index.close()


def test_conflicts_are_recorded_not_overwritten(target: str) -> None:
    index = Index(target)
    a_study, a_series, b_study, b_series = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    ds = _instance("P1", "DOE^JOHN", a_study, a_series, 1)
    _record(index, ds)
    _record(index, _instance("P1", "ROE^RICHARD", b_study, b_series, 1))  # same PatientID, another name
    moved = _instance("P1", "DOE^JOHN", a_study, generate_uid(), 1)
    moved.SOPInstanceUID = ds.SOPInstanceUID  # the same SOP Instance UID in another series
    _record(index, moved)
    kinds = sorted(c["kind"] for c in index.conflicts())
    assert kinds == sorted([str(ConflictKind.PATIENT_DEMOGRAPHICS), str(ConflictKind.SOP_UID_ELSEWHERE)])
    assert index.study(b_study)["patient_name"] == "ROE^RICHARD"  # the study keeps its own
    assert index.query("SELECT patient_name FROM patients") == [{"patient_name": "DOE^JOHN"}]
    _record(index, moved)  # a conflict is recorded once
    assert len(index.conflicts()) == 2
    index.close()


def test_two_processes_index_one_new_study_at_once(pg_url: str) -> None:
    """BEGIN IMMEDIATE on PostgreSQL serializes the read-modify-write of patients and studies across processes."""
    Index(pg_url).close()  # the schema exists before both start
    study, series = generate_uid(), generate_uid()
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0
    procs = [ctx.Process(target=pg.record_many, args=(pg_url, study, series, 40, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    index = Index(pg_url)
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 80, "conflicts": 0}
    assert index.series(series)["instance_count"] == 80
    index.close()


def test_migrate_twice_is_a_no_op(pg_url: str) -> None:
    index = Index(pg_url)
    _record(index, _instance("P1", "DOE^JOHN", generate_uid(), generate_uid(), 1))
    tables = index.db.table_names()
    migrate(index.db)
    migrate(index.db)
    assert schema_version(index.db) == SCHEMA_VERSION and index.db.table_names() == tables
    assert index.counts()["instances"] == 1
    assert isinstance(index.db, PgDatabase) and index.db.schema == "harmonode_index"
    index.close()
    again = Index(pg_url)  # a second process opening the same index
    assert again.counts()["instances"] == 1
    again.close()


# -- C-FIND: the same matches on both -----------------------------------------------------------------
_PEOPLE = [("P1", "DOE^JOHN", "CT"), ("P1", "DOE^JOHN", "MR"), ("P2", "doe^jane", "CT"), ("P3", "ÉMILE^ZOLA", "CT"),
           ("P4", "O'HARA^SCARLETT", "CT"), ("P5", "PCT%_^X", "OT")]  # fmt: skip
_CASES = [
    ({"PatientName": "DOE*"}, {"P1", "P2"}),  # PN: case-insensitive
    ({"PatientName": "?OE^JANE"}, {"P2"}),
    ({"PatientName": "doe^john"}, {"P1"}),
    ({"PatientName": "émile*"}, set()),  # as SQLite: only ASCII letters fold
    ({"PatientName": "ÉMILE^ZOLA"}, {"P3"}),
    ({"PatientName": "O'HARA*"}, {"P4"}),
    ({"PatientName": "PCT%_*"}, {"P5"}),  # % and _ are literal
    ({"PatientName": "PC__*"}, set()),
    ({"PatientID": "p*"}, set()),  # LO: case-sensitive
    ({"PatientID": "P?"}, {"P1", "P2", "P3", "P4", "P5"}),
    ({"StudyDescription": "QR*"}, {"P1", "P2", "P3", "P4", "P5"}),
    ({"StudyDescription": "qr*"}, set()),
    ({"StudyDescription": "[QR]*"}, set()),  # a bracket is literal, not a GLOB class
    ({"ModalitiesInStudy": "MR"}, {"P1"}),
    ({"ModalitiesInStudy": "C*"}, {"P1", "P2", "P3", "P4"}),
    ({"ModalitiesInStudy": "?T"}, {"P1", "P2", "P3", "P4", "P5"}),
    ({"ModalitiesInStudy": "ct"}, set()),
    ({"StudyDate": "20240101-"}, {"P1", "P2", "P3", "P4", "P5"}),
    ({"StudyTime": "1000-1015"}, {"P1", "P2", "P3", "P4", "P5"}),
    ({"StudyTime": "1000-1014"}, set()),
    ({"AccessionNumber": "ACC%"}, set()),
]


def _populate(index: Index) -> None:
    studies: dict[str, str] = {}
    for pid, name, modality in _PEOPLE:
        study = studies.setdefault(pid, generate_uid())
        _record(index, _instance(pid, name, study, generate_uid(), 1, modality))


@pytest.fixture
def both(tmp_path: Path, pg_url: str) -> Iterator[tuple[Index, Index]]:
    lite, postgres = Index(tmp_path / "index.sqlite"), Index(pg_url)
    _populate(lite)
    _populate(postgres)
    yield lite, postgres
    lite.close()
    postgres.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # wildcards in a CS key are what is tested
def test_cfind_matches_the_same_on_both(both: tuple[Index, Index]) -> None:
    def patients(index: Index, keys: dict[str, str]) -> set[str]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.PatientID = ""
        for keyword, value in keys.items():
            setattr(ident, keyword, value)
        return {str(r.PatientID) for r in find(index, ident, STUDY_ROOT)}

    for keys, expected in _CASES:
        assert patients(both[0], keys) == expected, ("sqlite", keys)
        assert patients(both[1], keys) == expected, ("postgresql", keys)


def test_cfind_counts_and_retrieve_on_postgres(both: tuple[Index, Index]) -> None:
    lite, postgres = both
    ident = Dataset()
    ident.QueryRetrieveLevel, ident.PatientID = "STUDY", "P1"
    ident.NumberOfStudyRelatedInstances, ident.ModalitiesInStudy = "", ""
    (found,) = list(find(postgres, ident, STUDY_ROOT))
    assert int(found.NumberOfStudyRelatedInstances) == 2 and list(found.ModalitiesInStudy) == ["CT", "MR"]
    ident = Dataset()
    ident.QueryRetrieveLevel, ident.PatientID, ident.StudyInstanceUID = "STUDY", "P1", ""
    study = str(next(iter(find(postgres, ident, STUDY_ROOT))).StudyInstanceUID)
    ident = Dataset()
    ident.QueryRetrieveLevel, ident.StudyInstanceUID = "STUDY", study
    assert len(retrieve_instances(postgres, ident, STUDY_ROOT)) == 2


def test_cfind_over_an_association_on_postgres(both: tuple[Index, Index]) -> None:
    scp = AE(ae_title="HARMONODE")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, handle_find, [both[1], "HARMONODE"])]
    )
    try:
        scu = AE(ae_title="VIEWER")
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = scu.associate("127.0.0.1", port, ae_title="HARMONODE")
        assert assoc.is_established
        ident = Dataset()
        ident.QueryRetrieveLevel, ident.PatientName, ident.PatientID = "STUDY", "doe*", ""
        answers = list(assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind))
        assoc.release()
    finally:
        server.shutdown()
    statuses = [int(st.Status) for st, _ in answers if st]
    assert statuses == [0xFF00, 0xFF00, 0x0000]
    assert {str(found.PatientID) for _, found in answers if found is not None} == {"P1", "P2"}


# -- the queue ----------------------------------------------------------------------------------------
def test_queue_lifecycle(target: str) -> None:
    q = JobQueue(target, QueueSettings(max_attempts=3, backoff_base_s=10, lease_seconds=60))
    a = q.enqueue("k", "s1", {"x": 1})
    assert isinstance(a, int) and a > 0 and q.enqueue("k", "s1", {"x": 2}) == a  # deduped, payload refreshed
    job = q.claim(("k",))
    assert job is not None and (job.id, job.payload, job.attempts) == (a, {"x": 2}, 1)
    assert q.claim(("k",)) is None and q.enqueue("k", "s1") != a  # a running twin gets a fresh job
    assert q.fail(job, "peer down") == READY
    assert q.claim_job(a) is None  # backing off
    job = q.claim_job(a, now=time.time() + 11)
    assert job is not None and job.attempts == 2
    assert q.fail(job, "peer down") == READY
    job = q.claim_job(a, now=time.time() + 100)
    assert q.fail(job, "still down") == DEAD and q.claim_job(a, now=time.time() + 1000) is None
    assert q.jobs((DEAD,))[0]["last_error"] == "still down"
    assert q.retry_dead("k", key_prefix="s") == 1
    job = q.claim_job(a)
    assert job is not None and job.attempts == 1
    q.complete(job)
    assert q.claim_job(a) is None and q.jobs((DONE,))[0]["id"] == a
    assert q.claim_job(10_000) is None  # no such job
    assert q.pending_count(("k",)) == 1
    q.close()


def test_claim_job_takes_an_expired_lease_but_not_a_live_one(target: str) -> None:
    q = JobQueue(target, QueueSettings(lease_seconds=60))
    jid = q.enqueue("k", "a")
    assert q.claim(("k",)) is not None
    other = JobQueue(target)
    other.worker_id = "elsewhere:1:1"
    assert other.claim_job(jid) is None  # held, lease running, a worker never seen: wait the lease
    taken = other.claim_job(jid, now=time.time() + 61)
    assert taken is not None and taken.attempts == 2
    assert q.jobs()[0]["state"] == RUNNING
    q.close()
    other.close()


def test_published_and_due_unpublished(target: str) -> None:
    q = JobQueue(target)
    now = time.time()
    a, b, c = q.enqueue("k", "a"), q.enqueue("k", "b"), q.enqueue("other", "c")
    assert [j.id for j in q.due_unpublished(["k"], 30, now + 1)] == [a, b]
    q.mark_published(a, now)
    assert [j.id for j in q.due_unpublished(["k"], 30, now + 1)] == [b]
    assert [j.id for j in q.due_unpublished(["k", "other"], 30, now + 31)] == [a, b, c]
    q.claim_job(b)
    assert [j.id for j in q.due_unpublished(("k",), 30, now + 31)] == [a]
    q.close()


def test_an_old_queue_gains_published_at(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, kind TEXT, key TEXT, payload TEXT, state TEXT, attempts INTEGER,"
        " max_attempts INTEGER, next_attempt_at FLOAT, lease_until FLOAT, worker TEXT, last_error TEXT,"
        " created_at FLOAT, updated_at FLOAT)"
    )
    conn.execute("INSERT INTO jobs VALUES (1, 'k', 'a', '{}', 'ready', 0, 5, 0, 0, '', '', 0, 0)")
    conn.commit()
    conn.close()
    q = JobQueue(path)
    assert "published_at" in q.db["jobs"].columns_dict
    assert [j.id for j in q.due_unpublished(["k"], 30)] == [1]
    q.close()


@pytest.mark.parametrize("by_id", [False, True], ids=["claim", "claim_job"])
def test_two_processes_claim_every_job_exactly_once(pg_url: str, tmp_path: Path, by_id: bool) -> None:
    q = JobQueue(pg_url)
    ids = [q.enqueue("k", f"job{n}", dedupe=False) for n in range(200)]
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0  # both processes have imported and connected by then
    outs = [tmp_path / f"claimed{n}.txt" for n in range(2)]
    order = [ids, ids[::-1]]
    procs = [ctx.Process(target=pg.claim_until_empty, args=(pg_url, by_id, order[n], start, str(outs[n])))
             for n in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    claimed = [[int(line) for line in out.read_text().split()] for out in outs]
    assert sorted(claimed[0] + claimed[1]) == ids  # every job once, none twice
    assert all(claimed), "both processes claimed some jobs"
    rows = q.jobs(limit=500)
    assert {r["state"] for r in rows} == {DONE} and {r["attempts"] for r in rows} == {1}
    q.close()


# -- workers ------------------------------------------------------------------------------------------
def test_heartbeats_and_takeover_of_a_stale_workers_job(target: str) -> None:
    holder, taker = JobQueue(target), JobQueue(target)
    holder.worker_id, taker.worker_id = "host-a:100:1", "host-b:200:1"
    now = time.time()
    holder.workers.beat(holder.worker_id, ["analyze-series"], "host-a", 100, now)
    holder.workers.beat(holder.worker_id, ["analyze-series", "send"], "host-a", 100, now + 5, current_job=7)
    seen = taker.workers.seen(now + 6, stale_after_s=30)
    assert len(seen) == 1 and seen[0]["alive"] and seen[0]["queues"] == ["analyze-series", "send"]
    assert seen[0]["started_at"] == now and seen[0]["last_seen"] == now + 5 and seen[0]["current_job"] == 7
    assert not taker.workers.is_stale(holder.worker_id, 30, now + 6)
    assert taker.workers.is_stale(holder.worker_id, 30, now + 36)
    assert not taker.workers.is_stale("never-seen", 30, now + 36)
    assert taker.workers.is_stale("never-seen", 30, now + 36, lease_until=now)
    jid = holder.enqueue("analyze-series", "s1")
    assert holder.claim(("analyze-series",), now=now + 5) is not None  # lease until now + 305
    assert taker.claim_job(jid, now=now + 20) is None  # its worker beat 15 s ago
    assert not taker.workers.seen(now + 40, stale_after_s=30)[0]["alive"]
    job = taker.claim_job(jid, now=now + 40)  # no beat for 35 s: taken over before the lease ends
    assert job is not None and job.attempts == 2
    assert taker.jobs()[0]["state"] == RUNNING
    assert taker.workers.forget(holder.worker_id) and taker.workers.seen(now) == []
    holder.close()
    taker.close()


def test_a_dead_process_of_this_host_loses_its_job(target: str) -> None:
    q = JobQueue(target)
    jid = q.enqueue("k", "a")
    gone = subprocess.Popen(["true"])
    gone.wait()
    q.db.conn.execute(
        "UPDATE jobs SET state='running', lease_until=?, worker=? WHERE id=?",
        (time.time() + 300, f"{socket.gethostname()}:{gone.pid}:1", jid),
    )
    mine = worker_id()  # this process's own
    assert q.claim_job(jid) is not None  # its pid is gone
    q.db.conn.execute("UPDATE jobs SET worker=? WHERE id=?", (mine, jid))
    q.worker_id = "someone-else:1:1"
    assert q.claim_job(jid) is None  # this very process still runs
    q.close()


# -- the rule registry --------------------------------------------------------------------------------
def test_rule_registry_on_postgres(pg_url: str) -> None:
    index = Index(pg_url)
    registry = RuleRegistry(index.db, index.lock)
    key = ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi5-15|100kv|head")
    seed = {"a": 0.9, "b": 15.0, "c": 150.0}
    v1 = registry.add(key, "seed", seed, {"n_images": 10}, activate=True)
    v2 = registry.add(key, "seed", {**seed, "a": 0.95})
    assert (v1.version, v2.version) == (1, 2) and registry.lookup(key).rule.label == v1.label
    registry.activate(v2.label)
    assert [r.label for r in registry.active()] == [v2.label]
    other = ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi30-60|100kv|chest")
    assert registry.lookup(other).match == "drop-dose"
    document = registry.export()
    assert not index.db.conn.in_transaction
    fresh = RuleRegistry(open_database(pg_url, "elsewhere"))  # another schema: an empty registry
    imported = fresh.import_document(json.loads(json.dumps(document)))
    assert sorted(r.label for r in imported) == sorted([v1.label, v2.label])
    assert fresh.lookup(key).rule.label == v2.label
    assert fresh.import_document(document) == []  # already there: nothing stored twice
    broken = {**document, "rules": [*document["rules"], {"id": "x"}]}
    with pytest.raises(ValueError):
        fresh.import_document(broken)
    assert len(fresh.all()) == 2 and not fresh.db.conn.in_transaction  # all or nothing
    index.close()


# -- the tables in the index, through open_store ------------------------------------------------------
def test_store_tables_round_trip_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """Long because it walks every table the index holds beside the DICOM ones, in one store."""
    with open_store(tmp_path / "data", database=pg_url) as store:
        assert not (tmp_path / "data" / "index.sqlite").exists() and not (tmp_path / "data" / "queue.sqlite").exists()
        index, queue = store.index, store.queue
        result = deliveries.StoredResult("r/a.dcm", "1.2.3", "1.2.3.4", "1.2.3.5", "1.2.840.10008.1.2.1")
        assert deliveries.enqueue_deliveries(queue, ["pacs"], [result], index) == 1
        assert deliveries.enqueue_deliveries(queue, ["pacs"], [result], index) == 0  # once per destination
        payload = deliveries.SendPayload("pacs", result)
        deliveries.set_delivery(index, payload, deliveries.DeliveryState.DEAD, 3, "refused")
        assert deliveries.delivery_state(index, "pacs", "1.2.3.4") == deliveries.DeliveryState.DEAD
        (status,) = deliveries.delivery_status(index)
        assert status["dead"] == 1 and status["last_error"] == "refused"
        users.add_user(index, "ana", "admin", "correct horse")
        assert users.authenticate(index, "ana", "correct horse") == users.User("ana", users.Role.ADMIN)
        assert users.authenticate(index, "ana", "wrong password") is None
        assert users.failed_logins(index, "ana") == 1
        token = users.create_token(index, "ana", "ci")
        assert users.user_of_token(index, token).name == "ana" and users.list_users(index)[0]["tokens"] == 1
        sid = users.open_session(index, "ana", 60)
        assert users.session_user(index, sid).name == "ana"
        record = findings.FindingRecord("2.25.1", "1.2.3.5", "1.2.3", 1, "F1", "aneurysm", (1.0, 2.0, 3.0), 4.5,
                                        0.9, 0.2, (0.8, 0.9), b"\x00\x01feat", "f16z", "m1", "CT|x")  # fmt: skip
        findings.save_findings(index, [record])
        stored = findings.finding(index, "2.25.1")
        assert stored["features"] == b"\x00\x01feat" and stored["center_mm"] == [1.0, 2.0, 3.0]
        findings.set_assessment(index, "2.25.1", findings.FindingState.REJECTED, "dr")
        assert findings.findings_status(index)[0]["state"] == "rejected"
        findings.save_report(index, "2.25.9", "1.2.3.5", "2.25.8", "r/sr.dcm")
        assert findings.current_report(index, "1.2.3.5")["sop_instance_uid"] == "2.25.9"
        verdict = feedback.Assessment("2.25.1", feedback.FeedbackAction.REJECT, "dr", feedback.FeedbackSource.AIRA,
                                      assessment_sop_instance_uid="2.25.7")  # fmt: skip
        row_id = feedback.record_feedback(index, verdict, feedback.FeedbackState.APPLIED)
        assert row_id > 0 and feedback.already_recorded(index, verdict)
        assert feedback.record_feedback(index, verdict, feedback.FeedbackState.APPLIED) == 0  # once
        feedback.set_corrected(index, [row_id], "2.25.10")
        assert feedback.feedback_rows(index)[0]["corrected_sr_uid"] == "2.25.10"
        set_id = parameters.store_parameters(index, "series:1", "CT|ge|x", "CT", {"regions": [{"mean": 1}]})
        assert parameters.store_parameters(index, "series:1", "CT|ge|y", "CT", {"regions": [{"mean": 2}]}) == set_id
        assert [p.condition_key for p in parameters.stored_parameters(index, "CT|ge|*")] == ["CT|ge|y"]
        assert parameters.conditions(index) == {"CT|ge|y": 1}
        settings = exports.ExportSettings(export_dir=str(tmp_path / "out"))
        body = exports.build_record(exports.ExportTrigger.FEEDBACK, b"f", 1, "f16z", {"kind": "a"}, None, 0.2, "m", "k")
        assert exports.add_export(index, queue, settings, body, "2.25.1", "2.25.1:detected") is not None
        assert exports.add_export(index, queue, settings, body, "2.25.1", "2.25.1:detected") is None
        assert exports.exports_status(index, queue)["targets"] == {"folder": {"ready": 1}}
        report = json.loads(json.dumps(collect_status(store, {"ae_title": "HARMONODE"})))
        assert report["findings"][0]["finding_id"] == "2.25.1" and report["exports"]["records"] == {"feedback": 1}


def test_commitments_on_postgres(tmp_path: Path, pg_url: str) -> None:
    table = Commitments(pg_url, max_attempts=2, backoff_base_s=0.0)
    refs = [SopReference("1.2.840.10008.5.1.4.1.1.2", "2.25.1")]
    table.record_request("2.25.100", "MODALITY", "127.0.0.1", refs)
    (due,) = table.due()
    assert due.transaction_uid == "2.25.100" and due.references == tuple(refs) and due.state == "pending"
    assert table.attempt_failed("2.25.100", "unreachable") == CommitmentState.PENDING
    table.reported("2.25.100", Outcome(tuple(refs), ()), "new-association")
    got = table.get("2.25.100")
    assert (
        got["state"] == "reported"
        and got["event_type"] == 1
        and got["refs"] == [[r.sop_class_uid, r.sop_instance_uid] for r in refs]
    )
    assert table.counts() == {"pending": 0, "reported": 1, "failed": 0}
    table.close()
