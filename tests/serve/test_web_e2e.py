"""The chat page end to end: a real `gptforge serve` process, Debian's headless Chromium driven by selenium.

Runs in CI (the Makefile installs chromium + chromium-driver and sets GPTFORGE_REQUIRE_BROWSER=1, which turns a
missing browser into a failure instead of a skip). Selenium is pointed at /usr/bin/chromedriver explicitly, so
selenium-manager never tries to download a driver.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from tests.serve.test_stage_serve import start, wait_ready
from tests.serve.utils import free_port

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _require_browser() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    msg = "headless Chromium is missing: apt-get install chromium chromium-driver (`make test` does it)"
    if os.environ.get("GPTFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(trained_run):
    """One slowed-down server (0.25 s per token, so a reply streams visibly and Stop lands mid-reply), with a key."""
    port = free_port()
    proc = start(
        [
            "--ckpt",
            str(trained_run / "pretrain"),
            "--port",
            str(port),
            "--api_key",
            "pagekey",
            "--max_tokens_limit",
            "0",
        ],
        {"GPTFORGE_FAULT": "serve_token_sleep=0.25"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:
            proc.kill()


def wait_for(cond, timeout: float = 30, every: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting for the page")


def open_page(browser, url: str, key: str | None):
    from selenium.webdriver.common.by import By

    browser.get(url + "/")  # the redirect to /chat is part of what is tested
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/chat")
    box = browser.find_element(By.ID, "api-key")
    box.clear()
    if key:
        box.send_keys(key)
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait_for(lambda: browser.find_element(By.ID, "status").text == "ready")
    return browser


def assistant_texts(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")]


def test_typed_chinese_message_gets_a_streamed_reply(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = open_page(browser, server, "pagekey")
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("12")
    page.find_element(By.ID, "temperature").clear()
    page.find_element(By.ID, "temperature").send_keys("0")
    box = page.find_element(By.ID, "input")
    box.send_keys("床前明月光，Shall I compare thee")
    box.send_keys(Keys.ENTER)
    assert (
        wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".msg.user"))[0].text == "床前明月光，Shall I compare thee"
    )
    # Streaming: text shows up while the reply is still marked as streaming, then grows.
    partial = wait_for(lambda: page.execute_script(
        "const m = document.querySelector('.msg.assistant.streaming .text'); return m && m.textContent"
    ), timeout=60)  # fmt: skip
    assert partial
    meta = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"), timeout=60)[0].text
    final = assistant_texts(page)[0]
    assert final.startswith(partial.strip()[:1]) and len(final) >= len(partial.strip())
    assert "finish:" in meta and "completion tokens" in meta
    assert page.find_element(By.ID, "send").is_enabled()


def test_stop_button_ends_the_reply_and_the_page_stays_usable(browser, server):
    from selenium.webdriver.common.by import By

    page = open_page(browser, server, "pagekey")
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("40")  # 10 s at 0.25 s a token: Stop lands mid-reply
    page.find_element(By.ID, "input").send_keys("Tell me a long story")
    page.find_element(By.ID, "send").click()
    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"))
    assert page.find_element(By.ID, "stop").is_enabled() and not page.find_element(By.ID, "send").is_enabled()
    page.find_element(By.ID, "stop").click()
    meta = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"))[-1].text
    assert "stopped" in meta
    stopped_text = assistant_texts(page)[-1]
    time.sleep(0.5)
    assert assistant_texts(page)[-1] == stopped_text  # nothing more arrives after Stop
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("5")
    page.find_element(By.ID, "input").send_keys("again")
    page.find_element(By.ID, "send").click()
    wait_for(lambda: len(page.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) == 2, timeout=60)


def test_missing_key_is_explained_then_a_key_makes_it_work(browser, server):
    from selenium.webdriver.common.by import By

    page = open_page(browser, server, None)
    assert "API key needed" in wait_for(lambda: page.find_element(By.ID, "status").text)
    page.find_element(By.ID, "input").send_keys("hello")
    page.find_element(By.ID, "send").click()
    err = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".msg.error"))[0].text
    assert "API key needed" in err
    key = page.find_element(By.ID, "api-key")
    key.send_keys("pagekey")
    page.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    wait_for(lambda: page.find_element(By.ID, "status").text == "ready")
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("5")
    page.find_element(By.ID, "input").send_keys("hello")
    page.find_element(By.ID, "send").click()
    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"), timeout=60)
    assert shutil.which("chromium") or os.path.exists(CHROMIUM)
