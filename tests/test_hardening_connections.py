"""Issue 22, connections and streams: slowloris, a client that never reads, SIGTERM with such a client.

- Slowloris: a connection whose headers never finish is closed after `header_timeout`; a body that trickles
  gets 408 after `body_timeout`; beyond `limit_concurrency` open connections uvicorn answers 503, and once
  the slow ones are closed a good request is served.
- A stream whose client never reads: the engine's outputs for it are coalesced (one pending output however
  many steps pass: AsyncEngine, no server), and the server aborts its engine request after `send_timeout`.
- Shutdown (uvicorn's exit path, as after SIGTERM) with such a client in flight takes less than
  `shutdown_timeout`, not twice it.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_fixtures import MODEL, ThreadServer, full_checkpoint, wait_until

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tiny_root):
    return full_checkpoint(tiny_checkpoint, tiny_root)


def raw_connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """(True, what came) when the server closes the connection within `within` seconds."""
    sock.settimeout(within)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, data
            data += chunk
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data


def request_bytes(payload: dict, port: int) -> bytes:
    data = json.dumps(payload).encode()
    return (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def test_slowloris_headers_body_and_connection_cap(folder):
    s = ThreadServer(folder, header_timeout=1.0, body_timeout=1.0, limit_concurrency=4)
    socks = []
    try:
        slow = raw_connect(s.port)  # headers that never end
        socks.append(slow)
        slow.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".encode())
        closed, _ = closed_by_server(slow, 8)
        assert closed, "a connection with unfinished headers was kept open"
        silent = raw_connect(s.port)  # connects and sends nothing
        socks.append(silent)
        assert closed_by_server(silent, 8)[0]

        trickle = raw_connect(s.port)  # complete headers, a body that never arrives: 408
        socks.append(trickle)
        trickle.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        "Content-Length: 100\r\n\r\n{\"mod".encode())
        closed, data = closed_by_server(trickle, 8)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]

        held = [raw_connect(s.port) for _ in range(4)]  # four idle connections fill limit_concurrency=4
        socks.extend(held)
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert wait_until(lambda: httpx.get(s.url + "/health", timeout=5).status_code == 503, 5)
        for sock in held:  # the header deadline frees them
            assert closed_by_server(sock, 8)[0]
        good = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
        assert wait_until(lambda: httpx.post(s.url + CHAT, json=good, timeout=30).status_code == 200, 5)
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def test_unread_stream_outputs_are_coalesced(folder):
    from llava_next import LLM, SamplingParams
    from llava_next.engine.driver import AsyncEngine

    llm = LLM(str(folder), dtype="float32", device="cpu")
    engine = AsyncEngine(llm.llm_engine)
    try:
        params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
        stream = engine.submit("slow-reader", llm.llm_engine.prepare("Tell me a long story", params))
        assert wait_until(lambda: stream.finished, 60)
        assert len(stream._items) <= 2  # one coalesced output and the end marker, not one per step
        outputs = list(stream)
        pieces = [t for out in outputs for t in out.outputs[0].new_token_ids]
        assert len(pieces) == 120 and pieces == outputs[-1].outputs[0].token_ids
        assert "".join(out.outputs[0].new_text for out in outputs) == outputs[-1].outputs[0].text
    finally:
        engine.shutdown()


def never_reading_stream(port: int, max_tokens: int) -> socket.socket:
    """A client that asks for a large stream (top-20 logprobs per token: KBs per event) and never reads."""
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything"}],
               "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": True,
               "top_logprobs": 20}
    sock = raw_connect(port, rcvbuf=4096)
    sock.sendall(request_bytes(payload, port))
    return sock


def test_a_client_that_never_reads_is_aborted_after_the_send_timeout(folder):
    s = ThreadServer(folder, send_timeout=1.0)
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # accepted sockets inherit it
    aborted = []
    real_abort = s.engine.abort
    s.engine.abort = lambda request_id: (aborted.append(request_id), real_abort(request_id))
    sock = None
    try:
        sock = never_reading_stream(s.port, 3000)
        assert wait_until(lambda: s.metrics()["llava_next_num_requests_running"] == 1, 20)
        assert wait_until(lambda: aborted, 60), "the unread stream was never aborted"
        assert wait_until(lambda: s.metrics()["llava_next_num_requests_running"] == 0
                          and s.metrics()["llava_next_num_requests_admitted"] == 0, 5)
        assert s.engine.healthy
    finally:
        if sock is not None:
            sock.close()
        s.stop()


def test_shutdown_with_a_never_reading_client_stays_within_the_timeout(folder):
    s = ThreadServer(folder, shutdown_timeout=4.0, send_timeout=60.0)
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # accepted sockets inherit it
    sock = None
    try:
        sock = never_reading_stream(s.port, 3000)
        engine = s.llm.llm_engine

        def generated() -> int:
            groups = list(engine.groups.values())
            return groups[0].seqs[0].num_output_tokens if groups else 0

        # 200 tokens of top-20 logprobs are ~700 KB: far more than the socket buffers and uvicorn's 64 KB, so
        # the server's send is waiting on a client that never reads
        assert wait_until(lambda: generated() >= 200, 60)
        start = time.monotonic()
        s.stop(timeout=30)  # uvicorn's exit path: the same drain and shutdown as SIGTERM
        elapsed = time.monotonic() - start
        assert not s.thread.is_alive()
        assert elapsed < 4 + 1.0, elapsed  # before: the drain, then uvicorn's own full timeout again (~7 s)
    finally:
        if sock is not None:
            sock.close()
        s.stop()
