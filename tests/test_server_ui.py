"""The web UI in a real headless Chromium: `minisd serve --model weights/minisd-shapes` in a
subprocess, its page driven with selenium as a person would drive it (type, click, wait, look).

    txt2img     the gallery's images are those minisd's Pipeline draws for the same prompt and
                seeds (within PIXEL_TOLERANCE); each PNG, as served and as downloaded, carries the
                `parameters` text the page shows; the page loads nothing from elsewhere
    queue       an img2img job waits "1 ahead of you" behind a long txt2img job; Stop ends that
                job, and the img2img image is the Pipeline's for the uploaded picture; a page
                that goes away cancels its job
    errors      a request over the limits, or img2img without an image, says which field
    controls    (no browser) sizes step by the VAE's factor, defaults and maxima follow the limits

The screenshot goes to tmp_path; MINISD_WRITE_SCREENSHOT=1 also writes docs/figures/serve-ui.png.
"""
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from server_harness import chrome_driver, http_request, require_chromium, running_server

from minisd import Pipeline
from minisd.pnginfo import generation_parameters
from minisd.server.worker import GenerationQueue, Limits

pytest.importorskip("gradio")
pytest.importorskip("selenium")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "weights" / "minisd-shapes"
SCREENSHOT = ROOT / "docs" / "figures" / "serve-ui.png"
VIEWPORT = (1280, 900)
GENERATION_SECONDS = 120  # most a generation may take in the page, queueing included
STOP_SECONDS = 5  # most the queue may stay held after Stop (the job ends at its next step)
# Max |difference| in 8-bit levels between the server's image and the Pipeline's in this
# process: the same float32 math on one thread each (0 seen); two threads against one gave 1.
PIXEL_TOLERANCE = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_chromium()
    # float32 on the CPU on one thread, as the reference Pipeline below (conftest.py sets one
    # thread here; --dtype auto might pick bfloat16), so both sum in the same order
    with running_server("--model", str(SHAPES), "--device", "cpu", "--dtype", "float32",
                        env={"OMP_NUM_THREADS": "1"}, log_dir=tmp_path_factory.mktemp("server")) as handle:
        yield handle


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(server, downloads):
    driver = chrome_driver(download_dir=downloads)
    try:
        # the page's size, whatever room the headless window gives its frame
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(SHAPES, device="cpu", dtype=torch.float32)


def open_page(browser, server):
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#txt2img_prompt textarea"))


def select_tab(browser, name: str):
    tab, = [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name]
    tab.click()


