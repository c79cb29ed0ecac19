"""Pure ASGI middleware of the gateway: metrics, API-key auth and the request body limit.

Pure ASGI (not BaseHTTPMiddleware) because they wrap every /reconstruct call and must cost microseconds.
Order, outermost first: metrics (so 401/413 answers are counted too) → auth (before any body is read)
→ body limit → the app.
"""

from __future__ import annotations

import time

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import DOCS_PATHS, METRICS_PATH, PROBE_PATHS, KeyRing, required_role
from service.deps import PRINCIPAL_STATE_KEY
from service.docs import DOCS_ASSETS_PATH
from service.metrics import OTHER, GatewayMetrics


def raw_header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header (lower-case name) straight from the ASGI scope: a tenth of what building
    Starlette's Headers mapping and looking the name up costs, on every request."""
    for key, value in scope["headers"]:
        if key == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


async def send_json(send: Send, status: int, body: dict[str, object], headers: list[tuple[bytes, bytes]] | None = None) -> None:
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


class AuthMiddleware:
    """Who calls and whether their key's role allows the route, before any body is read (service.auth).

    401 without a key or with one that is not configured, 403 when the key's role is below the route's; the
    caller's Principal is left in scope["state"] for the routes (service.deps.principal_of). The probes are always
    open, /metrics and the docs unless configured otherwise. Off when no keys are configured: everyone is
    OPEN_ACCESS. Secrets are never echoed or logged.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing, *, protect_metrics: bool = False, protect_docs: bool = False) -> None:
        self.app = app
        self.keys = keys
        open_paths = set(PROBE_PATHS)
        if not protect_metrics:
            open_paths.add(METRICS_PATH)
        self.open_prefixes: tuple[str, ...] = ()
        if not protect_docs:
            open_paths |= DOCS_PATHS
            self.open_prefixes = (DOCS_ASSETS_PATH + "/",)
        self.open_paths = frozenset(open_paths)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root_path = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path):]  # the route's own path, as routing will match it
        if self._is_open(path):
            await self.app(scope, receive, send)
            return
        presented = raw_header(scope, b"x-api-key")
        if not presented:
            await send_json(send, 401, {"detail": "This endpoint needs an API key. Expected an X-API-Key header. "
                                                  "Received: none"}, [(b"www-authenticate", b"APIKey")])
            return
        principal = self.keys.principal(presented)
        if principal is None:
            await send_json(send, 401, {"detail": "The API key is not valid. Expected one of the configured keys "
                                                  "(DAE_API_KEYS). Received: a key that is not configured"},
                            [(b"www-authenticate", b"APIKey")])
            return
        needed = required_role(scope["method"], path)
        if principal.role < needed:
            await send_json(send, 403, {"detail": (
                f"This key may not call {scope['method']} {path}. Expected a key with role {needed.name} or above. "
                f"Received: a {principal.role.name} key of owner {principal.owner!r}")})
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = principal
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
