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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import dicom_client
from tests.admin_site import AdminSite, start_admin_site
from tests.datasets import study_files
from tests.web_site import OPERATOR, VIEWER

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminSite]:
    # The prefetch planner runs as often as it may, for today's appointments.
    more: dict[str, dict[str, object]] = {"prefetch": {"interval": 10.0}}
    yield from start_admin_site(tmp_path_factory.mktemp("dashboard"), more)


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


# Read in one script each: the page replaces its rows on every refresh,
# which would leave element references taken one by one stale.


def text_of(driver: Any, element_id: str) -> str:
    script = "return document.getElementById(arguments[0]).textContent"
    return str(driver.execute_script(script, element_id))


def rows_of(driver: Any, table_id: str) -> list[str]:
    script = (
        "return Array.from(document.querySelectorAll"
        "('#' + arguments[0] + ' tbody tr')).map((row) => row.id)"
    )
    return list(driver.execute_script(script, table_id))


def cells_of(driver: Any, selector: str) -> list[list[str]]:
    script = (
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "(row) => Array.from(row.cells).map((cell) => cell.textContent))"
    )
    return list(driver.execute_script(script, selector))


def click(driver: Any, selector: str, label: str) -> None:
    """Click a button as a person would, again if a refresh replaced it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _attempt in range(5):
        try:
            button = driver.find_element(By.CSS_SELECTOR, selector)
            assert button.text == label
            button.click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} kept being replaced")


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
    assert cells_of(browser, "#volume-WEB001")[0][1] == "on the shelf"
    bars = browser.find_elements(By.CSS_SELECTOR, "#tier-chart rect.used")
    assert {bar.get_attribute("data-tier") for bar in bars} == {
        row["tier"] for row in status["watermarks"] if row["capacity_bytes"]
    }

    # The operator puts the volume back and says so with the button.
    (shelf / "WEB001").rename(site.volumes / "WEB001")
    click(browser, "#request-WEB001 button", "Loaded")
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
    wait_for(
        lambda: cells_of(browser, "#volume-WEB001")[0][1] == "loaded",
        "the volume shown loaded",
    )

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    urls = requested_urls(browser)
    assert urls, "the performance log recorded no request"
    outside = [url for url in urls if not url.startswith(site.url + "/")]
    assert outside == []


def test_todays_appointments_show_their_priors_readiness(
    site: AdminSite, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    start = datetime.now() + timedelta(minutes=30)
    if start.date() != datetime.now().date():
        pytest.skip("too close to midnight for an appointment later today")
    folder = tmp_path / "prior"
    files = study_files(folder, "prior", 1, patient_id="PREFETCH-7", modality="MR")
    assert set(dicom_client.store_files(site.appliance.port, files).values()) == {0}
    listed = tmp_path / "today.csv"
    listed.write_text(
        "patient_id,appointment_time,modality,accession\n"
        f"PREFETCH-7,{start:%Y-%m-%d %H:%M},MR,ACC-WEB-7\n"
    )
    imported = site.cli("prefetch", "import", str(listed))
    assert imported.returncode == 0, imported.stderr

    def planned() -> dict[str, Any] | None:
        with site.client(OPERATOR) as client:
            report = client.get("/api/prefetch").json()
        return report if report["appointments"] else None

    report = wait_for(planned, "the planner's next run")
    assert "patients" not in report["appointments"][0]
    log_in(browser, OPERATOR)
    browser.get(site.url + "/")
    wait_for(
        lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"),
        "the dashboard's first refresh",
    )
    screenshot(browser, tmp_path, "appointments")

    rows = cells_of(browser, "#appointments tbody tr")
    cells = rows[0]
    priors = report["appointments"][0]["priors"]
    online = sum(prior["state"] == "online" for prior in priors)
    assert len(rows) == 1
    assert cells[:3] == [f"{start:%H:%M}", "MR", f"{online} of {len(priors)}"]
    assert online == len(priors) == 1
    assert cells[3] == "ready"
    assert "PREFETCH-7" not in browser.page_source


def test_the_dashboard_opened_with_credentials_in_its_url_loads(
    site: AdminSite, browser: Any
) -> None:
    """http://name:password@host/ logs in too: the page's API calls must not
    be resolved against a URL that holds credentials (fetch refuses those)."""
    from selenium.webdriver.common.by import By

    with site.client(VIEWER) as client:
        status = client.get("/api/status").json()
    host = site.url.removeprefix("http://")
    browser.get(f"http://{VIEWER[0]}:{VIEWER[1]}@{host}/")
    wait_for(
        lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"),
        "the dashboard's first refresh",
    )
    assert "credentials" not in text_of(browser, "message")
    shown = text_of(browser, "count-studies").replace(",", "")
    assert shown == str(status["studies"])
