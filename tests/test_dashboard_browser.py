"""The dashboard in a real browser: headless Debian chromium driven by selenium, against
a real coordinator and worker. Log in, see tasks submitted through the API, open one
and follow its output, cancel one, drain a worker, upload and download an attachment,
log out; user text (a <script> command, an <img onerror> label) shows literally and
runs nothing; the page breaks no rule of its Content-Security-Policy and fits a phone.

Run only these with `pytest -m browser`. They skip (saying why) only when chromium,
chromedriver or selenium is not installed; .ci/run installs them."""

import shlex
import shutil
import time

import pytest

from e2e import Cluster, sh, spec, wait_until

try:
    from selenium import webdriver
    from selenium.common.exceptions import (NoSuchElementException,
                                            StaleElementReferenceException)
    from selenium.webdriver.common.by import By
except ImportError:  # the skip below says so
    webdriver = None

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                    ("selenium", webdriver)) if not found]
if MISSING:
    pytest.skip(f"no {', '.join(MISSING)}: apt-get install chromium chromium-driver; "
                f"pip install selenium (as .ci/run does)", allow_module_level=True)

# Chromium as root in a container: no sandbox, no GPU, nothing fetched from the network.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")
HOSTILE_COMMAND = "<script>window.pwned = 'command'</script>"
HOSTILE_LABEL = "<img src=x onerror=\"window.pwned = 'label'\">"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A coordinator, user alice (password pw) and one real worker serving her group."""
    c = Cluster(tmp_path_factory.mktemp("dashboard"), heartbeat_timeout="60s").boot()
    try:
        c.alice = c.user("alice")
        c.worker_proc = c.worker("alice")
        c.alice.api("POST", "/groups", {"group_name": "nobody-serves"})
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(system, browser):
    """The browser, logged in as alice on the dashboard's overview."""
    browser.get(system.url + "/")
    wait_for(browser, lambda: browser.find_element(By.ID, "login").is_displayed()
             or browser.find_element(By.ID, "app").is_displayed(), "the page to start")
    if browser.find_element(By.ID, "login").is_displayed():
        log_in(browser, "alice", "pw")
    yield browser
    assert browser.execute_script("return window.pwned || null") is None
    assert csp_violations(browser) == []


def wait_for(driver, predicate, what, timeout=30):
    """Poll `predicate` (elements may be missing yet, or replaced by a refresh)."""
    def attempt():
        try:
            return predicate()
        except (NoSuchElementException, StaleElementReferenceException):
            return None
    return wait_until(attempt, timeout, interval=0.1, what=what)


