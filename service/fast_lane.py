"""The fast lane of POST /reconstruct: the innermost middleware of the app's one middleware list, which serves the
route's work without FastAPI's routing and dependency solving (measured ~40% of a 28x28 request's event-loop CPU;
bench/README.md, 2026-12-02).

Being a middleware, every middleware of the list (and any added later with add_middleware, which goes outside it)
runs on the lane; errors are answered by the app's own exception handlers through Starlette's ExceptionMiddleware,
500s by its ServerErrorMiddleware. The lane reads the same inputs as the route (settings and engine from
app.state, the query through AnswerQuery with the route's types and defaults, the body through read_call) and
steps aside, so the route serves, under a root_path and while dependency_overrides are set.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import principal_of
from service.reconstruct.parsing import read_call, wants_png
from service.reconstruct.pipeline import reconstruct
from service.reconstruct.schemas import AnswerOptions, ErrorFormat, OutputFormat
from service.routes.reconstruct import router

LANE_PATH = "/reconstruct"


class AnswerQuery(BaseModel):
    """The query parameters of POST /reconstruct, as the route's signature declares them."""

    model_config = ConfigDict(extra="ignore")

    format: OutputFormat = "png"
    error_format: ErrorFormat = "json"
    heatmap: bool = True


#: The names AnswerQuery reads (pydantic's model_fields is a property that builds its answer on every access).
QUERY_NAMES = frozenset(AnswerQuery.model_fields)


def read_options(request: Request) -> AnswerOptions:
    """The validated query (the last value of a repeated parameter, as FastAPI takes); 422 located at ("query", name)."""
    query_string: bytes = request.scope["query_string"]
    if not query_string:
        return AnswerOptions()
    # Parsed as Starlette's QueryParams parses it, without building its multi-dict (a third of a small query's cost).
    values = {name: value for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
              if name in QUERY_NAMES}
    try:
        query = AnswerQuery.model_validate(values)
    except ValidationError as error:
        entries = [{**entry, "loc": ("query", *entry["loc"])}
                   for entry in error.errors(include_url=False, include_context=False)]
        raise RequestValidationError(entries) from None
    return AnswerOptions(format=query.format, error_format=query.error_format, heatmap=query.heatmap)


async def serve(request: Request) -> Response:
    """What the route does, with its inputs read directly."""
    options = read_options(request)
    call = await read_call(request)
    resources = request.app.state.resources
    return await reconstruct(call, request.app.state.settings, resources.inference, options, principal_of(request),
                             wants_png=await wants_png(request))


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """serve() as an ASGI app; the ExceptionMiddleware around it answers its errors (so no request_response layer,
    which would wrap the same handlers a second time)."""
    response = await serve(Request(scope, receive, send))
    await response(scope, receive, send)


class ReconstructLane:
    """Innermost middleware: POST /reconstruct served directly (see the module docstring); all else passes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.lane: ASGIApp | None = None
        self.route: APIRoute | None = None

    def _build(self, gateway: Any) -> ASGIApp:
        """The endpoint behind an ExceptionMiddleware with the app's handlers (500s are the outer stack's)."""
        handlers = {key: value for key, value in gateway.exception_handlers.items() if key not in (500, Exception)}
        self.route = next(route for route in router.routes
                          if isinstance(route, APIRoute) and route.path == LANE_PATH and "POST" in (route.methods or ()))
        return ExceptionMiddleware(endpoint, handlers=handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = scope.get("app")
        if (
            scope["type"] != "http"
            or scope["path"] != LANE_PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
            or gateway is None
            or gateway.dependency_overrides
        ):
            await self.app(scope, receive, send)
            return
        if self.lane is None:
            self.lane = self._build(gateway)
        scope["route"] = self.route  # what routing sets: the metrics label is the route's template
        await self.lane(scope, receive, send)
