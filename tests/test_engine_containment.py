"""No request can stop the engine: values at the edges of their ranges (temperature 1e-45, repetition_penalty
1e-40 / 1e-300, top_p 5e-324 / 1e-300, the largest seed whose n = 2 child seeds fit int64; a stop id outside the
vocabulary or past int64 and a seed that overflows are refused before queueing, tests/test_hardening_server.py) in
a crowd of normal requests, through LLM.generate and through the server: every request finishes, the normal ones
with the tokens they get alone, the engine stays healthy. A sampling failure injected for one row ends only that
request (finish_reason "error") and is logged with its traceback."""

from __future__ import annotations

import concurrent.futures
import logging

import httpx
import pytest
from server_fixtures import MODEL, ThreadServer, full_checkpoint

import llava_next
from llava_next import SamplingParams
from llava_next.engine.request import PreparedRequest
from llava_next.engine.sampler import Sampler

EDGES = [{"temperature": 1e-45}, {"temperature": 1.0, "repetition_penalty": 1e-40},
         {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 1.0, "top_p": 1e-300},
         {"temperature": 1.0, "repetition_penalty": 1e-300},
         {"temperature": 1.0, "seed": 2**63 - 2, "n": 2}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from llava_next.entrypoints.demo import build_demo_checkpoint

    folder = build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", quiet=True)
    return llava_next.LLM(str(folder), max_num_batched_tokens=512)


def _normal():
    return [("Tell me a story", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),
            ("Once upon", SamplingParams(temperature=1.0, top_k=40, seed=77, max_tokens=6, ignore_eos=True)),
            ("Hello there", SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=6, ignore_eos=True,
                                           presence_penalty=0.5, repetition_penalty=1.2))]


def test_edge_values_in_a_crowd_through_generate(llm):
    normal = _normal()
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in normal]
    edges = [("Edge case", SamplingParams(max_tokens=6, ignore_eos=True, **kw)) for kw in EDGES]
    crowd = normal + edges
    outs = llm.generate([p for p, _ in crowd], [sp for _, sp in crowd], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[: len(normal)]] == alone
    for out, (_, sp) in zip(outs, crowd):
        assert out.finished and len(out.outputs) == sp.n
        assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in out.outputs)
    greedy = llm.generate(["Edge case"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert outs[len(normal)].outputs[0].token_ids == greedy  # temperature 1e-45 is greedy
    assert outs[len(normal) + 2].outputs[0].token_ids == greedy  # top_p ~ 0 keeps only the best token


def _fail_marked(monkeypatch):
    real = Sampler._sample

    def failing(self, rows, logits):
        if any(r.seq.params.presence_penalty == 0.125 for r in rows):  # the marked request
            raise RuntimeError("injected sampling fault")
        return real(self, rows, logits)

    monkeypatch.setattr(Sampler, "_sample", failing)


def test_injected_sampling_failure_ends_one_request(llm, monkeypatch, caplog):
    normal = _normal()
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in normal]
    _fail_marked(monkeypatch)
    marked = ("Doomed", SamplingParams(temperature=1.0, presence_penalty=0.125, max_tokens=6, ignore_eos=True))
    with caplog.at_level(logging.ERROR):
        outs = llm.generate([p for p, _ in normal + [marked]], [sp for _, sp in normal + [marked]],
                            use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:3]] == alone
    assert outs[3].finished and outs[3].outputs[0].finish_reason == "error" and outs[3].outputs[0].token_ids == []
    tracebacks = [r for r in caplog.records if r.exc_info and "injected sampling fault" in str(r.exc_info[1])]
    assert tracebacks and any("ends with an error" in r.getMessage() for r in caplog.records)
    assert llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0].finished


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_root):
    s = ThreadServer(full_checkpoint(tiny_checkpoint, tiny_root))
    yield s
    s.stop()


def _chat(s, text, **kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 5, "ignore_eos": True,
            **kw}
    return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)


def test_edge_values_in_a_crowd_through_the_server(server, monkeypatch):
    normal = [{"temperature": 0}, {"temperature": 1.0, "seed": 42, "top_k": 30}]
    alone = [_chat(server, "Tell me", **kw).json()["choices"][0]["message"]["content"] for kw in normal]
    edge_bodies = [dict(kw) for kw in EDGES]
    _fail_marked(monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        normal_f = [pool.submit(_chat, server, "Tell me", **kw) for kw in normal]
        edge_f = [pool.submit(_chat, server, "Edge", **kw) for kw in edge_bodies]
        doomed = pool.submit(_chat, server, "Doomed", temperature=1.0, presence_penalty=0.125)
        normal_r = [f.result() for f in normal_f]
        edge_r = [f.result() for f in edge_f]
        doomed_r = doomed.result()
    assert [r.status_code for r in normal_r] == [200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in normal_r] == alone
    for r, kw in zip(edge_r, edge_bodies):
        # 200 and finished here; a server that refuses such values at the door answers a typed 400 instead
        assert r.status_code in (200, 400), (kw, r.status_code, r.text)
        if r.status_code == 200:
            assert {c["finish_reason"] for c in r.json()["choices"]} == {"length"}, kw
    assert doomed_r.status_code == 200 and doomed_r.json()["choices"][0]["finish_reason"] == "error"
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    assert _chat(server, "Tell me", temperature=0).json()["choices"][0]["message"]["content"] == alone[0]


def test_a_step_fault_is_logged_with_its_traceback(llm, monkeypatch, caplog):
    runner = llm.llm_engine.runner
    real = runner.execute
    calls = []

    def failing(step):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected step fault")
        return real(step)

    monkeypatch.setattr(runner, "execute", failing)
    with caplog.at_level(logging.ERROR, logger="llava_next.engine.llm_engine"), pytest.raises(RuntimeError):
        llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert any(r.exc_info and "injected step fault" in str(r.exc_info[1]) for r in caplog.records)
    monkeypatch.setattr(runner, "execute", real)
    assert not llm.llm_engine.has_unfinished_requests()  # the failed call's request was aborted and freed
    assert llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0].finished


def test_the_engine_thread_logs_the_fault_that_stops_it(caplog):
    from llava_next.engine.driver import AsyncEngine
    from llava_next.errors import EngineDeadError

    class Broken:
        def __init__(self):
            self.pending = False

        def stats(self):
            return {}

        def has_unfinished_requests(self):
            return self.pending

        def add_request(self, request_id, prepared):
            self.pending = True

        def step(self):
            raise RuntimeError("injected engine fault")

    with caplog.at_level(logging.ERROR, logger="llava_next.engine.driver"):
        driver = AsyncEngine(Broken())
        stream = driver.submit("r1", PreparedRequest(None, [1, 2], [], SamplingParams()))
        with pytest.raises(EngineDeadError):
            stream.result()
        driver.shutdown(5)
    assert not driver.healthy
    assert any(r.exc_info and "injected engine fault" in str(r.exc_info[1]) for r in caplog.records)
