"""`POST /v1/responses` (OpenAI's Responses API) as a front on the chat path: no state is stored.

A Responses request becomes the equivalent chat request (`instructions` as the system message, `input` items as
messages, `input_text` / `input_image` / `output_text` parts as text and image_url parts, `max_output_tokens` as
`max_completion_tokens`, `text.format` as `response_format`, `top_logprobs` as logprobs), validated by
protocol.py's model and served by serving_chat.OpenAIServing.chat, so admission, image fetching, the prepare
worker, constraints, disconnects, the drain and every error code are the chat path's own. The chat answer is
then re-shaped: one `message` output item with one `output_text` part (its `logprobs` are the chat answer's
`logprobs.content` as they are: the two APIs share the token / logprob / bytes / top_logprobs shape);
finish_reason "length" gives status "incomplete" with reason "max_output_tokens".

Streaming turns the chat chunks into the Responses events, in OpenAI's order, each `event: <type>` +
`data: {...}` with a `sequence_number`: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed or response.incomplete (an
engine error or the drain ends the stream with an `error` event instead).

Refused with a 400 (nothing is stored, the model has no tool format): `store: true`, `previous_response_id`,
`conversation`, `background: true`, `tools`, `input_image.file_id`.

Leaves out: reasoning items, tool calls, `include` options, GET/DELETE of stored responses.
"""

from __future__ import annotations

import json
import time
import uuid

from llava_next.entrypoints.openai import protocol as P
from llava_next.entrypoints.openai import protocol_responses as RP
from llava_next.entrypoints.openai.errors import bad_request


def _refuse(req: RP.ResponsesRequest) -> None:
    for field, bad, why in (("store", req.store is True, "responses are not stored: send store: false"),
                            ("previous_response_id", req.previous_response_id is not None,
                             "responses are not stored: send the whole conversation as input"),
                            ("conversation", req.conversation is not None, "conversations are not stored"),
                            ("background", req.background is True, "background responses are not supported"),
                            ("tools", bool(req.tools), "tools are not supported by the Responses endpoint")):
        if bad:
            raise bad_request(why, field, "unsupported_parameter")


def _messages(req: RP.ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [RP.InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        if isinstance(item.content, str):
            messages.append({"role": item.role, "content": item.content})
            continue
        parts = []
        for part in item.content:
            if isinstance(part, RP.InputImage):
                if part.image_url is None:
                    raise bad_request("input_image needs image_url (file_id is not supported)",
                                      f"input.{i}.content", "unsupported_parameter")
                if item.role != "user":
                    raise bad_request("images go in user messages", f"input.{i}.content", "invalid_content")
                url = {"url": part.image_url, **({"detail": part.detail} if part.detail else {})}
                parts.append({"type": "image_url", "image_url": url})
            else:
                parts.append({"type": "text", "text": part.text})
        if item.role != "user":  # system and assistant messages take text parts only
            parts = "".join(p["text"] for p in parts)
        messages.append({"role": item.role, "content": parts})
    return messages


def _chat_request(req: RP.ResponsesRequest) -> P.ChatCompletionRequest:
    body: dict = {"messages": _messages(req), "stream": bool(req.stream)}
    for src, dst in (("model", "model"), ("max_output_tokens", "max_completion_tokens"),
                     ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if getattr(req, src) is not None:
            body[dst] = getattr(req, src)
    if req.top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=req.top_logprobs)
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        spec = {"name": fmt.name or "response", **({"schema": fmt.schema_} if fmt.schema_ is not None else {})}
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    return P.ChatCompletionRequest.model_validate(body, strict=False)


class ResponsesServing:
    def __init__(self, serving):
        self.serving = serving  # serving_chat.OpenAIServing

    def _response(self, req, rid: str, created: int, status: str, output: list, usage: dict | None,
                  model: str) -> RP.Response:
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else {
            "type": "text"}
        return RP.Response(
            id=rid, created_at=created, status=status, model=model, output=output,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=req.temperature,
            top_p=req.top_p, text={"format": fmt}, user=req.user, metadata=req.metadata or {},
            usage=None if usage is None else RP.ResponseUsage(
                input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"], output_tokens_details=RP.OutputTokensDetails(),
                input_tokens_details=RP.InputTokensDetails(
                    cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))))

    async def create(self, req: RP.ResponsesRequest, request):
        _refuse(req)
        chat = _chat_request(req)
        model = req.model or self.serving.names[0]
        rid, mid, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())
        result = await self.serving.chat(chat, request)
        if req.stream:
            events, close = result
            return self._events(events, req, rid, mid, created, model), close
        choice = result.choices[0]
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        lps = choice.logprobs.model_dump()["content"] if choice.logprobs is not None else None
        item = RP.OutputMessage(id=mid, status=status, content=[RP.OutputText(
            text=choice.message.content or "", logprobs=lps or [])])
        return self._response(req, rid, created, status, [item], result.usage.model_dump(), model)

    async def _events(self, chunks, req, rid: str, mid: str, created: int, model: str):
        seq = 0

        def event(kind: str, **fields) -> str:
            nonlocal seq
            body = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        start = self._response(req, rid, created, "in_progress", [], None, model).model_dump()
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        yield event("response.output_item.added", output_index=0, item=RP.OutputMessage(
            id=mid, status="in_progress", content=[]).model_dump())
        yield event("response.content_part.added", part=RP.OutputText(text="", logprobs=[]).model_dump(), **where)
        text, logprobs, finish, usage = [], [], None, None
        try:
            async for chunk in chunks:
                if not chunk.startswith("data: {"):
                    continue  # "data: [DONE]"
                body = json.loads(chunk[6:])
                if "error" in body:
                    error = body["error"]
                    yield event("error", code=error.get("code"), message=error.get("message"),
                                param=error.get("param"))
                    return
                usage = body.get("usage") or usage
                for choice in body.get("choices", []):
                    delta = choice.get("delta", {}).get("content")
                    lps = (choice.get("logprobs") or {}).get("content") or []
                    logprobs.extend(lps)
                    if delta:
                        text.append(delta)
                        yield event("response.output_text.delta", delta=delta, logprobs=lps, **where)
                    finish = choice.get("finish_reason") or finish
        finally:
            await chunks.aclose()  # the chat stream's own cleanup: abort if unfinished, release its slot
        status = "incomplete" if finish == "length" else "completed"
        full = "".join(text)
        part = RP.OutputText(text=full, logprobs=logprobs)
        item = RP.OutputMessage(id=mid, status=status, content=[part])
        yield event("response.output_text.done", text=full, logprobs=logprobs, **where)
        yield event("response.content_part.done", part=part.model_dump(), **where)
        yield event("response.output_item.done", output_index=0, item=item.model_dump())
        final = self._response(req, rid, created, status, [item], usage, model)
        yield event(f"response.{status}", response=final.model_dump())
