"""Reading and parsing a request body without stalling the event loop.

`read_body(request, limit, timeout)` runs on the loop but only collects bytes: counted while read (413 past
`limit`, chunked uploads too) under one deadline for the whole body (408 when a client trickles it, the
slowloris of bodies). `parse_request(body, model_cls)` does everything that costs time in proportion to the
body and runs in a worker thread (`await parse_off_loop(...)`): a cheap count of the body's commas refuses a
body holding more than `MAX_JSON_ITEMS` values before `json.loads` (the C scanner holds the GIL for its whole
run, so a thread alone would not keep the loop free for a 15M-item array), strict JSON (400 for invalid
UTF-8/JSON, NaN/Infinity, lone surrogates, nesting deeper than `MAX_DEPTH`, a top level that is not an
object), then the pydantic model (strict; errors mapped by errors.from_validation).

Numbers: a 32 MiB body of 1M commas is refused in ~10 ms; the largest accepted body costs one parse and one
walk over at most 262,144 values (~0.1 s of one core), off the loop.

Leaves out: streaming JSON parsing (the body is read whole, within the byte limit).
"""

from __future__ import annotations

import asyncio
import json

from llava_next.entrypoints.openai.errors import APIError, bad_request, from_validation

MAX_DEPTH = 32
MAX_JSON_ITEMS = 1 << 18  # values in one body (commas + 1); a prompt of more token ids would not fit any context


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit:,} bytes", "invalid_request_error", None,
                    "request_too_large")


async def read_body(request, limit: int, timeout: float) -> bytes:
    """The raw body: 413 past `limit` bytes, 408 when it is not complete within `timeout` seconds."""
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body was not received within {timeout:g} s", "invalid_request_error", None,
                       "request_timeout") from None
    return b"".join(chunks)


def _deep() -> APIError:
    return bad_request(f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)", None, "invalid_json")


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (400 for anything else); bounded work before the parse."""
    if not body:
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")
    if body.count(b",") >= MAX_JSON_ITEMS:
        raise bad_request(f"the JSON body holds too many values (at most {MAX_JSON_ITEMS:,})", None, "invalid_json")

    def constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=constant)
    except RecursionError:
        raise _deep() from None
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8", None, "invalid_json") from None
    except ValueError as exc:
        message = str(exc).split(":", 1)[0]  # json's message without the document
        raise bad_request(f"the request body is not valid JSON ({message[:80]})", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    stack = [(data, 1)]
    while stack:  # depth and strings in one walk
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _deep()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad_request("the request holds a lone UTF-16 surrogate (invalid Unicode)", None,
                                          "invalid_json") from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return data


def parse_request(body: bytes, model_cls):
    """JSON, then the request model (strict pydantic): a validated request or a 400 APIError."""
    from pydantic import ValidationError

    data = parse_json(body)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc.errors(include_url=False, include_input=False)) from None


async def parse_off_loop(body: bytes, model_cls):
    """`parse_request` in the loop's default thread pool, so other requests keep being served meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, parse_request, body, model_cls)
