"""The chat page's routes, without a browser: content types, no external URLs, allowlisted, no path traversal."""

import re
from importlib import resources

import httpx
import pytest
from fastapi import FastAPI

from gptforge.serve.auth import APIKeyMiddleware
from gptforge.serve.web import mount_web
from tests.serve.utils import run


def app_with_key() -> FastAPI:
    app = FastAPI()
    app.add_middleware(APIKeyMiddleware, keys=["sekrit"])
    mount_web(app)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    return app


async def get(path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=app_with_key())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path, **kw)


@pytest.mark.parametrize(
    "path,ctype,needle",
    [("/chat", "text/html", 'id="messages"'), ("/static/chat.js", "text/javascript", "readSSE"),
     ("/static/chat.css", "text/css", ".msg.assistant")],
)  # fmt: skip
def test_page_files_are_served_without_a_key(path, ctype, needle):
    r = run(get(path))
    assert r.status_code == 200 and r.headers["content-type"].startswith(ctype) and needle in r.text


def test_root_redirects_to_the_page_and_the_api_still_needs_the_key():
    r = run(get("/"))
    assert r.status_code in (302, 307) and r.headers["location"] == "/chat"
    assert run(get("/v1/models")).status_code == 401
    assert run(get("/v1/models", headers={"Authorization": "Bearer sekrit"})).status_code == 200


@pytest.mark.parametrize("path", ["/static/../web.py", "/static/..%2Fweb.py", "/static/nope.js", "/static/%2e%2e"])
def test_static_refuses_anything_but_its_own_files(path):
    r = run(get(path))  # a normalized "../" leaves /static and meets the key check (401); the rest are 404
    assert r.status_code in (401, 404) and "import" not in r.text


def test_no_external_resources_in_any_static_file():
    folder = resources.files("gptforge.serve") / "static"
    names = [f.name for f in folder.iterdir()]
    assert {"chat.html", "chat.js", "chat.css"} <= set(names)
    for f in folder.iterdir():
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//cdn|@import|fonts\.googleapis", text), f"{f.name} loads something external"
        assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML", text), f"{f.name} renders HTML"
