"""Test inputs for structured outputs: JSON schemas generated from a seed, regex and choice constraints.

`schemas(50, seed)` gives nested objects, arrays, enums, consts, bounded integers and numbers, booleans, strings
with length bounds and patterns, anyOf and $defs/$ref, and required fields (the standard keywords, all under
`additionalProperties: false`, as OpenAI's strict mode). Every string and array is bounded, so an answer drawn
from a random model ends within `MAX_TOKENS`: with random weights only the constraint makes the output valid.
"""

from __future__ import annotations

import random

MAX_TOKENS = 160
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no)", r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5}){0,2}", r"\d{1,2}:\d{2}"]
CHOICES = [["red", "green", "blue"], ["positive", "negative", "neutral"], ["a b", "c d e"]]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "const", "pattern", "anyof"])
    if kind == "string":
        lo = rng.randint(0, 2)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 5)}
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "number":
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 50), "multipleOf": 0.25}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["cat", "dog", "bird", "fish", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, False])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,4}$", "^[0-9]{3}$", "^(ab|cd)+x?$"]),
                "maxLength": 8}
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]}


def _node(rng: random.Random, depth: int) -> dict:
    roll = rng.random()
    if depth < 3 and roll < 0.25:
        return _object(rng, depth + 1)
    if depth < 3 and roll < 0.45:
        lo = rng.randint(0, 1)
        return {"type": "array", "items": _node(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["name", "age", "tags", "id", "score", "items", "kind", "ok", "meta", "note"], rng.randint(1, 4))
    props = {name: _node(rng, depth) for name in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def schemas(count: int = 50, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        schema = _object(rng, 1)
        if i % 10 == 3:  # a shared definition through $defs/$ref
            schema = {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
                                          "required": ["x"], "additionalProperties": False}},
                      **schema, "properties": {**schema["properties"], "p": {"$ref": "#/$defs/point"}},
                      "required": [*schema["required"], "p"]}
        out.append(schema)
    return out
