"""AsyncEngine: one background thread owns the engine (and so the model); callers submit and read streams.

`submit(request_id, prompt_or_prepared, params)` validates in the caller's thread (LLMEngine.prepare is
thread-safe: bad requests raise there, before the engine sees them), then hands the request to the engine
thread through an inbox and returns a `RequestStream`. The thread loops: take the inbox (new requests,
aborts), `step()`, hand each RequestOutput to its stream; with nothing to do it waits on a condition (no busy
spinning). A stream is iterable (`for out in stream`, blocking) and async-iterable (`async for out in
stream`: the consumer's loop is woken through `loop.call_soon_threadsafe`), and ends after the output with
finished=True. Outputs not yet read are merged into one (memory per stream stays one output, however slow
the reader). `abort(request_id)` takes effect at the next step boundary (blocks freed within one step) and
ends the stream with finish_reason "abort".

A fault inside `step()` marks the engine unhealthy: every open stream ends with EngineDeadError, later
submits raise it. A bad request never reaches the thread, so one request's error cannot end another's stream.

Leaves out: a separate engine process (ZMQ/shared memory), back-pressure limits (the server decides).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading

from llava_next.engine.llm_engine import LLMEngine
from llava_next.engine.outputs import RequestOutput, coalesce
from llava_next.engine.request import PreparedRequest
from llava_next.errors import EngineDeadError

logger = logging.getLogger(__name__)

_END = object()


def _ends(item) -> bool:
    """An item a stream takes: True for the end marker; an exception (the request's or the engine's) raises."""
    if isinstance(item, BaseException):
        raise item
    return item is _END


class RequestStream:
    """The outputs of one request, in order, ending with the finished one (or an exception).

    Outputs the consumer has not taken yet are coalesced (`outputs.coalesce`, vLLM's merging of deltas for a
    slow reader): at most one RequestOutput waits per stream, so a client that never reads costs one output,
    not one per step. The consumer is woken once per batch of items (no callback per step on its loop)."""

    def __init__(self, request_id: str, driver: "AsyncEngine"):
        self.request_id = request_id
        self._driver = driver
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: collections.deque = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self.finished = False

    # producer side (engine thread)
    def _put(self, item) -> None:
        with self._lock:
            was_empty = not self._items
            last = self._items[-1] if self._items else None
            if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
                self._items[-1] = coalesce(last, item)
            else:
                self._items.append(item)
            self._ready.notify_all()
            if self._loop is not None and was_empty:
                with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody listens any more
                    self._loop.call_soon_threadsafe(self._event.set)

    def _take(self) -> list:
        items = list(self._items)
        self._items.clear()
        return items

    # consumer side
    def __iter__(self):
        while True:
            with self._lock:
                while not self._items:
                    self._ready.wait()
                items = self._take()
            for item in items:
                if _ends(item):
                    return
                yield item

    def __aiter__(self):
        return self._aiterate()

    async def _aiterate(self):
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                self._event = asyncio.Event()
        while True:
            with self._lock:
                items = self._take()
                self._event.clear()
            if not items:
                await self._event.wait()
                continue
            for item in items:
                if _ends(item):
                    return
                yield item

    def result(self) -> RequestOutput:
        """Block until the request finishes; its final output."""
        last = None
        for last in self:
            pass
        return last

    def abort(self) -> None:
        self._driver.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, start: bool = True):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list = []  # ("add", id, prepared) | ("abort", id)
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llava-next-engine", daemon=True)
        if start:
            self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopping

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def prepare(self, prompt, params=None) -> PreparedRequest:
        return self.engine.prepare(prompt, params)

    def submit(self, request_id: str, prompt, params=None) -> RequestStream:
        """Queue a request; bad requests raise here (typed errors of LLMEngine.prepare)."""
        self._check_alive()
        prepared = prompt if isinstance(prompt, PreparedRequest) else self.engine.prepare(prompt, params)
        with self._lock:
            self._check_alive()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            stream = RequestStream(request_id, self)
            self._streams[request_id] = stream
            self._inbox.append(("add", request_id, prepared))
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._streams:
                self._inbox.append(("abort", request_id))
                self._wake.notify()

    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._stats) if hasattr(self, "_stats") else self.engine.stats()
        stats["healthy"] = self.healthy
        return stats

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the thread (open streams end with EngineDeadError)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine failed and accepts no requests: {self._error!r}")
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    # -- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._lock:
                    while not self._inbox and not engine.has_unfinished_requests() and not self._stopping:
                        self._stats = engine.stats()
                        self._wake.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                for item in inbox:
                    if item[0] == "add":
                        try:
                            engine.add_request(item[1], item[2])
                        except Exception as exc:  # this request only
                            if not isinstance(exc, ValueError):
                                logger.exception("adding request %r failed", item[1])
                            self._finish(item[1], exc)
                    else:
                        engine.abort(item[1])
                outputs = engine.step() if engine.has_unfinished_requests() else []
                with self._lock:
                    self._stats = engine.stats()
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream._put(out)
                        if out.finished:
                            self._finish(out.request_id, None)
        except BaseException as exc:  # an engine fault: every stream learns it, the engine refuses new work
            logger.exception("the engine thread stopped on a fault; every open request ends with EngineDeadError")
            self._error = exc
        finally:
            error = EngineDeadError(f"the engine stopped: {self._error!r}" if self._error else "the engine is shut down")
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                stream._put(error)

    def _finish(self, request_id: str, error) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            if error is not None:
                stream._put(error)
            stream.finished = True
            stream._put(_END)
