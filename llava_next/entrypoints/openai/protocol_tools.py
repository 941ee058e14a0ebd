"""OpenAI's wire format for structured output and tool calls (pydantic v2): `response_format`, `tools`,
`tool_choice`, vLLM's `structured_outputs` extra, and the `tool_calls` of a response.

Requests are strict and closed like protocol.py's. `response_format` is `{"type": "text"}`,
`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`;
a tool is `{"type": "function", "function": {"name", "description", "parameters", "strict"}}`; `tool_choice` is
"none", "auto", "required" or `{"type": "function", "function": {"name"}}`. Schemas are free JSON here; their
size and nesting are capped where they are compiled (sampling/structured_params.py).

Leaves out: OpenAI's built-in tools (web search, file search, code interpreter), custom (grammar) tools,
`allowed_tools` choices.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RequestModel(BaseModel):
    """The base of every request model of the server's protocol_*.py files: strict types, unknown fields
    refused, no inf/nan."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ResponseModel(BaseModel):
    """The base of every response model: unknown fields refused."""

    model_config = ConfigDict(extra="forbid")


NAME = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class JsonSchemaSpec(RequestModel):
    name: NAME
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJsonObject(RequestModel):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class FunctionDefinition(RequestModel):
    name: NAME
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: NAME


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StructuredOutputsField(RequestModel):
    """vLLM's `structured_outputs` extra field (exactly one constraint)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=256)
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None


# ---------------------------------------------------------------------- responses


class FunctionCall(ResponseModel):
    name: str
    arguments: str


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
