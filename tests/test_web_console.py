"""The console's pages over the real server after a real push: the study, its series, the dead letters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import make_ct_series
from conftest import make_config
from node.config import Destination, with_overrides
from peers import free_port, run_tool, wait_until
from webnode import csrf_of, logged_in, web_node


@pytest.mark.peers
def test_pushed_study_dead_letters_and_resend_as_admin_only(tmp_path: Path) -> None:
    files = []
    for i, ds in enumerate(make_ct_series(seed=5)):
        files.append(tmp_path / f"ct{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    down = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())  # nobody listens
    config = with_overrides(make_config(tmp_path / "node"), destinations=[down], delivery={"max_attempts": 1})
    with web_node(tmp_path / "node", roles=("listen", "work", "dispatch"), config=config) as node:
        run_tool(["storescu", "-aec", "HARMONODE", "-aet", "CT_ROOM1", "127.0.0.1", str(node.port), *map(str, files)])
        series = wait_until(
            lambda: node.index.query("SELECT * FROM series WHERE origin='received' AND state='done'"),
            timeout=120,
            interval=0.3,
            what="the series analysed",
        )[0]
        wait_until(
            lambda: node.index.query("SELECT 1 FROM deliveries WHERE state='dead'"), timeout=60, what="a dead letter"
        )
        admin = logged_in(node, "ada")
        studies = admin.get("/studies").text
        assert "Test^Patient" in studies and series["series_instance_uid"] in studies
        assert series["condition_key"] in studies and "done" in studies
        page = admin.get(f"/series/{series['series_instance_uid']}").text
        findings = json.loads(series["findings"] or "[]")
        assert f"Findings ({len(findings)})" in page and page.count('class="finding"') == len(findings)
        for stage in json.loads(series["timings"]):
            assert f"<td>{stage}</td>" in page
        assert "dead" in page  # the results sent from this study, each with its delivery state
        deliveries = admin.get("/deliveries").text
        assert "Resend dead" in deliveries
        viewer = logged_in(node, "vic")
        token = csrf_of(viewer.get("/deliveries").text)
        assert viewer.post("/deliveries/resend", data={"destination": "pacs", "csrf_token": token}).status_code == 403
        dead = len(node.index.query("SELECT 1 FROM deliveries WHERE state='dead'"))
        assert dead > 0
        resent = admin.post("/deliveries/resend", data={"destination": "pacs", "csrf_token": csrf_of(deliveries)})
        assert resent.status_code == 303 and resent.headers["location"] == f"/deliveries?requeued={dead}"
        for path in ("/rules", "/models", "/quarantine"):
            assert admin.get(path).status_code == 200
        assert "harmonode lesion detector" in admin.get("/models").text
