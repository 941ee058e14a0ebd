"""The server as a process (`llava-next serve` in a subprocess) and the import arrows of the server package.

- /health is 503 until the model is loaded, then 200; `--served-model-name` names the model.
- SIGTERM with streams in flight: new requests get 503 at once, a short stream finishes normally, long streams
  end with an error event and `data: [DONE]` before the deadline, and the process exits 0 within
  `--shutdown-timeout` (plus a margin for the interpreter's exit).
- Bad flags end with one line on stderr and exit 1.
- `llava_next.entrypoints.openai` never imports `llava_next.generation` or `llava_next.compat` (AST closure
  over the package's own imports), and `import llava_next` / the CLI module do not import fastapi.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from server_fixtures import full_checkpoint, wait_until

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, *flags):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llava_next.entrypoints.cli", "serve", str(folder), "--port",
                             str(port), "--served-model-name", "srv", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def health(url) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def stream_body(max_tokens):
    return {"model": "srv", "messages": [{"role": "user", "content": "Tell me everything"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}


def test_sigterm_with_streams_in_flight_exits_zero(tiny_checkpoint, tiny_root):
    folder = full_checkpoint(tiny_checkpoint, tiny_root)
    proc, url = start(folder, "--shutdown-timeout", "6")
    try:
        statuses = []
        assert wait_until(lambda: statuses.append(health(url)) or statuses[-1] == 200, 60, 0.05), proc.stderr.read()
        assert 503 in statuses or None in statuses  # listening before the model was loaded, or not yet up
        results = {}

        def run_stream(name, max_tokens):
            lines = []
            with httpx.stream("POST", url + "/v1/chat/completions", json=stream_body(max_tokens), timeout=30) as r:
                results[name + "-status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
            results[name] = lines

        threads = [threading.Thread(target=run_stream, args=(f"long{i}", 5000)) for i in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: all(f"long{i}-status" in results for i in range(2)), 20)
        short = threading.Thread(target=run_stream, args=("short", 12))
        short.start()
        assert wait_until(lambda: "short-status" in results, 20)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(url + "/v1/chat/completions", json={**stream_body(3), "stream": False}, timeout=5)
        assert late.status_code == 503 and late.headers.get("retry-after")
        assert health(url) in (503, None)
        code = proc.wait(timeout=20)
        elapsed = time.monotonic() - signalled
        for t in [*threads, short]:
            t.join(10)
        assert code == 0, proc.stderr.read()[-2000:]
        assert elapsed < 6 + 4, elapsed  # the timeout, plus a margin for a loaded machine
        assert results["short"][-1] == "data: [DONE]"
        assert json.loads(results["short"][-2][6:])["choices"][0]["finish_reason"] == "length"
        for i in range(2):
            lines = results[f"long{i}"]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][6:])["error"]["code"] == "server_shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_bad_flags_are_one_line_errors(tiny_checkpoint, tiny_root, tmp_path, capsys):
    from llava_next.entrypoints import cli

    folder = full_checkpoint(tiny_checkpoint, tiny_root)
    capsys.readouterr()
    for flags in (["--tensor-parallel-size", "2"], ["--chat-template", str(tmp_path / "missing.jinja")],
                  ["--allowed-local-media-path", str(tmp_path / "nope")], ["--max-queued-requests", "-1"],
                  ["--shutdown-timeout", "0"], ["--port", "70000"]):
        assert cli.main(["serve", str(folder), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("llava-next: error:") and err.count("\n") == 1, err
    proc, _ = start(tmp_path / "no-such-model")  # the load fails in the server process: one line, exit 1
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1 and "Traceback" not in err and "could not load" in err, err


# ---------------------------------------------------------------------- arrows


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_server_never_reaches_generation_or_compat():
    start = [f"llava_next.entrypoints.openai.{p.stem}" for p in (ROOT / "llava_next/entrypoints/openai").glob("*.py")]
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        for imported in _imports(path):
            if imported.startswith("llava_next"):
                todo.append(imported)
    bad = sorted(n for n in seen if n.startswith(("llava_next.generation", "llava_next.compat"))
                 and _module_file(n) is not None)
    assert not bad, f"the server reaches {bad}"
    assert "llava_next.entrypoints.llm" in seen  # the check does follow the engine (LLM, over engine/)


def test_fastapi_is_imported_lazily():
    code = ("import sys, llava_next, llava_next.entrypoints.cli as c; c.build_parser(); "
            "print('fastapi' in sys.modules or 'uvicorn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.stdout.strip() == "False", out.stderr
