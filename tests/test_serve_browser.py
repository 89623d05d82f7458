"""`ipl serve` in a real browser: headless chromium stylizes a photo, runs a smoke adaptation and lists it.

The server is the real command (`ipl serve --smoke`) in a subprocess, so the page, the
queue and the files it serves are exactly what a user gets. `IPL_WRITE_SCREENSHOT=1`
also refreshes the README's screenshot (`docs/images/serve-stylize.png`); otherwise the
screenshot goes to a temporary folder and the repository is left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import bench
import pytest
from chromium import headless_chromium, needs_chromium
from PIL import Image

pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed")

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve-stylize.png"
WAIT_S = 30  # a page action (upload, stylize on CPU) on a slow two-core runner
ADAPT_WAIT_S = 90  # a smoke adaptation queued from the page, start to `done`

pytestmark = [
    needs_chromium,
    pytest.mark.xdist_group("serve-browser"),  # one server and one browser for the whole module
]


def _serve_load():
    """`benchmarks/serve_load.py`, whose `start_server` and `stop_server` run `ipl serve` here too."""
    return bench.load("serve_load")


@pytest.fixture(scope="module")
def server(tmp_path_factory, ipl_at):
    """(url, root): a smoke studio with one finished disney run, and an astronaut and a grey picture under root."""
    from skimage import data

    root = tmp_path_factory.mktemp("serve-browser")
    assert ipl_at(root, "--quiet", "adapt", "--domain", "disney", "--smoke", "--steps", "2", "--out", str(root / "runs")) == 0
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(root / "grey.png")
    serve_load = _serve_load()
    process, url = serve_load.start_server(root)  # `ipl serve --smoke --runs ROOT/runs` on a free port
    try:
        yield url, root
    finally:
        serve_load.stop_server(process)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium (see tests/chromium.py), tall enough for the Stylize tab's results."""
    with headless_chromium(tmp_path_factory.mktemp("profile"), window="1400,1100") as driver:
        yield driver


# -- page helpers ----------------------------------------------------------------


def _wait(driver, condition, timeout: float = WAIT_S, what: str = ""):
    """`condition(driver)` once truthy; elements Gradio redraws meanwhile (stale) are looked up again."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(condition, message=what)


def _open(driver, url: str) -> None:
    """Load the page afresh (a new Gradio session) and wait until the photo input is there."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), what="the photo input")


def _tab(driver, name: str) -> None:
    """Switch to the tab `name` (Gradio draws a tab's content only once it is selected)."""
    from selenium.webdriver.common.by import By

    (button,) = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name]
    button.click()
    _wait(driver, lambda d: button.get_attribute("aria-selected") == "true", what=f"the {name} tab")


def _upload(driver, path: Path) -> None:
    """Put `path` into the photo input and wait until the page shows it (a new picture replaces the old one)."""
    from selenium.webdriver.common.by import By

    def shown(d) -> list[str]:
        return d.execute_script("return Array.from(document.querySelectorAll('#photo img')).filter(i => i.complete && i.naturalWidth > 0).map(i => i.src)")

    before = set(shown(driver))
    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))
    _wait(driver, lambda d: set(shown(d)) - before, what=f"the uploaded {path.name}")


def _choose_style(driver, label_start: str) -> str:
    """Pick the first option of the Styles dropdown whose label starts with `label_start`; returns its label."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#stylize-styles input[role=combobox]").click()
    options = _wait(driver, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "#stylize-styles [role=option]") if o.text.strip().startswith(label_start)], what="a style option")
    label = options[0].text.strip()
    options[0].click()
    _wait(driver, lambda d: label in d.find_element(By.ID, "stylize-styles").text, what="the chosen style")
    return label


def _loaded_images(driver, selector: str) -> list[int]:
    """Natural widths of the images under `selector` that have finished loading."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' img')).filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth)",
        selector,
    )


