"""Crash safety on 4 concurrent associations: SIGKILL the node while 4 storescu push, twice.

Group commits (several associations' instances made durable by one flush) and the settler's deferred
directory fsyncs must not lose what was acknowledged on any association: after recovery every instance
acknowledged to any sender is present, byte-identical, indexed, and nothing partial is left in tmp/.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from test_crash import N_SLICES, acknowledged, dataset_body, series_files, start_node  # noqa: F401 - fixture

from peers import free_port, peer_env, system_tool

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ASSOCIATIONS = 4


def _stored(data_dir: Path) -> int:
    """Instance files in the store's objects/."""
    objects = data_dir / "objects"
    return sum(1 for _ in objects.rglob("*.dcm")) if objects.is_dir() else 0


def _wait_until_stored(data_dir: Path, n: int, timeout_s: float = 60.0) -> None:
    """Until ``n`` instance files are in the store's objects/ (or the timeout: the assertions then say so)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _stored(data_dir) < n:
        time.sleep(0.02)


def test_sigkill_during_four_concurrent_pushes_loses_nothing_acknowledged(series_files, tmp_path):  # noqa: F811
    data_dir = tmp_path / "node"
    port = free_port()
    rng = random.Random(20261201)
    acked_all: set[str] = set()
    for _round in range(2):
        proc = start_node(data_dir, port)
        before = _stored(data_dir)
        senders = [
            subprocess.Popen(
                [system_tool("storescu"), "-v", "-aec", "HARMONODE", "127.0.0.1", str(port)]
                + [str(p) for p in series_files[i::ASSOCIATIONS]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=peer_env(),
            )
            for i in range(ASSOCIATIONS)
        ]
        # a random moment in the transfers: once a random share of the slices is stored (a fixed delay let a
        # fast run finish before the kill)
        _wait_until_stored(data_dir, before + int(rng.uniform(0.1, 0.6) * (N_SLICES - before)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        acked = [a for s in senders for a in acknowledged(s.communicate(timeout=60)[0])]
        assert 0 < len(acked) < N_SLICES, "the kill should land mid-transfer"
        acked_all.update(acked)
    proc = start_node(data_dir, port)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not list((data_dir / "tmp").iterdir()), "partial files or slots survived recovery"
    stored = {}
    for f in (data_dir / "objects").rglob("*.dcm"):
        raw = f.read_bytes()
        stored[dcmread(BytesIO(raw), stop_before_pixels=True).SOPInstanceUID] = dataset_body(raw)
    for path in acked_all:
        src = Path(path).read_bytes()
        sop = dcmread(BytesIO(src), stop_before_pixels=True).SOPInstanceUID
        assert sop in stored, f"acknowledged instance {Path(path).name} lost"
        assert stored[sop] == dataset_body(src)
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from storage.index import Index

    idx = Index(data_dir / "index.sqlite")
    assert idx.counts()["instances"] == len(stored)
    idx.close()
