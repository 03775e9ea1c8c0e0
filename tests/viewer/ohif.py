"""Driving OHIF 3 in headless chromium through Playwright, and reading what it drew off a screenshot.

What a user does: open the study, double-click a series in the study browser, press the viewport's
arrows, scroll, press LOAD. What the tests read: the viewport overlay's instance number (``I:29 (36/64)``)
and the screenshot's pixels, mapped from image pixels to screen pixels by the viewport's fit (OHIF fits the
whole slice, centred, into the viewport's canvas).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).parent.parent.parent / "docs"
_ARGS = ["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"]


def keep_for_docs(shot: Path, name: str) -> None:
    """Copy a screenshot over the committed docs/ one only when asked (``HARMONODE_UPDATE_DOCS=1``)."""
    if os.environ.get("HARMONODE_UPDATE_DOCS", "") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS / name)


@contextmanager
def browser() -> Iterator[object]:
    """Headless Debian chromium under Playwright (no browser download), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_study(chromium, url: str, study_uid: str, user: str, password: str, console: list[str]):  # noqa: ANN001, ANN201
    """A page on OHIF's viewer route for one study, Basic auth on every request, first-visit dialogs away."""
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    page = chromium.new_page(
        viewport={"width": 1280, "height": 800}, extra_http_headers={"Authorization": f"Basic {credentials}"}
    )
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.add_init_script("localStorage.setItem('showInvestigationalUseDialog', 'never');")
    page.goto(f"{url}/viewer?StudyInstanceUIDs={study_uid}")
    page.locator("[data-cy=viewport-overlay-bottom-right]").first.wait_for(timeout=60_000)
    for label in ("Skip all", "Confirm and hide"):
        button = page.get_by_text(label)
        if button.count():
            button.first.click()
    return page


def open_series(page, description: str) -> None:  # noqa: ANN001
    """Double-click a series in the study browser: OHIF displays it in the active viewport."""
    page.get_by_text(description).first.dblclick()


def instance_number(page) -> int | None:  # noqa: ANN001
    """The instance number the viewport's overlay shows (``I:29 (36/64)``), None before it shows one."""
    text = page.locator("[data-cy=viewport-overlay-bottom-right]").first.inner_text()
    match = re.search(r"I:\s*(\d+)", text)
    return int(match.group(1)) if match else None


def wait_for_instance(page, wanted: int, timeout_ms: int = 20_000) -> int | None:  # noqa: ANN001
    """Poll the overlay until it shows ``wanted``; the last number seen."""
    seen = None
    for _ in range(timeout_ms // 250):
        seen = instance_number(page)
        if seen == wanted:
            return seen
        page.wait_for_timeout(250)
    return seen


@dataclass(frozen=True)
class Screen:
    """A screenshot and the image-to-screen mapping of the viewport's canvas."""

    rgb: np.ndarray  # rows × columns × 3
    left: float
    top: float
    width: float
    height: float
    rows: int
    columns: int

    @property
    def scale(self) -> float:
        """Screen pixels per image pixel (square pixels: the slice fitted whole)."""
        return min(self.width / self.columns, self.height / self.rows)

    def to_screen(self, column: float, row: float) -> tuple[float, float]:
        """Screen (x, y) of image PIXEL coordinates ((0, 0) the top left corner of the top left pixel)."""
        return (
            self.left + self.width / 2 + (column - self.columns / 2) * self.scale,
            self.top + self.height / 2 + (row - self.rows / 2) * self.scale,
        )

    def inside(self, margin: int = 4) -> np.ndarray:
        """A mask of the screenshot: True on the slice's image within the viewport's canvas (not on the
        viewport's buttons and notices around it)."""
        (x0, y0), (x1, y1) = self.to_screen(0, 0), self.to_screen(self.columns, self.rows)
        x0, y0 = max(x0, self.left) + margin, max(y0, self.top) + margin
        x1, y1 = min(x1, self.left + self.width) - margin, min(y1, self.top + self.height) - margin
        mask = np.zeros(self.rgb.shape[:2], bool)
        mask[int(y0) : int(y1), int(x0) : int(x1)] = True
        return mask


def screenshot(page, path: Path, rows: int, columns: int) -> Screen:  # noqa: ANN001
    """Save the page's screenshot and map the viewport's canvas (the largest canvas of the page)."""
    boxes = [b for b in (c.bounding_box() for c in page.locator("[data-cy=viewport-pane] canvas").all()) if b]
    box = max(boxes, key=lambda b: b["width"] * b["height"])
    page.screenshot(path=str(path))
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    return Screen(rgb, box["x"], box["y"], box["width"], box["height"], rows, columns)


def drawn(screen: Screen) -> bool:
    """The slice is drawn: the viewport shows an image's texture, not a flat panel."""
    return bool(screen.rgb[screen.inside()].std() > 3)


def settled(  # noqa: ANN001 - page: Playwright's Page
    page, path: Path, rows: int, columns: int, ready: Callable[[Screen], bool], timeout_ms: int = 15_000
) -> Screen:
    """Screenshots until ``ready`` holds of one (OHIF draws the slice, then its overlays) or the time is up."""
    shot = screenshot(page, path, rows, columns)
    for _ in range(timeout_ms // 500):
        if ready(shot):
            break
        page.wait_for_timeout(500)
        shot = screenshot(page, path, rows, columns)
    return shot


def green(rgb: np.ndarray) -> np.ndarray:
    """Pixels of OHIF's SR annotation colour (pure green lines and text)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (g > 150) & (r < 110) & (b < 110)


def yellow(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the SEG's recommended display colour (the GSPS's yellow), as OHIF outlines its segments."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r > 200) & (g > 200) & (b < 80)


def ring_hits(screen: Screen, centre: tuple[float, float], radius: float) -> int:
    """Green pixels on a ring of ``radius`` screen pixels around ``centre`` (± 3 px)."""
    ys, xs = np.nonzero(green(screen.rgb) & screen.inside())
    distance = np.hypot(xs - centre[0], ys - centre[1])
    return int(np.count_nonzero(np.abs(distance - radius) <= 3))
