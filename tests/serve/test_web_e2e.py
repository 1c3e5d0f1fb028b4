"""The chat page end to end: a real `gptforge serve` process, Debian's headless Chromium driven by selenium.

Runs in CI (the Makefile installs chromium + chromium-driver and sets GPTFORGE_REQUIRE_BROWSER=1, which turns a
missing browser into a failure instead of a skip). Selenium is pointed at /usr/bin/chromedriver explicitly, so
selenium-manager never tries to download a driver. The tiny test model has a 64-token context, so replies are short;
the server's test-only `serve_token_sleep` fault slows each token to 50 ms so that streaming is visible and Stop lands
mid-reply. One test swaps the page's `fetch` for a scripted byte stream to check SSE parsing the real server never
exercises (one-byte chunks splitting UTF-8 characters, CRLF, comments, a mid-stream error event).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.utils import free_port

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
KEY = "pagekey"


def _require_browser() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    msg = (
        f"headless Chromium is missing ({CHROMIUM}, {DRIVER}): install it with "
        "`sudo apt-get install chromium chromium-driver` (Debian/Ubuntu), then re-run"
    )
    if os.environ.get("GPTFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    if os.environ.get("GPTFORGE_REQUIRE_BROWSER") == "1":
        import selenium  # noqa: F401  (required in CI: an ImportError fails loudly)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(trained_run):
    """A real `gptforge serve` with an API key, slowed to 50 ms a token; stopped with SIGTERM (its drain path)."""
    _require_browser()  # no point in starting a server for tests that will skip
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GPTFORGE_LOG_LEVEL": "warning"}
    env.pop("GPTFORGE_API_KEY", None)
    env["GPTFORGE_FAULT"] = "serve_token_sleep=0.05"
    args = ["--ckpt", str(trained_run / "pretrain"), "--port", str(port), "--api_key", KEY, "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), timeout=60)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"gptforge serve exited {proc.returncode}: {proc.stderr.read()}")
    try:
        return httpx.get(url + "/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(cond, timeout: float = 30, every: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {getattr(cond, '__name__', cond)}")


def by_id(page, element_id: str):
    from selenium.webdriver.common.by import By

    return page.find_element(By.ID, element_id)


def css(page, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return page.find_elements(By.CSS_SELECTOR, selector)


def status(page) -> str:
    return by_id(page, "status").text


def open_page(browser, url: str, key: str | None):
    """Load the page through / (the redirect is part of what is tested) with an empty localStorage, then type `key`."""
    browser.get(url + "/chat")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    assert browser.current_url == url + "/chat"
    wait_for(lambda: status(browser) != "loading…")
    if key:
        set_key(browser, key)
    return browser


def set_key(page, key: str, expect: str = "ready") -> None:
    box = by_id(page, "api-key")
    box.clear()
    box.send_keys(key)
    page.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
    wait_for(lambda: expect in status(page))


def set_field(page, element_id: str, value: str) -> None:
    box = by_id(page, element_id)
    box.clear()
    if value:
        box.send_keys(value)


def text_of(page, element) -> str:
    return page.execute_script("return arguments[0].textContent", element)


def metas(page) -> list[str]:
    return [e.text for e in css(page, ".msg.assistant .meta")]


# Records every text the streaming reply shows, so the test can see it grow rather than appear all at once.
RECORD_STREAM = """
window.__seen = [];
new MutationObserver(() => {
  const m = document.querySelector('.msg.assistant.streaming .text');
  const last = window.__seen[window.__seen.length - 1];
  if (m && m.textContent && last !== m.textContent) window.__seen.push(m.textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def test_chinese_message_sent_with_enter_gets_a_streamed_reply(browser, server):
    from selenium.webdriver.common.keys import Keys

    page = open_page(browser, server, KEY)
    served = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert by_id(page, "model").get_attribute("value") == served[0]["id"]
    assert by_id(page, "max-tokens").get_attribute("max") == "64"  # the model's context, from /v1/models
    set_field(page, "max-tokens", "20")
    set_field(page, "temperature", "0")
    box = by_id(page, "input")
    box.send_keys("床前明月光，")
    box.send_keys(Keys.SHIFT, Keys.ENTER)  # a new line, not a send
    box.send_keys("Shall I compare thee?")
    # An Enter that confirms an IME composition must not send (isComposing, or the legacy keyCode 229).
    typed = "床前明月光，\nShall I compare thee?"
    for init in ({"isComposing": True}, {"keyCode": 229}):
        js = "arguments[0].dispatchEvent(new KeyboardEvent('keydown', arguments[1]))"
        page.execute_script(js, box, {"key": "Enter", "bubbles": True, "cancelable": True, **init})
    assert css(page, ".msg") == [] and by_id(page, "input").get_attribute("value") == typed
    page.execute_script(RECORD_STREAM)
    box.send_keys(Keys.ENTER)
    user = wait_for(lambda: css(page, ".msg.user"))[0]
    assert text_of(page, user.find_element("css selector", ".text")) == typed
    assert by_id(page, "input").get_attribute("value") == ""
    meta = wait_for(lambda: metas(page), timeout=30)[0]
    final = text_of(page, css(page, ".msg.assistant .text")[0])
    seen = page.execute_script("return window.__seen")
    # Streamed: several partial texts were on screen before the end, each a prefix of the final reply.
    assert len(seen) >= 3 and all(final.startswith(s) for s in seen), (seen, final)
    assert meta.startswith("finish: ") and "prompt +" in meta and "completion tokens" in meta, meta
    assert "finish: length" in meta or "finish: stop" in meta
    assert status(page) == "ready"
    assert by_id(page, "send").is_enabled() and not by_id(page, "stop").is_enabled()
    by_id(page, "new-chat").click()
    assert css(page, ".msg") == []


def test_stop_keeps_the_partial_reply_and_the_page_stays_usable(browser, server):
    page = open_page(browser, server, KEY)
    set_field(page, "temperature", "0")  # greedy: the same long reply every run
    set_field(page, "max-tokens", "")  # auto: as much as the context allows, ~2.5 s at 50 ms a token
    by_id(page, "input").send_keys("Tell me a long story")
    by_id(page, "send").click()
    wait_for(lambda: page.execute_script(
        "const m = document.querySelector('.msg.assistant.streaming .text'); return m && m.textContent.length > 2"
    ))  # fmt: skip
    assert by_id(page, "stop").is_enabled() and not by_id(page, "send").is_enabled()
    by_id(page, "stop").click()
    meta = wait_for(lambda: metas(page))[0]
    assert meta.startswith("finish: stopped"), meta
    reply = css(page, ".msg.assistant")[0]
    assert "stopped" in reply.get_attribute("class") and "streaming" not in reply.get_attribute("class")
    stopped_text = text_of(page, reply)
    assert stopped_text
    time.sleep(0.5)
    assert text_of(page, reply) == stopped_text  # nothing more arrives after Stop
    assert status(page) == "stopped"
    assert by_id(page, "send").is_enabled() and not by_id(page, "stop").is_enabled()
    # The server freed the request and answers the next turn (whose history holds the stopped reply).
    set_field(page, "max-tokens", "3")
    by_id(page, "input").send_keys("again")
    by_id(page, "send").click()
    wait_for(lambda: len(metas(page)) == 2)
    assert metas(page)[1].startswith("finish: length · ") and "3 completion tokens" in metas(page)[1]


def test_missing_key_is_explained_then_the_typed_key_works_and_is_remembered(browser, server):
    page = open_page(browser, server, None)
    assert "API key needed" in wait_for(lambda: status(page))
    by_id(page, "input").send_keys("hello")
    by_id(page, "send").click()
    err = wait_for(lambda: css(page, ".msg.error"))[0].text
    assert "API key needed" in err and "missing API key" in err
    set_key(page, "wrong", expect="invalid API key")
    set_key(page, KEY)
    set_field(page, "max-tokens", "4")
    by_id(page, "input").send_keys("hello")
    by_id(page, "send").click()
    wait_for(lambda: metas(page))
    assert "finish: length" in metas(page)[0]
    page.refresh()  # the key was kept in localStorage
    wait_for(lambda: status(page) == "ready")
    assert by_id(page, "api-key").get_attribute("value") == KEY
    # An HTTP error body (here: a request over the 64-token context) is shown inline, and the page recovers.
    set_field(page, "max-tokens", "500")
    by_id(page, "input").send_keys("too long")
    by_id(page, "send").click()
    err = wait_for(lambda: css(page, ".msg.error"))[0].text
    assert "max_tokens 500" in err, err
    assert by_id(page, "send").is_enabled()


SSE_EVENTS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "你好, "}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "世界 🚀\nline two"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "<img src=x onerror=window.__pwned=1>"}, "finish_reason": None}]},
]
SCRIPTED_FETCH = """
const [chunks, status] = arguments;
window.__fetch = window.__fetch || window.fetch;
window.fetch = async (url, opts) => {
  if (!String(url).includes('/v1/chat/completions')) return window.__fetch(url, opts);
  let i = 0;
  const pull = (c) => (i < chunks.length ? c.enqueue(new Uint8Array(chunks[i++])) : c.close());
  const body = new ReadableStream({ pull });
  return new Response(body, { status, headers: { 'Content-Type': 'text/event-stream' } });
};
"""


