"""An engine fault: the request in flight gets a 5xx (a streamed one an error event and `[DONE]`), `/health`
turns 503, later requests get 503 with Retry-After, and no traceback reaches a client."""

from __future__ import annotations

import json

import httpx
from server_fixtures import MODEL, ThreadServer, full_checkpoint, wait_until


def test_engine_fault_turns_health_503(tiny_checkpoint, tiny_root):
    s = ThreadServer(full_checkpoint(tiny_checkpoint, tiny_root))
    try:
        url = s.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500,
                "temperature": 0, "ignore_eos": True, "stream": True}
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200
        engine = s.llm.llm_engine
        real_step, calls = engine.step, []

        def failing_step():
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("simulated device fault /secret/path")
            return real_step()

        engine.step = failing_step
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error" and "secret" not in json.dumps(error)
        assert wait_until(lambda: httpx.get(s.url + "/health", timeout=5).status_code == 503, 2)
        late = httpx.post(url, json={**body, "stream": False}, timeout=10)
        assert late.status_code == 503 and late.headers.get("retry-after")
        assert set(late.json()["error"]) == {"message", "type", "param", "code"} and "Traceback" not in late.text
        assert s.metrics()["llava_next_engine_healthy"] == 0
    finally:
        s.stop()
