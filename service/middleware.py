"""Pure ASGI middleware of the gateway: metrics, API-key auth and the request body limit.

Pure ASGI (not BaseHTTPMiddleware) because they wrap every /reconstruct call and must cost microseconds.
Order, outermost first: metrics (so 401/413 answers are counted too) → auth (before any body is read)
→ body limit → the app.
"""

from __future__ import annotations

import hmac
import time

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.docs import DOCS_ASSETS_PATH
from service.metrics import OTHER, GatewayMetrics

#: Paths that never need an API key: probes, metrics and the documentation.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: Path prefixes that never need one: the documentation pages' JavaScript, CSS and icon (service.docs).
OPEN_PATH_PREFIXES = (DOCS_ASSETS_PATH + "/",)


def raw_header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header (lower-case name) straight from the ASGI scope: a tenth of what building
    Starlette's Headers mapping and looking the name up costs, on every request."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with a JSON body directly from middleware."""
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class MetricsMiddleware:
    """Counts requests and times them, labelled by the matched route template (`other` when none matched)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or OTHER  # never the raw path: clients choose it
            self.metrics.observe_request(scope["method"], template, status, time.perf_counter() - started)


class ApiKeyMiddleware:
    """401 without an X-API-Key header, 403 with a wrong one; open paths pass. Off when no keys are configured."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.api_keys or path in OPEN_PATHS or path.startswith(OPEN_PATH_PREFIXES):
            await self.app(scope, receive, send)
            return
        presented = raw_header(scope, b"x-api-key")
        if not presented:
            await send_json(
                send,
                401,
                {"detail": "This endpoint needs an API key. Expected an X-API-Key header. Received: none"},
                [(b"www-authenticate", b"APIKey")],
            )
            return
        presented_bytes = presented.encode()
        # Compare against every key in constant time, so timing reveals neither which key nor how much matched.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(presented_bytes, key)
        if not matched:
            await send_json(
                send, 403, {"detail": "The API key is not valid. Expected one of the configured keys. Received: another"}
            )
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the limit; the HTTPException handler answers 413."""

    def __init__(self, limit: int, received: str) -> None:
        super().__init__(
            status_code=413,
            detail=(
                f"The request body is too large. Expected at most {limit} bytes (DAE_MAX_UPLOAD_MB). "
                f"Received: {received}"
            ),
            # Without it the server keeps reading (and discarding) a chunked body for as long as the client sends.
            headers={"Connection": "close"},
        )


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, or while streaming (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = raw_header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes, f"Content-Length {declared}")
            await send_json(send, 413, {"detail": error.detail}, [(b"connection", b"close")])
            return
        received = 0
        limit = self.max_bytes

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, f"more than {limit} bytes")
            return message

        await self.app(scope, receive_with_limit, send)
