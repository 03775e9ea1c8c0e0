"""``[node] listeners = 2``: two processes serve one port and share the file store and the index.

Four lanes of DCMTK storescu push at once (four concurrent associations at any time). The first process
accepts each connection and hands it to the process serving the fewest, so both always get some; each
lane sends its share on several associations one after the other. Every acknowledged instance must be
indexed exactly once and byte-identical, both processes must have stored some (each logs its count when it
stops), and a SIGKILL of the extra listener mid-push loses nothing acknowledged (as
tests/test_crash_concurrent.py for one process).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from test_crash import acknowledged, dataset_body

from builders import write_noise_series
from peers import free_port, listening_pids, peer_env, system_tool, wait_until

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).parent.parent
N_SLICES = 200
LANES = 4


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[Path]:
    return write_noise_series(tmp_path_factory.mktemp("slices"), N_SLICES, 256, seed=24)


def start_node(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``harmonode serve`` with ``listeners = 2``, once both processes listen on ``port``."""
    cfg = data_dir.parent / "node.toml"
    cfg.write_text(
        f'[node]\nport = {port}\nlisteners = 2\ndata_dir = "{data_dir}"\n'
        "[pipeline]\nquiet_seconds = 3600\n[web]\nenabled = false\n"
    )
    mark = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),  # noqa: SIM115 - the children inherit it
        cwd=ROOT,
        env={**peer_env(), "PYTHONPATH": str(ROOT)},
    )
    wait_until(lambda: len(listening_pids(log, port, mark)) == 2, timeout=90, what="two listeners on the port")
    return proc


def extra_pid(log: Path) -> int:
    return int(re.findall(r"extra listener 1 started as pid (\d+)", log.read_text())[-1])


def push_in_lanes(files: list[Path], port: int, per_association: int) -> tuple[list[str], int]:
    """LANES concurrent lanes, each sending its share on associations of ``per_association`` files, in turn.

    Returns the files acknowledged with success and how many storescu runs failed (an aborted association).
    """
    acked: list[str] = []
    failed = 0
    lock = threading.Lock()

    def lane(share: list[Path]) -> None:
        nonlocal failed
        for i in range(0, len(share), per_association):
            run = subprocess.run(
                [system_tool("storescu"), "-v", "-aec", "HARMONODE", "127.0.0.1", str(port)]
                + [str(p) for p in share[i : i + per_association]],
                capture_output=True,
                text=True,
                env=peer_env(),
                timeout=120,
            )
            with lock:
                acked.extend(acknowledged(run.stdout + run.stderr))
                failed += run.returncode != 0

    threads = [threading.Thread(target=lane, args=(files[i::LANES],)) for i in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acked, failed


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def check_store(data_dir: Path, acked: set[str]) -> None:
    """Every acknowledged file stored byte-identical and indexed exactly once; nothing left in tmp/."""
    sys.path.insert(0, str(ROOT))
    from storage.index import Index

    assert not list((data_dir / "tmp").iterdir()), "partial files or slots survived"
    stored = {}
    for f in (data_dir / "objects").rglob("*.dcm"):
        raw = f.read_bytes()
        stored[dcmread(BytesIO(raw), stop_before_pixels=True).SOPInstanceUID] = dataset_body(raw)
    idx = Index(data_dir / "index.sqlite")
    try:
        rows = idx.query("SELECT sop_instance_uid, COUNT(*) n FROM instances GROUP BY sop_instance_uid")
        indexed = {r["sop_instance_uid"]: r["n"] for r in rows}
        [series] = idx.query("SELECT instance_count FROM series")
    finally:
        idx.close()
    for path in acked:
        src = Path(path).read_bytes()
        sop = dcmread(BytesIO(src), stop_before_pixels=True).SOPInstanceUID
        assert sop in stored, f"acknowledged instance {Path(path).name} lost"
        assert stored[sop] == dataset_body(src)
        assert indexed.get(sop) == 1, f"{Path(path).name} indexed {indexed.get(sop, 0)} times"
    assert set(indexed) == set(stored) and series["instance_count"] == len(stored)


def test_two_listeners_share_the_port_and_index_every_instance_once(slices, tmp_path):
    data_dir, log, port = tmp_path / "node", tmp_path / "node.log", free_port()
    proc = start_node(data_dir, port, log)
    try:
        acked, failed = push_in_lanes(slices, port, per_association=10)  # 20 associations, 4 at a time
    finally:
        stop(proc)
    assert failed == 0 and len(acked) == N_SLICES
    check_store(data_dir, set(acked))
    counts = {int(p): int(n) for p, n in re.findall(r"pid (\d+) stored (\d+) instance", log.read_text())}
    assert len(counts) == 2 and sum(counts.values()) == N_SLICES, counts
    assert all(n > 0 for n in counts.values()), f"one listener received nothing: {counts}"


def _written_bytes(pid: int) -> int:
    try:
        return int(re.search(r"wchar: (\d+)", Path(f"/proc/{pid}/io").read_text()).group(1))
    except (OSError, AttributeError):
        return 0


def test_sigkill_of_a_listener_mid_push_loses_nothing_acknowledged(slices, tmp_path):
    data_dir, log, port = tmp_path / "node", tmp_path / "node.log", free_port()
    proc = start_node(data_dir, port, log)
    victim = extra_pid(log)
    result: dict[str, tuple[list[str], int]] = {}
    pusher = threading.Thread(target=lambda: result.setdefault("push", push_in_lanes(slices, port, 25)))
    try:
        baseline = _written_bytes(victim)
        pusher.start()
        # kill once the extra listener is storing (a few slices' worth written), not at a fixed delay
        wait_until(lambda: _written_bytes(victim) > baseline + 2_000_000, timeout=60, interval=0.01,
                   what="the extra listener to receive")  # fmt: skip
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        wait_until(lambda: "restarting" in log.read_text(), timeout=30, what="the supervisor to restart it")
        pusher.join(timeout=300)
        wait_until(lambda: extra_pid(log) != victim, timeout=30, what="a new extra listener")
    finally:
        stop(proc)
    acked, failed = result["push"]
    assert 0 < len(acked) <= N_SLICES
    assert failed > 0, "the kill should land mid-association"
    proc = start_node(data_dir, port, log)  # the parent recovers what the killed listener left
    stop(proc)
    check_store(data_dir, set(acked))
