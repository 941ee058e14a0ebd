"""The server's errors: one exception type carrying an HTTP status and OpenAI's error body, and the mapping from
the library's typed errors and pydantic's validation errors onto it.

Every message is short and safe to return: library messages are flattened to one line and cut to
`MAX_MESSAGE` characters, pydantic messages name the field and what was expected but never echo the input
value, and nothing from a traceback is ever put in a body.

Leaves out: localisation, error documentation links.
"""

from __future__ import annotations

import re

from llava_next.errors import (
    ContextLengthError,
    EngineDeadError,
    ImageTokenMismatchError,
    InvalidImageError,
    KVCacheCapacityError,
    SamplingParamsError,
    TooManyImagesError,
)

MAX_MESSAGE = 300
_FIELD = re.compile(r"SamplingParams\.(\w+)")
_UNION_MEMBERS = {"system", "developer", "user", "assistant", "text", "image_url"}
_TYPE_MEMBERS = {"str", "int", "float", "bool"}
_BYTES = re.compile(r" starting b(['\"]).*?\1")  # decode errors quote a file's first bytes: never echo them


class APIError(Exception):
    """An error answered as `{"error": {...}}` with `status` (and optional extra headers)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, clean(message), type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def clean(message: str, limit: int = MAX_MESSAGE) -> str:
    """One line, no file bytes, at most `limit` characters."""
    text = _BYTES.sub("", " ".join(str(message).split()))
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_library(exc: BaseException) -> APIError:
    """The APIError for an exception raised while preparing or running a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine is not available; retry later", "service_unavailable", None,
                        "engine_unavailable", {"Retry-After": "5"})
    if isinstance(exc, ContextLengthError):
        return bad_request(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, KVCacheCapacityError):
        return bad_request(str(exc), "max_tokens", "context_length_exceeded")
    if isinstance(exc, TooManyImagesError):
        return bad_request(str(exc), "messages", "too_many_images")
    if isinstance(exc, ImageTokenMismatchError):
        return bad_request(str(exc), "messages", "image_token_mismatch")
    if isinstance(exc, InvalidImageError):
        return bad_request(str(exc), "messages", "invalid_image")
    if isinstance(exc, SamplingParamsError):
        field = _FIELD.search(str(exc))
        return bad_request(str(exc).replace("SamplingParams.", ""), field.group(1) if field else None,
                           "invalid_parameter")
    if isinstance(exc, FileNotFoundError):
        return bad_request("the image file was not found", "messages", "invalid_image")
    if isinstance(exc, (ValueError, TypeError)):  # the library's other bad-input errors (ModelInputError, ...)
        return bad_request(str(exc), None, "invalid_request")
    return APIError(500, "internal error while serving the request", "server_error", None, "internal_error")


def from_validation(errors: list[dict]) -> APIError:
    """A 400 from pydantic's `ValidationError.errors()`: the first error's location and message (no input)."""
    # unions report one error per member: the deepest is the one that says what is wrong
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    # a union puts member names in the path ("messages.0.user.content.list[...]"): drop them
    raw, loc = list(first.get("loc", ())), []
    for i, p in enumerate(raw):
        tag = str(p) in _UNION_MEMBERS and i > 0 and isinstance(raw[i - 1], int)
        if not tag and str(p) not in _TYPE_MEMBERS and "[" not in str(p):
            loc.append(str(p))
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif kind == "missing":
        message = f"missing field {param!r}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = first.get("ctx", {})
        message = f"{param}: {first.get('msg', 'invalid value')}" if not ctx else (
            f"{param}: unknown {ctx.get('discriminator', 'tag')} (expected one of {ctx.get('expected_tags', '?')})")
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return bad_request(message, param, "invalid_parameter" if kind != "missing" else "missing_parameter")
