"""The `ipl eval` page in a real browser: Debian's headless chromium loads it, shows one metrics table and every image."""

from __future__ import annotations

from pathlib import Path

import pytest
from chromium import REQUIRED, headless_chromium, needs_chromium
from PIL import Image

if not REQUIRED:
    pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")
pytestmark = needs_chromium


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, make_smoke_runs, ipl_at) -> Path:
    """The report of an IPL and a NADA `--smoke` run of disney (CLIP metrics and FID, which has no reference)."""
    root = tmp_path_factory.mktemp("browser")
    runs = [str(run) for run in make_smoke_runs(root, steps=1)]
    assert ipl_at(root, "--quiet", "eval", *runs, "--metrics", "clip,fid", "--n", "4", "--report", str(root / "report")) == 0
    return root / "report"


@pytest.fixture
def browser(tmp_path):
    """Headless chromium (see tests/chromium.py)."""
    with headless_chromium(tmp_path / "profile") as driver:
        yield driver


def test_report_page_shows_the_metrics_table_and_every_image(report_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get((report_dir / "index.html").as_uri())
    assert browser.title == "ipl eval report"
    tables = browser.find_elements(By.TAG_NAME, "table")
    assert len(tables) == 1 and tables[0].get_attribute("id") == "metrics"
    headers = [th.text for th in tables[0].find_elements(By.CSS_SELECTOR, "thead th")]
    assert headers == ["run", "clip_score ↑", "clip_dir ↑", "fid ↓", "fid_src_tgt"]
    rows = [th.text for th in tables[0].find_elements(By.CSS_SELECTOR, "tbody th")]
    assert rows == ["disney·ipl", "disney·nada"]
    missing = tables[0].find_elements(By.CSS_SELECTOR, "td.missing")
    assert missing and all("reference" in td.get_attribute("title") for td in missing)  # the reason as a tooltip
    assert "reference" in browser.find_element(By.ID, "note-1").text  # and as a note under the table
    # The table comes first: it starts within the first screen, above every sample grid.
    table_top = tables[0].location["y"]
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2 and table_top < 400 and all(img.location["y"] > table_top for img in images)
    loaded = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert all(complete and width > 0 and height > 0 for complete, width, height in loaded), loaded
    assert all(width >= 6 * 160 for _, width, _ in loaded)  # 160 px tiles, six samples a row

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width >= 1000
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # text, table lines and the sample tiles, not a blank page
