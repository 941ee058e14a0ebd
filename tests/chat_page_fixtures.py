"""Helpers for the chat page's browser tests: the real `llava-next serve` in a subprocess, Debian's Chromium
driven by Playwright, and page helpers.

`serve(folder, *flags)`: the CLI server on 127.0.0.1 at a free port, stopped by its pid (SIGTERM, then SIGKILL).
`browser()`: Playwright's Chromium launched from /usr/bin/chromium (Debian's package; `playwright install`
cannot download here) headless with networking extras off. `Tab`: one page in a fresh context (own
localStorage) that records console errors, page errors and dialogs; `.check()` fails on any not expected.

Leaves out: other browsers.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server_fixtures import AppThread

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STORE = "llava-next-chat/conversations/v1"
KEY_ITEM = "llava-next-chat/api-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, folder, *flags, name="tiny-llava", key=None):
        port = free_port()
        self.url, self.key, self.name = f"http://127.0.0.1:{port}", key, name
        args = [sys.executable, "-m", "llava_next.entrypoints.cli", "serve", str(folder), "--host", "127.0.0.1",
                "--port", str(port), "--served-model-name", name, "--dtype", "float32", "--device", "cpu", *flags]
        if key:
            args += ["--api-key", key]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)

    def wait(self, status=200, timeout=90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited: " + self.proc.stderr.read()[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not get ready in time")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def chat(self, messages, **params) -> httpx.Response:
        body = {"model": self.name, "messages": messages, **params}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=self.headers(), timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=5).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc.stderr.close()


def status(url) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


class Tab:
    """A page in its own browser context; `expected` console errors match these regexes (e.g. a 400 fetch)."""

    def __init__(self, browser, url, key=None, viewport=None):
        self.context = browser.new_context(viewport=viewport or {"width": 1100, "height": 800}, accept_downloads=True)
        if key:
            self.context.add_init_script(f"sessionStorage.setItem({KEY_ITEM!r}, {key!r})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.errors, self.dialogs = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url)
        self.page.wait_for_function("() => document.querySelector('#model-name').textContent !== '\u2026'")

    def settings(self, **values) -> None:
        page = self.page
        if page.locator("#settings").is_hidden():
            page.click("#toggle-settings")
        for name, value in values.items():
            page.fill("#" + name.replace("_", "-"), str(value))
        page.click("#toggle-settings")

    def ask(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_answer(self, count: int) -> None:
        """Until the conversation holds `count` messages and nothing streams."""
        self.page.wait_for_function(
            "([n]) => document.querySelectorAll('#messages .msg').length === n"
            " && !document.querySelector('#stop:not([hidden])')",
            arg=[count])

    def stored(self) -> dict:
        return self.page.evaluate(f"JSON.parse(localStorage.getItem({STORE!r}))")

    def messages(self) -> list[dict]:
        data = self.stored()
        return next(c for c in data["conversations"] if c["id"] == data["current"])["messages"]

    def check(self, *expected: str) -> None:
        unexpected = [e for e in self.errors if not any(re.search(p, e) for p in expected)]
        assert not unexpected, unexpected
        assert not self.dialogs, self.dialogs

    def close(self) -> None:
        self.context.close()


def greedy(server, messages, max_tokens, **params):
    r = server.chat(messages, **{"temperature": 0, "top_p": 1, "max_tokens": max_tokens, **params})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def sampled(server, messages, max_tokens, seed):
    """The tiny checkpoint's greedy answer is one token repeated whatever the input; a seeded sample at
    temperature 1 depends on the logits, so it tells images and prompts apart."""
    return greedy(server, messages, max_tokens, temperature=1, seed=seed)


def chat_200(server):
    return server.metrics().get('llava_next_requests_total{endpoint="/v1/chat/completions",status="200"}', 0)


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class PageServer(AppThread):
    """The real app and uvicorn in a thread with no model attached (phase "loading"): the page and /v1/models
    answer, POSTs get the server's own 503. For tests of the page's rendering."""

    def __init__(self, name="tiny-llava"):
        from llava_next.entrypoints.openai import api_server

        self.state = api_server.ServerState([name])
        self._serve()
