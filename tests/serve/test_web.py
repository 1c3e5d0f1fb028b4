"""The chat page's routes, without a browser: content types, no external URLs, allowlisted, no path traversal."""

import re
from importlib import resources

import httpx
import pytest
from fastapi import FastAPI

from gptforge.serve.auth import APIKeyMiddleware
from gptforge.serve.web import mount_web, static_files
from tests.serve.utils import run


def make_app(keys: list[str]) -> FastAPI:
    app = FastAPI()
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys)
    mount_web(app)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    return app


async def get(path: str, keys: tuple[str, ...] = ("sekrit",), **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=make_app(list(keys)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path, **kw)


def package_file(name: str) -> bytes:
    return (resources.files("gptforge.serve") / "static" / name).read_bytes()


@pytest.mark.parametrize(
    "path,name,ctype",
    [("/chat", "chat.html", "text/html"), ("/static/chat.html", "chat.html", "text/html"),
     ("/static/chat.js", "chat.js", "text/javascript"), ("/static/chat.css", "chat.css", "text/css")],
)  # fmt: skip
def test_page_files_are_served_without_a_key_byte_for_byte(path, name, ctype):
    r = run(get(path))
    assert r.status_code == 200
    assert r.headers["content-type"] == f"{ctype}; charset=utf-8"
    assert r.content == package_file(name)


def test_root_redirects_to_the_page_and_the_api_still_needs_the_key():
    r = run(get("/"))
    assert r.status_code in (302, 307) and r.headers["location"] == "/chat"
    assert run(get("/v1/models")).status_code == 401
    assert run(get("/v1/models", headers={"Authorization": "Bearer sekrit"})).status_code == 200


def test_every_file_the_page_references_is_served():
    html = run(get("/chat")).text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(refs) == ["/static/chat.css", "/static/chat.js"]
    for ref in refs:
        assert run(get(ref)).status_code == 200, ref
    # The ids the end-to-end test and users' scripts rely on.
    for element_id in ("input", "send", "stop", "messages", "status", "api-key", "model", "max-tokens", "new-chat"):
        assert f'id="{element_id}"' in html, element_id


@pytest.mark.parametrize(
    "path",
    ["/static/..%2Fweb.py", "/static/..%2F..%2Fpyproject.toml", "/static/%2e%2e%2fweb.py", "/static/nope.js",
     "/static/%2e%2e", "/static/chat.js%00", "/static/__init__.py", "/static/"],
)  # fmt: skip
@pytest.mark.parametrize("keys", [(), ("sekrit",)])
def test_static_refuses_anything_but_its_own_files(path, keys):
    r = run(get(path, keys=keys))
    assert r.status_code == 404, (path, r.status_code)
    assert b"import" not in r.content and b"[project]" not in r.content


def test_a_dot_dot_segment_normalized_by_the_client_leaves_static_and_meets_the_key_check():
    r = run(get("/static/../web.py"))  # httpx sends /web.py: outside the allowlist, so the key check answers first
    assert r.status_code == 401


def test_only_page_files_are_exposed():
    assert set(static_files()) == {"chat.html", "chat.js", "chat.css"}


# Any scheme-qualified or protocol-relative URL, CSS @import, or url(...) that is not a same-origin path.
EXTERNAL = re.compile(r"[a-z][a-z0-9+.-]*://|(?<![:\w])//[\w-]+\.[\w.-]+|@import|url\(\s*['\"]?(?!/static/)", re.I)


@pytest.mark.parametrize("name", ["chat.html", "chat.js", "chat.css"])
def test_no_external_resources_and_no_html_rendering(name):
    text = package_file(name).decode("utf-8")
    assert not EXTERNAL.search(text), f"{name} loads something external: {EXTERNAL.search(text).group(0)!r}"
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write", text), name


def test_the_external_resource_check_catches_what_it_should():
    for bad in ("https://cdn.example.com/x.js", "//cdn.jsdelivr.net/npm/x", "@import 'x.css';", "url(http://f/x)"):
        assert EXTERNAL.search(bad), bad
    for ok in ("// a comment", 'fetch("/v1/models")', "a // b", "url(/static/x.png)"):
        assert not EXTERNAL.search(ok), ok
