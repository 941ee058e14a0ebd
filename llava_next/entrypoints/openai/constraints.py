"""From an OpenAI request to the engine's output constraint, and from the constrained text back to `tool_calls`.

`plan(req)` reads `response_format`, vLLM's `structured_outputs`, `tools` + `tool_choice` and `logit_bias` (all
validated here with protocol_tools.py's strict models; 400 naming the field) and returns the
StructuredOutputsParams the engine compiles and a `ToolCalls` renderer, or None for each (and the field that
set the constraint):
- `response_format` json_schema -> its schema (`strict` or not: llguidance honours the keywords either way);
  json_object -> any JSON object; text -> nothing.
- a named `tool_choice` -> the function's `parameters` schema; the answer is one tool call whose `arguments`
  are the generated JSON (finish_reason "stop", as OpenAI answers a forced function).
- "required" -> a JSON array of `{"name": <one of the tools>, "parameters": <its schema>}` items (vLLM's
  shape), one item when `parallel_tool_calls` is false, at most MAX_PARALLEL_CALLS otherwise; the answer is
  those tool calls (finish_reason "tool_calls").
- "auto" (OpenAI's default when tools are given) is a 400: this model has no tool-call format to detect.
At most one constraint per request. Schemas compile later, in the prepare worker thread (`guard` turns a
StructuredOutputError there into a 400 naming the field).

Streaming a named call sends the id and name first, then the arguments as they are generated; "required"
sends all calls in one delta at the end (the array must be complete to be split into calls).

Leaves out: tool calls parsed from free text ("auto"), the legacy `functions` / `function_call` fields,
tool messages and assistant tool_calls in the conversation (the chat template has no place for them).
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from pydantic import TypeAdapter, ValidationError

from llava_next.entrypoints.openai import protocol_tools as T
from llava_next.entrypoints.openai.errors import APIError, bad_request, from_validation
from llava_next.errors import SamplingParamsError, StructuredOutputError
from llava_next.sampling.structured_params import StructuredOutputsParams

MAX_PARALLEL_CALLS = 8
_FORMAT = TypeAdapter(T.ResponseFormat)
_TOOLS = TypeAdapter(list[T.ToolDefinition])
_CHOICE = TypeAdapter(T.ToolChoice)


def _validate(adapter: TypeAdapter, value, field: str):
    try:
        return adapter.validate_python(value, strict=True)
    except ValidationError as exc:
        error = from_validation(exc.errors(include_url=False, include_input=False))
        error.param = f"{field}.{error.param}" if error.param else field
        raise error from None


def _params(field: str, **kwargs) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except StructuredOutputError as exc:
        raise bad_request(str(exc), field, "invalid_structured_output") from None


class ToolCalls:
    """How a tool-call answer is rendered: one named function, or the array of "required" calls."""

    def __init__(self, names: list[str], named: bool):
        self.names, self.named = names, named
        self._ids: dict[int, str] = {}

    def _id(self, index: int) -> str:
        return self._ids.setdefault(index, f"call_{uuid.uuid4().hex[:24]}")

    def calls(self, index: int, text: str) -> list[T.ToolCall]:
        """The tool calls of completion `index` (its whole text); [] when the text is not a finished answer."""
        if self.named:
            return [T.ToolCall(id=self._id(index), function=T.FunctionCall(name=self.names[0], arguments=text))]
        try:
            items = json.loads(text)
        except ValueError:
            return []
        return [T.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=T.FunctionCall(
            name=item["name"], arguments=json.dumps(item["parameters"], ensure_ascii=False)))
            for item in items if isinstance(item, dict) and "name" in item and "parameters" in item]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and not self.named else reason

    def delta(self, index: int, new_text: str, first: bool, done: bool, text: str) -> dict:
        """The chunk delta of completion `index` for this step's `new_text` (streaming)."""
        if self.named:
            call = {"index": 0, "function": {"arguments": new_text}}
            if first:
                call.update(id=self._id(index), type="function")
                call["function"]["name"] = self.names[0]
            return {"tool_calls": [call]} if first or new_text else {}
        if not done:
            return {}
        calls = self.calls(index, text)
        return {"tool_calls": [{"index": i, **c.model_dump()} for i, c in enumerate(calls)]} if calls else {}


