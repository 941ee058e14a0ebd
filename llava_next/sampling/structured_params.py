"""vLLM's `StructuredOutputsParams`: which constraint a request's output must follow, checked and capped.

Exactly one of `json` (a JSON schema, dict or string), `regex`, `choice` (a list of strings), `grammar` (Lark,
or llama.cpp's GBNF) or `json_object=True` (any JSON object) is set. `whitespace_pattern` overrides the
whitespace allowed between JSON tokens; by default there is none (compact JSON, as vLLM's
`disable_any_whitespace`), so a constrained answer always ends: with free whitespace a weak model can loop on
spaces until max_tokens.

Caps, checked on construction before any compile (`StructuredOutputError`, a ValueError): a schema or grammar
of at most 64 KiB, JSON nested at most 32 levels, a regex of at most 4 KiB, at most 256 choices of at most
1 KiB each. The compiler's own limits (sampling/structured.py) bound what is left: time and memory.

`key()` is the canonical text a compiled grammar is cached under (the same constraint, the same key).

Leaves out: vLLM's `structural_tag`, `disable_fallback`, `disable_additional_properties` and backend choice
(llguidance is the only backend).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llava_next.errors import StructuredOutputError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_REGEX_CHARS = 4096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
ANY_OBJECT = {"type": "object"}


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (iterative: a hostile document cannot overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


@dataclasses.dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's field names)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise StructuredOutputError("structured_outputs needs exactly one of json, regex, choice, grammar or "
                                        f"json_object, got {given or 'none'}")
        if self.json is not None:
            self.json = self._schema(self.json)
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex
                                       or len(self.regex) > MAX_REGEX_CHARS):
            raise StructuredOutputError(f"structured_outputs.regex must be a string of 1 to {MAX_REGEX_CHARS} "
                                        "characters")
        if self.choice is not None:
            choice = self.choice
            if not isinstance(choice, (list, tuple)) or not 1 <= len(choice) <= MAX_CHOICES or not all(
                    isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in choice):
                raise StructuredOutputError(f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} "
                                            f"non-empty strings of at most {MAX_CHOICE_CHARS} characters")
            self.choice = list(choice)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()
                                         or len(self.grammar.encode("utf-8", "replace")) > MAX_SCHEMA_BYTES):
            raise StructuredOutputError(f"structured_outputs.grammar must be a non-empty string of at most "
                                        f"{MAX_SCHEMA_BYTES} bytes")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise StructuredOutputError("structured_outputs.json_object must be a bool")
        if self.whitespace_pattern is not None and (not isinstance(self.whitespace_pattern, str)
                                                    or len(self.whitespace_pattern) > 256):
            raise StructuredOutputError("structured_outputs.whitespace_pattern must be a regex of at most 256 "
                                        "characters")

    @staticmethod
    def _schema(schema: str | dict) -> dict:
        if isinstance(schema, str):
            if len(schema.encode("utf-8", "replace")) > MAX_SCHEMA_BYTES:
                raise StructuredOutputError(f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes")
            if _depth_of_text(schema) > MAX_DEPTH:
                raise StructuredOutputError(f"the JSON schema is nested deeper than {MAX_DEPTH} levels")
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise StructuredOutputError(f"the JSON schema is not valid JSON: {str(exc)[:80]}") from None
        if not isinstance(schema, dict):
            raise StructuredOutputError("the JSON schema must be a JSON object")
        if _depth(schema) > MAX_DEPTH:
            raise StructuredOutputError(f"the JSON schema is nested deeper than {MAX_DEPTH} levels")
        try:
            size = len(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise StructuredOutputError(f"the JSON schema is not plain JSON: {str(exc)[:80]}") from None
        if size > MAX_SCHEMA_BYTES:
            raise StructuredOutputError(f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes")
        return schema

    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """The canonical text of this constraint (the compile cache's key)."""
        value = {"json": self.json, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                 "json_object": True}[self.kind()]
        return json.dumps([self.kind(), value, self.whitespace_pattern], sort_keys=True, separators=(",", ":"))


def _depth_of_text(text: str) -> int:
    """Bracket depth of JSON text, before json.loads (whose recursion a deep document would exhaust)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
