"""`svfseg serve` in a real browser: headless Chromium uploads files, clicks Segment, reads the result."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_setup import shared_checkpoints, write_inputs
from svfseg.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs a browser: the Debian packages chromium and chromium-driver "
                              "(apt-get install chromium chromium-driver)"),
]
WAIT = 90  # seconds; generous for two busy CPU cores, every wait ends as soon as its condition holds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"svfseg serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # polling a port that is not open yet: no event to wait on
    raise AssertionError(f"svfseg serve did not answer on {url} within {timeout} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpts = shared_checkpoints(tmp_path_factory)
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "svfseg", "serve", "--checkpoint", str(ckpts["svf"]),
                                 str(ckpts["frozen"]), "--port", str(port), "--max-upload-mb", "1"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(proc, url, log, WAIT)
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
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def _open(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, WAIT).until(ec.element_to_be_clickable((By.ID, "run")))


def _upload(browser, elem_id, *paths):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys("\n".join(map(str, paths)))
    # each file is listed in the component once its upload has reached the server
    WebDriverWait(browser, WAIT).until(lambda d: all(
        d.find_elements(By.CSS_SELECTOR, f'#{elem_id} td.filename[aria-label="{Path(p).name}"]') for p in paths))


def _run_and_wait(browser, word):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, WAIT).until(lambda d: word in d.find_element(By.ID, "status").text)
    return browser.find_element(By.ID, "status").text


def _fetch_png(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return np.array(Image.open(BytesIO(r.read())))


def test_segment_in_the_browser_equals_predict(server, browser, inputs, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _upload(browser, "support-image-1", inputs["support"])
    _upload(browser, "support-mask-1", inputs["mask"])
    _upload(browser, "queries", inputs["query"])
    status = _run_and_wait(browser, "Done")
    assert "svf-best" in status and "1-shot" in status
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery-a img")  # the overlay and mask are shown
    link = browser.find_element(By.CSS_SELECTOR, '#files-a a[download="query_mask.png"]').get_attribute("href")
    served = _fetch_png(link)
    assert main(["predict", "--checkpoint", str(server["ckpts"]["svf"]), "--support", str(inputs["support"]),
                 str(inputs["mask"]), "--query", str(inputs["query"]), "--out", str(tmp_path / "p")]) == 0
    expected = np.array(Image.open(tmp_path / "p" / "query_mask.png"))
    np.testing.assert_array_equal(served, expected)
    assert 0.05 < (expected == 255).mean() < 0.95  # a real mask, not all one class
    assert browser.find_elements(By.CSS_SELECTOR, '#zip a[download="svfseg_results.zip"]')


def test_empty_mask_shows_the_error_and_server_keeps_serving(server, browser, inputs):
    _open(browser, server["url"])
    _upload(browser, "support-image-1", inputs["support"])
    _upload(browser, "support-mask-1", inputs["empty"])
    _upload(browser, "queries", inputs["query"])
    status = _run_and_wait(browser, "Error")
    assert "support 1 mask (empty.png): the support mask has no foreground pixel" in status
    with urllib.request.urlopen(server["url"], timeout=10) as r:
        assert r.status == 200
    assert server["proc"].poll() is None


def _post_file(url, name, data):
    boundary = "svfsegboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_uploads_over_the_limit_are_refused(server):
    upload = server["url"] + "gradio_api/upload"
    assert _post_file(upload, "small.png", b"x" * 1000) == 200
    assert _post_file(upload, "big.png", b"x" * (1024 * 1024 + 1)) == 413  # the server ran with --max-upload-mb 1


def test_painted_mask_is_used(server, browser, inputs):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _upload(browser, "support-image-1", inputs["support"])
    _upload(browser, "queries", inputs["query"])
    assert "support 1: no mask" in _run_and_wait(browser, "Error")
    # the editor shows the support image once it has loaded; a stroke across its centre paints the mask
    canvas = next(c for c in browser.find_elements(By.CSS_SELECTOR, "#support-editor-1 canvas") if c.is_displayed())
    ActionChains(browser).move_to_element_with_offset(canvas, -10, -5).click_and_hold().move_by_offset(10, 5) \
        .move_by_offset(10, 5).release().perform()
    status = _run_and_wait(browser, "Done")
    assert "1-shot" in status
