"""Helpers for the server tests: a full tiny checkpoint, a real uvicorn server in a thread, images, clients.

`full_checkpoint(tiny_checkpoint, root)`: the tiny transformers-written Mistral weights (tests/tiny.py) plus the
hub-layout processor files of llava-v1.6-mistral (tests/processor_fixtures.py: the real Mistral tokenizer and
chat template) in one folder. `ThreadServer(folder, ...)`: the engine (llava_next.LLM's engine, fp32 CPU), an
AsyncEngine, the FastAPI app and a uvicorn.Server on 127.0.0.1 with a pre-bound free port, served from a
thread (`state_options`: ServerState's keyword settings); `.stop()` ends it through uvicorn's own exit flag
and joins the thread (bounded). `openai_client` has `max_retries=0` so no error is hidden by a retry. The pytest fixtures
`folder` and `server` (a default ThreadServer, stopped at the module's end) built on these live in conftest.py.

Leaves out: fixtures for GPU runs.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import processor_fixtures

MODEL = "tiny-llava"


def full_checkpoint(tiny_checkpoint, root: Path) -> Path:
    folder = Path(root) / "tiny-mistral-server"
    if not (folder / "model.safetensors").is_file():
        weights, _ = tiny_checkpoint("mistral")
        shutil.copytree(weights, folder, dirs_exist_ok=True)
        for path in processor_fixtures.shared_processor_folder("mistral", "hub").iterdir():
            if path.name != "config.json":
                shutil.copy(path, folder / path.name)
    return folder


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class AppThread:
    """The real app (`self.state`, set by the subclass) under uvicorn in a thread of this process, on a free
    127.0.0.1 port; stopped by uvicorn's exit flags, never by a name."""

    def _serve(self) -> None:
        from llava_next.entrypoints.openai import api_server

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = api_server.make_server(api_server.build_app(self.state), self.state, "127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        self.sock.close()


class ThreadServer(AppThread):
    def __init__(self, folder, *, api_key=None, max_num_seqs=None, max_queued_requests=64, media=None,
                 limit_mm_per_prompt=None, max_body_bytes=None, max_model_len=None, shutdown_timeout=5.0,
                 num_kv_blocks=None, **state_options):
        from llava_next.engine.driver import AsyncEngine
        from llava_next.entrypoints.llm import LLM
        from llava_next.entrypoints.openai import api_server
        from llava_next.entrypoints.openai.media import MediaPolicy

        extra = {"num_kv_blocks": num_kv_blocks} if num_kv_blocks else {}
        self.llm = LLM(str(folder), dtype="float32", device="cpu", max_num_seqs=max_num_seqs,
                       max_model_len=max_model_len, limit_mm_per_prompt=limit_mm_per_prompt, **extra)
        self.state = api_server.ServerState([MODEL], api_key, max_body_bytes or api_server.MAX_BODY_BYTES,
                                            shutdown_timeout, **state_options)
        self.engine = AsyncEngine(self.llm.llm_engine)
        self.serving = api_server.make_serving(self.engine, self.state, media=media or MediaPolicy(),
                                               max_num_seqs=self.llm.llm_engine.max_num_seqs,
                                               max_queued_requests=max_queued_requests)
        self._serve()

    def client(self, api_key="unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def async_client(self, api_key="unused", **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def metrics(self) -> dict[str, float]:
        import httpx

        headers = {"Authorization": f"Bearer {self.state.api_key}"} if self.state.api_key else {}
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=5).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values



def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

