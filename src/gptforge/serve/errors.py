"""OpenAI-shaped error bodies, shared by the app and the replica router.

Clients (the official `openai` package among them) parse `{"error": {"message", "type", "param", "code"}}` and map
the HTTP status to an exception class, so every refusal we send, from auth to overload, uses this one shape.
"""

from __future__ import annotations

from typing import Any

# HTTP status -> the `type` OpenAI uses for it; anything unlisted >= 500 is a server_error.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response for HTTP `status`."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
):
    """A starlette JSONResponse carrying `error_body`; imported lazily so this module stays import-light."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)
