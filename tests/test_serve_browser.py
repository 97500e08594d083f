"""`svfseg serve` in a real browser: headless Chromium uploads files, clicks Segment, reads the result."""
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_setup import blank_checkpoint, demo_record, free_port, shared_checkpoints, wait_for_server, write_inputs
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpts = dict(shared_checkpoints(tmp_path_factory))
    # a model that finds nothing, with the score its (made-up) demo cell recorded: what the page must explain
    ckpts["blank"] = blank_checkpoint(ckpts["svf"], tmp_path_factory.mktemp("demo") / "blank",
                                      demo_record("svf", 0.123))
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "svfseg", "serve", "--checkpoint", str(ckpts["svf"]),
                                 str(ckpts["frozen"]), str(ckpts["blank"]), "--port", str(port),
                                 "--max-upload-mb", "1"], stdout=out, stderr=subprocess.STDOUT)
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


def _pick(browser, elem_id, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_no_object_notice_and_recorded_scores_are_on_the_page(server, browser, inputs):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    info = browser.find_element(By.ID, "checkpoint-info").text
    assert "blank-best" in info and "test mIoU 12.3% (FB-IoU 50.0%, 1000 episodes)" in info
    assert "synthetic fold 0, 1-shot (data/synthetic-5i)" in info and "no recorded test score" in info
    _pick(browser, "checkpoint", str(server["ckpts"]["blank"]))
    _pick(browser, "compare", "(none)")
    _upload(browser, "support-image-1", inputs["support"])
    _upload(browser, "support-mask-1", inputs["mask"])
    _upload(browser, "queries", inputs["query"])
    status = _run_and_wait(browser, "Done")
    assert ("blank-best: the model found no object in query; this checkpoint scored 12.3% mIoU on its test "
            "(synthetic fold 0, 1-shot (data/synthetic-5i), 1000 episodes).") in status
    assert "test mIoU 12.3%" in browser.find_element(By.ID, "title-a").text


def test_captions_show_name_and_iou_in_full_and_clear_empties_the_page(server, browser, inputs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    long_query = tmp_path / "a_query_with_a_rather_long_file_name.png"
    shutil.copy(inputs["query"], long_query)
    shutil.copy(inputs["gt"], tmp_path / "a_query_with_a_rather_long_file_name_mask.png")
    _open(browser, server["url"])
    _upload(browser, "support-image-1", inputs["support"])
    _upload(browser, "support-mask-1", inputs["mask"])
    _upload(browser, "queries", long_query)
    _upload(browser, "ground-truth", tmp_path / "a_query_with_a_rather_long_file_name_mask.png")
    assert "IoU" in _run_and_wait(browser, "Done")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery-b .caption-label"))
    for gallery in ("gallery-a", "gallery-b"):  # compare view: two columns of half the width
        caption = browser.find_elements(By.CSS_SELECTOR, f"#{gallery} .caption-label")[0]
        assert re.fullmatch(r"a_query_with_a_rather_long_file_name · IoU \d+\.\d%", caption.text), caption.text
        assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", caption)
    browser.find_element(By.ID, "clear").click()
    WebDriverWait(browser, WAIT).until(lambda d: not d.find_element(By.ID, "status").text.strip())
    assert not browser.find_elements(By.CSS_SELECTOR, "#queries td.filename")
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery-a img")


def test_class_index_mask_gets_a_class_picker(server, browser, inputs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fg = np.array(Image.open(inputs["mask"])) == 255
    labels = np.zeros(fg.shape, np.uint8)
    labels[fg] = 7
    labels[:6, :6] = 3
    Image.fromarray(labels).save(tmp_path / "classes.png")
    _open(browser, server["url"])
    _upload(browser, "support-image-1", inputs["support"])
    _upload(browser, "support-mask-1", tmp_path / "classes.png")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "support-class-1").is_displayed())
    _upload(browser, "queries", inputs["query"])
    assert "a class-index mask (classes 3, 7); pick the object's class" in _run_and_wait(browser, "Error")
    _pick(browser, "support-class-1", "7 (")
    assert "1-shot" in _run_and_wait(browser, "Done")


def test_one_click_example_from_the_training_data(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server["url"])
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert examples, "no examples although the checkpoints' data root is there"
    examples[0].click()  # fills the inputs and segments: no Segment click here
    WebDriverWait(browser, WAIT).until(lambda d: "Done" in d.find_element(By.ID, "status").text)
    status = browser.find_element(By.ID, "status").text
    assert "1 of 1 queries have a ground truth" in status and "1-shot" in status
