"""The gateway's OpenAPI document, and `python -m service.openapi` to print it as YAML (for openapi.yaml).

FastAPI generates the document from the routes; this adds the schemas of the /reconstruct body (JSON and
multipart on one path, read by a dependency; the route's requestBody references both), and makes
the document say what the gateway answers (checked by schemathesis: tests/e2e/test_schemathesis.py):
- every error is the JSON ErrorBody (FastAPI documents its own 422 body, and errors of a route with another
  response class under that class's media type: text/event-stream, image/png);
- an operation with a body documents the 400 the framework answers when it cannot parse one (broken multipart);
- an optional header or query parameter is absent or a value, never `null` (the wire has no null);
- the API key is optional when the gateway runs open (no DAE_API_KEYS);
- `epochs` is capped at this gateway's DAE_MAX_EPOCHS, not only the library's ceiling;
- links from the model list to each model's operations (clients and schemathesis' stateful phase follow them).
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
    from service.reconstruct.schemas import ReconstructForm, ReconstructRequest

    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    extra = ReconstructRequest.model_json_schema(ref_template=_REF_TEMPLATE)
    form = ReconstructForm.model_json_schema(ref_template=_REF_TEMPLATE)
    for field in form["properties"].values():  # a form field is absent or a value, never null
        _drop_null(field)
    definitions = {**extra.pop("$defs", {}), "ReconstructRequest": extra, "ReconstructForm": form}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in definitions.items():
        if name in schemas and schemas[name] != definition:
            raise RuntimeError(
                f"Two different OpenAPI schemas share a name. Expected unique model names. Received: {name!r}"
            )
        schemas[name] = definition
    _document_errors_as_json(schema)
    _document_unparsable_bodies(schema)
    _drop_null_from_parameters(schema)
    _link_model_list(schema)
    settings = getattr(app.state, "settings", None)
    if settings is not None:
        if not settings.auth_enabled:
            _make_api_key_optional(schema)
        elif settings.metrics_require_key:
            _require_api_key(schema, "/metrics", 401, 403)
        _cap_epochs(schema, settings.max_epochs)
    app.openapi_schema = schema
    return schema


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for methods in schema.get("paths", {}).values() for operation in methods.values()]


def _document_errors_as_json(schema: dict[str, Any]) -> None:
    """Every 4xx/5xx documented as `application/json` ErrorBody, the body service.main's handlers send."""
    error_body = {"$ref": _REF_TEMPLATE.format(model="ErrorBody")}
    for operation in _operations(schema):
        for code, response in operation.get("responses", {}).items():
            if not str(code).isdigit() or int(code) < 400:
                continue
            content = response.get("content", {})
            refs = {entry.get("schema", {}).get("$ref") for entry in content.values()}
            if refs == {_REF_TEMPLATE.format(model="HTTPValidationError")}:  # FastAPI's default 422
                response["description"] = "Invalid input (says what was expected and what was received)"
            elif refs != {error_body["$ref"]}:
                continue  # another body on purpose (e.g. the Readiness report of a 503)
            response["content"] = {"application/json": {"schema": dict(error_body)}}
    schemas = schema.get("components", {}).get("schemas", {})
    if not any(_refers_to(operation, "HTTPValidationError") for operation in _operations(schema)):
        schemas.pop("HTTPValidationError", None)
        if not any(_refers_to(definition, "ValidationError") for definition in schemas.values()):
            schemas.pop("ValidationError", None)


def _document_unparsable_bodies(schema: dict[str, Any]) -> None:
    """FastAPI answers 400 to a body it cannot parse (e.g. broken multipart) on any operation that reads one."""
    for operation in _operations(schema):
        responses = operation.get("responses", {})
        if "requestBody" in operation and "400" not in responses and 400 not in responses:
            responses["400"] = {
                "description": "Bad request (a body that cannot be parsed as its Content-Type)",
                "content": {"application/json": {"schema": {"$ref": _REF_TEMPLATE.format(model="ErrorBody")}}},
            }


def _drop_null_from_parameters(schema: dict[str, Any]) -> None:
    """`X | None` parameters are documented as anyOf [X, null]; a header or query value cannot be null."""
    for operation in _operations(schema):
        for parameter in operation.get("parameters", []):
            if not parameter.get("required"):
                _drop_null(parameter.get("schema", {}))


