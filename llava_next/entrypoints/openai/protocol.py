"""OpenAI's wire format for the server: request, response, usage and error models (pydantic v2).

Requests are strict (`strict=True`: `"max_tokens": "5"` or `"stream": 1` is a 400, not coerced) and closed
(`extra="forbid"`: a typo such as `max_token` is a 400 naming it, not silently ignored). Fields OpenAI clients
send that change nothing here (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`) are accepted
and ignored; fields whose feature is not built (`audio`, `modalities`, `prediction`, `echo`, `suffix`,
`best_of` != n) are refused by `unsupported()` with a 400 "not supported". vLLM's sampling extras (`top_k`, `min_p`,
`min_tokens`, `ignore_eos`, `repetition_penalty`, `stop_token_ids`, `skip_special_tokens`, `cache_salt`) sit at the
top level of the body. Every field is typed and every list or map capped (`MAX_PARTS`, `MAX_TOOLS`, ...): no field
takes an arbitrary JSON value, so a 15M-item array is a 400 wherever it is put (request_body.py also caps the
values of a whole body before parsing). A message's content list must not be empty (OpenAI's rule).

Responses are built as OpenAI documents them (`openai-python` types): `chat.completion`,
`chat.completion.chunk` (dicts written by serving_chat.py; `usage` present, as null, on every chunk only when
`stream_options.include_usage`), `text_completion`, `list` of `model`, usage with `prompt_tokens_details.
cached_tokens`, and errors as `{"error": {"message", "type", "param", "code"}}` with a string `code` (OpenAI's
convention, not vLLM's int).

Structured output and tool calls (`response_format`, `tools`, `tool_choice`, `structured_outputs`,
`logit_bias`) are checked by constraints.py (their models: protocol_tools.py). Current spec fields with no
meaning here (`safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`, `verbosity`,
`stream_options.include_obfuscation`) are accepted and ignored; `service_tier` is answered as "default".

Leaves out: audio, the legacy function calling fields, prompt logprobs, batched `/v1/completions` prompts (one
prompt per request).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from llava_next.entrypoints.openai.protocol_tools import (
    RequestModel,
    ResponseModel,
    ToolCall,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKENS_CAP = 1 << 31  # larger is a schema error; smaller but beyond the context is context_length_exceeded
MAX_N = 16  # the engine's cap (sampling/params.py)
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_STOP = 16
MAX_MESSAGES = 1024
SYSTEM_FINGERPRINT = "fp_llava_next"
MAX_PARTS = 256  # content parts per message
MAX_TOOLS = 128
MAX_MAP = 64  # keys of a free-form object (logit_bias: 1024)
MAX_NAME = 256  # characters of short strings (names, tiers, efforts, cache_salt: 1024)
JSONObject = Annotated[dict[str, Any], Field(max_length=MAX_MAP)]  # free-form; its size is bounded by the body caps
ShortStr = Annotated[str, Field(max_length=MAX_NAME)]



# ---------------------------------------------------------------------- requests


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImageURL(RequestModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(RequestModel):
    role: Literal["system", "developer"]
    content: str | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_PARTS)]
    name: ShortStr | None = None


class UserMessage(RequestModel):
    role: Literal["user"]
    content: str | Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_PARTS)]
    name: ShortStr | None = None


class AssistantMessage(RequestModel):
    role: Literal["assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] | None = None
    name: ShortStr | None = None
    refusal: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(RequestModel):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; accepted, usage is sent at the end only
    include_obfuscation: bool | None = None  # OpenAI's; accepted, no obfuscation padding is sent


class SamplingFields(RequestModel):
    """The sampling fields both endpoints share (OpenAI's ranges, vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # OpenAI's range; 0 is greedy
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=1024)] | None = None
    user: str | None = Field(None, max_length=MAX_NAME)
    safety_identifier: str | None = Field(None, max_length=256)  # OpenAI's; accepted and ignored
    prompt_cache_key: str | None = Field(None, max_length=1024)  # OpenAI's; accepted and ignored
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None  # OpenAI's; accepted and ignored
    structured_outputs: JSONObject | None = None  # vLLM's extra: json | regex | choice | grammar | json_object
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_CAP)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)  # vLLM's: a private prefix cache


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: JSONObject | None = None
    tools: Annotated[list[JSONObject], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ShortStr | JSONObject | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[JSONObject], Field(max_length=MAX_TOOLS)] | None = None
    function_call: ShortStr | JSONObject | None = None
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    store: bool | None = None
    service_tier: ShortStr | None = None
    modalities: Annotated[list[ShortStr], Field(max_length=4)] | None = None
    audio: JSONObject | None = None
    prediction: JSONObject | None = None
    reasoning_effort: ShortStr | None = None
    web_search_options: JSONObject | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # OpenAI's; accepted and ignored


class CompletionRequest(SamplingFields):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_CAP)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


def unsupported(request: SamplingFields) -> tuple[str, str] | None:
    """(param, message) for the first field whose feature is not built; None when every field is usable."""
    if isinstance(request, ChatCompletionRequest):  # response_format, tools, tool_choice: constraints.py
        if request.modalities not in (None, ["text"]) or request.audio is not None:
            return "modalities", "audio output is not supported"
        if request.prediction is not None:
            return "prediction", "predicted outputs are not supported"
        if request.web_search_options is not None:
            return "web_search_options", "web search is not supported"
    else:
        if request.echo:
            return "echo", "echo is not supported"
        if request.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if request.best_of is not None and request.best_of != request.n:
            return "best_of", "best_of other than n is not supported"
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stop) > MAX_STOP:
        return "stop", f"stop holds {len(stop)} strings; at most {MAX_STOP} are allowed"
    return None


# ---------------------------------------------------------------------- responses


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    service_tier: str | None = "default"
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava_next"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))
