"""The OpenAI-compatible HTTP server: FastAPI app factory, request guard, routes, lifecycle, uvicorn server
(the `llava-next serve` command that loads the model and runs it: serve.py).

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses` (serving_responses.py),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics`, `GET /openapi.json` and `GET /docs`
(behind the API key like every route but /health; `/metrics` too unless `--metrics-without-auth`), and the chat
page at `GET /` with its files under `/ui/` (ui/__init__.py; no key; `--no-ui` leaves them out). Every
response carries `x-request-id` (the client's when it sent a safe one, else a new one).
One process: uvicorn (one worker) runs the app on the asyncio loop; the engine runs in its own thread
(llava_next.engine.driver.AsyncEngine); image fetching, decoding, templating and tokenization run in a thread
pool (serving_chat.py), so the loop only parses, routes and streams.

Before any route runs, a plain ASGI guard (`_Guard`) answers: 400 for a Host header outside `--allowed-hosts`
(connections.py: DNS rebinding); 401 for a missing or wrong API key on every path but `/health` and the chat page
(`Authorization: Bearer KEY`, compared with `hmac.compare_digest`, case-sensitive); 503 while
the model loads or the server drains; for POST, 415 unless the content type is JSON and 413 when the declared
Content-Length is over the limit (the body is not read). The body is then read with a byte count (413 past the
limit, for chunked uploads too; 408 past `body_timeout`) and parsed and validated in a worker thread
(request_body.py: 400 for invalid UTF-8/JSON, NaN/Infinity, lone surrogates, deep nesting, too many values,
a top level that is not an object), so the loop never parses or walks a large body. Connections: at most
`limit_concurrency` (uvicorn answers 503 beyond it), request headers complete within `header_timeout`, and a
stream whose client takes no data for `send_timeout` seconds is aborted (connections.py). Every error, 404/405 for
unknown routes included, is `{"error": {"message", "type", "param", "code"}}`; an unexpected exception is a
500 with a fixed message (logged, never returned).

`/health` is 200 only while the engine thread is alive and healthy and the server is serving; 503 while
loading, draining or after an engine fault. SIGTERM (or SIGINT): the server stops admitting (503), lets
in-flight requests finish until `shutdown_timeout` minus a margin, then aborts the rest (their streams end with
an error event and `[DONE]`), gives uvicorn what is left of the margin to close connections (a client that
never reads cannot stretch it), stops the engine and exits 0: all within `shutdown_timeout`.

Leaves out: TLS termination (put a proxy in front), CORS, the embeddings/audio APIs, multiple workers or models
per server (several API keys are accepted: `--api-key` repeated).
"""


import asyncio
import contextlib
import hmac
import logging
import time

from llava_next.entrypoints.openai import openapi
from llava_next.entrypoints.openai import protocol as P
from llava_next.entrypoints.openai import protocol_responses as RP
from llava_next.entrypoints.openai.connections import (
    SendTimeout,
    h11_with_header_timeout,
    host_allowed,
    send_with_deadline,
)
from llava_next.entrypoints.openai.errors import APIError, bad_request
from llava_next.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from llava_next.entrypoints.openai.openapi import with_request_id
from llava_next.entrypoints.openai.request_body import parse_off_loop, read_body

logger = logging.getLogger("llava_next.server")

MAX_BODY_BYTES = 32 * 1024 * 1024  # data: URLs of a few large images


