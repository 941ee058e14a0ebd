"""A corpus of malformed requests (../shared/RELIABILITY.md, server table): each gets its mapped 4xx with an
`{"error": {"message", "type", "param", "code"}}` body (short, no traceback, no echo of the input, no file
bytes), answered in well under a second; afterwards the server is healthy and answers a good request exactly
as before. The `openai` client sees the same bodies (BadRequestError.body).
"""

from __future__ import annotations

import json
import struct
import time
import zlib

import httpx
import openai
import pytest
from server_fixtures import (
    MODEL,
    ThreadServer,
    data_url,
    full_checkpoint,
    png_bytes,
)

MAX_BODY = 1 << 20
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


def bomb_png(width=50_000, height=50_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def with_(**fields):
    return {**GOOD, **fields}


def user(content):
    return with_(messages=[{"role": "user", "content": content}])


def img(url):
    return user([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])


def nested(depth):
    return f'{{"model": "{MODEL}", "messages": {"[" * depth + "]" * depth}}}'


B = "invalid_json"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
TINY = data_url(png_bytes(20, 30))

# (id, path, body: dict | str | bytes, expected status, expected code or None, extra headers)
CORPUS = [
    ("not-json", CHAT, b"{not json", 400, B),
    ("empty-body", CHAT, b"", 400, B),
    ("top-array", CHAT, b"[1, 2]", 400, B),
    ("top-string", CHAT, b'"hello"', 400, B),
    ("top-number", CHAT, b"5", 400, B),
    ("top-null", CHAT, b"null", 400, B),
    ("nested-64", CHAT, nested(64), 400, B),
    ("nested-100k", CHAT, nested(100_000), 400, B),
    ("lone-surrogate", CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, B),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, B),
    ("nan", CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, B),
    ("infinity", CHAT, '{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}', 400, B),
    ("trailing-garbage", CHAT, json.dumps(GOOD) + " x", 400, B),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "missing_parameter"),
    ("empty-messages", CHAT, with_(messages=[]), 400, "invalid_parameter"),
    ("messages-string", CHAT, with_(messages="hi"), 400, "invalid_parameter"),
    ("message-string", CHAT, with_(messages=["hi"]), 400, "invalid_parameter"),
    ("unknown-role", CHAT, with_(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_parameter"),
    ("tool-role", CHAT, with_(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_parameter"),
    ("missing-role", CHAT, with_(messages=[{"content": "x"}]), 400, None),
    ("missing-content", CHAT, with_(messages=[{"role": "user"}]), 400, "missing_parameter"),
    ("content-number", CHAT, user(5), 400, "invalid_parameter"),
    ("unknown-part", CHAT, user([{"type": "audio", "audio": "x"}]), 400, "invalid_parameter"),
    ("part-without-type", CHAT, user([{"text": "x"}]), 400, None),
    ("text-part-without-text", CHAT, user([{"type": "text"}]), 400, "missing_parameter"),
    ("image-part-without-payload", CHAT, user([{"type": "image_url"}]), 400, "missing_parameter"),
    ("image-url-without-url", CHAT, user([{"type": "image_url", "image_url": {}}]), 400, "missing_parameter"),
    ("image-url-number", CHAT, user([{"type": "image_url", "image_url": {"url": 7}}]), 400, "invalid_parameter"),
    ("image-url-empty", CHAT, user([{"type": "image_url", "image_url": {"url": ""}}]), 400, "invalid_parameter"),
    ("image-detail", CHAT, user([{"type": "image_url", "image_url": {"url": TINY, "detail": "ultra"}}]), 400, None),
    ("unknown-field", CHAT, with_(max_token=5), 400, "invalid_parameter"),
    ("system-image", CHAT, with_(messages=[{"role": "system", "content": [{"type": "image_url",
                                                                          "image_url": {"url": TINY}}]}]), 400, None),
    ("model-number", CHAT, with_(model=123), 400, "invalid_parameter"),
    ("max-tokens-0", CHAT, with_(max_tokens=0), 400, "invalid_parameter"),
    ("max-tokens-negative", CHAT, with_(max_tokens=-1), 400, "invalid_parameter"),
    ("max-tokens-string", CHAT, with_(max_tokens="5"), 400, "invalid_parameter"),
    ("max-tokens-huge", CHAT, with_(max_tokens=10**40), 400, "invalid_parameter"),
    ("max-tokens-float", CHAT, with_(max_tokens=1.5), 400, "invalid_parameter"),
    ("max-tokens-bool", CHAT, with_(max_tokens=True), 400, "invalid_parameter"),
    ("temperature-negative", CHAT, with_(temperature=-0.1), 400, "invalid_parameter"),
    ("temperature-3", CHAT, with_(temperature=3), 400, "invalid_parameter"),
    ("temperature-string", CHAT, with_(temperature="hot"), 400, "invalid_parameter"),
    ("top-p-negative", CHAT, with_(top_p=-0.1), 400, "invalid_parameter"),  # top_p 0 is greedy (issue 23)
    ("top-p-1.5", CHAT, with_(top_p=1.5), 400, "invalid_parameter"),
    ("top-k-minus-2", CHAT, with_(top_k=-2), 400, "invalid_parameter"),
    ("n-0", CHAT, with_(n=0), 400, "invalid_parameter"),
    ("n-100", CHAT, with_(n=100), 400, "invalid_parameter"),
    ("top-logprobs-21", CHAT, with_(logprobs=True, top_logprobs=21), 400, "invalid_parameter"),
    ("top-logprobs-alone", CHAT, with_(top_logprobs=2), 400, "invalid_parameter"),
    ("logprobs-string", CHAT, with_(logprobs="yes"), 400, "invalid_parameter"),
    ("stop-17", CHAT, with_(stop=[f"s{i}" for i in range(17)]), 400, "unsupported_parameter"),
    ("stop-number", CHAT, with_(stop=[1]), 400, "invalid_parameter"),
    ("stop-empty", CHAT, with_(stop=[""]), 400, "invalid_parameter"),
    ("seed-2^63", CHAT, with_(seed=2**63), 400, "invalid_parameter"),
    ("seed-below-int64", CHAT, with_(seed=-(2**63) - 1), 400, "invalid_parameter"),
    ("seed-string", CHAT, with_(seed="1"), 400, "invalid_parameter"),
    ("presence-3", CHAT, with_(presence_penalty=3), 400, "invalid_parameter"),
    ("frequency-minus-3", CHAT, with_(frequency_penalty=-3), 400, "invalid_parameter"),
    ("min-p-2", CHAT, with_(min_p=2), 400, "invalid_parameter"),
    ("repetition-0", CHAT, with_(repetition_penalty=0), 400, "invalid_parameter"),
    ("stream-string", CHAT, with_(stream="yes"), 400, "invalid_parameter"),
    ("stream-options-list", CHAT, with_(stream=True, stream_options=[1]), 400, "invalid_parameter"),
    ("min-tokens-over-max", CHAT, with_(min_tokens=10, max_tokens=4), 400, "invalid_parameter"),
    ("stream-bad-param", CHAT, with_(stream=True, temperature=-1), 400, "invalid_parameter"),
    ("stream-context", CHAT, with_(stream=True, max_tokens=5000), 400, "context_length_exceeded"),
    ("response-format-unknown", CHAT, with_(response_format={"type": "xml"}), 400, "invalid_parameter"),
    ("tools-auto", CHAT, with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
    ("tool-choice-no-tools", CHAT, with_(tool_choice="required"), 400, "invalid_parameter"),
    ("logit-bias-101", CHAT, with_(logit_bias={"1": 101}), 400, "invalid_parameter"),
    ("context-max-tokens", CHAT, with_(max_tokens=5000), 400, "context_length_exceeded"),
    ("context-long-prompt", CHAT, user("hello " * 5000), 400, "context_length_exceeded"),
    ("context-image", CHAT, {**img(TINY), "max_tokens": 4000}, 400, "context_length_exceeded"),
    ("bad-base64", CHAT, img("data:image/png;base64,!!!!"), 400, "invalid_image"),
    ("random-bytes", CHAT, img(data_url(bytes(range(256)) * 4)), 400, "invalid_image"),
    ("non-image-mime", CHAT, img("data:text/plain;base64,aGVsbG8="), 400, "invalid_image"),
    ("truncated-png", CHAT, img(data_url(png_bytes(100, 100)[:300])), 400, "invalid_image"),
    ("bomb-png", CHAT, img(data_url(bomb_png())), 400, "invalid_image"),
    ("too-many-images", CHAT, user([{"type": "image_url", "image_url": {"url": TINY}}] * 3), 400, "too_many_images"),
    ("extreme-aspect", CHAT, img(data_url(png_bytes(1, 400))), 400, "invalid_image"),
    ("literal-image-token", CHAT, user("look: <image>"), 400, "invalid_content"),
    ("scheme-ftp", CHAT, img("ftp://example.com/a.png"), 400, "invalid_image"),
    ("scheme-file", CHAT, img("file:///etc/passwd"), 400, "invalid_image"),
    ("host-not-allowed", CHAT, img("http://example.com/a.png"), 400, "invalid_image"),
    ("scheme-javascript", CHAT, img("javascript:alert(1)"), 400, "invalid_image"),
    ("bare-path", CHAT, img("/etc/passwd"), 400, "invalid_image"),
    ("gopher", CHAT, img("gopher://127.0.0.1:70/_x"), 400, "invalid_image"),
    ("unknown-model", CHAT, with_(model="gpt-4o"), 404, "model_not_found"),
    ("completion-missing-prompt", COMP, {"model": MODEL}, 400, "missing_parameter"),
    ("completion-prompt-number", COMP, {"model": MODEL, "prompt": 5}, 400, "invalid_parameter"),
    ("completion-echo", COMP, {"model": MODEL, "prompt": "x", "echo": True}, 400, "unsupported_parameter"),
    ("completion-logprobs-6", COMP, {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "invalid_parameter"),
    ("completion-bad-token-id", COMP, {"model": MODEL, "prompt": [99_999_999]}, 400, "invalid_request"),
    ("completion-empty-ids", COMP, {"model": MODEL, "prompt": []}, 400, "invalid_parameter"),
    ("completion-batched", COMP, {"model": MODEL, "prompt": ["a", "b"]}, 400, "unsupported_parameter"),
    ("completion-context", COMP, {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "context_length_exceeded"),
    ("completion-unknown-model", COMP, {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_root):
    s = ThreadServer(full_checkpoint(tiny_checkpoint, tiny_root), max_model_len=4096, limit_mm_per_prompt=2,
                     max_body_bytes=MAX_BODY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def baseline(server):
    return httpx.post(server.url + CHAT, json=GOOD, timeout=30).json()["choices"][0]["message"]["content"]


def check_error(r: httpx.Response, status: int, code=None, sent: bytes = b"") -> dict:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    assert len(r.content) < 800
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "Traceback" not in message and "root:" not in message
    if code is not None:
        assert body["error"]["code"] == code, body
    if len(sent) > 200:  # never more than ~200 bytes of the input echoed back
        for i in range(0, len(sent) - 200, 50):
            assert sent[i:i + 200] not in r.content
    return body


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 60 and len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_request(server, baseline, case):
    name, path, body, status, code = case
    content = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass") if isinstance(body, str) \
        else json.dumps(body).encode()
    start = time.monotonic()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    elapsed = time.monotonic() - start
    check_error(r, status, code, content)
    assert elapsed < 2.0, f"{name} took {elapsed:.2f} s"


def test_transport_level_errors(server, baseline):
    url = server.url + CHAT
    body = json.dumps(GOOD).encode()
    check_error(httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=10), 415,
                "unsupported_media_type")
    check_error(httpx.post(url, content=body, timeout=10), 415, "unsupported_media_type")  # no content type
    check_error(httpx.post(url, data={"a": "b"}, timeout=10), 415)  # a form
    check_error(httpx.post(url, content=b"x" * (MAX_BODY + 1), headers={"Content-Type": "application/json"},
                           timeout=10), 413, "request_too_large")

    def chunks():  # chunked upload: no Content-Length, counted while read
        for _ in range(40):
            yield b" " * 65536

    check_error(httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"}, timeout=10), 413,
                "request_too_large")
    check_error(httpx.get(url, timeout=10), 405)
    check_error(httpx.get(server.url + "/v2/nothing", timeout=10), 404)


def test_openai_client_sees_the_error_body(server, baseline):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert info.value.body["param"] == "temperature" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000,
                                       stream=True)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_healthy_and_correct_after_the_corpus(server, baseline):
    """Runs last in this file: the corpus left nothing behind (no slot, no request, same answers)."""
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = httpx.post(server.url + CHAT, json=GOOD, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == baseline
    m = server.metrics()
    assert m["llava_next_num_requests_admitted"] == 0 and m["llava_next_num_requests_running"] == 0
    assert m['llava_next_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 60
    ok = httpx.post(server.url + CHAT, json={**img(TINY), "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200
