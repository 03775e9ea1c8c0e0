"""The console in real headless Chromium (Debian's, driven by Playwright; no browser download), and its
finding buttons over the real server.

One node serves the module: a head CTA study with an aneurysm pushed by DCMTK storescu, analysed by the
shipped detector, its results dead-lettered (the one destination is down, one attempt). In the browser: log
in through the form, see the study, its finding with the key image the server renders from the key-image
SC and the viewer link, accept the finding with its button, resend the dead letters as admin; as a viewer,
no button and a 403 for the same form. Over HTTP: modify and reject as operator (a corrected SR is queued),
the refusals (viewer, no CSRF token, bad values, unknown finding) and the audit of each verdict.

Screenshots go to the test's temp folder; ``HARMONODE_UPDATE_DOCS=1`` copies them into docs/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import httpx
import pytest
from viewer.ohif import browser, keep_for_docs

from conftest import make_config
from node.app import Node
from node.config import Destination, with_overrides
from peers import free_port, run_tool, system_tool, wait_until
from simulator.studies import simulate_study, write_study
from storage import findings as found
from storage.audit import read_messages
from webnode import PASSWORDS, csrf_of, logged_in, web_node

pytestmark = pytest.mark.peers

VIEWER_URL = "http://viewer.example/viewer?StudyInstanceUIDs={study}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The node with its console, one analysed study with findings, its deliveries dead."""
    system_tool("chromium")  # skipped here without Debian's chromium, a failure in CI (./dev setup installs it)
    root = tmp_path_factory.mktemp("console")
    study = simulate_study("head-cta", "ge-revolution-standard", seed=5, size="test", lesion_diameters_mm=[9.0])
    paths = [p for p in write_study(study, root / "study") if p.suffix == ".dcm"]
    down = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())  # nobody listens
    config = with_overrides(
        make_config(root / "node"), destinations=[down], delivery={"max_attempts": 1}, web={"viewer_url": VIEWER_URL}
    )
    with web_node(root / "node", roles=("listen", "work", "dispatch"), config=config) as node:
        run_tool(["storescu", "-aec", "HARMONODE", "-aet", "CT_ROOM1", "127.0.0.1", str(node.port), *map(str, paths)])
        series_uid = study.truth["series_instance_uid"]
        wait_until(
            lambda: (node.index.series(series_uid) or {}).get("state") == "done", timeout=180, what="the analysis"
        )
        wait_until(
            lambda: (
                node.index.query("SELECT 1 FROM deliveries WHERE state='dead'")
                and not node.index.query("SELECT 1 FROM deliveries WHERE state IN ('pending', 'failed')")
            ),
            timeout=60,
            what="the dead letters",
        )
        findings = found.findings_of_series(node.index, series_uid)
        assert len(findings) >= 3, "the study needs three findings (accept, modify, reject)"
        yield {
            "node": node,
            "series": series_uid,
            "study": study.truth["study_instance_uid"],
            "findings": findings,
            "patient": str(study.datasets[0].PatientName),
        }


def _url(node: Node) -> str:
    return f"http://localhost:{node.web.port}"  # localhost: a secure context, so the Secure cookie is kept


def _log_in(page, node: Node, name: str) -> None:  # noqa: ANN001
    page.goto(_url(node) + "/studies")  # not logged in: sent to the login form
    assert "/login" in page.url
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url("**/studies")