def scripted_reply(page, wire: str, chunk: int, status_code: int = 200) -> None:
    """Make the page's next chat request get `wire` (UTF-8 bytes) in pieces of `chunk` bytes, then send a message."""
    data = wire.encode()
    page.execute_script(SCRIPTED_FETCH, [list(data[i : i + chunk]) for i in range(0, len(data), chunk)], status_code)
    by_id(page, "input").send_keys("hi")
    by_id(page, "send").click()


@pytest.mark.parametrize("chunk", [1, 5])
def test_sse_parsing_split_utf8_crlf_comments_and_a_mid_stream_error(browser, server, chunk):
    page = open_page(browser, server, KEY)
    wire = ": keep-alive\r\n\r\n" + "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in SSE_EVENTS)
    wire += 'data: {"error": {"message": "generation failed: boom", "type": "server_error"}}\n\n'
    scripted_reply(page, wire, chunk)
    err = wait_for(lambda: css(page, ".msg.error"))[0]
    assert err.text == "generation failed: boom"
    reply = css(page, ".msg.assistant .text")[0]
    assert text_of(page, reply) == "你好, 世界 🚀\nline two<img src=x onerror=window.__pwned=1>"
    assert css(page, "#messages img") == [] and page.execute_script("return window.__pwned") is None
    assert "failed" in css(page, ".msg.assistant")[0].get_attribute("class")
    # A clean finish with usage (LF endings this time), then a stream cut before [DONE].
    by_id(page, "new-chat").click()
    done = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}]  # fmt: skip
    scripted_reply(page, "".join(f"data: {json.dumps(e)}\n\n" for e in done) + "data: [DONE]\n\n", chunk)
    assert wait_for(lambda: metas(page))[0].startswith("finish: stop · 7 prompt + 1 completion tokens")
    scripted_reply(page, f"data: {json.dumps(done[0])}\n\n", chunk)
    assert "closed before the reply was complete" in wait_for(lambda: css(page, ".msg.error"))[0].text
    assert [text_of(page, e) for e in css(page, ".msg.assistant .text")] == ["ok", "ok"]
