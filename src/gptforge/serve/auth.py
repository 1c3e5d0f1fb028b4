"""API keys: every route needs `Authorization: Bearer <key>` (or `x-api-key`) except an explicit allowlist.

A pure ASGI middleware rather than a FastAPI dependency, so a route added later cannot forget it, and the router in
front of replicas uses the very same check. Keys come from `--api_key` (comma-separated for several) or the
GPTFORGE_API_KEY environment variable; none configured means an open server, which `gptforge serve` says loudly.
Comparison is constant-time (hmac.compare_digest) so response timing does not leak key prefixes.
"""

from __future__ import annotations

import hmac
import os

from gptforge.serve.errors import error_response

ENV_VAR = "GPTFORGE_API_KEY"
# Health probes come from load balancers and orchestrators that hold no key; the chat page's HTML and script carry no
# data (the page asks for the key and sends it with each API call).
ALLOWLIST = frozenset({"/health/live", "/health/ready", "/", "/chat"})
ALLOW_PREFIXES = ("/static/",)


def resolve_api_keys(cli_value: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Keys from the flag, else from $GPTFORGE_API_KEY; both may hold several keys separated by commas."""
    raw = cli_value if cli_value else (env if env is not None else os.environ).get(ENV_VAR, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def is_allowlisted(path: str) -> bool:
    return path in ALLOWLIST or path.startswith(ALLOW_PREFIXES)


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: a Bearer token, else an x-api-key header."""
    found = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key":
            found = value.decode("latin-1").strip() or None
    return found


def key_ok(key: str | None, keys: list[str]) -> bool:
    if key is None:
        return False
    # Check every key (no early exit) so the time taken does not depend on which one matched.
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(key.encode(), k.encode())
    return ok


class APIKeyMiddleware:
    """ASGI middleware answering 401 (OpenAI error shape) to any non-allowlisted HTTP request without a valid key."""

    def __init__(self, app, keys: list[str]) -> None:
        self.app, self.keys = app, list(keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or is_allowlisted(scope["path"]):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers", []))
        if key_ok(key, self.keys):
            await self.app(scope, receive, send)
            return
        msg = "missing API key" if key is None else "invalid API key"
        hint = "send it as 'Authorization: Bearer <key>'"
        response = error_response(401, f"{msg}: {hint}", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