def _drop_null(definition: dict[str, Any]) -> None:
    """An optional value's schema without its `null` branch (and without a `null` default)."""
    branches = definition.get("anyOf")
    if not branches or {"type": "null"} not in branches:
        return
    kept = [branch for branch in branches if branch != {"type": "null"}]
    del definition["anyOf"]
    if definition.get("default", ...) is None:
        del definition["default"]
    if len(kept) == 1:
        definition.update({key: value for key, value in kept[0].items() if key not in definition})
    else:
        definition["anyOf"] = kept


#: operationId -> what the link from GET /models (its first card) says.
_MODEL_LINKS = {
    "models-read_model": ("ReadModel", "The first model's card."),
    "models-read_model_history": ("ReadModelHistory", "The first model's training curves."),
    "models-read_model_samples": ("ReadModelSamples", "The first model's sample reconstructions."),
    "models-delete_model": ("DeleteModel", "Delete the first model."),
}


def _link_model_list(schema: dict[str, Any]) -> None:
    """GET /models → the operations on one model, by the id of the first card of the page."""
    listing = schema.get("paths", {}).get("/models", {}).get("get", {}).get("responses", {}).get("200")
    if listing is None:
        return
    known = {operation.get("operationId") for operation in _operations(schema)}
    listing["links"] = {
        name: {"operationId": operation_id, "parameters": {"ref": "$response.body#/items/0/id"}, "description": text}
        for operation_id, (name, text) in _MODEL_LINKS.items()
        if operation_id in known
    }


def _refers_to(node: Any, model: str) -> bool:
    ref = _REF_TEMPLATE.format(model=model)
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_refers_to(value, model) for value in node.values())
    if isinstance(node, list):
        return any(_refers_to(value, model) for value in node)
    return False


def _make_api_key_optional(schema: dict[str, Any]) -> None:
    """Without DAE_API_KEYS the gateway ignores X-API-Key: `{}` (no requirement) is an alternative everywhere.

    The ApiKey scheme stays documented (Swagger's Authorize button), as required only where keys are configured.
    """
    for operation in _operations(schema):
        security = operation.get("security")
        if security and {} not in security:
            operation["security"] = [*security, {}]


def _require_api_key(schema: dict[str, Any], path: str, *codes: int) -> None:
    """A route the middleware protects by a setting (not by its router) documents the key and its refusals."""
    from service.schemas import error_responses

    for operation in schema.get("paths", {}).get(path, {}).values():
        operation["security"] = [{"ApiKey": []}]
        for code in codes:
            operation.setdefault("responses", {})[str(code)] = {
                "description": error_responses(code)[code]["description"],
                "content": {"application/json": {"schema": {"$ref": _REF_TEMPLATE.format(model="ErrorBody")}}},
            }


def _cap_epochs(schema: dict[str, Any], max_epochs: int) -> None:
    """POST /jobs refuses more epochs than DAE_MAX_EPOCHS (422): its body says so.

    Only the body: records and cards keep TrainingSpec itself (a job submitted before the limit was lowered).
    """
    spec = schema.get("components", {}).get("schemas", {}).get("TrainingSpec", {}).get("properties", {})
    ceiling = spec.get("epochs", {}).get("maximum")
    body = schema.get("paths", {}).get("/jobs", {}).get("post", {}).get("requestBody", {}).get("content", {})
    entry = body.get("application/json")
    if entry is None or (ceiling is not None and ceiling <= max_epochs):
        return
    entry["schema"] = {"allOf": [entry["schema"], {"properties": {"epochs": {"maximum": float(max_epochs)}}}]}


def openapi_yaml(app: FastAPI) -> str:
    """The document as YAML with sorted keys."""
    return yaml.safe_dump(app.openapi(), sort_keys=True, allow_unicode=True, width=120)


def main() -> None:
    """Print the OpenAPI YAML of a default app (no connection is made)."""
    from service.main import create_app

    sys.stdout.write(openapi_yaml(create_app()))


if __name__ == "__main__":
    main()
