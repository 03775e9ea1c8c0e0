"""Crash safety: SIGKILL the node while DCMTK storescu pushes 500 slices, several times.

After each restart, every instance storescu saw acknowledged is present and byte-identical, and no
half-written file is visible in the store.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from builders import write_noise_series
from peers import free_port, peer_env, system_tool, wait_until

pytestmark = [pytest.mark.peers, pytest.mark.slow]

N_SLICES = 500


def dataset_body(raw: bytes) -> bytes:
    ds = dcmread(BytesIO(raw), stop_before_pixels=True)
    return raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]


@pytest.fixture(scope="module")
def series_files(tmp_path_factory) -> list[Path]:
    return write_noise_series(tmp_path_factory.mktemp("series"), N_SLICES, 128, seed=1)


def start_node(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = data_dir.parent / "node.toml"
    cfg.write_text(f'[node]\nport = {port}\ndata_dir = "{data_dir}"\n[pipeline]\nquiet_seconds = 3600\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir.parent / "node.log", "ab"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )

    def up() -> bool:
        r = subprocess.run(
            [system_tool("echoscu"), "-aec", "HARMONODE", "127.0.0.1", str(port)], capture_output=True, env=peer_env()
        )
        return r.returncode == 0

    wait_until(up, timeout=60, interval=0.1, what="the node to answer C-ECHO")
    return proc


def acknowledged(storescu_output: str) -> list[str]:
    """Files storescu saw a success response for (its -v log pairs 'Sending file' with a response)."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_sigkill_during_ingest_loses_nothing_acknowledged(series_files, tmp_path):
    data_dir = tmp_path / "node"
    port = free_port()
    rng = random.Random(20261122)
    acked_all: set[str] = set()
    for _round in range(3):
        proc = start_node(data_dir, port)
        sender = subprocess.Popen(
            [system_tool("storescu"), "-v", "-aec", "HARMONODE", "127.0.0.1", str(port), *map(str, series_files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=peer_env(),
        )
        time.sleep(rng.uniform(0.5, 2.5))  # a random moment in the transfer: what this test is about
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out, _ = sender.communicate(timeout=60)
        acked = acknowledged(out)
        assert 0 < len(acked) < N_SLICES, "the kill should land mid-transfer"
        acked_all.update(acked)
    # restart: recovery runs, then check what the node holds
    proc = start_node(data_dir, port)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not list((data_dir / "tmp").iterdir()), "partial files survived recovery"
    stored = {}
    for f in (data_dir / "objects").rglob("*.dcm"):
        raw = f.read_bytes()
        body = dataset_body(raw)  # a half-written file would fail to parse here
        stored[dcmread(BytesIO(raw), stop_before_pixels=True).SOPInstanceUID] = body
    for path in acked_all:
        src = Path(path).read_bytes()
        sop = dcmread(BytesIO(src), stop_before_pixels=True).SOPInstanceUID
        assert sop in stored, f"acknowledged instance {Path(path).name} lost"
        assert stored[sop] == dataset_body(src)
    # and the index knows every stored file (recovery re-indexes what a kill left unindexed)
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from storage.index import Index

    idx = Index(data_dir / "index.sqlite")
    assert idx.counts()["instances"] == len(stored)
    idx.close()
