"""Issue 22, the server core: what a hostile trial broke, each answered at the door (tests fail without the fix).

- Values the sampler cannot compute: temperature 1e-300 / 5e-324 are greedy (vLLM's rule: below 1e-5), the
  same tokens as temperature 0; repetition_penalty 1e-300 is served (the sampler clamps it to float32's normal
  range); stop_token_ids beyond int64 or the vocabulary, and seed 2**63-1 with n=2 (child seeds overflow) are
  400s naming the field; the engine stays healthy.
  `LLM.generate` leaves nothing queued when queueing one of its prompts fails.
- Bodies: parsed off the event loop (a parse held in its thread does not stop /health), a 15M-item array is
  refused before parsing, every ignored field is typed (a list where an object or a short string belongs is a
  400), `{"role": "user", "content": []}` is a 400.
- Host header: DNS-rebinding names refused, the bound address and the loopback names answered; defaults.
- An empty API key refuses to start; `cache_salt` closes the `cached_tokens` oracle across salts and, with
  `--cache-salt-per-key`, across API keys.
- Exact usage with n=2 (completion_tokens == the tokens of both choices) and the context check at its exact
  boundary (max_tokens that just fits: 200; one more: 400).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_fixtures import MODEL, ThreadServer, wait_until

import llava_next
from llava_next.entrypoints.openai import request_body
from llava_next.entrypoints.openai.connections import allowed_hosts, host_name
from llava_next.errors import SamplingParamsError

MAX_MODEL_LEN = 256
CHAT = "/v1/chat/completions"
LONG_SYSTEM = "You are a careful assistant who answers in full sentences and checks every fact twice. " * 3


def body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4,
            "temperature": 0, **fields}


@pytest.fixture(scope="module")
def server(folder):
    s = ThreadServer(folder, max_model_len=MAX_MODEL_LEN)
    yield s
    s.stop()


def post(server, payload, **kw) -> httpx.Response:
    return httpx.post(server.url + CHAT, json=payload, timeout=kw.pop("timeout", 30), **kw)


def healthy(server) -> bool:
    return httpx.get(server.url + "/health", timeout=5).status_code == 200


# ---------------------------------------------------------------------- item 1: values at the door


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_tiny_temperatures_are_greedy(server, temperature):
    fields = dict(max_tokens=6, ignore_eos=True)
    greedy = post(server, body(**fields))
    tiny = post(server, body(**fields, temperature=temperature))
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    assert healthy(server)


@pytest.mark.parametrize("fields,param", [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=1e3), "repetition_penalty"),
    (dict(stop_token_ids=[10**30], temperature=1.0), "stop_token_ids"),
    (dict(stop_token_ids=[2**63], temperature=1.0), "stop_token_ids"),
    (dict(stop_token_ids=[10**6], temperature=1.0, min_tokens=2), "stop_token_ids"),  # beyond the vocabulary
    (dict(seed=2**63 - 1, n=2, temperature=1.0), "seed"),
    (dict(min_tokens=2**31 - 1, max_tokens=None), "min_tokens"),  # found by the fuzz run: a 500 before
])
def test_uncomputable_values_are_400(server, fields, param):
    for stream in (False, True):
        r = post(server, body(**fields, stream=stream))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert healthy(server)
    assert post(server, body()).status_code == 200


@pytest.mark.parametrize("penalty", [1e-300, 1e-3])
def test_extreme_repetition_penalty_is_clamped_and_served(server, penalty):
    for stream in (False, True):
        r = post(server, body(repetition_penalty=penalty, temperature=1.0, max_tokens=4, ignore_eos=True,
                              stream=stream))
        assert r.status_code == 200, r.text
    assert healthy(server)


def test_largest_child_seed_that_fits_is_served(server):
    r = post(server, body(seed=2**63 - 2, n=2, temperature=1.0))
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_sampling_params_library_bounds():
    for kwargs in (dict(repetition_penalty=0.0), dict(stop_token_ids=[2**63]), dict(seed=2**63 - 1, n=2)):
        with pytest.raises(SamplingParamsError):
            llava_next.SamplingParams(**kwargs)
    assert llava_next.SamplingParams(temperature=5e-324).greedy
    assert not llava_next.SamplingParams(temperature=1e-5).greedy


def test_generate_queues_nothing_when_adding_fails(server):
    llm = llava_next.LLM.__new__(llava_next.LLM)  # the test server's engine, stepped here while its thread waits
    engine = server.llm.llm_engine
    llm.llm_engine, llm._tp_leader = engine, None
    real_add, calls = engine.add_request, []

    def failing_add(request_id, prepared, params=None):
        calls.append(request_id)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while queueing")
        return real_add(request_id, prepared, params)

    with server.engine._lock:  # hold the engine thread out of the engine meanwhile
        engine.add_request = failing_add
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                llm.generate(["one", "two", "three"], llava_next.SamplingParams(max_tokens=2), use_tqdm=False)
        finally:
            del engine.add_request
        assert not engine.has_unfinished_requests() and engine.num_requests() == (0, 0)
    with pytest.raises(SamplingParamsError, match="seed"):
        llm.generate(["a", "b"], llava_next.SamplingParams(n=2, seed=2**63 - 1), use_tqdm=False)
    assert post(server, body()).status_code == 200


# ---------------------------------------------------------------------- item 3: bodies


def test_parsing_runs_off_the_event_loop(server, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = request_body.parse_request

    def held(data, model_cls):
        entered.set()
        release.wait(20)
        return real(data, model_cls)

    monkeypatch.setattr(request_body, "parse_request", held)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(server, body())))
    t.start()
    try:
        assert entered.wait(10)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # the loop is free meanwhile
    finally:
        release.set()
        t.join(30)
    assert result["r"].status_code == 200


def test_huge_arrays_refused_before_parsing(server):
    raw = b'{"model": "tiny-llava", "messages": [], "reasoning_effort": [' + b",".join([b"0"] * 15_000_000) + b"]}"
    assert len(raw) < 32 * 1024 * 1024
    start = time.monotonic()
    r = httpx.post(server.url + CHAT, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert "too many values" in r.json()["error"]["message"]
    assert time.monotonic() - start < 20
    assert healthy(server)


@pytest.mark.parametrize("field,value", [
    ("reasoning_effort", [0] * 1000), ("audio", [0] * 1000), ("prediction", [0] * 1000),
    ("tool_choice", [0] * 1000), ("function_call", [0] * 10), ("web_search_options", [1, 2]),
    ("tools", [{}] * 129), ("reasoning_effort", "x" * 1000), ("metadata", {str(i): "v" for i in range(17)}),
    ("response_format", {str(i): 0 for i in range(65)}), ("modalities", ["text"] * 5),
])
def test_ignored_fields_are_typed_and_capped(server, field, value):
    r = post(server, body(**{field: value}))
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), r.text


def test_empty_content_list_is_400(server):
    for role in ("user", "system"):
        r = post(server, body(messages=[{"role": role, "content": []}]))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text


# ---------------------------------------------------------------------- item 8: Host, API key


def test_allowed_hosts_defaults():
    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("::1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("10.1.2.3") == {"10.1.2.3"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None
    assert allowed_hosts("127.0.0.1", ["Example.COM"]) == {"example.com"}
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    assert [host_name(h) for h in (b"[::1]:8000", b"LocalHost:1", b"a.example.", b"::1")] == \
        ["::1", "localhost", "a.example", "::1"]


def test_dns_rebinding_host_is_refused(server):
    server.state.allowed_hosts = allowed_hosts("127.0.0.1")
    try:
        for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.nip.io"):
            for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("POST", CHAT)):
                r = httpx.request(method, server.url + path, headers={"Host": host}, json=body(), timeout=10)
                assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", (host, path)
        for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "localhost"):
            assert httpx.post(server.url + CHAT, headers={"Host": host}, json=body(), timeout=30).status_code == 200
    finally:
        server.state.allowed_hosts = None


def test_empty_api_key_refuses_to_start(folder, monkeypatch, capsys):
    from llava_next.entrypoints import cli

    capsys.readouterr()
    assert cli.main(["serve", str(folder), "--api-key", ""]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llava-next: error:") and "empty" in err and err.count("\n") == 1, err
    monkeypatch.setenv("LLAVA_NEXT_API_KEY", "  ")
    assert cli.main(["serve", str(folder)]) == 1
    assert "empty" in capsys.readouterr().err
    monkeypatch.delenv("LLAVA_NEXT_API_KEY")
    assert cli.main(["serve", str(folder), "--cache-salt-per-key"]) == 1
    assert "--api-key" in capsys.readouterr().err


# ---------------------------------------------------------------------- item 7: cache_salt


def cached(server, salt=None, key=None) -> int:
    payload = body(messages=[{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Hi"}],
                   max_tokens=1)
    if salt is not None:
        payload["cache_salt"] = salt
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = post(server, payload, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cache_salt_closes_the_cached_tokens_oracle(server):
    cached(server, salt="alice")  # alice's system prompt is now in the cache
    assert cached(server, salt="alice") >= 32  # alice herself hits it
    assert cached(server, salt="mallory") == 0  # another salt learns nothing
    assert cached(server) == 0  # nor does an unsalted request
    assert cached(server) >= 32  # unsalted requests share among themselves, as before


def test_cache_salt_per_api_key(folder):
    s = ThreadServer(folder, api_key=["key-a", "key-b"], cache_salt_per_key=True, max_model_len=MAX_MODEL_LEN)
    try:
        cached(s, key="key-a")
        assert cached(s, key="key-a") >= 32
        assert cached(s, key="key-b") == 0  # another key never sees key-a's prefix
        assert cached(s, key="key-b", salt="x") == 0
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer key-c"}, timeout=5)
        assert r.status_code == 401
    finally:
        s.stop()


# ---------------------------------------------------------------------- test gaps: exact usage, exact boundary


def test_usage_with_n_2_is_exact(server):
    fields = dict(n=2, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True, logprobs=True)
    r = post(server, body(**fields)).json()
    per_choice = [len(c["logprobs"]["content"]) for c in r["choices"]]
    assert per_choice == [8, 8]
    assert r["usage"]["completion_tokens"] == 16 == sum(per_choice)
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 16
    stream = {**fields, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + CHAT, json=body(**stream), timeout=30) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 16


def test_context_length_checked_at_the_exact_boundary(server):
    prompt_tokens = post(server, body(max_tokens=1)).json()["usage"]["prompt_tokens"]
    fits = MAX_MODEL_LEN - prompt_tokens
    r = post(server, body(max_tokens=fits, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == fits, r.text
    over = post(server, body(max_tokens=fits + 1))
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded", over.text
    assert wait_until(lambda: healthy(server), 5)