def test_admin_sees_the_finding_accepts_it_and_resends_viewer_is_refused(site: dict, tmp_path: Path) -> None:
    node, series_uid = site["node"], site["series"]
    first = site["findings"][0]
    with browser() as chromium:
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        _log_in(page, node, "ada")
        shown = page.inner_text("main")
        assert site["patient"] in shown or site["patient"].replace("^", " ") in shown
        assert page.locator(f"a[href='/series/{series_uid}']").count() == 1
        page.screenshot(path=str(tmp_path / "console-studies.png"), full_page=True)
        page.goto(_url(node) + f"/series/{series_uid}")
        rows = page.locator("tr.finding")
        assert rows.count() == len(site["findings"])
        image = page.locator("#finding-1 img.key-image")
        image.scroll_into_view_if_needed()
        wait_until(lambda: image.evaluate("i => i.complete && i.naturalWidth"), timeout=20, what="the key image")
        assert image.evaluate("i => i.naturalWidth") >= 512  # the SC's enlarged slice, decoded by the browser
        link = page.locator("a.viewer")
        assert link.get_attribute("href") == VIEWER_URL.replace("{study}", site["study"])
        page.screenshot(path=str(tmp_path / "console-finding.png"), full_page=True)
        page.locator("#finding-1 form.assess button[value=accept]").click()
        page.wait_for_url("**assessed=*")
        assert page.locator("#finding-1 .assessment").inner_text() == "accepted"
        assert found.finding(node.index, first["finding_id"])["state"] == "accepted"
        assert found.finding(node.index, first["finding_id"])["assessed_by"] == "ada"
        dead = len(node.index.query("SELECT 1 FROM deliveries WHERE state='dead'"))
        page.goto(_url(node) + "/deliveries")
        page.screenshot(path=str(tmp_path / "console-deliveries.png"), full_page=True)
        page.locator("form[action='/deliveries/resend'] button").first.click()
        page.wait_for_url("**/deliveries?requeued=*")
        assert f"{dead} delivery job(s) back in the queue" in page.inner_text("p.msg")

        viewer = chromium.new_page()
        _log_in(viewer, node, "vic")
        viewer.goto(_url(node) + "/deliveries")
        assert viewer.locator("form[action='/deliveries/resend']").count() == 0
        token = viewer.locator("input[name=csrf_token]").first.get_attribute("value")
        refused = viewer.request.post(
            _url(node) + "/deliveries/resend", form={"destination": "pacs", "csrf_token": token}
        )
        assert refused.status == 403
        viewer.goto(_url(node) + f"/series/{series_uid}")
        assert viewer.locator("form.assess").count() == 0
        refused = viewer.request.post(
            _url(node) + f"/findings/{first['finding_id']}/assess", form={"action": "reject", "csrf_token": token}
        )
        assert refused.status == 403
        assert found.finding(node.index, first["finding_id"])["state"] == "accepted"
    for name in ("console-studies.png", "console-finding.png", "console-deliveries.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        keep_for_docs(tmp_path / name, name)


def test_operator_modifies_and_rejects_over_http_and_every_verdict_is_audited(site: dict) -> None:
    node = site["node"]
    second, third = site["findings"][1], site["findings"][2]
    operator = logged_in(node, "olga")
    token = csrf_of(operator.get(f"/series/{site['series']}").text)
    modify = {"action": "modify", "kind": "nodule", "diameter_mm": "4.5", "center_mm": "", "csrf_token": token}
    answer = operator.post(f"/findings/{second['finding_id']}/assess", data=modify)
    assert answer.status_code == 303 and answer.headers["location"].endswith(f"assessed={second['finding_id']}")
    changed = found.finding(node.index, second["finding_id"])
    assert (changed["state"], changed["assessed_kind"], changed["assessed_diameter_mm"]) == ("modified", "nodule", 4.5)
    answer = operator.post(f"/findings/{third['finding_id']}/assess", data={"action": "reject", "csrf_token": token})
    assert answer.status_code == 303 and found.finding(node.index, third["finding_id"])["state"] == "rejected"
    corrected = node.index.query("SELECT version FROM reports WHERE series_instance_uid=?", (site["series"],))
    assert max(r["version"] for r in corrected) >= 2  # a corrected SR was issued

    assert operator.post(f"/findings/{third['finding_id']}/assess", data={"action": "reject"}).status_code == 403
    bad = [
        {"action": "delete"},
        {"action": "modify", "kind": "tumour"},
        {"action": "modify", "diameter_mm": "big"},
        {"action": "modify", "center_mm": "1,2"},
        {"action": "modify"},
    ]
    for form in bad:
        assert (
            operator.post(f"/findings/{third['finding_id']}/assess", data={**form, "csrf_token": token}).status_code
            == 400
        )
    unknown = operator.post("/findings/1.2.3.4/assess", data={"action": "accept", "csrf_token": token})
    assert unknown.status_code == 404
    assert operator.post(
        "/findings/..%2F..%2Fx/assess", data={"action": "accept", "csrf_token": token}
    ).status_code in (
        400,
        404,
    )
    anonymous = httpx.post(f"http://127.0.0.1:{node.web.port}/findings/{third['finding_id']}/assess", data=modify)
    assert anonymous.status_code == 401

    trail = node.config.data_path / "audit" / "audit.log"
    verdicts = [
        m
        for m in map(ET.fromstring, read_messages(trail))
        if m.find("EventIdentification/EventID").get("csd-code") == "110103"
        and m.find("EventIdentification").get("EventActionCode") == "U"
    ]
    by = [
        p.get("UserID") for m in verdicts for p in m.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"
    ]
    assert by.count("olga") == 2 and "ada" in by  # the accept in the browser, the modify and reject here
    assert site["patient"] and site["patient"] not in trail.read_text()
