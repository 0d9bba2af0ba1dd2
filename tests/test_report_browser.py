"""The report in a real browser: ``index.html`` of a report with eight feature sets,
opened in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by
``.ci/run``). Every image loads, no figure is larger than a page can show legibly, nothing
overflows the page, the settings are tables (no JSON dump), and the tables sort.

Screenshots of the page go to ``$DFRE_SCREENSHOTS`` when it is set.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import report_browser
from test_report import LONG_MODELS, MAX_PIXELS, write_fre_result

from dfre.descriptors.cumulants import structure_cumulants
from dfre.projection.pcovr import pcovr_map
from dfre.report import make_report
from dfre.store import Store

pytestmark = pytest.mark.skipif(
    not report_browser.available(),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, sample_store) -> str:
    """index.html of GFRE and LFRE of eight feature sets, a PCovR map, and their settings."""
    import shutil

    folder = tmp_path_factory.mktemp("browser")
    path = folder / "store.zarr"
    shutil.copytree(sample_store, path)
    store = Store.open(path, mode="r+")
    names = [f"{m}/ll" for m in LONG_MODELS]
    rng = np.random.default_rng(3)
    atoms = np.sort(rng.choice(store.n_atoms, 400, replace=False))
    write_fre_result(store, "gfre-cross-model", "gfre", names, atoms, store.n_atoms, seed=1)
    write_fre_result(store, "lfre-cross-model", "lfre", names, atoms, store.n_atoms, seed=2)
    phi = structure_cumulants(rng.normal(size=(store.n_atoms, 4)), store.offsets, 3)
    store.write_descriptor("cumulants-toy-ll-M3", phi)
    pcovr_map(store, "cumulants-toy-ll-M3", run="pcovr-toy")
    return make_report(store, folder / "report", min_count=5).html


def test_report_renders_in_chromium(report_page):
    with report_browser.browser() as driver:
        report_browser.open_page(driver, report_page)
        images = report_browser.images(driver)
        assert len(images) >= 9
        for image in images:
            assert image["complete"] and image["naturalWidth"] > 0, image["alt"]
            assert image["naturalWidth"] <= MAX_PIXELS and image["naturalHeight"] <= MAX_PIXELS
        page_width = driver.execute_script("return document.documentElement.clientWidth")
        assert all(image["shownWidth"] <= page_width for image in images)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0  # no horizontal scrolling of the page itself

        text = driver.execute_script("return document.body.innerText")
        assert "Main findings" in text and "Models and layers" in text
        assert "The others reconstruct" in text
        assert not driver.find_elements("tag name", "pre")
        for marker in ('{"', '": ', "[[", "{'"):  # no JSON or Python dump anywhere
            assert marker not in text, marker

        # the numbers' table sorts by a click on its GFRE column
        details = driver.find_element("css selector", "#gfre-cross-model details")
        details.click()
        table = details.find_element("tag name", "table")
        header = table.find_elements("tag name", "th")[2]
        assert header.text == "GFRE"
        header.click()
        values = [
            float(cell.get_attribute("data-value"))
            for cell in table.find_elements("css selector", "tbody tr td:nth-child(3)")
        ]
        assert len(values) == 8 * 8 and values == sorted(values)

        folder = os.environ.get("DFRE_SCREENSHOTS")
        if folder:
            for path in report_browser.screenshots(driver, folder):
                assert os.path.getsize(path) > 10_000