def _message(driver) -> str:
    """The Stylize message (the markdown alone, not the "processing" tracker drawn over it)."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#stylize-message [data-testid=markdown]").text.strip()


def _stylize(driver) -> str:
    """Click Stylize; returns the new message once the answer is on the page (callers make it differ from the last)."""
    from selenium.webdriver.common.by import By

    before = _message(driver)
    driver.find_element(By.ID, "stylize-button").click()

    def answered(d) -> bool:  # a new message, and no "processing" tracker over it any more
        tracker = d.find_element(By.CSS_SELECTOR, "#stylize-message [data-testid=status-tracker]")
        return _message(d) not in ("", before) and "hide" in tracker.get_attribute("class").split()

    _wait(driver, answered, what="the stylize answer")
    return _message(driver)


def _table(driver, elem_id: str) -> list[list[str]]:
    """The rows of the Gradio dataframe `elem_id`, as text (Gradio 6 draws them as ARIA grid rows)."""
    return driver.execute_script(
        "const t = document.getElementById(arguments[0]);"
        "return t ? Array.from(t.querySelectorAll('[role=row][data-index]')).map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.textContent.trim())) : [];",
        elem_id,
    )


# -- tests -----------------------------------------------------------------------


def test_stylize_a_photo_in_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, root = server
    _open(browser, url)
    _upload(browser, root / "astronaut.png")
    label = _choose_style(browser, "disney · ipl · disney-")
    message = _stylize(browser)
    _wait(browser, lambda d: _loaded_images(d, "#stylized") and _loaded_images(d, "#pasted"), what="the stylized and pasted images")
    assert "face(s) found" in message and not message.startswith("0 ")
    assert _loaded_images(browser, "#aligned") and _loaded_images(browser, "#reconstruction")
    captions = [img.get_attribute("alt") for img in browser.find_elements(By.CSS_SELECTOR, "#stylized img")]
    assert captions and all(caption == label.split(" · ")[0] for caption in captions)  # one picture per chosen style, named by domain

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "serve-stylize.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width >= 1000
        picture = image.convert("RGB")
    colours = picture.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000  # the photo and the stylized faces, not a blank page
    if os.environ.get("IPL_WRITE_SCREENSHOT", "") not in ("", "0"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        # 256 colours: a quarter of the bytes in the repository, and the page still reads the same.
        picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)


def test_a_photo_without_a_face_is_a_message_and_the_server_goes_on(server, browser):
    url, root = server
    _open(browser, url)
    _upload(browser, root / "grey.png")
    _choose_style(browser, "disney · ipl · disney-")
    message = _stylize(browser)
    assert message.startswith("No face found"), message
    assert not _loaded_images(browser, "#stylized")
    # The same page, a photo with a face: the server is still there and answers.
    _upload(browser, root / "astronaut.png")
    assert "face(s) found" in _stylize(browser)
    _wait(browser, lambda d: _loaded_images(d, "#stylized"), what="the stylized image after a no-face photo")


def test_start_a_smoke_adaptation_and_find_its_run(server, browser):
    from selenium.webdriver.common.by import By

    url, root = server
    before = {path.name for path in (root / "runs").iterdir()}
    _open(browser, url)
    _tab(browser, "Adapt")
    # The editor is filled with the disney domain when the page loads.
    _wait(browser, lambda d: 'name = "disney"' in d.find_element(By.CSS_SELECTOR, "#domain-toml textarea").get_attribute("value"), what="the disney domain in the editor")
    browser.find_element(By.ID, "start-button").click()
    queued = _wait(browser, lambda d: re.search(r"job (\d+) queued: disney", d.find_element(By.ID, "job-message").text), what="the job message")
    # The 1 s timer refreshes the jobs table until the job has ended, one way or another.
    rows = _wait(browser, lambda d: [r for r in _table(d, "jobs") if r[0] == queued[1] and r[2] in ("done", "failed", "stopped")], ADAPT_WAIT_S, "the job's end")
    job = rows[0]
    assert job[1] == "disney" and job[2] == "done", job
    run = job[7]
    assert run.startswith("disney-") and run not in before and (root / "runs" / run / "generator.pt").is_file()

    # The new run in the lists: Refresh lists (Stylize tab) updates the generator and run dropdowns and the runs table.
    _tab(browser, "Stylize")
    browser.find_element(By.ID, "refresh").click()
    _tab(browser, "Runs")
    _wait(browser, lambda d: run in [r[0] for r in _table(d, "runs")], what="the new run in the runs table")
    browser.find_element(By.ID, "runs-refresh").click()  # the tab's own Refresh keeps it there
    _wait(browser, lambda d: run in [r[0] for r in _table(d, "runs")], what="the new run in the refreshed runs table")
    browser.find_element(By.CSS_SELECTOR, "#run input[role=combobox]").click()
    options = _wait(browser, lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "#run [role=option]") if o.text.strip() == run], what="the new run in the dropdown")
    options[0].click()
    _wait(browser, lambda d: 'name = "disney"' in d.find_element(By.ID, "run-config").text, what="the run's config.toml")
    _wait(browser, lambda d: _loaded_images(d, "#run-samples"), what="the run's sample grids")
