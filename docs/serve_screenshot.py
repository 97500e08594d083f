"""Re-make docs/serve.png: drive a running `svfseg serve` in headless Chromium and screenshot the result.

    svfseg serve &                        # the demo's svf and frozen checkpoints, compared by default
    python docs/serve_screenshot.py --support S.jpg S_mask.png --query Q1.jpg Q2.jpg \
        --gt Q1_mask.png Q2_mask.png --out docs/serve.png
    python docs/serve_screenshot.py --example 1 --out docs/serve.png   # or: click the page's first example

It prints the status line, each checkpoint's title (its recorded score) and the result captions (the IoUs) of the
page it took: the README's caption quotes them, so both come from one run.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def _upload(driver, elem_id: str, paths: list[Path]) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(
        "\n".join(str(p.resolve()) for p in paths))
    WebDriverWait(driver, 60).until(lambda d: all(
        d.find_elements(By.CSS_SELECTOR, f'#{elem_id} td.filename[aria-label="{p.name}"]') for p in paths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--support", nargs=2, type=Path, metavar=("IMAGE", "MASK"))
    p.add_argument("--query", nargs="+", type=Path)
    p.add_argument("--example", type=int, metavar="N", help="click the page's N-th example instead of uploading")
    p.add_argument("--gt", nargs="*", type=Path, default=[])
    p.add_argument("--compare", help="the second checkpoint, as listed in the page")
    p.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args()
    if args.example is None and not (args.support and args.query):
        p.error("give --support and --query, or --example N")

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.width},1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(args.url)
        WebDriverWait(driver, 60).until(ec.element_to_be_clickable((By.ID, "run")))
        if args.example is None:
            _upload(driver, "support-image-1", [args.support[0]])
            _upload(driver, "support-mask-1", [args.support[1]])
            _upload(driver, "queries", args.query)
        if args.gt:
            _upload(driver, "ground-truth", args.gt)
        if args.compare:
            box = driver.find_element(By.CSS_SELECTOR, "#compare input")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(args.compare)
            box.send_keys(Keys.ENTER)
        if args.example is None:
            driver.find_element(By.ID, "run").click()
        else:  # an example fills the inputs and segments on its own
            driver.find_elements(By.CSS_SELECTOR, "#examples button")[args.example - 1].click()
        WebDriverWait(driver, 300).until(lambda d: "Done" in d.find_element(By.ID, "status").text
                                         or "Error" in d.find_element(By.ID, "status").text)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(args.width, height + 40)
        driver.execute_script("window.scrollTo(0, 0)")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete)"))
        png = driver.get_screenshot_as_png()
        # 256 colours: the page is mostly flat colour, and the README's image stays small
        Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(args.out, optimize=True)
        # what the README's caption quotes, from this same page
        print(driver.find_element(By.ID, "status").text)
        for column in ("a", "b"):
            title = driver.find_elements(By.ID, f"title-{column}")
            captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, f"#gallery-{column} .caption-label")]
            if title and title[0].text.strip():
                print(f"column {column}: {' '.join(title[0].text.split())}; captions: {' | '.join(captions)}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
