"""The OpenAI surface of 2026 on a real server: the Responses API through the openai SDK (plain, image, streamed
with OpenAI's event order, json_schema), logprob tokens / bytes / text_offset that add up to the text, current
request fields accepted (unknown ones still 400), GET /v1/models/{id}, top_p 0 as greedy, service_tier and
system_fingerprint, x-request-id, /openapi.json and /docs behind the key, --metrics-without-auth.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_fixtures import MODEL, ThreadServer, data_url, png_bytes

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["cat", "dog"]}, "count": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["label", "count"], "additionalProperties": False}


def test_responses_plain_image_streamed_json_schema(server):
    client = server.client()
    plain = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=6, temperature=0)
    assert plain.object == "response" and plain.id.startswith("resp_") and plain.status == "incomplete"
    assert plain.incomplete_details.reason == "max_output_tokens"
    assert plain.output_text == chat.choices[0].message.content
    assert plain.usage.output_tokens == 6 and plain.usage.input_tokens == chat.usage.prompt_tokens
    image = client.responses.create(model=MODEL, max_output_tokens=4, instructions="Be brief.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": data_url(png_bytes(40, 60))}]}])
    assert image.usage.input_tokens > 100 and len(image.output_text) > 0  # the image's placeholders count
    events = list(client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert events[-1].response.output_text == plain.output_text
    fmt = {"format": {"type": "json_schema", "name": "pet", "schema": SCHEMA, "strict": True}}
    structured = client.responses.create(model=MODEL, input="A pet?", max_output_tokens=40, text=fmt)
    assert structured.status == "completed"
    jsonschema.validate(json.loads(structured.output_text), SCHEMA)
    for bad, param in (({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
                       ({"tools": [{"type": "web_search"}]}, "tools"), ({"nonsense": 1}, "nonsense")):
        r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": "x", **bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_logprob_tokens_add_up_to_the_text(server):
    client = server.client()
    messages = [{"role": "user", "content": "Write something with spaces and accents: café"}]
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=1.0,
                                           seed=seed, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        text = r.choices[0].message.content
        assert "".join(t.token for t in content) == text
        assert b"".join(bytes(t.bytes) for t in content) == text.encode("utf-8")
        assert all(len(t.top_logprobs) == 3 for t in content)
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=1.0,
                                                seed=seed, logprobs=True, stream=True)
        tokens = [t.token for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert "".join(tokens) == text
    r = client.completions.create(model=MODEL, prompt="The weather today", max_tokens=16, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert any(t.startswith(" ") for t in lp.tokens[1:])  # SentencePiece's spaces are kept in context


def test_current_fields_models_top_p_tier_request_id(server):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    new_fields = {"safety_identifier": "user-1", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
                  "verbosity": "low", "service_tier": "flex", "stream_options": {"include_obfuscation": False},
                  "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json={**base, **new_fields}, timeout=30)
    assert r.status_code == 200, r.text
    chunk = json.loads(r.text.split("\n\n")[0][6:])
    assert chunk["service_tier"] == "default" and chunk["system_fingerprint"] == "fp_llava_next"
    assert httpx.post(server.url + "/v1/chat/completions", json={**base, "typo_field": 1}).status_code == 400
    greedy = httpx.post(server.url + "/v1/chat/completions", json={**base, "temperature": 0}).json()
    top_p0 = httpx.post(server.url + "/v1/chat/completions", json={**base, "temperature": 1.5, "top_p": 0}).json()
    assert top_p0["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    assert greedy["service_tier"] == "default"
    card = server.client().models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("other-model")
    r = httpx.get(server.url + "/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(server.url + "/v1/models", headers={"x-request-id": "bad id\twith spaces"})
    assert len(r.headers["x-request-id"]) == 32 and " " not in r.headers["x-request-id"]
    assert httpx.get(server.url + "/nope").headers["x-request-id"]


def test_metrics_without_auth_flag():
    from llava_next.entrypoints.cli import build_parser

    assert build_parser().parse_args(["serve", "m", "--metrics-without-auth"]).metrics_without_auth is True
    assert build_parser().parse_args(["serve", "m"]).metrics_without_auth is False


def test_openapi_docs_and_metrics_behind_the_key(folder):
    s = ThreadServer(folder, api_key="k3y")
    try:
        for path in ("/openapi.json", "/docs", "/metrics"):
            assert httpx.get(s.url + path).status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        doc = httpx.get(s.url + "/openapi.json", headers=auth).json()
        assert httpx.get(s.url + "/docs", headers=auth).status_code == 200
        schemas = doc["components"]["schemas"]
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert body.rsplit("/", 1)[1] in schemas
        assert "messages" in schemas["ChatCompletionRequest"]["properties"]
        assert "response_format" in schemas["ChatCompletionRequest"]["properties"]
        s.state.metrics_without_auth = True
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert httpx.get(s.url + "/openapi.json").status_code == 401
    finally:
        s.stop()
