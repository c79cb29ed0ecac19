"""A direct ASGI lane for POST /reconstruct: the gateway's middleware and error mapping, without the framework stack.

Every request through FastAPI passes eight ASGI layers before it reaches a route (ServerErrorMiddleware, FastAPI's
exception telemetry and body-limit middleware, the user middleware, ExceptionMiddleware, AsyncExitStackMiddleware,
the router with its included-router and path matching, the route's request/response wrapper). Measured in-process
on a 28x28 /reconstruct (bench/serve.py's request), they took ~20% of the request's CPU time, as much as decoding
the PNG. POST /reconstruct is the hot path, so `GatewayApp` sends it down a short lane instead:

    MetricsMiddleware → ApiKeyMiddleware → BodySizeLimitMiddleware → serve_reconstruct, errors mapped by the app's
    own exception handlers

The lane uses the same middleware classes with the same settings and the same exception handlers as the full
stack, so status codes, bodies, headers and metrics labels are identical (tests/service/test_direct_lane.py
compares both paths answer by answer). Every other request, and /reconstruct with any other method or under a
root_path, takes the full stack. The route itself stays registered: it defines the OpenAPI operation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._exception_handler import _lookup_exception_handler
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, MetricsMiddleware

logger = logging.getLogger(__name__)

DIRECT_PATH = "/reconstruct"

Handler = Callable[[Request], Awaitable[Response]]


class DirectEndpoint:
    """The innermost ASGI app of the lane: one handler, its exceptions answered by the app's exception handlers."""

    def __init__(self, app: FastAPI, route: APIRoute, handler: Handler) -> None:
        self.app = app
        self.route = route
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # what the router would set: the metrics label is the route's template
        request = Request(scope, receive, send)
        try:
            try:
                response = await self.handler(request)
            except Exception as error:
                exception_handler = _lookup_exception_handler(self.app.exception_handlers, error)
                if exception_handler is None:
                    raise
                response = await exception_handler(request, error)
            await response(scope, receive, send)
        finally:
            await request.close()  # uploaded files of a multipart body (FastAPI's exit stack does this elsewhere)


class GatewayApp(FastAPI):
    """FastAPI whose POST /reconstruct takes the direct lane (see the module docstring); all else is unchanged."""

    direct_lane: ASGIApp | None = None

    def enable_direct_lane(
        self, route: APIRoute, *, metrics: Any, api_keys: list[str], max_body_bytes: int
    ) -> None:
        """Serve POST /reconstruct with `route`'s handler behind the gateway's three middlewares (same arguments)."""
        if route.path != DIRECT_PATH or "POST" not in route.methods:
            raise ValueError(f"The direct lane serves POST {DIRECT_PATH}. Received: {route.methods} {route.path}")
        lane: ASGIApp = DirectEndpoint(self, route, route.get_route_handler())
        lane = BodySizeLimitMiddleware(lane, max_bytes=max_body_bytes)
        lane = ApiKeyMiddleware(lane, api_keys=api_keys)
        self.direct_lane = MetricsMiddleware(lane, metrics=metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.direct_lane
        if (
            lane is not None
            and scope["type"] == "http"
            and scope["path"] == DIRECT_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            scope["app"] = self  # what Starlette.__call__ sets: request.app reaches app.state
            await lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
