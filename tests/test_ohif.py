"""OHIF 3 (its prebuilt dist from npm) in Debian's headless chromium, reading a study from the node's DICOMweb.

A CT series is stored over STOW-RS; OHIF opens the study through ``/dicom-web`` (QIDO-RS, series metadata,
frames), every request authenticated by HTTP Basic as the viewer user, and draws the slice: the test reads
the screenshot's pixels inside the viewport, where the phantom's bright blob must show above the noise.
The screenshot is kept as docs/ohif-study.png when HARMONODE_UPDATE_DOCS=1.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from PIL import Image
from viewer.ohif import keep_for_docs
from viewer.site import DIST, ViewerSite

from builders import make_ct_series
from peers import in_ci, wait_until
from webnode import PASSWORDS, base_url, web_node

pytestmark = pytest.mark.peers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _needs() -> str:
    missing = []
    if not (DIST / "index.html").is_file():
        missing.append("OHIF's dist (tests/viewer/fetch-ohif.sh)")
    if not os.path.exists(CHROMIUM):
        missing.append("chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright")
    return ", ".join(missing)


def test_ohif_opens_a_study_from_the_nodes_dicomweb(tmp_path: Path) -> None:
    missing = _needs()
    if missing:
        if in_ci():
            pytest.fail(f"missing: {missing}")
        pytest.skip(f"missing: {missing}")
    from playwright.sync_api import sync_playwright

    with web_node(tmp_path / "node") as node:
        ct = make_ct_series(seed=3, slices=16)
        session = create_session_from_user_pass("olga", PASSWORDS["olga"])
        DICOMwebClient(url=base_url(node) + "/dicom-web", session=session).store_instances(ct)
        study = str(ct[0].StudyInstanceUID)
        site = ViewerSite(DIST, node.web.port).start()
        credentials = base64.b64encode(f"vic:{PASSWORDS['vic']}".encode()).decode()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM,
                    headless=True,
                    args=["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"],
                )
                try:
                    page = browser.new_page(
                        viewport={"width": 1280, "height": 800},
                        extra_http_headers={"Authorization": f"Basic {credentials}"},
                    )
                    # OHIF's first-visit tour and banner would cover the image
                    page.add_init_script("localStorage.setItem('showInvestigationalUseDialog', 'never');")
                    page.goto(f"{site.url}/viewer?StudyInstanceUIDs={study}")
                    wait_until(
                        lambda: sum("/frames/" in p for p, _ in site.proxied) >= 1, timeout=60, what="OHIF frames"
                    )
                    page.get_by_text("CTA head").first.wait_for(timeout=30_000)
                    for label in ("Skip all", "Confirm and hide"):
                        button = page.get_by_text(label)
                        if button.count():
                            button.first.click()
                    # the slice through the blob: OHIF opens the first slice, the blob is around slice 9 of 16
                    viewport = page.locator("canvas").first
                    viewport.wait_for(timeout=30_000)
                    viewport.hover()
                    for _ in range(8):
                        page.mouse.wheel(0, 100)
                        page.wait_for_timeout(150)
                    page.wait_for_timeout(1500)
                    shot = tmp_path / "ohif-study.png"
                    page.screenshot(path=str(shot))
                    box = viewport.bounding_box()
                finally:
                    browser.close()
        finally:
            site.stop()
        statuses = {status for _, status in site.proxied}
        paths = [p for p, _ in site.proxied]
    assert statuses == {200}, site.proxied
    assert any(p.startswith("/dicom-web/studies?") for p in paths)  # QIDO-RS
    assert any(p.endswith("/metadata") for p in paths)  # WADO-RS metadata
    assert box is not None
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    x0, y0 = int(box["x"]), int(box["y"])
    inside = pixels[y0 + 20 : y0 + int(box["height"]) - 20, x0 + 20 : x0 + int(box["width"]) - 20]
    # the image is drawn (noise texture, not a flat panel) and the blob stands out of it
    assert inside.std() > 3, inside.std()
    assert np.percentile(inside, 99.9) - np.median(inside) > 60
    keep_for_docs(shot, "ohif-study.png")
