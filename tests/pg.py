"""A PostgreSQL server for the tests: the one on 127.0.0.1:5432 (user postgres, trust), else one started here.

``server()`` finds or starts it once per test session; ``fresh_database(base)`` makes an empty database
(``harmonode_t_<random>``) and ``drop_database`` removes it. Nothing is skipped: a machine where neither
works fails with a message that says what was tried.
Also the worker of the two-process claim test (``claim_until_empty``), importable by a spawned process.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

DEFAULT = "postgresql://postgres@127.0.0.1:5432"


@dataclass
class Server:
    """A reachable server: its base URL (no database), and how to stop it when the tests started it."""

    base: str
    started: Path | None = None  # the data directory of a server started here
    stop_as: list[str] = field(default_factory=list)  # runuser prefix when started as the postgres user

    def stop(self) -> None:
        """Stop a server the tests started (one found running is left alone)."""
        if self.started is None:
            return
        subprocess.run([*self.stop_as, _postgres_tool("pg_ctl"), "-D", str(self.started), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(self.started.parent, ignore_errors=True)


def _answers(base: str) -> bool:
    try:
        with psycopg.connect(f"{base}/postgres", connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_tool(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), "")
    if not found:
        raise RuntimeError(f"nothing answers on 127.0.0.1:5432 and {name} is missing: apt-get install postgresql")
    return found


def _start_own() -> Server:
    """initdb into a temp dir and pg_ctl start on a free port (as the postgres OS user when run as root)."""
    tools = {tool: _postgres_tool(tool) for tool in ("initdb", "pg_ctl")}
    top = Path(tempfile.mkdtemp(prefix="harmonode-pg-"))
    data, sock = top / "data", top / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run it as the postgres user, in folders it owns
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(top, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    steps = [
        [*prefix, tools["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        [*prefix, tools["pg_ctl"], "-D", str(data), "-w", "-l", str(top / "log"), "-o",
         f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{step[len(prefix)]} failed: {done.stderr[-1500:] or done.stdout[-1500:]}")
    base = f"postgresql://postgres@127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _answers(base):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the PostgreSQL started in {data} does not answer on port {port}")
        time.sleep(0.2)
    return Server(base, data, prefix)


def server() -> Server:
    """The server of ``HARMONODE_TEST_POSTGRES``, else the one on 127.0.0.1:5432, else one started here.

    Raises
    ------
    RuntimeError
        Neither: what was tried and why it failed.
    """
    given = os.environ.get("HARMONODE_TEST_POSTGRES", "")  # another server: its URL without a database
    if given:
        if not _answers(given):
            raise RuntimeError(f"HARMONODE_TEST_POSTGRES={given} does not answer")
        return Server(given)
    if _answers(DEFAULT):
        return Server(DEFAULT)
    return _start_own()


def fresh_database(base: str) -> str:
    """A new empty database on the server; its URL."""
    name = f"harmonode_t_{secrets.token_hex(6)}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def drop_database(url: str) -> None:
    """Drop a database made by ``fresh_database`` (its connections are ended)."""
    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def claim_until_empty(url: str, by_id: bool, ids: list[int], start: float, out: str) -> None:
    """One claiming process: claim (``claim`` or ``claim_job`` over ``ids``) until nothing is left.

    Waits until ``start`` (wall clock) so that both processes claim at the same moment; writes the ids it
    got, one a line, to ``out``.
    """
    from storage.queue import JobQueue

    queue = JobQueue(url)
    got: list[int] = []
    while time.time() < start:
        time.sleep(0.005)
    if by_id:
        for job_id in ids:
            job = queue.claim_job(job_id)
            if job is not None:
                queue.complete(job)
                got.append(job.id)
    else:
        while (job := queue.claim(("k",))) is not None:
            queue.complete(job)
            got.append(job.id)
    queue.close()
    Path(out).write_text("".join(f"{i}\n" for i in got))


def record_many(url: str, study: str, series: str, count: int, start: float) -> None:
    """One indexing process: record ``count`` new instances of one new patient's study and series."""
    from builders import SeriesSpec, synthetic_instance
    from storage.index import Index, instance_meta_from_dataset

    index = Index(url)
    spec = SeriesSpec("P9", "DOE^JOHN", study, "20240115", "101500", "ACC9", series, "CT", count)
    instances = [instance_meta_from_dataset(synthetic_instance(spec, n), "1.2.840.10008.1.2.1") for n in range(count)]
    while time.time() < start:
        time.sleep(0.005)
    for n, meta in enumerate(instances):
        index.record_instance(meta, f"{meta.sop_instance_uid}.dcm", 10, f"{n:064d}", 1)
    index.close()


@contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh database for a ``with`` block (on ``server()``), dropped after it, with a server started here."""
    found = server()
    url = fresh_database(found.base)
    try:
        yield url
    finally:
        drop_database(url)
        found.stop()
