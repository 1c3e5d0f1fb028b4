"""The web chat page: GET / (redirect), GET /chat, GET /static/{name}; files from the package's serve/static folder.

Plain HTML, CSS and JavaScript with no build step and no CDN, so the page works on an offline machine and `pip
install` needs no Node toolchain; the price is hand-written DOM code instead of a UI framework. The page talks to the
same OpenAI-compatible routes as any client (streaming chat completions through fetch), sending the API key the user
typed; the page's own files carry no data and sit on the auth allowlist. The files are read once when the app is
built and looked up by exact name in that fixed set, so nothing taken from the URL ever reaches the file system
(no path traversal by construction), at the cost of a server restart to pick up an edited page.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from gptforge.serve.errors import error_response

if TYPE_CHECKING:
    from fastapi import FastAPI

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def static_files() -> dict[str, bytes]:
    """The page's files by name (only the types in `_TYPES`), read from the installed package."""
    folder = resources.files("gptforge.serve") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.name.endswith(tuple(_TYPES))}


def mount_web(app: FastAPI) -> None:
    """Add the chat page routes to `app` (the files are read now, once)."""
    from starlette.responses import RedirectResponse, Response

    files = static_files()

    def serve(name: str) -> Response:
        body = files.get(name)
        if body is None:
            return error_response(404, f"no static file {name!r}", code="not_found")
        suffix = name[name.rfind(".") :]
        # no-cache (revalidate) rather than max-age: an upgraded server must not run against a stale cached script.
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return Response(body, media_type=_TYPES[suffix], headers=headers)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/chat")

    @app.get("/chat", include_in_schema=False)
    async def chat_page():
        return serve("chat.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return serve(name)
