"""AsyncEngine: one thread owns the engine; many callers submit concurrently (threads and asyncio), get their
own streams; abort ends a stream and frees its blocks; an engine fault ends every stream with EngineDeadError."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine_cases import case, reference
from llava_next import SamplingParams
from llava_next.engine.driver import AsyncEngine
from llava_next.engine.llm_engine import LLMEngine
from llava_next.errors import ContextLengthError, EngineDeadError

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
LIMIT_S = 120  # no stream in these tests may take longer: a driver that never ends a stream fails, not hangs


def bounded(fn, *args):
    """fn(*args) on a daemon thread, failing the test if it has not returned within LIMIT_S (its exception is
    re-raised here)."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {LIMIT_S} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def driver(tiny_pair):
    model, _ = tiny_pair("mistral")
    d = AsyncEngine(LLMEngine(model, None, max_model_len=4096, max_num_batched_tokens=512))
    yield model, d
    d.shutdown()


def test_threads_and_asyncio_get_their_own_exact_streams(driver):
    model, d = driver
    prompts = [case([(200, 300)], 1), case([], 2), case([(336, 336)], 3), case([], 4)]
    results = {}

    def worker(i):
        outs = list(d.submit(f"t{i}", prompts[i], GREEDY))
        results[i] = outs

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    async def consume(i):
        return [o async for o in d.submit(f"a{i}", prompts[i], GREEDY)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(consume(2), consume(3)), LIMIT_S)

    for i, outs in zip((2, 3), asyncio.run(main())):
        results[i] = outs
    for t in threads:
        t.join(LIMIT_S)
        assert not t.is_alive(), "a thread's stream did not end"
    for i, outs in results.items():
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].token_ids == reference(model, prompts[i], 4)
        assert sum((o.outputs[0].new_token_ids for o in outs), []) == outs[-1].outputs[0].token_ids
    # idle: the thread waits on its condition instead of stepping
    steps = d.engine.step_times["steps"]
    time.sleep(0.3)
    assert d.engine.step_times["steps"] == steps and d.healthy


def test_bad_request_raises_in_the_caller_and_others_continue(driver):
    model, d = driver
    stream = d.submit("ok", case([], 5), SamplingParams(temperature=0.0, max_tokens=6))
    with pytest.raises(ContextLengthError):
        d.submit("bad", {"prompt_token_ids": [5] * 5000}, GREEDY)
    assert bounded(stream.result).outputs[0].finish_reason == "length" and d.healthy


def test_abort_ends_the_stream_and_frees_blocks(driver):
    _, d = driver
    stream = d.submit("long", case([(500, 316)], 6), SamplingParams(temperature=0.0, max_tokens=3000 - 1500,
                                                                   ignore_eos=True))
    it = iter(stream)
    bounded(next, it)
    d.abort("long")
    last = bounded(list, it)[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    deadline = time.time() + 5
    while d.stats()["kv_blocks_used"] and time.time() < deadline:
        time.sleep(0.01)
    assert d.stats()["kv_blocks_used"] == 0


def test_engine_fault_ends_every_stream_and_refuses_new_work(tiny_pair, monkeypatch):
    model, _ = tiny_pair("mistral")
    engine = LLMEngine(model, None, max_model_len=4096)
    d = AsyncEngine(engine)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(engine, "step", broken)
    streams = [d.submit(f"r{i}", case([], i), GREEDY) for i in range(3)]
    for s in streams:
        with pytest.raises(EngineDeadError):
            bounded(list, s)
    assert not d.healthy
    with pytest.raises(EngineDeadError):
        d.submit("later", case([], 9), GREEDY)
    d.shutdown()
