"""`svfseg serve` in a real browser: headless Chromium uploads files, clicks Segment, reads the result."""
import re
import shutil
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from serve_browser import (NEEDS_BROWSER, WAIT, browser, fetch_png, in_view, open_page, pick,  # noqa: F401
                           run_and_wait, server, upload)
from serve_setup import inputs  # noqa: F401 (fixture)
from svfseg.cli import main

pytestmark = NEEDS_BROWSER


def test_segment_in_the_browser_equals_predict(server, browser, inputs, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["mask"])
    upload(browser, "queries", inputs["query"])
    status = run_and_wait(browser, "Done")
    assert "svf-best" in status and "1-shot" in status
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery-a img")  # the overlay and mask are shown
    link = browser.find_element(By.CSS_SELECTOR, '#files-a a[download="query_mask.png"]').get_attribute("href")
    served = fetch_png(link)
    assert main(["predict", "--checkpoint", str(server["ckpts"]["svf"]), "--support", str(inputs["support"]),
                 str(inputs["mask"]), "--query", str(inputs["query"]), "--out", str(tmp_path / "p")]) == 0
    expected = np.array(Image.open(tmp_path / "p" / "query_mask.png"))
    np.testing.assert_array_equal(served, expected)
    assert 0.05 < (expected == 255).mean() < 0.95  # a real mask, not all one class
    assert browser.find_elements(By.CSS_SELECTOR, '#zip a[download="svfseg_results.zip"]')


def test_empty_mask_shows_the_error_and_server_keeps_serving(server, browser, inputs):
    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["empty"])
    upload(browser, "queries", inputs["query"])
    status = run_and_wait(browser, "Error")
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

    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "queries", inputs["query"])
    assert "support 1: no mask" in run_and_wait(browser, "Error")
    # the editor shows the support image once it has loaded; a stroke across its centre paints the mask
    canvas = next(c for c in browser.find_elements(By.CSS_SELECTOR, "#support-editor-1 canvas") if c.is_displayed())
    ActionChains(browser).move_to_element_with_offset(canvas, -10, -5).click_and_hold().move_by_offset(10, 5) \
        .move_by_offset(10, 5).release().perform()
    status = run_and_wait(browser, "Done")
    assert "1-shot" in status


def test_no_object_notice_and_recorded_scores_are_on_the_page(server, browser, inputs):
    from selenium.webdriver.common.by import By

    open_page(browser, server["url"])
    info = browser.find_element(By.ID, "checkpoint-info").text
    assert "blank-best" in info and "test mIoU 12.3% (FB-IoU 50.0%, 1000 episodes)" in info
    assert "synthetic fold 0, 1-shot (data/synthetic-5i)" in info and "no recorded test score" in info
    pick(browser, "checkpoint", str(server["ckpts"]["blank"]))
    pick(browser, "compare", "(none)")
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["mask"])
    upload(browser, "queries", inputs["query"])
    status = run_and_wait(browser, "Done")
    assert ("blank-best: the model found no object in query; this checkpoint scored 12.3% mIoU on its test "
            "(synthetic fold 0, 1-shot (data/synthetic-5i), 1000 episodes).") in status
    assert "test mIoU 12.3%" in browser.find_element(By.ID, "title-a").text


def test_captions_show_name_and_iou_in_full_and_clear_empties_the_page(server, browser, inputs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    long_query = tmp_path / "a_query_with_a_rather_long_file_name.png"
    shutil.copy(inputs["query"], long_query)
    shutil.copy(inputs["gt"], tmp_path / "a_query_with_a_rather_long_file_name_mask.png")
    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["mask"])
    upload(browser, "queries", long_query)
    upload(browser, "ground-truth", tmp_path / "a_query_with_a_rather_long_file_name_mask.png")
    assert "IoU" in run_and_wait(browser, "Done")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery-b .caption-label"))
    for gallery in ("gallery-a", "gallery-b"):  # compare view: two columns of half the width
        caption = browser.find_elements(By.CSS_SELECTOR, f"#{gallery} .caption-label")[0]
        assert re.fullmatch(r"a_query_with_a_rather_long_file_name · IoU \d+\.\d%", caption.text), caption.text
        assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", caption)
    browser.find_element(By.ID, "clear").click()
    WebDriverWait(browser, WAIT).until(lambda d: not d.find_element(By.ID, "status").text.strip())
    assert not browser.find_elements(By.CSS_SELECTOR, "#queries td.filename")
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery-a img")


def test_one_click_example_from_the_val_split(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server["url"], size=(1400, 1000))
    assert "val split" in browser.find_element(By.ID, "examples").text  # not "the training data"
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert examples, "no examples although the checkpoints' data root is there"
    examples[0].click()  # fills the inputs and segments: no Segment click here
    WebDriverWait(browser, WAIT).until(lambda d: "Done" in d.find_element(By.ID, "status").text)
    status = browser.find_element(By.ID, "status").text
    assert "1 of 1 queries have a ground truth" in status and "1-shot" in status
    WebDriverWait(browser, WAIT).until(lambda d: in_view(d, "#status table"))  # brought into view
    # the example's support holds several shapes: its preview marks the one that is the class
    assert browser.find_elements(By.CSS_SELECTOR, "#support-preview-1 img")
    assert "the uploaded mask support_mask.png" in browser.find_element(By.ID, "support-note-1").text
