"""Concurrency, backpressure and cancellation through the real server.

- 32 concurrent clients (AsyncOpenAI, max_retries=0) mixing image sizes, text-only prompts, streamed and
  non-streamed requests: every answer equals the same request sent alone (none lost or cross-wired).
- Backpressure with max_num_seqs=1, max_queued_requests=1: exactly the expected number of 503s (with
  Retry-After, answered without the engine), and the admitted requests still finish. The engine is held by a
  gate on its step while admission is decided, so no timing is involved.
- A client that disconnects (a stream closed mid-way, a non-streamed request whose client gives up) has its
  engine request aborted: running sequences and KV blocks are back to the baseline within 1 s (/metrics).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from server_fixtures import MODEL, ThreadServer, data_url, image_message, png_bytes, wait_until

IMAGE_SIZES = [(20, 30), (60, 80), (300, 200), (336, 336), (100, 700), (700, 100)]
TEXTS = ["Hello", "What is two plus two?", "Write a haiku about the sea.", "List three colours.",
         "Translate 'cat' to French.", "Why is the sky blue?", "Name a prime number.", "Say something kind.",
         "What day is it?", "Describe a tree."]


def payloads() -> list[dict]:
    out = []
    for i, text in enumerate(TEXTS):
        out.append({"messages": [{"role": "user", "content": text}], "max_tokens": 6 + i % 5})
    for i, (h, w) in enumerate(IMAGE_SIZES):
        url = data_url(png_bytes(h, w, seed=10 + i))
        out.append({"messages": image_message(f"Image {i}: what is shown?", url), "max_tokens": 5 + i % 4})
    return out


def test_32_concurrent_clients_each_equal_their_request_alone(server):
    items = payloads()
    client = server.client()
    alone = []
    for p in items:
        r = client.chat.completions.create(model=MODEL, temperature=0, **p)
        alone.append((r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens))

    async def one(aclient, index, stream):
        p = items[index]
        if not stream:
            r = await aclient.chat.completions.create(model=MODEL, temperature=0, **p)
            return index, r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens
        s = await aclient.chat.completions.create(model=MODEL, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **p)
        text, usage = [], None
        async for chunk in s:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage
        return index, "".join(text), usage.completion_tokens, usage.prompt_tokens

    async def crowd():
        aclient = server.async_client()
        jobs = [one(aclient, i, stream) for stream in (False, True) for i in range(len(items))]
        assert len(jobs) == 32
        try:
            return await asyncio.wait_for(asyncio.gather(*jobs), 180)
        finally:
            await aclient.close()

    results = asyncio.run(crowd())
    assert len(results) == 32
    for index, text, completion_tokens, prompt_tokens in results:
        assert (text, completion_tokens, prompt_tokens) == alone[index], index
    m = server.metrics()
    assert m["llava_next_num_requests_admitted"] == 0 and m["llava_next_num_requests_running"] == 0


def _long_body(stream: bool, max_tokens: int = 400) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Count forever"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": True}


class _EngineGate:
    """Holds the engine thread before its next step until `open()`: admission is decided with no engine progress,
    so the test does not depend on how fast the machine generates (it passes next to busy-loop processes)."""

    def __init__(self, engine):
        self.engine, self.real_step = engine, engine.step
        self.opened, self.waiting = threading.Event(), threading.Event()
        engine.step = self.step

    def step(self):
        if not self.opened.is_set():
            self.waiting.set()
            self.opened.wait(120)
        return self.real_step()

    def open(self):
        self.opened.set()
        del self.engine.step


def test_backpressure_gives_exactly_the_expected_503s(folder):
    s = ThreadServer(folder, max_num_seqs=1, max_queued_requests=1)
    try:
        url = s.url + "/v1/chat/completions"

        async def burst(n, max_tokens):
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[c.post(url, json=_long_body(False, max_tokens)) for _ in range(n)])

        # 4 at once against 1 running + 1 queued, the engine held: exactly 2 are refused, the 2 admitted finish
        gate = _EngineGate(s.llm.llm_engine)
        result = {}
        sender = threading.Thread(target=lambda: result.setdefault("codes", asyncio.run(burst(4, 48))))
        sender.start()
        refused = 'llava_next_requests_total{endpoint="/v1/chat/completions",status="503"}'
        assert wait_until(lambda: s.metrics().get(refused, 0) == 2, 30)
        assert s.metrics()["llava_next_num_requests_admitted"] == 2
        gate.open()
        sender.join(60)
        codes = sorted(r.status_code for r in result["codes"])
        assert codes == [200, 200, 503, 503], codes

        # two streams hold both slots while the engine is held: every further request is a 503, answered without
        # the engine (a queued request would wait for the held engine and time out instead)
        gate = _EngineGate(s.llm.llm_engine)
        streams = []
        for _ in range(2):
            cm = httpx.stream("POST", url, json=_long_body(True, 150), timeout=60)
            r = cm.__enter__()
            assert r.status_code == 200
            streams.append((cm, r, r.iter_lines()))
        assert gate.waiting.wait(30)
        for _ in range(5):
            r = httpx.post(url, json=_long_body(False, 4), timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_overloaded"
        gate.open()
        for cm, r, lines in streams:  # the admitted ones finish normally
            rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
            cm.__exit__(None, None, None)
        assert wait_until(lambda: s.metrics()["llava_next_num_requests_admitted"] == 0, 10)
        assert httpx.post(url, json=_long_body(False, 3), timeout=30).status_code == 200
        too_many = httpx.post(url, json={**_long_body(False, 3), "n": 3}, timeout=10)  # can never fit: 400, not 503
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        assert s.metrics()[refused] == 7
    finally:
        s.stop()


def _freed(server, baseline_blocks) -> bool:
    m = server.metrics()
    return (m["llava_next_num_requests_running"] == 0 and m["llava_next_num_requests_waiting"] == 0
            and m["llava_next_num_requests_admitted"] == 0 and m["llava_next_kv_blocks_used"] == baseline_blocks)


def test_disconnected_stream_frees_its_slot_within_a_second(server):
    baseline = server.metrics()["llava_next_kv_blocks_used"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=_long_body(True, 3000), timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.metrics()["llava_next_num_requests_running"] == 1
    closed = time.monotonic()
    assert wait_until(lambda: _freed(server, baseline), 1.0), server.metrics()
    assert time.monotonic() - closed < 1.0
    # the openai client's close() does the same
    stream = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on"}],
                                                     max_tokens=3000, temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert wait_until(lambda: _freed(server, baseline), 1.0), server.metrics()


def test_disconnected_non_streamed_request_is_aborted(server):
    baseline = server.metrics()["llava_next_kv_blocks_used"]
    started = threading.Event()

    def client():
        started.set()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=_long_body(False, 3000), timeout=0.6)

    t = threading.Thread(target=client)
    t.start()
    assert wait_until(lambda: server.metrics()["llava_next_num_requests_running"] == 1, 5)
    t.join(5)
    gone = time.monotonic()
    assert wait_until(lambda: _freed(server, baseline), 1.0), server.metrics()
    assert time.monotonic() - gone < 1.0
    m = server.metrics()
    assert m.get('llava_next_requests_total{endpoint="/v1/chat/completions",status="499"}', 0) >= 1
