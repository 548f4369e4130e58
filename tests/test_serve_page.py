"""The web page at /, in a real browser (Debian's chromium, driven by selenium and chromedriver): it
draws the image the API draws for the same settings, and it inpaints what the user paints."""

import base64
import io
import shutil
import time

import numpy as np
import pytest
import requests
from helpers import stroke_picture as picture
from PIL import Image

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")

from test_serve import FIRST, make_server, two_models  # noqa: E402


@pytest.fixture(scope="module")
def served(pipes):
    server = make_server(pipes)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir, tmp_path_factory):
    return two_models(tiny_pipeline_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def gallery_image(browser, count: int) -> np.ndarray:
    images = wait_for(lambda: len(found := browser.find_elements("css selector", "#gallery img")) >= count and found)
    src = images[0].get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def fill(browser, field: str, value) -> None:
    element = browser.find_element("id", field)
    element.clear()
    element.send_keys(str(value))


def test_the_page_draws_what_the_api_draws(browser, served, tmp_path):
    browser.get(served.url + "/")
    wait_for(lambda: browser.find_elements("css selector", "#sampler option"))
    assert FIRST in browser.find_element("id", "model").text
    fill(browser, "prompt", "a blue square")
    for field, value in (("steps", 3), ("seed", 11), ("cfg", 6)):
        fill(browser, field, value)
    browser.find_element("id", "generate").click()
    shown = gallery_image(browser, 1)
    body = dict(prompt="a blue square", steps=3, seed=11, cfg_scale=6, width=64, height=64, sampler_name="Euler")
    answer = requests.post(served.url + "/sdapi/v1/txt2img", json=body).json()
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))
    assert np.array_equal(shown, expected)
    caption = browser.find_element("css selector", "#gallery figcaption").text
    assert "Seed: 11" in caption and "Steps: 3" in caption
    browser.save_screenshot(str(tmp_path / "page.png"))  # (the README's picture is made the same way)


def test_the_page_inpaints_what_the_user_paints(browser, served, tmp_path):
    from selenium.webdriver import ActionChains

    picture().save(tmp_path / "in.png")
    browser.get(served.url + "/")
    wait_for(lambda: browser.find_elements("css selector", "#sampler option"))
    browser.find_element("id", "tab-img2img").click()
    fill(browser, "prompt", "a red circle")
    browser.find_element("id", "picture").send_keys(str(tmp_path / "in.png"))
    wait_for(lambda: browser.find_element("id", "picture").get_attribute("data-ready"))
    fill(browser, "steps", 3)
    fill(browser, "brush", 40)
    mask = browser.find_element("id", "mask")  # 256 px on the page for 64 px: paint the right half's middle
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", mask)
    ActionChains(browser).move_to_element_with_offset(mask, 60, -80).click_and_hold() \
        .move_by_offset(0, 160).release().perform()
    browser.find_element("id", "generate").click()
    shown = gallery_image(browser, 1).astype(int)
    given = np.asarray(picture()).astype(int)
    assert np.array_equal(shown[:, :32], given[:, :32])  # unpainted: the input's own pixels
    assert np.abs(shown[:, 40:56] - given[:, 40:56]).mean() > 3  # painted: redrawn
    assert "Inpaint method: replace" in browser.find_element("css selector", "#gallery figcaption").text
