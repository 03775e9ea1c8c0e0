"""Hostile peers at the door: idle, malformed and slow-dripping connections, huge declared PDUs, TLS, bad UIDs.

Each test holds the hostile connections open while a legitimate peer (pynetdicom or DCMTK echoscu) must be
served within 2 s; the memory test runs the node as its own process and reads its peak RSS.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from builders import SeriesSpec, synthetic_instance, tls_files
from conftest import make_config
from handlers.transport import INVALID_REQUEST
from node.app import Node
from peers import free_port, peer_env, system_tool, wait_until

LEGIT_WITHIN_S = 2.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(make_config(tmp_path / "node", node={"acse_timeout_s": 3.0}))
    n.start(("listen",))
    yield n
    n.stop()


def echo_seconds(port: int, tls: ssl.SSLContext | None = None) -> float:
    """Seconds a legitimate C-ECHO takes (inf when refused)."""
    t0 = time.perf_counter()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return float("inf")
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return time.perf_counter() - t0 if ok else float("inf")


@contextmanager
def hostile(port: int, n: int, first_bytes: bytes = b"", source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``n`` connections that send ``first_bytes`` (maybe nothing) and then hold the line."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
            if first_bytes:
                s.sendall(first_bytes)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_connections_do_not_lock_out_a_peer_from_the_same_address(node: Node) -> None:
    with hostile(node.port, 50):
        times = [echo_seconds(node.port) for _ in range(10)]
    assert max(times) < LEGIT_WITHIN_S, times
    assert node.door.evicted >= 46


def test_idle_connections_from_another_address_do_not_lock_out(node: Node) -> None:
    with hostile(node.port, 50, source="127.0.0.2"):
        times = [echo_seconds(node.port) for _ in range(10)]
    assert max(times) < LEGIT_WITHIN_S, times


def test_malformed_association_requests_do_not_lock_out(node: Node) -> None:
    garbage = b"\x01\x00" + struct.pack(">I", 68) + b"\x00\x01" + b"\xde\xad" * 30  # an A-ASSOCIATE-RQ cut short
    with hostile(node.port, 20, garbage):
        times = [echo_seconds(node.port) for _ in range(10)]
    assert max(times) < LEGIT_WITHIN_S, times


def test_slow_drip_connections_do_not_lock_out_and_are_closed(node: Node) -> None:
    stop = threading.Event()

    def drip(socks: list[socket.socket]) -> None:
        while not stop.wait(0.5):
            for s in socks:
                try:
                    s.send(b"\x01")
                except OSError:
                    pass

    with hostile(node.port, 20, b"\x01") as socks:
        dripper = threading.Thread(target=drip, args=(socks,), daemon=True)
        dripper.start()
        try:
            times = [echo_seconds(node.port) for _ in range(10)]
            # The four of them the door kept are closed once the set-up timeout (3 s here) runs out.
            assert all(closed_by_peer(s, 6.0) for s in socks[-4:])
        finally:
            stop.set()
    assert max(times) < LEGIT_WITHIN_S, times


def test_a_refused_address_is_closed_before_anything_is_read(tmp_path: Path) -> None:
    n = Node(make_config(tmp_path / "node", node={"allowed_addresses": ("127.0.0.1",)}))
    n.start(("listen",))
    try:
        with hostile(n.port, 20, source="127.0.0.2") as socks:
            assert all(closed_by_peer(s, 2.0) for s in socks)
            assert echo_seconds(n.port) < LEGIT_WITHIN_S
        assert n.door.refused >= 20
    finally:
        n.stop()


def test_an_idle_plain_connection_on_the_tls_port_does_not_block_tls_clients(tmp_path: Path) -> None:
    key, crt = tls_files(tmp_path)
    tls = {"enabled": True, "cert_file": str(crt), "key_file": str(key)}
    n = Node(make_config(tmp_path / "node", tls=tls, node={"acse_timeout_s": 3.0}))
    n.start(("listen",))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(crt))
    try:
        with hostile(n.port, 3) as socks:
            times = [echo_seconds(n.port, client) for _ in range(5)]
            assert max(times) < LEGIT_WITHIN_S, times
            assert all(closed_by_peer(s, 6.0) for s in socks)  # the handshake deadline closes them
    finally:
        n.stop()


def test_a_tls_peer_cannot_stream_a_pdu_past_the_cap(tmp_path: Path) -> None:
    key, crt = tls_files(tmp_path)
    tls = {"enabled": True, "cert_file": str(crt), "key_file": str(key)}
    n = Node(make_config(tmp_path / "node", tls=tls, node={"max_pdu_size": 65536}))
    n.start(("listen",))
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(crt))
        raw = socket.create_connection(("127.0.0.1", n.port), timeout=5)
        s = client.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(b"\x01\x00" + struct.pack(">I", 200 * 1024 * 1024))  # declares a 200 MiB PDU
        assert closed_by_peer(s, 5.0)
        assert echo_seconds(n.port, client) < LEGIT_WITHIN_S
    finally:
        n.stop()


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_connections_declaring_huge_pdus_cost_no_memory(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nport = {port}\ndata_dir = "{tmp_path / "data"}"\nmax_pdu_size = 0\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "listen", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    try:
        echo = [system_tool("echoscu"), "-aec", "HARMONODE", "127.0.0.1", str(port)]
        wait_until(lambda: subprocess.run(echo, capture_output=True, env=peer_env()).returncode == 0, timeout=60)
        before = _rss_peak_kib(proc.pid)
        declare = b"\x04\x00" + struct.pack(">I", 60 * 1024 * 1024) + b"\x00" * 1024  # P-DATA of 60 MiB, 1 KiB sent
        with hostile(port, 20, declare, source="127.0.0.2"), hostile(port, 20, declare, source="127.0.0.3"):
            time.sleep(1.0)  # let the node read what was sent
            assert subprocess.run(echo, capture_output=True, env=peer_env()).returncode == 0
            peak = _rss_peak_kib(proc.pid)
        assert peak - before < 100 * 1024, (before, peak)
        assert peak < 400 * 1024
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_c_store_with_an_unusable_uid_gets_a_status_at_once(node: Node) -> None:
    ds = synthetic_instance(SeriesSpec("P1", "U^ID", "1.2.3.4", "20240101", "120000", "A", "1.2.3.5", "CT", 1), 1)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 20
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
    assert assoc.is_established
    try:
        for bad in ("", " ", "\0"):
            ds.SOPInstanceUID = bad
            t0 = time.perf_counter()
            status = assoc.send_c_store(ds)
            assert status and int(status.Status) == INVALID_REQUEST
            assert time.perf_counter() - t0 < LEGIT_WITHIN_S
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert len(node.files.quarantined()) == 3


def test_a_dataset_past_the_cap_aborts_its_association_and_the_node_keeps_serving(tmp_path: Path) -> None:
    n = Node(make_config(tmp_path / "node", node={"max_dataset_mb": 4}))
    n.start(("listen",))
    try:
        ds = synthetic_instance(SeriesSpec("P1", "BIG^ONE", "1.2.3.4", "20240101", "1", "A", "1.2.3.5", "CT", 1), 1)
        ds.Rows = ds.Columns = 2048  # 8 MiB of pixels: over the 4 MiB cap
        ds.PixelData = bytes(2048 * 2048 * 2)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", n.port, ae_title="HARMONODE")
        assert assoc.is_established
        assoc.send_c_store(ds)
        wait_until(lambda: assoc.is_aborted, timeout=10, what="the association to be aborted")
        assert n.index.counts()["instances"] == 0
        assert echo_seconds(n.port) < LEGIT_WITHIN_S
    finally:
        n.stop()


def test_connections_closed_before_associating_do_not_leave_threads_waiting(node: Node) -> None:
    def acceptors() -> int:
        return sum(1 for t in threading.enumerate() if "AcceptorThread" in t.name)

    for i in range(100):
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
            s.sendall(b"\x01\x00" if i % 2 else b"\xff\xff\xff")
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(16)
            except OSError:
                pass
    # Each used to wait out the whole set-up timeout (3 s here, 10 s by default) for a PDU that cannot come.
    wait_until(lambda: acceptors() < 10, timeout=2.5, what="the closed connections' threads to end")
