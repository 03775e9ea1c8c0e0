"""/healthz and /readyz over the real server; disk back-pressure on a small tmpfs with real C-STOREs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from builders import make_ct_series
from conftest import make_config
from node.config import Destination, with_overrides
from peers import free_port, wait_until
from storage.files import file_sha256
from webnode import base_url, web_node


def test_readyz_reports_each_check_and_fails_on_an_unreachable_destination(tmp_path: Path) -> None:
    config = make_config(tmp_path / "node")
    itself = Destination(name="itself", ae_title="HARMONODE", host="127.0.0.1", port=config.node.port)
    config = with_overrides(config, destinations=[itself])
    with web_node(tmp_path / "node", roles=("listen", "dispatch"), config=config) as node:
        ready = httpx.get(base_url(node) + "/readyz")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        assert {"store_writable", "index_open", "queue_open", "disk_space", "roles", "destination:itself"} <= set(
            checks
        )
        assert checks["roles"]["running"] == ["dispatch", "listen"]
        assert all(c["ok"] for c in checks.values())
    closed = Destination(name="down", ae_title="PACS", host="127.0.0.1", port=free_port())
    config = with_overrides(make_config(tmp_path / "node2"), destinations=[closed])
    with web_node(tmp_path / "node2", config=config) as node:
        assert httpx.get(base_url(node) + "/healthz").json() == {"alive": True}  # alive, but not ready
        answer = httpx.get(base_url(node) + "/readyz")
        assert answer.status_code == 503
        down = answer.json()["checks"]["destination:down"]
        assert down["ok"] is False and down["detail"]
        assert answer.json()["checks"]["store_writable"]["ok"] is True


MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB tmpfs (root only: the node's data directory on a disk that fills up)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _big_slices(n: int) -> list:
    """CT instances of 256 × 256 int16 (128 KiB of pixels each)."""
    out = []
    rng = np.random.default_rng(0)
    for ds in make_ct_series(seed=9, slices=n):
        ds.Rows = ds.Columns = 256
        ds.PixelData = rng.integers(0, 2000, (256, 256), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def _push(port: int, datasets: list) -> list[int]:
    ae = AE(ae_title="CT_ROOM1")
    ae.dimse_timeout = 120  # a loaded 2-core CI machine answered one store after pynetdicom's default 30 s
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_a_full_disk_answers_a700_keeps_every_acknowledged_instance_and_recovers(small_disk: Path) -> None:
    data_dir = small_disk / "node"
    sections = {"storage": {"min_free_gb": 4 * MB / 1024**3, "resume_free_gb": 5 * MB / 1024**3}}
    with web_node(data_dir, **sections) as node:
        datasets = _big_slices(80)  # ~10.5 MB: more than fits above the 4 MB watermark
        statuses = _push(node.port, datasets)
        stored = [ds for ds, s in zip(datasets, statuses, strict=True) if s == 0]
        refused = [s for s in statuses if s != 0]
        assert stored and refused, statuses
        assert set(refused) == {0xA700}
        first_refusal = statuses.index(0xA700)
        assert all(s == 0xA700 for s in statuses[first_refusal:])  # no flapping around the mark
        st = os.statvfs(small_disk)
        assert st.f_bavail * st.f_frsize >= 3 * MB  # refused before the disk ran out, with room to spare
        # every acknowledged instance is indexed and its file intact
        rows = {r["sop_instance_uid"]: r for r in node.index.query("SELECT * FROM instances")}
        assert set(rows) == {ds.SOPInstanceUID for ds in stored}
        for row in rows.values():
            assert file_sha256(node.files.abspath(row["path"])) == row["sha256"]
        assert not node.files.quarantined()  # a full disk is no place for copies of what was refused
        ready = httpx.get(base_url(node) + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["disk_space"]["ok"] is False
        metrics = httpx.get(base_url(node) + "/metrics").text
        assert 'harmonode_store_refusals_total{status="0xA700"} ' + f"{float(len(refused))}" in metrics
        assert "harmonode_store_accepting 0.0" in metrics
        # free space: the node accepts again above the high watermark
        for row in list(rows.values())[: len(rows) // 2 + 2]:
            node.files.abspath(row["path"]).unlink()
        wait_until(lambda: node.disk.accepting(), timeout=10, what="accepting again")
        assert _push(node.port, _big_slices(1)) == [0]
        assert httpx.get(base_url(node) + "/readyz").json()["checks"]["disk_space"]["ok"] is True


def test_a_web_port_in_use_leaves_the_dicom_roles_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from node.app import Node

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        node = Node(make_config(tmp_path / "node", web={"port": taken.getsockname()[1]}))
        node.start(("listen", "web"))
        try:
            assert node.web is None and "web console not started" in caplog.text
            assert _push(node.port, make_ct_series(seed=2, slices=1)) == [0]
        finally:
            node.stop()
    finally:
        taken.close()