class ServerState:
    """What the routes and the lifecycle share. `serving` (OpenAIServing) is None until the model is loaded."""

    def __init__(self, served_model_names: list[str], api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, shutdown_timeout: float = 30.0, *,
                 allowed_hosts: frozenset[str] | None = None, limit_concurrency: int | None = 256,
                 header_timeout: float = 10.0, body_timeout: float = 30.0, send_timeout: float = 30.0,
                 cache_salt_per_key: bool = False, metrics_without_auth: bool = False):
        self.names = list(served_model_names)
        self.api_key = api_key
        self.metrics_without_auth = metrics_without_auth  # --metrics-without-auth: /metrics open to scrapers
        self.max_body_bytes = max_body_bytes
        self.shutdown_timeout = shutdown_timeout
        self.allowed_hosts = allowed_hosts  # None: any Host header
        self.limit_concurrency, self.header_timeout = limit_concurrency, header_timeout
        self.body_timeout, self.send_timeout = body_timeout, send_timeout
        self.cache_salt_per_key = cache_salt_per_key
        self.drain_deadline: float | None = None  # monotonic time by which the whole shutdown is over
        self.phase = "loading"  # loading | serving | draining | failed
        self.serving = None
        self.engine = None
        self.metrics = ServerMetrics(self._stats, self._admitted)
        self.load_error: str | None = None

    def _stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {"healthy": False}

    def _admitted(self) -> int:
        return self.serving.admission.used if self.serving is not None else 0

    def attach(self, serving) -> None:
        self.serving, self.engine = serving, serving.engine
        if self.phase == "loading":
            self.phase = "serving"

    def healthy(self) -> bool:
        engine = self.engine
        if self.phase != "serving" or engine is None or not engine.healthy:
            return False
        thread = getattr(engine, "_thread", None)
        return thread is None or thread.is_alive()

    async def drain(self) -> None:
        """Stop admitting; wait for in-flight requests until the deadline's margin, then end the rest and give
        them until half a second before the deadline to send their last event."""
        self.phase = "draining"
        margin = min(2.0, 0.2 * self.shutdown_timeout)
        self.drain_deadline = time.monotonic() + self.shutdown_timeout
        for end, last in ((self.drain_deadline - margin, False), (self.drain_deadline - 0.5, True)):
            while self.serving is not None and self.serving.active and time.monotonic() < end:
                await asyncio.sleep(0.05)
            if self.serving is not None and self.serving.active and not last:
                logger.warning("shutdown: ending %d unfinished request(s)", self.serving.end_all())

    def close(self) -> None:
        start = time.monotonic()
        if self.engine is not None:
            self.engine.shutdown(timeout=5.0)
        if self.serving is not None:
            self.serving.executor.shutdown(wait=False, cancel_futures=True)
        logger.info("engine stopped in %.2f s", time.monotonic() - start)


def _error_response(error: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Guard:
    """Auth, phase, content type and declared size, before routing (plain ASGI: no per-request task)."""

    def __init__(self, app, state: ServerState, public=lambda path: False):
        self.app, self.state, self.public = app, state, public  # public(path): the chat page's files (no key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = with_request_id(scope, send)  # x-request-id on every response
        error = self._check(scope)
        if error is not None:
            self.state.metrics.answered(_endpoint(scope["path"]), error.status)
            return await _error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        state, path = self.state, scope["path"]
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)
        if not host_allowed(headers.get(b"host"), state.allowed_hosts):
            return bad_request("the Host header names a host this server does not answer (--allowed-hosts)", None,
                               "host_not_allowed")
        page = scope["method"] == "GET" and self.public(path)
        open_path = page or path == "/health" or (path == "/metrics" and state.metrics_without_auth)
        if not open_path and state.api_key is not None:
            given = headers.get(b"authorization", b"")
            keys = [state.api_key] if isinstance(state.api_key, str) else state.api_key
            valid = False
            for key in keys:  # every key compared: the time says nothing about which one matched
                valid |= hmac.compare_digest(given, b"Bearer " + key.encode("utf-8"))
            if not valid:
                return APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error",
                                None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            if state.phase in ("loading", "draining", "failed"):
                return APIError(503, f"the server is {state.phase}; retry later", "service_unavailable", None,
                                f"server_{state.phase}", {"Retry-After": "5"})
            kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if kind != b"application/json":
                return APIError(415, "the request body must be JSON (Content-Type: application/json)",
                                "invalid_request_error", None, "unsupported_media_type")
            length = headers.get(b"content-length")
            if length is not None:
                if not length.strip().isdigit():
                    return bad_request("invalid Content-Length header", None, "invalid_request")
                if int(length) > state.max_body_bytes:
                    return APIError(413, f"the request body is over the limit of {state.max_body_bytes:,} bytes",
                                    "invalid_request_error", None, "request_too_large")
        return None


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics")
    return path if path in known else "/v1/models" if path.startswith("/v1/models/") else "other"


