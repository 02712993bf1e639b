"""The dashboard in headless Chromium (Debian's chromium and its
chromedriver, driven by Selenium): it loads with no console error and no
request outside the appliance, shows the API's numbers, and an operator
marks a shelved volume loaded with its button.

Set DASHBOARD_SCREENSHOT to a file name to keep a screenshot of the page.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.admin_site import AdminSite, start_admin_site
from tests.web_site import OPERATOR

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminSite]:
    yield from start_admin_site(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} missing: the dashboard test needs Debian's "
            "chromium and chromium-driver (scripts/setup --test installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1280,2000"):
        options.add_argument(argument)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver: Any, account: tuple[str, str]) -> None:
    """What the browser sends once a person has answered its Basic prompt."""
    pair = base64.b64encode(f"{account[0]}:{account[1]}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders",
        {"headers": {"Authorization": f"Basic {pair}"}},
    )


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def rows_of(driver: Any, table_id: str) -> list[str]:
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.ID, table_id)
    return [
        row.get_attribute("id")
        for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


def requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def screenshot(driver: Any, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    kept = os.environ.get("DASHBOARD_SCREENSHOT")
    if kept:
        shutil.copy(path, f"{kept.removesuffix('.png')}-{name}.png")


def test_the_dashboard_shows_the_api_and_marks_a_volume_loaded(
    site: AdminSite, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    study, shelf = site.shelved_study("WEB001")
    with site.client(OPERATOR) as client:
        waiting = client.post("/api/recall", json={"study_uid": study})
        assert waiting.json()["waiting_for"] == ["WEB001"]
        status = client.get("/api/status").json()
        volumes = client.get("/api/volumes").json()

    log_in(browser, OPERATOR)
    browser.get(site.url + "/")
    wait_for(
        lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"),
        "the dashboard's first refresh",
    )
    screenshot(browser, tmp_path, "before")

    for level in ("patients", "studies", "series", "instances"):
        shown = text_of(browser, f"count-{level}").replace(",", "")
        assert shown == str(status[level]), level
    queues = status["queues"]
    assert text_of(browser, "queue-replication") == str(
        queues["replication"]["instances"]
    )
    assert text_of(browser, "queue-recall") == str(queues["recall"]["studies_waiting"])
    assert queues["recall"]["studies_waiting"] == 1
    assert rows_of(browser, "requests") == [
        f"request-{request['volume']}" for request in volumes["requests"]
    ]
    assert rows_of(browser, "volumes") == [
        f"volume-{volume['label']}" for volume in volumes["volumes"]
    ]
    row = browser.find_element(By.ID, "volume-WEB001")
    assert row.find_element(By.CLASS_NAME, "state").text == "on the shelf"
    bars = browser.find_elements(By.CSS_SELECTOR, "#tier-chart rect.used")
    assert {bar.get_attribute("data-tier") for bar in bars} == {
        row["tier"] for row in status["watermarks"] if row["capacity_bytes"]
    }

    # The operator puts the volume back and says so with the button.
    (shelf / "WEB001").rename(site.volumes / "WEB001")
    button = browser.find_element(By.CSS_SELECTOR, "#request-WEB001 button")
    assert button.text == "Loaded"
    button.click()
    wait_for(
        lambda: "request-WEB001" not in rows_of(browser, "requests"),
        "the request to leave the page",
    )
    wait_for(lambda: "reachable" in text_of(browser, "message"), "the answer")
    screenshot(browser, tmp_path, "after")

    with site.client(OPERATOR) as client:
        after = client.get("/api/volumes").json()
        recalled = client.get("/api/status").json()
    assert "WEB001" not in {request["volume"] for request in after["requests"]}
    assert {v["label"]: v["reachable"] for v in after["volumes"]}["WEB001"] is True
    assert recalled["queues"]["recall"]["studies_waiting"] == 0
    state = browser.find_element(By.CSS_SELECTOR, "#volume-WEB001 .state").text
    assert state == "loaded"

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    urls = requested_urls(browser)
    assert urls, "the performance log recorded no request"
    outside = [url for url in urls if not url.startswith(site.url + "/")]
    assert outside == []