def text_of(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def log_in(driver, username, password):
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_for(driver, lambda: driver.find_element(By.ID, "app").is_displayed(), "the login")


def go(driver, hash_path):
    driver.execute_script("location.hash = arguments[0]", hash_path)


def csp_violations(driver):
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"]]


def screenshot(driver, tmp_path, name):
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


# ---- tests ---------------------------------------------------------------------------------


def test_a_wrong_password_is_refused_and_the_token_never_shows_in_a_url(system, browser):
    browser.get(system.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(browser, lambda: browser.find_element(By.ID, "login").is_displayed(), "login")
    browser.find_element(By.ID, "username").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_for(browser, lambda: "wrong username or password" in text_of(browser, "login-error"),
             "the refusal")
    browser.find_element(By.ID, "username").clear()
    browser.find_element(By.ID, "password").clear()
    log_in(browser, "alice", "pw")
    token = browser.execute_script("return sessionStorage.getItem('mito-token')")
    assert token and token not in browser.current_url


def test_tasks_submitted_through_the_api_appear_newest_first_shown_literally(
        system, page, tmp_path):
    c = system
    older = c.submit(c.alice, spec("echo", HOSTILE_COMMAND), group="nobody-serves",
                     labels=[HOSTILE_LABEL])
    newer = c.submit(c.alice, spec("true"), group="nobody-serves", labels=["plain"])
    go(page, "#/tasks?group=nobody-serves")
    rows = wait_for(page, lambda: len(page.find_elements(By.CSS_SELECTOR, "#part-table tbody tr"))
                    >= 2 and page.find_elements(By.CSS_SELECTOR, "#part-table tbody tr"),
                    "the tasks in the table")
    assert rows[0].text.startswith(newer[:8]) and rows[1].text.startswith(older[:8])
    assert shlex.join(["echo", HOSTILE_COMMAND]) in rows[1].text  # quoted as a shell would
    assert HOSTILE_LABEL in rows[1].text
    assert page.find_elements(By.CSS_SELECTOR, "#view img, #view script") == []
    go(page, "#/tasks?group=nobody-serves&label=plain")
    wait_for(page, lambda: len(page.find_elements(By.CSS_SELECTOR, "#part-table tbody tr")) == 1,
             "the label filter")
    screenshot(page, tmp_path, "tasks")


def test_the_tasks_table_shows_all_the_users_groups_unless_one_is_chosen(system, page):
    c = system
    bob = c.user("bob")
    c.submit(bob, spec("true"), labels=["everywhere"])  # not alice's to see
    lab = c.submit(c.alice, spec("true"), group="nobody-serves", labels=["everywhere"])
    own = c.submit(c.alice, spec("true"), labels=["everywhere"])
    go(page, "#/tasks?label=everywhere")
    rows_of = lambda: page.find_elements(By.CSS_SELECTOR, "#part-table tbody tr")  # noqa: E731
    rows = wait_for(page, lambda: len(rows_of()) == 2 and rows_of(), "both groups' tasks")
    shown = [(row.text[:8], row.find_elements(By.TAG_NAME, "td")[3].text) for row in rows]
    assert shown == [(own[:8], "alice"), (lab[:8], "nobody-serves")]
    chosen = page.find_element(By.CSS_SELECTOR, "#filter-group option:checked")
    assert chosen.text == "all my groups"
    go(page, "#/tasks?label=everywhere&group=alice")
    wait_for(page, lambda: [row.text[:8] for row in rows_of()] == [own[:8]], "one group's")


def test_a_task_page_follows_the_output_while_the_task_runs(system, page, tmp_path):
    c = system
    task_uuid = c.submit(c.alice, sh("for i in $(seq 1 10); do echo line$i; sleep 0.7; done; "
                                     "echo oops >&2", terminal_output=True))
    go(page, f"#/task/{task_uuid}")
    wait_for(page, lambda: "line1" in text_of(page, "out-stdout")
             and "Running" in text_of(page, "part-details"), "output while it runs")
    wait_for(page, lambda: "line10" in text_of(page, "out-stdout")
             and "Finished" in text_of(page, "part-details"), "the end of the task")
    assert text_of(page, "out-stdout").split() == [f"line{i}" for i in range(1, 11)]
    wait_for(page, lambda: "oops" in text_of(page, "out-stderr"), "stderr")
    # its state is Finished from the worker's Finish report; the history's Finished
    # comes with the commit, after the std-log's upload
    wait_for(page, lambda: all(event in text_of(page, "part-history")
                               for event in ("Submitted", "Started", "Finished")),
             "the whole history")
    wait_for(page, lambda: "std-log" in text_of(page, "part-artifacts"), "the artifacts")
    screenshot(page, tmp_path, "task")


def test_a_finished_task_shows_the_tail_of_its_std_log(system, page):
    c = system
    task_uuid = c.submit(c.alice, sh("echo finished-output", terminal_output=True))
    c.wait_task(c.alice, task_uuid)
    go(page, f"#/task/{task_uuid}")
    wait_for(page, lambda: "finished-output" in text_of(page, "out-stdout"), "the output")


def test_cancel_a_waiting_task_from_its_page(system, page):
    c = system
    task_uuid = c.submit(c.alice, spec("true"), group="nobody-serves")
    go(page, f"#/task/{task_uuid}")
    wait_for(page, lambda: page.find_element(By.ID, "cancel"), "the cancel button").click()
    wait_for(page, lambda: "Cancelled" in text_of(page, "part-details"), "the cancellation")
    assert c.task(c.alice, task_uuid)["info"]["state"] == "Cancelled"
    assert page.find_elements(By.ID, "cancel") == []


def test_a_task_page_shows_its_retries_and_requeues(system, page):
    c = system
    task_uuid = c.alice.api("POST", "/tasks", {
        "tags": [], "labels": [], "timeout": "1m", "priority": 0, "max_retries": 1,
        "retry_on": ["exit"], "task_spec": {"args": ["sh", "-c", "exit 3"]}})["uuid"]
    c.wait_task(c.alice, task_uuid)
    go(page, f"#/task/{task_uuid}")
    wait_for(page, lambda: "1 of 1 used (on exit); attempts: exit, exit"
             in text_of(page, "part-details"), "the retries")
    assert "Retried" in text_of(page, "part-history")


def test_the_overview_says_why_a_task_waits_and_draws_the_chart(system, page, tmp_path):
    c = system
    c.submit(c.alice, spec("true"), group="nobody-serves")
    go(page, "#/")
    wait_for(page, lambda: "no worker serves group nobody-serves" in text_of(page, "part-waiting"),
             "why the oldest task waits")
    assert page.find_elements(By.CSS_SELECTOR, "#part-chart svg rect")
    assert "idle" in text_of(page, "part-workers") or "busy" in text_of(page, "part-workers")
    scrolled = page.execute_script("window.scrollTo(0, 200); return window.scrollY")
    time.sleep(3.5)  # one refresh later the page has not jumped
    assert page.execute_script("return window.scrollY") == scrolled
    screenshot(page, tmp_path, "overview")


def test_the_page_fits_a_phone(system, page, tmp_path):
    page.set_window_size(390, 844)
    try:
        go(page, "#/")
        wait_for(page, lambda: page.find_elements(By.CSS_SELECTOR, "#part-chart svg"), "overview")
        assert page.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1")
        screenshot(page, tmp_path, "phone")
    finally:
        page.set_window_size(1280, 900)


def test_upload_and_download_an_attachment(system, page, tmp_path):
    local = tmp_path / "data.txt"
    local.write_text("attached bytes\n")
    go(page, "#/groups/alice")
    page.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(local))
    page.find_element(By.CSS_SELECTOR, "input[name=key]").send_keys("inputs/<b>data.txt")
    page.find_element(By.CSS_SELECTOR, "#view form button").click()
    wait_for(page, lambda: "inputs/<b>data.txt" in text_of(page, "part-attachments"),
             "the attachment in the list")
    page.find_element(By.CSS_SELECTOR, "#part-attachments button").click()
    # saved under the key's last part, which chromium makes a safe file name (_b_data.txt)
    wait_for(page, lambda: [p for p in page.downloads.iterdir() if p.name.endswith("data.txt")
                            and p.read_bytes() == b"attached bytes\n"],
             f"the download in {page.downloads}")
    screenshot(page, tmp_path, "group")


def test_drain_a_worker_from_the_workers_page(system, page, tmp_path):
    c = system
    worker_uuid, _ = c.register(c.alice, groups=["alice"], tags=["drain-me"])
    go(page, "#/workers")
    row = wait_for(page, lambda: [r for r in page.find_elements(By.CSS_SELECTOR, "#part-workers tr")
                                  if "drain-me" in r.text], "the worker in the table")[0]
    screenshot(page, tmp_path, "workers")
    row.find_element(By.XPATH, ".//button[text()='Drain']").click()
    wait_for(page, lambda: worker_uuid not in c.workers(c.alice), "the worker to go")
    wait_for(page, lambda: "drain-me" not in text_of(page, "part-workers"), "the table to update")


def test_log_out_forgets_the_token(system, page):
    page.find_element(By.ID, "logout").click()
    wait_for(page, lambda: page.find_element(By.ID, "login").is_displayed(), "the login form")
    assert page.execute_script("return sessionStorage.getItem('mito-token')") is None
