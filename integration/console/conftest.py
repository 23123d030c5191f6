"""The console's browser tests share the SDK tests' broker fixture (a real
`leasehold dev` on a free loopback port) and add a headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "sdk" / "python" / "src"))
_spec = importlib.util.spec_from_file_location("lh_sdk_fixtures", ROOT / "sdk" / "python" / "tests" / "conftest.py")
assert _spec is not None and _spec.loader is not None
fixtures = importlib.util.module_from_spec(_spec)
sys.modules["lh_sdk_fixtures"] = fixtures
_spec.loader.exec_module(fixtures)

broker = fixtures.broker  # the fixture itself
Broker = fixtures.Broker


def _path(var: str, default: str, package: str) -> str:
    path = os.environ.get(var, default)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: the browser tests need Debian's `{package}` (apt-get install "
                    f"chromium chromium-driver; integration/test.sh does it), or set {var}", pytrace=False)
    return path


@pytest.fixture()
def shots(request: pytest.FixtureRequest) -> Path:
    """Where a test saves its screenshots."""
    base = Path(os.environ.get("LEASEHOLD_CONSOLE_SHOTS", ROOT / "target" / "console-screenshots"))
    d = base / request.node.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_driver(javascript: bool = True) -> object:
    """A fresh headless Chromium driven over WebDriver by Debian's
    chromedriver; nothing is downloaded (Selenium Manager stays off)."""
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    opts.binary_location = _path("LEASEHOLD_CHROMIUM", "/usr/bin/chromium", "chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    service = Service(executable_path=_path("LEASEHOLD_CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture()
def browser() -> Iterator[object]:
    driver = make_driver()
    try:
        yield driver
    finally:
        driver.quit()  # type: ignore[attr-defined]


@pytest.fixture()
def browser_without_javascript() -> Iterator[object]:
    driver = make_driver(javascript=False)
    try:
        yield driver
    finally:
        driver.quit()  # type: ignore[attr-defined]