def type_into(browser, css: str, value):
    """Replace a text box's or a number box's value, as a person would."""
    box = browser.find_element(By.CSS_SELECTOR, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def text_of(browser, element_id: str) -> str:
    # textContent: also for an element on a tab not shown (selenium's .text is "" there)
    return browser.find_element(By.ID, element_id).get_attribute("textContent").strip()


def wait_for(browser, condition, seconds: float, what: str, server):
    try:
        return WebDriverWait(browser, seconds, poll_frequency=0.1).until(lambda d: condition())
    except TimeoutException:
        pytest.fail(f"no {what} within {seconds} s\n--- server log ---\n{server.log_tail()}")


def gallery_urls(browser, tab: str) -> list[str]:
    """The gallery's image URLs in order (each shown as a thumbnail, once)."""
    thumbnails = browser.find_elements(By.CSS_SELECTOR, f"#{tab}_gallery button.thumbnail-small img")
    return [img.get_attribute("src") for img in thumbnails]


def fetch_png(url: str) -> Image.Image:
    status, _, body = http_request(url)
    assert status == 200, url
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    return image


def assert_same_image(served: Image.Image, reference: Image.Image, what: str):
    a, b = np.asarray(served.convert("RGB"), np.int16), np.asarray(reference, np.int16)
    assert a.shape == b.shape, what
    worst = int(np.abs(a - b).max())
    assert worst <= PIXEL_TOLERANCE, f"{what}: differs from the Pipeline's by up to {worst} levels"


def mean_colour(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.convert("RGB").crop(box), np.float64).reshape(-1, 3).mean(0)


def start_long_job(browser, server):
    """On the txt2img tab: the most the default limits allow (8 images of 128x128, 150 steps),
    a minute on two cores; returns once its per-step progress shows."""
    browser.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea").send_keys("a small white triangle")
    for name, value in (("steps", 150), ("batch_size", 8), ("width", 128), ("height", 128)):
        type_into(browser, f"#txt2img_{name} input[type=number]", value)
    browser.find_element(By.ID, "txt2img_generate").click()
    wait_for(browser, lambda: re.search(r"Generating: step \d+/150", text_of(browser, "txt2img_status")), 30,
             "per-step progress of the long job", server)


def test_txt2img_in_the_browser(server, browser, pipe, downloads, tmp_path):
    prompt, steps, seed, count = "a large red square on a blue background", 15, 7, 4
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea").send_keys(prompt)
    type_into(browser, "#txt2img_steps input[type=number]", steps)
    type_into(browser, "#txt2img_batch_size input[type=number]", count)
    type_into(browser, "#txt2img_seed input", seed)
    browser.find_element(By.ID, "txt2img_generate").click()
    wait_for(browser, lambda: len(gallery_urls(browser, "txt2img")) == count, GENERATION_SECONDS,
             f"{count} images in the gallery", server)

    expected = [generation_parameters(prompt, "", steps, "DPM++ 2M", 7, seed + i, 64, 64, "minisd-shapes")
                for i in range(count)]
    shown = lambda: browser.find_element(By.CSS_SELECTOR, "#txt2img_parameters textarea").get_attribute("value")
    assert shown() == expected[0]
    assert f"{count} image(s) in" in text_of(browser, "txt2img_status")
    reference = pipe(prompt, num_inference_steps=steps, guidance_scale=7, num_images_per_prompt=count,
                     generator=[torch.Generator().manual_seed(seed + i) for i in range(count)],
                     width=64, height=64, prompt_syntax="a1111").images
    for i, url in enumerate(gallery_urls(browser, "txt2img")):
        image = fetch_png(url)
        assert image.size == (64, 64)
        assert image.info["parameters"] == expected[i]
        assert_same_image(image, reference[i], f"image {i}")
        red, blue = mean_colour(image, (24, 24, 40, 40)), mean_colour(image, (0, 0, 6, 6))
        assert red[0] > 150 and red[0] > red[1] + 80 and red[0] > red[2] + 80, f"image {i}: centre {red}"
        assert blue[2] > 150 and blue[2] > blue[0] + 80 and blue[2] > blue[1] + 80, f"image {i}: corner {blue}"

    # the page's own files only: nothing from a CDN or a font service
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.url + "/") for url in loaded), \
        [url for url in loaded if not url.startswith(server.url + "/")]

    browser.save_screenshot(str(tmp_path / "serve-ui.png"))
    if os.environ.get("MINISD_WRITE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "serve-ui.png", SCREENSHOT)

    # the second thumbnail: its parameters; the download button: its file, chunk and all
    browser.find_element(By.CSS_SELECTOR, "#txt2img_gallery button[aria-label='Thumbnail 2 of 4']").click()
    wait_for(browser, lambda: shown() == expected[1], 10, "parameters of the selected image", server)
    browser.find_element(By.CSS_SELECTOR, "#txt2img_gallery button[aria-label='Download']").click()
    downloaded = wait_for(browser, lambda: list(downloads.glob("*.png")), 10, "downloaded PNG", server)
    assert Image.open(downloaded[0]).info["parameters"] == expected[1]


def test_queue_stop_and_img2img(server, browser, pipe, tmp_path):
    picture = Image.new("RGB", (64, 64), (30, 60, 220))
    ImageDraw.Draw(picture).rectangle((16, 16, 47, 47), fill=(220, 30, 30))
    picture.save(tmp_path / "square.png")
    prompt, steps, seed = "a large green circle on a blue background", 10, 11
    open_page(browser, server)

    start_long_job(browser, server)

    select_tab(browser, "img2img")
    browser.find_element(By.CSS_SELECTOR, "#img2img_image input[type=file]").send_keys(str(tmp_path / "square.png"))
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#img2img_image img"), 10,
             "uploaded image", server)
    browser.find_element(By.CSS_SELECTOR, "#img2img_prompt textarea").send_keys(prompt)
    type_into(browser, "#img2img_steps input[type=number]", steps)
    type_into(browser, "#img2img_seed input", seed)
    browser.find_element(By.ID, "img2img_generate").click()
    wait_for(browser, lambda: "Waiting: 1 ahead of you" in text_of(browser, "img2img_status"), 30,
             "queue position", server)

    select_tab(browser, "txt2img")
    browser.find_element(By.ID, "txt2img_stop").click()
    wait_for(browser, lambda: "Waiting" not in text_of(browser, "img2img_status"), STOP_SECONDS,
             "img2img job started after Stop (the long job still holds the queue)", server)
    assert text_of(browser, "txt2img_status") == "Stopped."
    assert gallery_urls(browser, "txt2img") == []

    select_tab(browser, "img2img")
    wait_for(browser, lambda: gallery_urls(browser, "img2img"), GENERATION_SECONDS, "img2img image", server)
    image = fetch_png(gallery_urls(browser, "img2img")[0])
    assert image.size == picture.size  # width and height 0: the picture's own
    assert image.info["parameters"] == generation_parameters(prompt, "", steps, "DPM++ 2M", 7, seed, 64, 64,
                                                             "minisd-shapes", denoising_strength=0.75)
    reference = pipe(prompt, image=picture, strength=0.75, num_inference_steps=steps, guidance_scale=7,
                     generator=[torch.Generator().manual_seed(seed)], prompt_syntax="a1111").images[0]
    assert_same_image(image, reference, "img2img")


