"""The server-sent event stream of one streamed `/v1/chat/completions` or `/v1/completions` request.

`sse_stream(serving, ...)` returns the event generator and its `close(abort)`. Events, in order: for chat a
first chunk with the assistant role and empty content per choice; then one `chat.completion.chunk` /
`text_completion` chunk per engine step that has something new (text, a finish reason, or logprobs: chat
`delta`s, tool-call deltas rendered by constraints.ToolCalls, completion `text` with running `text_offset`s;
logprobs rendered by logprob_text.py); with `stream_options.include_usage` a last chunk with no choices and the
usage (every chunk then carries `usage`, null until that one); then `data: [DONE]`. A request aborted by the
drain ends with an error event (503 server_shutdown) and `[DONE]`; an engine failure with a 500 engine_error
event and `[DONE]`. `close` (called by the generator's `finally`, and by the response when the generator never
started) aborts an unfinished engine request and gives its admission slot back, once.

Leaves out: continuous usage stats, per-chunk timing fields.
"""

from __future__ import annotations

import json
import time

from llava_next.entrypoints.openai import protocol as P
from llava_next.entrypoints.openai.errors import APIError
from llava_next.entrypoints.openai.logprob_text import (
    chat_logprobs,
    completion_logprobs,
)
from llava_next.errors import EngineDeadError


def sse_stream(serving, kind: str, request_id: str, stream, prepared, params, arrival: float, include_usage: bool,
               active, model: str, tools=None):
    """(the SSE event generator, its idempotent close(abort)) of one admitted request (see the module docstring)."""
    created = int(time.time())
    n = params.n
    chat = kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None) -> str:
        body = {"id": request_id, "object": obj, "created": created, "model": model,
                "system_fingerprint": P.SYSTEM_FINGERPRINT, "choices": choices}
        if chat:
            body["service_tier"] = "default"
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    state = {"open": True}

    def close(abort: bool) -> None:
        """Idempotent: abort the engine request if asked, give the slot back (also called by the response
        when its generator never started, e.g. the client left before the first byte)."""
        if state["open"]:
            state["open"] = False
            if abort:
                serving.engine.abort(request_id)
            serving.active.pop(request_id, None)
            serving.admission.release(n)

    async def events():
        finished = False
        first = None
        n_out = [0] * n
        offsets = [0] * n
        last = None
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n)])
            async for out in stream:
                last = out
                choices = []
                for c in out.outputs:
                    new = c.new_token_ids
                    if first is None and new:
                        first = time.monotonic()
                    done = c.finish_reason is not None
                    if c.finish_reason == "abort":
                        continue
                    if not c.new_text and not done and not (new and params.logprobs is not None):
                        continue
                    lp_list = None
                    start = len(c.token_ids) - len(new)
                    if params.logprobs is not None and new:
                        lp_list = c.logprobs if c.logprobs else None
                    first_out = n_out[c.index] == 0
                    n_out[c.index] = len(c.token_ids)
                    if chat:
                        delta = {"content": c.new_text} if c.new_text or not done else {}
                        if tools is not None:
                            delta = tools.delta(c.index, c.new_text, first_out and bool(new), done, c.text)
                        choices.append({"index": c.index, "delta": delta,
                                        "logprobs": None if lp_list is None else chat_logprobs(
                                            serving.tokenizer, c.token_ids, lp_list, params, start,
                                            done).model_dump(),
                                        "finish_reason": c.finish_reason if tools is None else
                                        tools.finish_reason(c.finish_reason)})
                    else:
                        lps = None if lp_list is None else completion_logprobs(
                            serving.tokenizer, c.token_ids, lp_list, params, offsets[c.index], start,
                            done).model_dump()
                        offsets[c.index] += sum(map(len, lps["tokens"])) if lps else len(c.new_text)
                        choices.append({"index": c.index, "text": c.new_text, "logprobs": lps,
                                        "finish_reason": c.finish_reason})
                if choices:
                    yield chunk(choices)
                if out.finished:
                    finished = True
            if active.shutdown or (last is not None and any(c.finish_reason == "abort" for c in last.outputs)):
                yield _error_event(APIError(503, "the server is shutting down; the stream was ended early",
                                            "service_unavailable", None, "server_shutdown"))
            else:
                now = time.monotonic()
                total = sum(n_out)
                serving.metrics.observe(arrival, first, now, prepared.num_prompt_tokens, total,
                                     [c.finish_reason for c in last.outputs] if last else [])
                if include_usage:
                    use = P.usage(prepared.num_prompt_tokens, total, last.num_cached_tokens if last else 0)
                    yield chunk([], use.model_dump())
            yield "data: [DONE]\n\n"
        except EngineDeadError:
            finished = True
            yield _error_event(APIError(500, "the engine failed while generating", "server_error", None,
                                        "engine_error"))
            yield "data: [DONE]\n\n"
        finally:
            close(abort=not finished)  # not finished: the client went away (or the server is cancelling)

    return events(), close



def _error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body(), separators=(',', ':'))}\n\n"
