"""OpenAI's Responses API wire format (`POST /v1/responses`), the part this server answers (pydantic v2).

Request: `input` (a string, or message items whose content is a string or `input_text` / `input_image` /
`output_text` parts), `instructions`, `max_output_tokens`, `temperature`, `top_p`, `stream`, `text.format`
(text, json_object, json_schema), `top_logprobs`, and the fields clients send that change nothing here
(`metadata`, `user`, `safety_identifier`, `prompt_cache_key`, `service_tier`, `truncation`, `include`,
`parallel_tool_calls`, `reasoning`, ...). Strict and closed like protocol.py; what needs server-side state or
tools (`store: true`, `previous_response_id`, `conversation`, `background`, `tools`) is refused by
serving_responses.py with a 400.

Response: `response` objects with one `message` output item holding one `output_text` part, `usage` with
input/output token details; `status` "completed" or "incomplete" (`incomplete_details.reason`
"max_output_tokens").

Leaves out: tools and tool outputs, reasoning items, file inputs, audio, retrieval of stored responses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from llava_next.entrypoints.openai.protocol import (
    MAX_MESSAGES,
    MAX_TOKENS_CAP,
    MAX_TOP_LOGPROBS,
)
from llava_next.entrypoints.openai.protocol_tools import RequestModel, ResponseModel

_ANY = Annotated[dict[str, Any], Field(max_length=64)]
_SHORT = Annotated[str, Field(max_length=256)]


class InputText(RequestModel):
    type: Literal["input_text"]
    text: str


class InputImage(RequestModel):
    type: Literal["input_image"]
    image_url: str | None = Field(None, min_length=1)
    file_id: _SHORT | None = None
    detail: Literal["auto", "low", "high"] | None = None


class OutputTextPart(RequestModel):
    type: Literal["output_text"]
    text: str
    annotations: list[_ANY] | None = Field(None, max_length=256)
    logprobs: list[_ANY] | None = None


InputPart = Annotated[InputText | InputImage | OutputTextPart, Field(discriminator="type")]


class InputMessage(RequestModel):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputPart], Field(min_length=1, max_length=256)]
    id: _SHORT | None = None
    status: _SHORT | None = None


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: _SHORT | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = Field(None, max_length=4096)


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: str | Annotated[list[InputMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool | None = False
    stream_options: _ANY | None = None
    text: TextConfig | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: _SHORT | None = None
    conversation: _SHORT | _ANY | None = None
    tools: list[_ANY] | None = Field(None, max_length=128)
    tool_choice: _SHORT | _ANY | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    user: _SHORT | None = None
    safety_identifier: _SHORT | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    service_tier: _SHORT | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[_SHORT] | None = Field(None, max_length=16)
    reasoning: _ANY | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's extra


# ---------------------------------------------------------------------- responses


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = []
    logprobs: list[dict] | None = None


class OutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(ResponseModel):
    cached_tokens: int = 0


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: dict | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    previous_response_id: str | None = None
    reasoning: dict | None = None
    service_tier: str = "default"
    store: bool = False
    temperature: float | None = None
    text: dict
    tool_choice: str = "none"
    tools: list[dict] = []
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}
