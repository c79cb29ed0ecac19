"""The gateway's OpenAPI document, and `python -m service.openapi` to print it as YAML (for openapi.yaml).

FastAPI generates the document from the routes; this adds the schemas of the /reconstruct body, which the
route parses itself (it accepts JSON and multipart on one path) and references from its requestBody.
The YAML has sorted keys, so regenerating it without code changes gives the same bytes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import yaml
from fastapi.openapi.utils import get_openapi

if TYPE_CHECKING:
    from fastapi import FastAPI

_REF_TEMPLATE = "#/components/schemas/{model}"


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (computed once per app)."""
    if app.openapi_schema:
        return app.openapi_schema
    from service.routes.reconstruct import ReconstructRequest

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    extra = ReconstructRequest.model_json_schema(ref_template=_REF_TEMPLATE)
    definitions = {**extra.pop("$defs", {}), "ReconstructRequest": extra}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in definitions.items():
        if name in schemas and schemas[name] != definition:
            raise RuntimeError(
                f"Two different OpenAPI schemas share a name. Expected unique model names. Received: {name!r}"
            )
        schemas[name] = definition
    app.openapi_schema = schema
    return schema


def openapi_yaml(app: FastAPI) -> str:
    """The document as YAML with sorted keys."""
    return yaml.safe_dump(app.openapi(), sort_keys=True, allow_unicode=True, width=120)


def main() -> None:
    """Print the OpenAPI YAML of a default app (no connection is made)."""
    from service.main import create_app

    sys.stdout.write(openapi_yaml(create_app()))


if __name__ == "__main__":
    main()
