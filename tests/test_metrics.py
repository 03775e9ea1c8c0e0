"""/metrics after real pushes: DCMTK storescu's instances and bytes counted by calling AE, refusals by
status, the analysed series' stage histograms, the queue and series gauges; a scrape by real Prometheus."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from builders import dataset_bytes, make_ct_series
from peers import free_port, run_tool, system_tool, wait_until
from webnode import base_url, web_node

N = 16


def scrape(node, headers: dict | None = None) -> dict[tuple[str, tuple], float]:  # noqa: ANN001
    """Every sample of the node's /metrics as {(name, sorted labels): value}."""
    response = httpx.get(base_url(node) + "/metrics", headers=headers or {})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A whole node (listen, work, dispatch, web) that DCMTK pushed one series of N instances to."""
    workdir = tmp_path_factory.mktemp("metrics")
    files = []
    for i, ds in enumerate(make_ct_series(seed=3, slices=N)):
        path = workdir / f"ct{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    with web_node(workdir / "node", roles=("listen", "work", "dispatch")) as node:
        run_tool(["storescu", "-aec", "HARMONODE", "-aet", "CT_ROOM1", "127.0.0.1", str(node.port), *map(str, files)])
        yield node, files


@pytest.mark.peers
def test_instances_and_bytes_are_counted_by_calling_ae(pushed) -> None:  # noqa: ANN001
    node, files = pushed
    samples = scrape(node)
    ae = (("calling_ae", "CT_ROOM1"),)
    assert samples[("harmonode_instances_received_total", ae)] == N
    assert samples[("harmonode_bytes_received_total", ae)] == sum(len(dataset_bytes(f)) for f in files)
    assert samples[("harmonode_associations_open", ())] == 0
    assert samples[("harmonode_disk_free_bytes", ())] > 0
    assert samples[("harmonode_store_accepting", ())] == 1


@pytest.mark.peers
def test_an_analysed_series_feeds_the_stage_histograms_and_gauges(pushed) -> None:  # noqa: ANN001
    node, _ = pushed

    def analysed() -> bool:
        return scrape(node).get(("harmonode_series_analysed_total", (("state", "done"),)), 0) == 1

    wait_until(analysed, timeout=120, interval=0.5, what="the series analysed")
    samples = scrape(node)
    for stage in ("load", "key", "rule", "harmonize", "detect", "results"):
        assert samples[("harmonode_stage_seconds_count", (("stage", stage),))] == 1, stage
        assert samples[("harmonode_stage_seconds_sum", (("stage", stage),))] >= 0
    timings = node.index.query("SELECT timings FROM series WHERE origin='received'")[0]["timings"]
    assert '"detect"' in timings
    received = (("state", "done"),)
    assert samples[("harmonode_series", received)] >= 1  # the received series; result series are indexed too
    assert samples[("harmonode_queue_jobs", (("kind", "analyze-series"), ("state", "done")))] == 1


def test_refusals_are_counted_by_status(pushed) -> None:  # noqa: ANN001
    node, _ = pushed
    ds = make_ct_series(seed=4, slices=1)[0]
    ds.StudyInstanceUID = "1.2.not-a-uid"
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0xA900
    samples = scrape(node)
    assert samples[("harmonode_associations_open", ())] == 1  # this one, still open
    assoc.release()
    assert samples[("harmonode_store_refusals_total", (("status", "0xA900"),))] == 1
    assert ("harmonode_instances_received_total", (("calling_ae", "BADSCU"),)) not in samples


def test_metrics_token_when_configured(tmp_path: Path) -> None:
    with web_node(tmp_path / "node", web={"metrics_token": "s3cret-scrape"}) as node:
        assert httpx.get(base_url(node) + "/metrics").status_code == 401
        assert scrape(node, {"authorization": "Bearer s3cret-scrape"})[("harmonode_quarantined_files", ())] == 0


@pytest.mark.peers
def test_real_prometheus_scrapes_the_node(pushed, tmp_path: Path) -> None:  # noqa: ANN001
    binary = system_tool("prometheus")  # skipped here without Debian's prometheus, a failure in CI
    node, _ = pushed
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: harmonode\n    static_configs: [{{targets: ['127.0.0.1:{node.web.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = f"http://127.0.0.1:{port}/api/v1/query"

        def scraped() -> bool:
            try:
                result = httpx.get(query, params={"query": 'harmonode_instances_received_total{calling_ae="CT_ROOM1"}'})
                values = result.json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return bool(values) and float(values[0]["value"][1]) == N

        wait_until(scraped, timeout=60, interval=0.5, what="Prometheus scraping the node")
        up = httpx.get(query, params={"query": "up{job='harmonode'}"}).json()["data"]["result"]
        assert up and up[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
