"""`svfseg serve` in a real browser: the page shows what it was given (each support with its mask, the queries with
their ground truths, named classes), brings the results into view, clears stale errors, and its two checkpoint
pickers never offer the same checkpoint (issue 31)."""
import numpy as np
from PIL import Image

from serve_browser import (NEEDS_BROWSER, WAIT, browser, console_errors, dropdown_options, fetch_png,  # noqa: F401
                           in_view, open_page, pick, remove_file, run_and_wait, server, settles, status_text,
                           upload, wait_for_options)
from serve_setup import inputs  # noqa: F401 (fixture)

pytestmark = NEEDS_BROWSER


def _preview(browser, j=1, previous=None):
    """Support ``j``'s preview image as the page shows it (waiting until it differs from ``previous``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def src(d):
        found = d.find_elements(By.CSS_SELECTOR, f"#support-preview-{j} img")
        value = found[0].get_attribute("src") if found else None
        return value if value and value != previous else None

    url = WebDriverWait(browser, WAIT).until(src)
    return url, fetch_png(url)


def _assert_overlay_of(preview, rgb, mask):
    """``preview`` is ``rgb`` with exactly the pixels of ``mask`` turned green (enlarged by a whole factor)."""
    factor = preview.shape[0] // rgb.shape[0]
    assert factor >= 1 and preview.shape[:2] == (rgb.shape[0] * factor, rgb.shape[1] * factor)
    shown = preview[::factor, ::factor, :3].astype(int)
    np.testing.assert_array_equal(shown[~mask], rgb[~mask])  # untouched outside the mask
    inside = shown[mask]
    assert (inside != rgb[mask]).any(axis=1).all() and (inside[:, 1] > inside[:, 0]).all()  # every pixel greened


def test_the_support_is_shown_with_the_mask_the_model_gets(server, browser, inputs):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["mask"])
    rgb = np.array(Image.open(inputs["support"]))
    mask = np.array(Image.open(inputs["mask"])) == 255
    _, shown = _preview(browser)
    _assert_overlay_of(shown, rgb, mask)
    note = browser.find_element(By.ID, "support-note-1").text
    assert "Support 1 (64x48): the object in green is the uploaded mask support_mask.png" in note
    # strokes painted over an uploaded mask: the note says which of the two the model gets
    canvas = next(c for c in browser.find_elements(By.CSS_SELECTOR, "#support-editor-1 canvas") if c.is_displayed())
    ActionChains(browser).move_to_element_with_offset(canvas, -10, -5).click_and_hold().move_by_offset(10, 5) \
        .move_by_offset(10, 5).release().perform()
    WebDriverWait(browser, WAIT).until(
        lambda d: "painted strokes are not used" in d.find_element(By.ID, "support-note-1").text)
    # the queries, each with its ground truth drawn on it, and their sizes as width x height
    upload(browser, "queries", inputs["query"], inputs["query2"])
    upload(browser, "ground-truth", inputs["gt"])
    expected = ["query.png · 64x48 · ground truth query_gt.png", "other.png · 64x48 · no ground truth"]

    def captions(d=browser):
        return [c.text for c in d.find_elements(By.CSS_SELECTOR, "#query-previews .caption-label")]

    # the previews are redrawn once per upload: wait for the one that has seen the ground truth too
    settles(browser, lambda d: captions(d) == expected)
    assert captions() == expected
    thumb = fetch_png(browser.find_elements(By.CSS_SELECTOR, "#query-previews img")[0].get_attribute("src"))
    _assert_overlay_of(thumb, np.array(Image.open(inputs["query"])), np.array(Image.open(inputs["gt"])) == 255)
    assert not console_errors(browser)


def test_class_picker_names_the_classes_starts_on_the_largest_and_previews_it(server, browser, inputs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fg = np.array(Image.open(inputs["mask"])) == 255
    labels = np.zeros(fg.shape, np.uint8)
    labels[fg] = 7
    labels[:6, :6] = 3
    Image.fromarray(labels).save(tmp_path / "classes.png")
    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", tmp_path / "classes.png")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "support-class-1").is_displayed())
    # the checkpoints were trained on synthetic-5i, whose class 7 is "hexagon-waves": the larger object is chosen
    chosen = browser.find_element(By.CSS_SELECTOR, "#support-class-1 input")
    WebDriverWait(browser, WAIT).until(lambda d: chosen.get_attribute("value") == "7 hexagon-waves (14% of the image)")
    assert dropdown_options(browser, "support-class-1") == ["3 triangle-dots (1% of the image)",
                                                            "7 hexagon-waves (14% of the image)"]
    rgb = np.array(Image.open(inputs["support"]))
    url, shown = _preview(browser)
    _assert_overlay_of(shown, rgb, labels == 7)
    pick(browser, "support-class-1", "3 triangle")
    _, shown = _preview(browser, previous=url)
    _assert_overlay_of(shown, rgb, labels == 3)
    assert "class 3 (triangle-dots)" in browser.find_element(By.ID, "support-note-1").text
    upload(browser, "queries", inputs["query"])
    assert "1-shot" in run_and_wait(browser, "Done")


def test_segment_brings_the_results_into_view_in_a_gallery_sized_to_them(server, browser, inputs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server["url"], size=(1400, 1000))
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["mask"])
    upload(browser, "queries", inputs["query"])
    browser.execute_script("window.scrollTo(0, 0)")  # where a user who scrolled up to the inputs would be
    run_and_wait(browser, "Done")
    WebDriverWait(browser, WAIT).until(lambda d: in_view(d, "#status table"))
    assert "64x48" in browser.find_element(By.CSS_SELECTOR, "#status table").text  # the query's width x height
    # one query: one row of overlay and mask, no empty space below it and no scrolling inside the gallery
    wrap = browser.find_element(By.CSS_SELECTOR, "#gallery-a .grid-wrap")
    cell = browser.find_element(By.CSS_SELECTOR, "#gallery-a .thumbnail-item")
    sizes = browser.execute_script("const w = arguments[0], c = arguments[1];"
                                   "return [w.scrollHeight, w.clientHeight, c.offsetHeight];", wrap, cell)
    assert sizes[0] <= sizes[1] < 1.5 * sizes[2], sizes
    assert not console_errors(browser)


def test_a_replaced_input_clears_the_old_error(server, browser, inputs):
    open_page(browser, server["url"])
    upload(browser, "support-image-1", inputs["support"])
    upload(browser, "support-mask-1", inputs["empty"])
    upload(browser, "queries", inputs["query"])
    assert "the support mask has no foreground pixel" in run_and_wait(browser, "Error")
    remove_file(browser, "support-mask-1")
    upload(browser, "support-mask-1", inputs["mask"])
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT).until(lambda d: "Error" not in status_text(d))
    assert "1-shot" in run_and_wait(browser, "Done")


def test_the_two_checkpoint_pickers_never_offer_the_same_checkpoint(server, browser):
    from selenium.webdriver.common.by import By

    svf, frozen, blank = (str(server["ckpts"][k]) for k in ("svf", "frozen", "blank"))
    open_page(browser, server["url"])
    wait_for_options(browser, "compare", ["(none)", frozen, blank])
    assert dropdown_options(browser, "checkpoint") == [svf, blank]  # and the first does not offer the second's
    pick(browser, "checkpoint", blank)
    wait_for_options(browser, "compare", ["(none)", svf, frozen])
    assert browser.find_element(By.CSS_SELECTOR, "#compare input").get_attribute("value") == frozen
    pick(browser, "compare", "(none)")
    wait_for_options(browser, "checkpoint", [svf, frozen, blank])
