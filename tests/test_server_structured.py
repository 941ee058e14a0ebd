"""Structured output over HTTP on the tiny random checkpoint (only the constraint makes an answer valid): the
openai SDK's `parse()`, named and "required" tool calls, LangChain's `with_structured_output` (all three
methods) and raw httpx with the 50 generated schemas (greedy, sampled n = 2 streamed) in a crowd of plain
requests whose answers equal their answers alone; vLLM's `structured_outputs`; 400s naming the reason.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
import structured_cases as cases
from server_fixtures import MODEL, ThreadServer


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=99)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog"]})


MESSAGES = [{"role": "user", "content": "Who is it?"}]


@pytest.fixture(scope="module")
def server(folder):
    s = ThreadServer(folder, max_num_seqs=64)
    yield s
    s.stop()


def test_openai_parse_greedy_sampled_n2_streamed(server):
    client = server.client()
    schema = Person.model_json_schema()
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=4, n=2)):
        r = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Person, max_tokens=80, **kw)
        for choice in r.choices:
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
            jsonschema.validate(json.loads(choice.message.content), schema)
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, response_format=Person, max_tokens=80,
                                        temperature=0.8, seed=9) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_named_and_required_tool_calls(server):
    client = server.client()
    tool = openai.pydantic_function_tool(Person)
    r = client.chat.completions.parse(model=MODEL, messages=MESSAGES, tools=[tool], max_tokens=80, temperature=0,
                                      tool_choice={"type": "function", "function": {"name": "Person"}})
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "Person" and r.choices[0].message.content is None
    assert isinstance(calls[0].function.parsed_arguments, Person)
    other = {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}}
    schemas = {"Person": Person.model_json_schema(), "count": other["function"]["parameters"]}
    for kw in (dict(parallel_tool_calls=False, temperature=0), dict(temperature=1.0, seed=3, n=2)):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[tool, other], tool_choice="required",
                                           max_tokens=120, **kw)
        for choice in r.choices:
            calls = choice.message.tool_calls
            assert choice.finish_reason == "tool_calls" and calls
            if kw.get("parallel_tool_calls") is False:
                assert len(calls) == 1
            for call in calls:
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[tool], max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "Person"}},
                                            stream=True, temperature=0)
    pieces = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert pieces[0][0].id and pieces[0][0].function.name == "Person"
    args = "".join(p[0].function.arguments or "" for p in pieces)
    Person.model_validate_json(args)


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=80, max_retries=0, timeout=60)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Person, method=method).invoke("Who is it?")
        assert isinstance(out, Person), method
    try:  # JSON mode: any JSON object (the schema is not sent), which a random model may not close in time
        raw = llm.with_structured_output(Person, method="json_mode", include_raw=True).invoke("Reply in JSON.")
        assert raw["raw"].content.startswith("{") and isinstance(json.loads(raw["raw"].content), dict)
    except openai.LengthFinishReasonError as exc:  # answered (200) and cut at max_tokens
        assert exc.completion.choices[0].message.content.startswith("{")
    responses = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused",
                                            use_responses_api=True, max_tokens=80, max_retries=0, timeout=60)
    assert isinstance(responses.invoke("Hello").text, str)
    out = responses.with_structured_output(Person, method="json_schema").invoke("Who is it?")
    assert isinstance(out, Person)


def test_fifty_schemas_raw_httpx_in_a_crowd(server):
    schemas = cases.schemas(50, seed=1)
    plain = [{"messages": [{"role": "user", "content": f"Tell me about {w}"}], "max_tokens": 10, **kw}
             for w, kw in (("cats", {"temperature": 0}), ("dogs", {"temperature": 0.9, "seed": 5, "n": 2}))]

    def body(i, schema, **kw):
        return {"model": MODEL, "messages": [{"role": "user", "content": f"JSON {i}"}], "max_tokens": cases.MAX_TOKENS,
                "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                             "strict": True}}, **kw}

    async def post(client, payload):
        if not payload.get("stream"):
            r = await client.post("/v1/chat/completions", json=payload)
            assert r.status_code == 200, r.text
            return [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]
        texts, reasons = {}, {}
        async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
                        reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
        return [(texts[i], reasons[i]) for i in sorted(texts)]

    async def run(payloads):
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*[post(client, p) for p in payloads])

    alone = asyncio.run(run([{**p, "model": MODEL} for p in plain[:1]])) + asyncio.run(
        run([{**p, "model": MODEL} for p in plain[1:]]))
    constrained = [body(i, s, temperature=0) for i, s in enumerate(schemas)]
    constrained += [body(i, s, temperature=1.0, n=2, seed=i, stream=True) for i, s in enumerate(schemas[:10])]
    results = asyncio.run(run(constrained + [{**p, "model": MODEL} for p in plain]))
    for payload, answers in zip(constrained, results):
        for text, reason in answers:
            assert reason == "stop", text
            jsonschema.validate(json.loads(text), payload["response_format"]["json_schema"]["schema"])
    assert results[len(constrained):] == alone


def test_structured_outputs_extra_and_logit_bias(server):
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0.7, n=2,
                                       extra_body={"structured_outputs": {"regex": r"[0-9]{2}-[a-z]{3}"}})
    assert all(re.fullmatch(r"[0-9]{2}-[a-z]{3}", c.message.content) for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert r.choices[0].text in ("alpha", "beta")
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                       logit_bias={"1500": 100})
    assert r.choices[0].message.content == server.llm.get_tokenizer().decode([1500] * 3)


@pytest.mark.parametrize("extra, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuch"}}}},
     "response_format", "json"),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "auto"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice", "auto"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name", "not in tools"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "both"),
    ({"logit_bias": {"1": 101}}, "logit_bias", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": "b" * 70000}}}},
     "response_format.json_schema.schema", "bytes"),
])
def test_bad_constraints_are_400s(server, extra, param, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if fragment:
        assert fragment in error["message"], error
