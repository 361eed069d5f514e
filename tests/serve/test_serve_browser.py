"""The pages in a real browser (headless Chromium via selenium) against a live server.

Skipped only where Chromium or chromedriver is not installed (see the ``browser`` fixture).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from serve_helpers import FakeBackend, LiveServer

from sparsefusion.serve.app import create_app
from sparsefusion.serve.runs import RunCatalog

LOADED = "const i = arguments[0]; return i.complete && i.naturalWidth > 0;"


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _size(driver, image) -> tuple[int, int]:
    return tuple(
        driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight];", image
        )
    )


@pytest.fixture(scope="module")
def fake_server(tiny_runs):
    app = create_app(RunCatalog([tiny_runs["mot"], tiny_runs["dense"]]), FakeBackend())
    with LiveServer(app) as server:
        yield server


def test_run_page_shows_loss_plot_and_compare_report(browser, fake_server, tiny_runs):
    from selenium.webdriver.common.by import By

    browser.get(f"{fake_server.url}/run/mot")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    plot = browser.find_element(By.ID, "loss-plot")
    _wait(browser, lambda d: d.execute_script(LOADED, plot))
    assert _size(browser, plot) == (3 * 360, 320)  # overall, image, text panels
    assert browser.find_element(By.ID, "run-title").text == "run mot"
    reports = browser.find_elements(By.CSS_SELECTOR, ".report-plot")
    report_dir = next(tiny_runs["mot"].parent.glob("compare*"))
    assert len(reports) == len(list(report_dir.glob("*.png"))) >= 4  # every plot of the report
    _wait(browser, lambda d: all(d.execute_script(LOADED, r) for r in reports))
    assert '"arch": "mot"' in browser.find_element(By.ID, "config").text


def test_playground_side_by_side_columns(browser, fake_server):
    """Page plumbing with the fake backend: two runs, same prompt and seed, two columns."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{fake_server.url}/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    Select(browser.find_element(By.ID, "mode")).select_by_value("text_to_image")
    browser.find_element(By.ID, "compare").click()
    assert Select(browser.find_element(By.ID, "run-b")).first_selected_option.text == "dense"
    browser.find_element(By.ID, "prompt").send_keys("a red circle")
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("9")
    browser.find_element(By.ID, "generate").click()
    output = browser.find_element(By.ID, "output")
    _wait(browser, lambda d: output.get_attribute("data-state") == "done")
    columns = output.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.find_element(By.TAG_NAME, "h2").text for c in columns] == [
        "mot @ step 6",
        "dense @ step 6",
    ]
    for column in columns:
        image = column.find_element(By.CSS_SELECTOR, "img.generated-image")
        _wait(browser, lambda d, i=image: d.execute_script(LOADED, i))
        assert _size(browser, image) == (8, 6)
        assert "a red circle #0" in column.text and "tokens/s" in column.text


@pytest.fixture(scope="module")
def real_server(tiny_runs):
    """The real engine; ``SPARSEFUSION_SERVE_RUN=RUN_DIR`` serves another run (e.g. the demo) to
    measure its page-to-image time."""
    from sparsefusion.serve.engine import GeneratorBackend

    run = Path(os.environ.get("SPARSEFUSION_SERVE_RUN") or tiny_runs["mot"])
    app = create_app(RunCatalog([run]), GeneratorBackend("cpu"))
    with LiveServer(app) as server:
        server.run = run
        yield server


def test_text_to_image_in_the_browser(browser, real_server, tmp_path):
    """Open the page, submit text -> image, wait for the image to load, check its pixel size.

    The screenshot goes to ``SPARSEFUSION_SERVE_SCREENSHOT`` when set (docs/serve_screenshot.png
    was taken so), else into the test's temporary folder.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    size = yaml.safe_load((real_server.run / "config.yaml").read_text())["data"]["image_size"]
    opened = time.perf_counter()
    browser.get(f"{real_server.url}/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    Select(browser.find_element(By.ID, "mode")).select_by_value("text_to_image")
    browser.find_element(By.ID, "prompt").send_keys("a red circle above a blue square")
    samples = browser.find_element(By.ID, "num_samples")
    samples.clear()
    samples.send_keys("4")
    submitted = time.perf_counter()
    browser.find_element(By.ID, "generate").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.generated-image")) == 4, 300)
    images = browser.find_elements(By.CSS_SELECTOR, "img.generated-image")
    _wait(browser, lambda d: all(d.execute_script(LOADED, i) for i in images))
    done = time.perf_counter()
    assert [_size(browser, i) for i in images] == [(size, size)] * 4
    shot = Path(os.environ.get("SPARSEFUSION_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
    print(f"page-to-image {done - opened:.2f} s (submit-to-image {done - submitted:.2f} s), {shot}")
