"""The server's OpenAPI document from its pydantic models, and the `x-request-id` header.

The routes read and validate their bodies themselves (request_body.py: read under a deadline, parsed and
validated with strict pydantic off the event loop, OpenAI's error shape), so FastAPI cannot see their types. `install(app)` replaces `app.openapi` with a generator that adds,
per route of `ROUTES`, the request body schema and the 200 response schema (JSON, and `text/event-stream` for
the streaming routes) and, for every route, OpenAI's error body for the 4xx/5xx answers; every model lands in
`components/schemas` (pydantic's JSON Schema in validation mode for requests, serialization for responses).

`with_request_id(scope, send)` wraps an ASGI `send` so the response carries `x-request-id`: the client's own
value when it is 1-128 characters of [A-Za-z0-9._:-], otherwise a new random id.

Leaves out: per-route examples, security schemes in the document (the key is a plain bearer token).
"""

from __future__ import annotations

import re
import uuid

from pydantic.json_schema import models_json_schema

from llava_next.entrypoints.openai import protocol as P
from llava_next.entrypoints.openai import protocol_responses as RP

REF = "#/components/schemas/{model}"
ROUTES = {  # path: (request model, response model, streams)
    "/v1/chat/completions": (P.ChatCompletionRequest, P.ChatCompletionResponse, True),
    "/v1/completions": (P.CompletionRequest, P.CompletionResponse, True),
    "/v1/responses": (RP.ResponsesRequest, RP.Response, True),
    "/v1/models": (None, P.ModelList, False),
    "/v1/models/{model_id}": (None, P.ModelCard, False),
}
PLAIN_200 = {  # the routes that answer 200 with something else than a pydantic model
    "/health": {"description": "ready", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}}}},
    "/metrics": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _schemas() -> tuple[dict, dict]:
    models = [(m, "validation") for m, _, _ in ROUTES.values() if m is not None]
    models += [(m, "serialization") for _, m, _ in ROUTES.values()] + [(P.ErrorResponse, "serialization")]
    keys, doc = models_json_schema(models, ref_template=REF)
    return keys, doc.get("$defs", {})


def install(app) -> None:
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        keys, defs = _schemas()
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
        error = {"content": {"application/json": {"schema": keys[(P.ErrorResponse, "serialization")]}},
                 "description": "an error, as OpenAI returns it"}
        for path, item in doc.get("paths", {}).items():
            route = ROUTES.get(path.replace("{model_id:path}", "{model_id}"))
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)  # FastAPI's default: our validation errors are 400s
                for status in ("400", "401", "404", "413", "415", "500", "503"):
                    responses[status] = error
                if path in PLAIN_200:
                    responses["200"] = PLAIN_200[path]
                if route is None:
                    continue
                request, response, streams = route
                content = {"application/json": {"schema": keys[(response, "serialization")]}}
                if streams:
                    content["text/event-stream"] = {"schema": {"type": "string"}}
                responses["200"] = {"description": "the answer", "content": content}
                if request is not None:
                    operation["requestBody"] = {"required": True, "content": {"application/json": {
                        "schema": keys[(request, "validation")]}}}
        for name in ("HTTPValidationError", "ValidationError"):
            doc["components"]["schemas"].pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def with_request_id(scope, send):
    given = None
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            given = value.decode("latin-1")
            break
    request_id = given if given is not None and _SAFE_ID.match(given) else uuid.uuid4().hex
    header = (b"x-request-id", request_id.encode("ascii"))

    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return wrapped
