"""The web chat page: GET / (redirect), GET /chat, GET /static/{name}; files from the package's serve/static folder.

Plain HTML, CSS and JavaScript with no build step and no CDN, so the page works on an offline machine. It talks to the
same OpenAI-compatible routes as any client (streaming chat completions through fetch), sending the API key the user
typed; the page's own files carry no data and sit on the auth allowlist. Static names are looked up in a fixed set,
so no path from the URL ever reaches the file system.
"""

from __future__ import annotations

from importlib import resources

from gptforge.serve.errors import error_response

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def _files() -> dict[str, bytes]:
    folder = resources.files("gptforge.serve") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.name.endswith(tuple(_TYPES))}


def mount_web(app) -> None:
    """Add the chat page routes to `app` (read once, at app creation)."""
    from starlette.responses import RedirectResponse, Response

    files = _files()

    def serve(name: str) -> Response:
        body = files.get(name)
        if body is None:
            return error_response(404, f"no static file {name!r}", code="not_found")
        suffix = name[name.rfind(".") :]
        return Response(body, media_type=_TYPES[suffix], headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/chat")

    @app.get("/chat", include_in_schema=False)
    async def chat_page():
        return serve("chat.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return serve(name)
