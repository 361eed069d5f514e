"""Fixtures for the server tests: two tiny trained runs with a compare report, headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (pip install -e '.[serve]')")

from serve_helpers import STEPS  # noqa: E402

from sparsefusion.runs.presets import resolve_config  # noqa: E402
from sparsefusion.train.trainer import train  # noqa: E402


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tokenizer_cache) -> dict[str, Path]:
    """``mot`` and ``dense`` debug runs (6 steps, checkpoints 3 and 6, validation at 3 and 6)
    and a compare report ``compare/`` beside them."""
    from sparsefusion.compare.report import run_compare
    from sparsefusion.compare.savings import CompareConfig

    root = tmp_path_factory.mktemp("serve_runs")
    runs = {}
    for name in ("mot", "dense"):
        cfg = resolve_config(
            f"{name}-debug",
            [
                f"run.dir={root / name}",
                f"tokenizer.cache_dir={tokenizer_cache}",
                f"train.steps={STEPS}",
                "run.log_every=1",
                "run.eval_every=3",
                "run.save_every=3",
                "run.keep_checkpoints=2",
                "run.tensorboard=false",
                "run.progress=log",
            ],
        )
        train(cfg)
        runs[name] = root / name
    run_compare(runs["dense"], [runs["mot"]], root / "compare", CompareConfig())
    return runs


@pytest.fixture()
def run_copy(tiny_runs, tmp_path) -> Path:
    """A copy of the mot run that a test may add files to."""
    dst = tmp_path / "mot_copy"
    shutil.copytree(tiny_runs["mot"], dst)
    return dst


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Chromium driven by selenium (skipped only where Chromium is not installed)."""
    binary = next((b for b in CHROMIUM if Path(b).is_file()), shutil.which("chromium"))
    driver_path = next((d for d in DRIVERS if Path(d).is_file()), shutil.which("chromedriver"))
    if binary is None or driver_path is None:
        pytest.skip("Chromium or chromedriver not found (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (serve extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
