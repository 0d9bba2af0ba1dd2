"""A dfre report opened in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): what a reader's browser loads and shows.

Used by ``tests/test_report_browser.py``; also a script that takes screenshots of any
report::

    python tests/report_browser.py demo-report/index.html screenshots/

writes ``page-top.png`` (the header) and one PNG per section into ``screenshots/``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Flags for a headless Chromium on a machine without network or GPU.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
WINDOW = (1300, 1000)


def available() -> bool:
    """Whether Debian's Chromium and its driver are installed here."""
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


@contextlib.contextmanager
def browser() -> Iterator:
    """A selenium driver of a fresh headless Chromium (own empty profile folder)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="dfre-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, html: str | os.PathLike) -> None:
    """Load a local page and wait until every image has decoded."""
    driver.get(Path(html).resolve().as_uri())
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))"
        ".then(() => done(true));"
    )


def images(driver) -> list[dict]:
    """Every image of the page: loaded?, natural and displayed size, alt text."""
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({complete: i.complete,"
        " naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,"
        " shownWidth: i.getBoundingClientRect().width, alt: i.alt}));"
    )


def screenshot(driver, element, path: str | os.PathLike) -> str:
    """A PNG of the whole of ``element``, also the part below the window (DevTools)."""
    import base64

    box = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return {x: r.left + window.scrollX, y: r.top + window.scrollY,"
        " width: r.width, height: r.height};",
        element,
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {**box, "scale": 1}},
    )
    Path(path).write_bytes(base64.b64decode(shot["data"]))
    return str(path)


def screenshots(driver, folder: str | os.PathLike) -> list[str]:
    """PNG screenshots of the page header and of each section into ``folder``."""
    from selenium.webdriver.common.by import By

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        screenshot(driver, driver.find_element(By.TAG_NAME, "header"), folder / "page-top.png")
    ]
    for number, section in enumerate(driver.find_elements(By.TAG_NAME, "section"), start=1):
        name = section.get_attribute("id") or str(number)
        paths.append(screenshot(driver, section, folder / f"section-{number:02d}-{name}.png"))
    return paths


if __name__ == "__main__":
    page, out = sys.argv[1], sys.argv[2]
    with browser() as driver:
        open_page(driver, page)
        for line in screenshots(driver, out):
            print(line)
