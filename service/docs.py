"""Swagger UI (/docs) and ReDoc (/redoc) served with their JavaScript and CSS from the app, never from a CDN.

FastAPI's recipe "Self-hosting JavaScript and CSS for docs": the app is built with `docs_url=None,
redoc_url=None` and `install_docs(app)` adds the two pages, Swagger UI's OAuth2 redirect page and a static mount
of the assets. The assets come from the pinned PyPI package `fastapi-offline` (MIT; it bundles Swagger UI, Apache
2.0, and ReDoc's standalone build, MIT), read through Starlette's `StaticFiles(packages=...)`, so a gateway with
no internet access still renders its documentation.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

#: Where the assets are served; the API-key middleware leaves this prefix open, like the pages themselves.
DOCS_ASSETS_PATH = "/docs-assets"
#: The package and its folder holding swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png.
ASSETS_PACKAGE = ("fastapi_offline", "static")

SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"
#: ReDoc's menu always shows its maker's logo from cdn.redoc.ly (hidden when it fails): images from the app only.
REDOC_IMAGES_POLICY = "img-src 'self' data:"


def install_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add /docs, its OAuth2 redirect, /redoc and the asset mount to `app`, built with docs_url=redoc_url=None."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError(
            "FastAPI's own docs pages load their assets from a CDN. Expected an app built with docs_url=None and "
            f"redoc_url=None. Received: docs_url={app.docs_url!r}, redoc_url={app.redoc_url!r}"
        )
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("The docs pages render the OpenAPI document. Expected an openapi_url. Received: None")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

    def asset(request: Request, name: str) -> str:
        return f"{root_path(request)}{DOCS_ASSETS_PATH}/{name}"

    async def swagger_ui_html(request: Request) -> HTMLResponse:
        root = root_path(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=asset(request, SWAGGER_JS),
            swagger_css_url=asset(request, SWAGGER_CSS),
            swagger_favicon_url=asset(request, FAVICON),
            oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def swagger_ui_redirect(_request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc_html(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=root_path(request) + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, REDOC_JS),
            redoc_favicon_url=asset(request, FAVICON),
            with_google_fonts=False,  # fonts from Google are another host; ReDoc falls back to the system's
        )
        page.headers["Content-Security-Policy"] = REDOC_IMAGES_POLICY
        return page

    app.mount(DOCS_ASSETS_PATH, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")
    app.add_route(docs_url, swagger_ui_html, include_in_schema=False)
    if oauth2_redirect_url:
        app.add_route(oauth2_redirect_url, swagger_ui_redirect, include_in_schema=False)
    app.add_route(redoc_url, redoc_html, include_in_schema=False)


def root_path(request: Request) -> str:
    """The prefix a proxy serves the app under (ASGI root_path), as FastAPI's own docs pages use it."""
    return str(request.scope.get("root_path", "")).rstrip("/")