def build_app(state: ServerState, ui: bool = True):
    """The FastAPI application over `state` (its `serving` may be attached later, when the model is loaded);
    `ui`: serve the chat page at `/` (llava_next/entrypoints/openai/ui)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="llava_next", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    openapi.install(app)  # request and response schemas from the pydantic models (openapi.py)

    class _Stream(StreamingResponse):
        """SSE whose cleanup runs even when its generator never started (client gone before the first byte)."""

        def __init__(self, events, close):
            super().__init__(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self._close = close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send_with_deadline(send, state.send_timeout))
            except SendTimeout as exc:  # a client that stopped reading: its request is aborted below
                logger.warning("ending a stream: %s", exc)
            finally:
                self._close(abort=True)  # a no-op when the generator already closed itself

    async def handle(endpoint: str, request: Request, model_cls, method):
        status = 500
        try:
            body = await read_body(request, state.max_body_bytes, state.body_timeout)
            req = await parse_off_loop(body, model_cls)
            if state.serving is None:
                raise APIError(503, "the model is loading; retry later", "service_unavailable", None,
                               "server_loading", {"Retry-After": "5"})
            result = await method(req, request)
            status = 200
            if isinstance(result, tuple):
                return _Stream(*result)
            return Response(result.model_dump_json(), media_type="application/json")
        except APIError as error:
            status = error.status
            return _error_response(error)
        except Exception:  # a bug: log it, never return it
            logger.exception("unexpected error in %s", endpoint)
            return _error_response(APIError(500, "internal server error", "server_error", None, "internal_error"))
        finally:
            state.metrics.answered(endpoint, status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle("/v1/chat/completions", request, P.ChatCompletionRequest,
                            lambda req, r: state.serving.chat(req, r))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle("/v1/completions", request, P.CompletionRequest,
                            lambda req, r: state.serving.completion(req, r))

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await handle("/v1/responses", request, RP.ResponsesRequest,
                            lambda req, r: state.serving.responses.create(req, r))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in state.names:
            state.metrics.answered("/v1/models", 404)
            return _error_response(APIError(404, f"the model {model_id[:80]!r} does not exist", "not_found_error",
                                            "model", "model_not_found"))
        created = state.serving.created if state.serving is not None else int(time.time())
        state.metrics.answered("/v1/models", 200)
        return Response(P.ModelCard(id=model_id, created=created).model_dump_json(), media_type="application/json")

    @app.get("/v1/models")
    async def models():
        created = state.serving.created if state.serving is not None else int(time.time())
        body = P.ModelList(data=[P.ModelCard(id=name, created=created) for name in state.names])
        state.metrics.answered("/v1/models", 200)
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health():
        if state.healthy():
            return JSONResponse({"status": "ok"})
        reason = state.phase if state.phase != "serving" else "engine_unhealthy"
        return _error_response(APIError(503, f"not ready: {reason}", "service_unavailable", None, reason,
                                        {"Retry-After": "5"}))

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kinds = {404: ("not_found_error", "the route does not exist"), 405: ("invalid_request_error",
                                                                             "method not allowed on this route")}
        kind, message = kinds.get(exc.status_code, ("invalid_request_error", "invalid request"))
        state.metrics.answered("other", exc.status_code)
        return _error_response(APIError(exc.status_code, message, kind, None, None))

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        logger.exception("unexpected error")
        return _error_response(APIError(500, "internal server error", "server_error", None, "internal_error"))

    if ui:
        from llava_next.entrypoints.openai import ui as chat_page

        chat_page.mount(app)
        return _Guard(app, state, chat_page.is_public)
    return _Guard(app, state)


# ---------------------------------------------------------------------- running it


def make_serving(engine, state: ServerState, *, media, max_num_seqs: int | None = None,
                 max_queued_requests: int = 64, chat_template: str | None = None):
    """OpenAIServing over an AsyncEngine, attached to `state`."""
    from llava_next.entrypoints.openai.serving_chat import OpenAIServing

    serving = OpenAIServing(engine, state.names, media, state.metrics,
                            max_num_seqs=max_num_seqs or engine.engine.max_num_seqs,
                            max_queued_requests=max_queued_requests, chat_template=chat_template,
                            cache_salt_per_key=state.cache_salt_per_key)
    from llava_next.entrypoints.openai.serving_responses import ResponsesServing

    serving.responses = ResponsesServing(serving)
    state.attach(serving)
    return serving


def make_server(app, state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    """A uvicorn.Server whose SIGTERM/SIGINT starts the drain (see the module docstring)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.phase != "failed":
                state.phase = "draining"  # new requests get 503 at once
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await state.drain()  # in-flight requests finish (or are ended) while the listener still answers 503
            start = time.monotonic()
            # what is left of --shutdown-timeout, less a moment for the engine: a stream whose client never
            # reads would otherwise hold uvicorn for a second full timeout
            self.config.timeout_graceful_shutdown = max(0.1, state.drain_deadline - start - 0.25)
            await super().shutdown(sockets)
            logger.info("uvicorn shutdown took %.2f s", time.monotonic() - start)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, int(state.shutdown_timeout + 0.999)),
                            timeout_keep_alive=5, limit_concurrency=state.limit_concurrency,
                            http=h11_with_header_timeout(state.header_timeout))
    return Server(config)
