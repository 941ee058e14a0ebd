"""`llava-next serve` answers like the library: a real uvicorn server on 127.0.0.1 (tests/server_fixtures.py),
the real `openai` client (max_retries=0) and raw httpx.

Greedy chat answers, streamed and not, equal `LlavaNextForConditionalGeneration.generate()` on the same
messages (text, token counts, usage); the stream's deltas concatenate to the full text; `include_usage` gives
a last chunk with `choices == []`; `data: [DONE]` ends the raw stream; `/v1/completions`, `/v1/models`, `n`,
`stop`, `seed`, logprobs shapes, `max_completion_tokens`, prefix-cache `cached_tokens`, API key on every route
but /health.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from server_fixtures import MODEL, ThreadServer, data_url, image_message, png_bytes

SIZES = [(40, 60), (300, 200)]


@pytest.fixture(scope="module")
def reference(folder):
    """generate() on the same messages: (text, prompt tokens, completion tokens)."""
    from llava_next import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from llava_next.preprocess.images import decode_image

    model = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    processor = LlavaNextProcessor.from_pretrained(folder)

    def run(text: str, images: list[bytes], max_new_tokens: int):
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        kwargs = {"add_special_tokens": False} if prompt.startswith(processor.tokenizer.bos_token) else {}
        pil = [decode_image(b) for b in images]
        inputs = processor(images=pil or None, text=prompt, return_tensors="pt", **kwargs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return processor.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1], len(new)

    return run


CASES = [("Describe the picture.", [SIZES[0]]), ("What is the answer to everything?", []),
         ("Compare these.", SIZES)]


@pytest.mark.parametrize("text,sizes", CASES, ids=["one-image", "text-only", "two-images"])
def test_greedy_chat_equals_generate(server, reference, text, sizes):
    images = [png_bytes(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    want_text, want_prompt, want_new = reference(text, images, 12)
    messages = image_message(text, *[data_url(b) for b in images])
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want_prompt, want_new)
    assert r.usage.total_tokens == want_prompt + want_new
    assert r.usage.prompt_tokens_details.cached_tokens >= 0

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.created == chunks[0].created for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want_new
    assert chunks[-1].usage.prompt_tokens == want_prompt
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want_text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    # the same prompt again: its full blocks come from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= (want_prompt // 16 - 1) * 16


def test_raw_sse_shape_and_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_and_models(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    tok = server.llm.llm_engine.tokenizer
    ids = server.llm.llm_engine.prepare("Once upon a time").prompt_token_ids
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
    offline = server.llm.generate(["Once upon a time"], _greedy(6), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == offline.text == tok.decode(offline.token_ids, skip_special_tokens=True)
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    default = client.completions.create(model=MODEL, prompt="Once", temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def _greedy(n):
    from llava_next import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)


def test_sampling_parameters(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Tell me a story"}]
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=8, temperature=1.0,
                                       seed=1234, n=2, extra_body={"top_k": 50, "min_p": 0.01})
    b = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=8, temperature=1.0,
                                       seed=1234, n=2, extra_body={"top_k": 50, "min_p": 0.01})
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 16
    # max_completion_tokens wins over max_tokens; min_tokens + ignore_eos give exactly that many
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, max_completion_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True, "min_tokens": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    # penalties are accepted and change nothing about the shape
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=1.0,
                                       extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].message.content is not None


def test_stop_string_cuts_text(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == cut


def test_logprobs_shapes(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top token
    none = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    assert none.choices[0].logprobs is None
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_api_key_on_every_route_but_health(folder):
    s = ThreadServer(folder, api_key="s3cret-KEY")
    try:
        for path, method in [("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/chat/completions", "POST"),
                             ("/v1/completions", "POST"), ("/nowhere", "GET")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-key"},
                            {"Authorization": "s3cret-KEY"}, {"Authorization": "Bearer s3cret-KEYx"}):
                r = httpx.request(method, s.url + path, headers=headers, json={}, timeout=10)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="nope").models.list()
        good = s.client(api_key="s3cret-KEY")
        assert good.models.list().data[0].id == MODEL
        r = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        s.stop()
