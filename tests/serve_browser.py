"""A running `svfseg serve` and headless Chromium for the browser tests, and what they do on the page
(no test functions here; the test files import the fixtures by name)."""
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_setup import blank_checkpoint, demo_record, free_port, shared_checkpoints, wait_for_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NEEDS_BROWSER = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs a browser: the Debian packages chromium and chromium-driver "
                              "(apt-get install chromium chromium-driver)"),
]
WAIT = 90  # seconds; generous for two busy CPU cores, every wait ends as soon as its condition holds
WINDOW = (1400, 1800)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`svfseg serve` on the svf, frozen and a blank checkpoint (one that finds nothing, with a made-up demo
    score: what the page must explain); checks on the way out that it left no temp folder and no traceback."""
    ckpts = dict(shared_checkpoints(tmp_path_factory))
    ckpts["blank"] = blank_checkpoint(ckpts["svf"], tmp_path_factory.mktemp("demo") / "blank",
                                      demo_record("svf", 0.123))
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "svfseg", "serve", "--checkpoint", str(ckpts["svf"]),
                                 str(ckpts["frozen"]), str(ckpts["blank"]), "--port", str(port),
                                 "--max-upload-mb", "1", "--threads", "1"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(proc, url, log, WAIT)
        yield {"url": url, "ckpts": ckpts, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    temp = re.search(r"uploads and results in (\S+)", text)
    assert temp and not Path(temp.group(1)).exists(), f"temp folder left behind: {text[-2000:]}"
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, its console log kept (``browser.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def open_page(browser, url, size=WINDOW):
    """Load the page at window ``size`` and wait until Segment can be clicked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(*size)
    browser.get(url)
    WebDriverWait(browser, WAIT).until(ec.element_to_be_clickable((By.ID, "run")))


def upload(browser, elem_id, *paths):
    """Upload files into a file component and wait until the server has each (it lists them by name)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys("\n".join(map(str, paths)))
    WebDriverWait(browser, WAIT).until(lambda d: all(
        d.find_elements(By.CSS_SELECTOR, f'#{elem_id} td.filename[aria-label="{Path(p).name}"]') for p in paths))


def remove_file(browser, elem_id):
    """Empty a single-file component with its Clear button (a filled one takes no new upload)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, f'#{elem_id} button[aria-label="Clear"]').click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"))


def status_text(browser):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "status").text


def run_and_wait(browser, word):
    """Click Segment and wait until the status line says ``word`` ("Done" or "Error")."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, WAIT).until(lambda d: word in status_text(d))
    return status_text(browser)


def pick(browser, elem_id, text):
    """Choose the dropdown entry that starts with ``text`` by typing it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def settles(browser, condition, seconds=WAIT) -> bool:
    """Whether ``condition(browser)`` holds within ``seconds`` (polling; no exception when it does not)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, seconds).until(condition)
        return True
    except TimeoutException:
        return False


def dropdown_options(browser, elem_id):
    """The entries a dropdown offers (opened, read, closed again)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    entries = f'#{elem_id} li[data-testid="dropdown-option"]'
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    # Gradio opens the list when the input gains focus, not on every click: an input that kept the focus
    # from an earlier try (the page re-rendered the list closed while the load event ran) never opens again,
    # so blur it first. The list renders after the click returns: read it once it is there, and close it.
    browser.execute_script("if (document.activeElement) document.activeElement.blur();")
    box.click()
    settles(browser, lambda d: d.find_elements(By.CSS_SELECTOR, entries), 10)
    options = [li.get_attribute("aria-label") for li in browser.find_elements(By.CSS_SELECTOR, entries)]
    box.send_keys(Keys.ESCAPE)
    settles(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, entries), 10)
    return options


def wait_for_options(browser, elem_id, expected):
    """Wait until the dropdown ``elem_id`` offers ``expected``; on failure say what it offered last."""
    seen = []
    if not settles(browser, lambda d: seen.append(dropdown_options(d, elem_id)) or seen[-1] == expected):
        raise AssertionError(f"#{elem_id} offers {seen[-1] if seen else 'nothing'}, expected {expected}")


def in_view(browser, selector):
    """Whether the element ``selector`` lies wholly inside the browser window."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); if (!e) return false;"
        "const r = e.getBoundingClientRect();"
        "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight;", selector)


def fetch_png(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return np.array(Image.open(BytesIO(r.read())))


def console_errors(browser):
    """The page's console errors since the last call (warnings from Gradio's canvas library are not errors)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
