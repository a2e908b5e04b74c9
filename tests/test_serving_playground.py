"""The playground page in a real headless browser (Debian's chromium + chromium-driver, selenium).

The ingress app is served by uvicorn on a free loopback port over the tiny bundle; chromium loads
``/``, generates an image, and shows an API error to the person. Without chromium the test fails
with the command that installs it (``make setup-system-serving``); it never skips silently.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tiny_bundle_dir):
    import torch
    import uvicorn

    from serving.api import IngressState, LocalBackend, create_api
    from serving.model import LocalImageModel

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = LocalImageModel()
    asyncio.run(model.reconfigure({"model_source": str(tiny_bundle_dir), "warmup": False}))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(IngressState(LocalBackend(model))), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the playground test needs Debian's chromium and "
                    "chromium-driver; install them with `make setup-system-serving` "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,720"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_playground_generates_and_shows_errors(page_url, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    d.get(page_url + "/")
    assert "budgetdiff playground" in d.title
    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a large red circle at the top left")
    Select(d.find_element(By.ID, "mode")).select_by_value("auto")
    d.find_element(By.ID, "use-quality").click()  # the slider sends quality_target for auto
    d.find_element(By.ID, "seed").clear()
    d.find_element(By.ID, "seed").send_keys("7")
    d.find_element(By.ID, "generate").click()
    WebDriverWait(d, 60).until(lambda d: d.find_element(By.ID, "stat-steps").text not in ("", "-")
                               or d.find_element(By.ID, "error").is_displayed())
    assert not d.find_element(By.ID, "error").is_displayed(), d.find_element(By.ID, "error").text
    steps = int(d.find_element(By.ID, "stat-steps").text)
    nfe = int(d.find_element(By.ID, "stat-nfe").text)
    assert steps >= 1 and 1 <= nfe <= steps and d.find_element(By.ID, "stat-skipped").text.isdigit()
    assert d.find_element(By.ID, "stat-mode").text == "auto" and d.find_element(By.ID, "stat-seed").text == "7"
    assert "ms" in d.find_element(By.ID, "stat-latency").text
    img = d.find_element(By.ID, "result-image")
    assert d.execute_script("return arguments[0].naturalWidth", img) == 16  # the native size ...
    assert img.size["width"] >= 256  # ... shown enlarged
    shot = tmp_path / "playground.png"
    d.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5  # not a blank page

    # an error from the API reaches the person, with the field it is about
    Select(d.find_element(By.ID, "mode")).select_by_value("full")
    prompt.clear()
    d.find_element(By.ID, "generate").click()
    WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    text = d.find_element(By.ID, "error").text
    assert "400" in text and "prompt: must be a non-empty string" in text and "field: prompt" in text
