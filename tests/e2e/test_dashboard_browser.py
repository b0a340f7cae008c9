"""The dashboard in a real browser: headless Chromium (selenium + Debian's chromium-driver) against a
running node (`pe-agent serve` on loopback, the builtin:demo model) with series analysed for real.

Two phantoms go in by C-STORE (a central PE with RV/LV > 1, and no PE); the reports go to a
pynetdicom storage SCP standing in for PACS. The browser checks the worklist rows and flags, the
flag filter, the study page (result, Grad-CAM images decoded by the browser, SR summary, deliveries),
sees a reprocess refused before signing in and done after (a new job, an audit event naming the
user), acknowledges the CRITICAL study, and looks at the queue and health pages. Screenshots go to
$PE_AGENT_SCREENSHOTS when set, else to the test's tmp_path/screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Event, Job, JobStatus, Series
from pacs_agent.node.web.auth import hash_password
from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import Node, node_config, send, wait_until
from tests.support.settings import find_free_port as free_port
from tests.support.pacs_scp import PacsSCP

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ADMIN, PASSWORD = "dr.rad", "pe-dashboard-test-password"
PATIENT_NAME = "BROWSER^CRITICAL"
PATIENT_ID = "BROWSER-PE-1"

webdriver = pytest.importorskip("selenium.webdriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


def _screens(tmp_path: Path) -> Path:
    folder = Path(os.environ["PE_AGENT_SCREENSHOTS"]) if os.environ.get("PE_AGENT_SCREENSHOTS") else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1000",
                     "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        # The last page as the browser saw it, for a failing run.
        driver.save_screenshot(str(_screens(tmp_path) / "99-last-page.png"))
        (_screens(tmp_path) / "99-last-page.html").write_text(driver.page_source)
        driver.quit()


@pytest.fixture
def live_node(tmp_path: Path) -> Iterator[tuple[Node, PacsSCP, int]]:
    passwords = tmp_path / "admins.passwd"
    passwords.write_text(f"{ADMIN}:{hash_password(PASSWORD)}\n")
    passwords.chmod(0o600)
    http_port = free_port()
    with PacsSCP(ae_title="PACS", store_dir=tmp_path / "pacs") as pacs:
        config = node_config(
            tmp_path / "node", port=free_port(), checkpoint="builtin:demo", destinations=[("pacs", "PACS", pacs.port)],
            model={"checkpoint": "builtin:demo", "torch_threads": 1},
            outputs={"key_slices": 2},
            http={"enabled": True, "host": "127.0.0.1", "port": http_port, "admin_password_file": str(passwords), "refresh_seconds": 0},
        )
        node = Node(tmp_path / "node", config)
        node.start(timeout=180)
        try:
            yield node, pacs, http_port
        finally:
            node.stop()


def click_and_load(browser: WebDriver, element: WebElement) -> None:
    """Click a link or submit button and wait until the next page has replaced this one."""
    page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 60).until(staleness_of(page))


def _api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def _jobs(node: Node, series_uid: str) -> list[Job]:
    return node.jobs(series_uid)


def test_dashboard_in_chromium(tmp_path: Path, live_node: tuple[Node, PacsSCP, int], browser: WebDriver) -> None:
    node, pacs, port = live_node
    screens = _screens(tmp_path)
    base = f"http://127.0.0.1:{port}"
    critical = write_phantom_series(tmp_path / "pe", PhantomSpec(
        pe=True, seed=11, rows=64, columns=64, n_slices=48, locations=("central", "left"), rv_lv_ratio=1.3,
        patient_name=PATIENT_NAME, patient_id=PATIENT_ID))
    negative = write_phantom_series(tmp_path / "neg", PhantomSpec(
        pe=False, seed=12, rows=64, columns=64, n_slices=48, rv_lv_ratio=0.8, patient_id="BROWSER-NEG-2"))
    for truth in (critical, negative):
        result = send(node.port, list(truth.files))
        assert result.established and set(result.statuses) == {0}

    def analysed_and_delivered() -> list[dict[str, Any]] | None:
        entries = _api(port, "/api/worklist")
        if len(entries) < 2:
            return None
        deliveries = _api(port, "/api/deliveries")
        if not deliveries or any(d["status"] != "DELIVERED" for d in deliveries):
            return None
        return entries

    entries = wait_until(analysed_and_delivered, timeout=420, what="both studies analysed and their reports delivered")
    assert {e["study_instance_uid"]: e["flag"] for e in entries} == {
        critical.study_instance_uid: "CRITICAL", negative.study_instance_uid: "ROUTINE"}

    # The worklist: most urgent first, clear flags, no patient identifiers by default.
    browser.get(f"{base}/worklist")
    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr[data-study]")
    assert [r.get_attribute("data-flag") for r in rows] == ["CRITICAL", "ROUTINE"]
    assert rows[0].find_element(By.CSS_SELECTOR, ".flag").text == "CRITICAL"
    assert rows[0].find_element(By.CSS_SELECTOR, ".flag").value_of_css_property("background-color") != \
        rows[1].find_element(By.CSS_SELECTOR, ".flag").value_of_css_property("background-color")
    assert PATIENT_ID not in browser.page_source and "BROWSER" not in browser.page_source
    assert "Unverified AI output" in browser.find_element(By.CSS_SELECTOR, ".disclaimer").text
    browser.save_screenshot(str(screens / "01-worklist.png"))

    # The flag filter.
    click_and_load(browser, browser.find_element(By.CSS_SELECTOR, '#filters a[data-flag="CRITICAL"]'))
    assert browser.current_url.endswith("/worklist?flag=CRITICAL")
    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr[data-study]")
    assert [r.get_attribute("data-study") for r in rows] == [critical.study_instance_uid]
    browser.save_screenshot(str(screens / "02-worklist-critical.png"))

    # The study page: result, Grad-CAM previews the browser could decode, SR summary, deliveries.
    click_and_load(browser, rows[0].find_element(By.CSS_SELECTOR, "a.study-link"))
    assert browser.find_element(By.ID, "study-flag").text == "CRITICAL"
    images = browser.find_elements(By.CSS_SELECTOR, "img.gradcam")
    assert len(images) == 2
    for image in images:
        browser.execute_script("arguments[0].scrollIntoView()", image)
        wait_until(lambda image=image: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
                   timeout=30, what="a Grad-CAM image to load")
        assert browser.execute_script("return arguments[0].naturalWidth", image) >= 256
    assert "NOT FOR CLINICAL USE" in browser.find_element(By.CSS_SELECTOR, ".result").text  # the demo model says so
    statuses = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "table.deliveries td.status")]
    assert statuses == ["DELIVERED"] * 4  # one SR, two SC and the key-image KOS at PACS
    browser.find_element(By.CSS_SELECTOR, "details.sr-items summary").click()
    assert "UNVERIFIED" in browser.page_source
    browser.execute_script("window.scrollTo(0, 0)")
    browser.set_window_size(1440, browser.execute_script("return document.documentElement.scrollHeight") + 140)
    browser.save_screenshot(str(screens / "03-study-critical.png"))  # the whole page
    browser.set_window_size(1440, 1000)
    study_url = browser.current_url

    # Reprocess without signing in: refused, nothing queued.
    click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "button.reprocess-button"))
    assert "sign in as an administrator" in browser.find_element(By.ID, "message").text
    browser.save_screenshot(str(screens / "04-reprocess-refused.png"))
    assert len(_jobs(node, critical.series_instance_uid)) == 1

    # Sign in, reprocess: a new job, recorded with the user.
    browser.get(f"{base}/login?next=/studies/{critical.study_instance_uid}")
    browser.find_element(By.ID, "username").send_keys(ADMIN)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.save_screenshot(str(screens / "05-sign-in.png"))
    click_and_load(browser, browser.find_element(By.ID, "login-submit"))
    assert browser.find_element(By.ID, "signed-in-user").text == ADMIN
    click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "button.reprocess-button"))
    assert "queued job" in browser.find_element(By.ID, "flash").text
    jobs = _jobs(node, critical.series_instance_uid)
    assert len(jobs) == 2 and jobs[1].reason == "reprocess" and jobs[1].supersedes_job_id == jobs[0].id
    audit = [e for e in node.events(kind="admin_action") if e.detail.get("action") == "reprocess"]
    assert [(e.detail["user"], e.detail["via"], e.job_id) for e in audit] == [(ADMIN, "web", jobs[1].id)]
    wait_until(lambda: _jobs(node, critical.series_instance_uid)[1].status == JobStatus.SUCCEEDED, timeout=300,
               what="the re-analysis to finish")

    # Acknowledge the CRITICAL result; the worklist shows who did.
    browser.get(study_url)
    click_and_load(browser, browser.find_element(By.ID, "acknowledge"))
    browser.get(f"{base}/worklist")
    row = browser.find_element(By.CSS_SELECTOR, f'#worklist tr[data-study="{critical.study_instance_uid}"]')
    assert f"✓ {ADMIN}" in row.text
    browser.save_screenshot(str(screens / "06-worklist-acknowledged.png"))
    acknowledged = node.events(kind="study_acknowledged")
    assert [(e.entity_id, e.detail["user"]) for e in acknowledged] == [(critical.study_instance_uid, ADMIN)]

    # Queue and health pages; time to notification counts both studies.
    browser.get(f"{base}/queue")
    assert browser.find_element(By.ID, "workers").text.count("alive") >= 1
    browser.save_screenshot(str(screens / "07-queue.png"))
    browser.get(f"{base}/health")
    assert browser.find_element(By.ID, "health-status").text == "OK"
    cell = browser.find_element(By.CSS_SELECTOR, '#time-to-notification tr[data-flag="CRITICAL"] td[data-stage="acknowledged"]')
    assert cell.get_attribute("data-count") == "1"
    delivered = browser.find_element(By.CSS_SELECTOR, '#time-to-notification tr[data-flag="ROUTINE"] td[data-stage="delivered"]')
    assert delivered.get_attribute("data-count") == "1"
    browser.save_screenshot(str(screens / "08-health.png"))

    with node.sessions()() as session:
        assert session.scalars(select(Series).where(Series.series_instance_uid == critical.series_instance_uid)).one()
        assert all(e.detail.get("user") == ADMIN for e in session.scalars(select(Event).where(Event.kind == "admin_action")))
    assert len(list(screens.glob("0*.png"))) == 8
