"""The node's cluster processes for tests and benchmarks: one config, processes with their logs, studies.

Used by ``tests/test_cluster.py`` and ``tests/benchmarks/scaleout.py``.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peers import free_port, peer_env, run_tool, system_tool, wait_until
from simulator.studies import simulate_study, write_study
from storage.store import Store, StoreSettings, open_store

ROOT = Path(__file__).parent.parent


def write_config(root: Path, port: int, broker: str, database: str, orthanc_port: int, extra: str = "") -> Path:
    """One cluster config every process of the test reads (the store is the shared ``root/store``)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cluster.toml"
    path.write_text(
        f"""[node]
port = {port}
data_dir = "{root / "store"}"

[pipeline]
quiet_seconds = 1.0
poll_seconds = 0.1

[queue]
backoff_base_s = 0.2
backoff_max_s = 2.0

[delivery]
backoff_base_s = 0.2
backoff_max_s = 2.0

[web]
enabled = false

[cluster]
broker = "{broker}"
database = "{database}"
name = "hn-{uuid.uuid4().hex[:8]}"
relay_seconds = 0.2
lost_after_s = 3.0
heartbeat_seconds = 0.5
stale_after_s = 5.0

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_port}
{extra}"""
    )
    return path


class Processes:
    """The node's processes of one test, each with its own log; all killed at the end."""

    def __init__(self, root: Path, config: Path, env: dict[str, str] | None = None) -> None:
        self.root, self.config, self.env = root, config, env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", *args, "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def echo(port: int) -> bool:
    r = subprocess.run(
        [system_tool("echoscu"), "-aec", "HARMONODE", "127.0.0.1", str(port)], capture_output=True, env=peer_env()
    )
    return r.returncode == 0


def studies(root: Path, n: int, first_seed: int) -> tuple[list[str], Path]:
    """``n`` small head CTAs written under ``root``; their Study Instance UIDs and the folder."""
    folder = root / "scanner"
    uids = []
    for i in range(n):
        study = simulate_study("head-cta", "ge-revolution-standard", seed=first_seed + i, size="test", slices=24)
        write_study(study, folder / f"s{i:02d}")
        (folder / f"s{i:02d}" / "truth.json").unlink(missing_ok=True)
        uids.append(study.truth["study_instance_uid"])
    return uids, folder


def push(port: int, folder: Path) -> None:
    run_tool(
        ["storescu", "-aec", "HARMONODE", "-aet", "CT_ROOM1", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        timeout=300,
    )


def settled(store, n_series: int) -> bool:  # noqa: ANN001
    """Every received series analysed, every job done, every delivery sent."""
    done = store.index.query("SELECT COUNT(*) AS n FROM series WHERE origin='received' AND state='done'")[0]["n"]
    open_jobs = store.queue.pending_count()
    unsent = store.index.query("SELECT COUNT(*) AS n FROM deliveries WHERE state != 'sent'")[0]["n"]
    return done == n_series and open_jobs == 0 and unsent == 0


def results_exactly_once(orthanc, store, study_uids: list[str]) -> None:  # noqa: ANN001
    """Each result object of the node was received by Orthanc once, and each study holds one SR."""
    made = {
        r["sop_instance_uid"]
        for r in store.index.query(
            "SELECT i.sop_instance_uid FROM instances i JOIN series s ON s.series_instance_uid = i.series_instance_uid"
            " WHERE s.origin = 'result'"
        )
    }
    # Orthanc's log of receptions is written by Orthanc: give its last lines a moment to reach the file
    try:
        wait_until(lambda: made <= set(orthanc.receptions()), timeout=30, interval=0.2, what="Orthanc's log")
    except AssertionError:
        pass  # the assertions below say what is missing
    received = collections.Counter(orthanc.receptions())
    twice = {uid: n for uid, n in received.items() if n > 1}
    assert twice == {}, f"received more than once: {twice}"
    assert made and made <= set(received), f"{len(made - set(received))} result object(s) never reached Orthanc"
    for study_uid in study_uids:
        found = orthanc.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
        )
        assert len(found) == 1, f"study {study_uid}: {len(found)} SR in Orthanc"


@dataclass
class Cluster:
    """A running cluster of the tests: its processes, its config, the store read from the test, the workers."""

    procs: Processes
    config: Path
    store: Store
    workers: list[subprocess.Popen[bytes]]
    port: int


@contextmanager
def running_cluster(
    root: Path, broker: str, database: str, orthanc_port: int, workers: int = 1, env: dict[str, str] | None = None
) -> Iterator[Cluster]:
    """``listen``, ``workers`` × ``work`` and ``dispatch`` as processes of one config; every log printed on failure.

    The listener answers C-ECHO before the workers start; the test reads the cluster's database through a
    store of its own (closed, and every process stopped, at the end).
    """
    port = free_port()
    config = write_config(root, port, broker, database, orthanc_port)
    procs = Processes(root, config, env)
    store = None
    try:
        procs.start("listen", "listen")
        wait_until(lambda: echo(port), timeout=60, interval=0.2, what="the listener to answer C-ECHO")
        started = [procs.start(f"work-{chr(97 + i)}", "work") for i in range(workers)]
        procs.start("dispatch", "dispatch")
        store = open_store(root / "store", StoreSettings(database=database))
        yield Cluster(procs, config, store, started, port)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        if store is not None:
            store.close()