def plan(req) -> tuple[StructuredOutputsParams | None, ToolCalls | None, str | None]:
    """(constraint, tool-call renderer, the field that set the constraint) of a chat request; APIError 400."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    tools = None
    if getattr(req, "response_format", None) is not None:
        fmt = _validate(_FORMAT, req.response_format, "response_format")
        if fmt.type == "json_object":
            found.append(("response_format", _params("response_format", json_object=True)))
        elif fmt.type == "json_schema":
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
            found.append(("response_format", _params("response_format.json_schema.schema", json=schema)))
    extra = getattr(req, "structured_outputs", None)
    if extra is not None:
        so = _validate(TypeAdapter(T.StructuredOutputsField), extra, "structured_outputs")
        # the field's names (json by its alias) are StructuredOutputsParams' own
        found.append(("structured_outputs", _params("structured_outputs", **so.model_dump(by_alias=True))))
    if getattr(req, "functions", None) or getattr(req, "function_call", None) not in (None, "none"):
        raise bad_request("the legacy functions/function_call fields are not supported; use tools and tool_choice",
                          "functions", "unsupported_parameter")
    choice = getattr(req, "tool_choice", None)
    choice = _validate(_CHOICE, choice, "tool_choice") if choice is not None else None
    if getattr(req, "tools", None) and choice != "none":
        defs = _validate(_TOOLS, req.tools, "tools")
        by_name = {d.function.name: d.function for d in defs}
        if choice is None or choice == "auto":
            raise bad_request('tool_choice "auto" is not supported: this model has no tool-call format; use '
                              'tool_choice "required" or {"type": "function", "function": {"name": ...}}',
                              "tool_choice", "unsupported_parameter")
        if choice == "required":
            items = [{"type": "object", "properties": {"name": {"const": d.name},
                                                         "parameters": d.parameters or {"type": "object"}},
                      "required": ["name", "parameters"], "additionalProperties": False} for d in by_name.values()]
            most = 1 if req.parallel_tool_calls is False else MAX_PARALLEL_CALLS
            schema = {"type": "array", "items": {"anyOf": items}, "minItems": 1, "maxItems": most}
            tools = ToolCalls(list(by_name), named=False)
        else:
            name = choice.function.name
            if name not in by_name:
                raise bad_request(f"tool_choice names the function {name!r}, which is not in tools",
                                  "tool_choice.function.name", "invalid_parameter")
            schema = by_name[name].parameters or {"type": "object"}
            tools = ToolCalls([name], named=True)
        found.append(("tools", _params("tools", json=schema)))
    elif isinstance(choice, T.NamedToolChoice) or choice == "required":
        raise bad_request(f"tool_choice {'required' if choice == 'required' else 'a named function'} needs tools",
                          "tool_choice", "invalid_parameter")
    if len(found) > 1:
        raise bad_request(f"{found[0][0]} and {found[1][0]} both constrain the output; give one", found[1][0],
                          "invalid_parameter")
    field, constraint = found[0] if found else (None, None)
    return constraint, tools, field


def with_constraint(params, constraint: StructuredOutputsParams | None, logit_bias: dict | None):
    """`params` (engine SamplingParams) with the constraint and logit_bias, re-validated (400 on a bad bias)."""
    if constraint is None and not logit_bias:
        return params
    try:
        return dataclasses.replace(params, structured_outputs=constraint, logit_bias=logit_bias or None)
    except SamplingParamsError as exc:
        raise bad_request(str(exc).replace("SamplingParams.", ""), "logit_bias", "invalid_parameter") from None


def guard(prepare, field: str):
    """Wrap a prepare callable: a constraint that does not compile is a 400 naming `field`."""

    def run(*args):
        try:
            return prepare(*args)
        except StructuredOutputError as exc:
            raise APIError(400, str(exc), "invalid_request_error", field, "invalid_structured_output") from None

    return run