def test_a_page_that_leaves_frees_the_queue(server, browser):
    open_page(browser, server)
    start_long_job(browser, server)
    browser.get("about:blank")
    left = time.monotonic()
    while (jobs := server.get("/sdapi/v1/progress")[1]["state"]["job_count"]) and time.monotonic() - left < 30:
        time.sleep(0.1)
    assert jobs == 0 and time.monotonic() - left < STOP_SECONDS, f"the queue held {time.monotonic() - left:.1f} s"


def test_errors_name_the_field(server, browser):
    open_page(browser, server)
    type_into(browser, "#txt2img_batch_count input[type=number]", 8)
    type_into(browser, "#txt2img_batch_size input[type=number]", 8)
    browser.find_element(By.ID, "txt2img_generate").click()
    toasts = lambda: " ".join(t.text for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"))
    wait_for(browser, lambda: "Batch size: batch_size x n_iter = 64 images" in toasts(), 10, "error toast", server)

    open_page(browser, server)
    select_tab(browser, "img2img")
    browser.find_element(By.ID, "img2img_generate").click()
    wait_for(browser, lambda: "Image: upload one" in toasts(), 10, "error toast", server)


def test_controls_follow_the_model_and_the_limits(pipe):
    """Without a browser: sizes step by the VAE's factor (4 for minisd-shapes) from the native size."""
    from minisd.server.app import ServerInfo
    from minisd.server.ui import build_ui

    generation = GenerationQueue(pipe, Limits(max_width=128, max_height=98, max_steps=50, max_images=4))
    try:
        ui = build_ui(generation, ServerInfo("minisd-shapes", str(SHAPES), generation.limits, 64))
    finally:
        generation.close()
    control = {block.elem_id: block for block in ui.blocks.values() if getattr(block, "elem_id", None)}
    for tab, (low, value) in (("txt2img", (4, 64)), ("img2img", (0, 0))):  # img2img: 0 = the image's size
        width, height = control[f"{tab}_width"], control[f"{tab}_height"]
        assert (width.minimum, width.maximum, width.step, width.value) == (low, 128, 4, value)
        assert (height.minimum, height.maximum, height.step, height.value) == (low, 96, 4, value)
        assert (control[f"{tab}_steps"].maximum, control[f"{tab}_batch_size"].maximum) == (50, 4)
        assert control[f"{tab}_clip_skip"].maximum == pipe.text_encoder.config.num_hidden_layers

