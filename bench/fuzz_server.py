"""Fuzz `llava-next serve` with schemathesis on the server's own OpenAPI schema (issue 22's done-when).

    python bench/fuzz_server.py MODEL_DIR [--minutes 10] [--out bench/logs/fuzz] [--max-model-len 1024]

1. The schema comes from the app object: FastAPI's `app.openapi()` of `api_server.build_app`. Routes that parse
   their body themselves (the server reads and validates bodies off the event loop) get the protocol models'
   JSON schemas (`ChatCompletionRequest`, `CompletionRequest`) as their request bodies, where the schema does
   not already carry one.
2. `llava-next serve MODEL_DIR` starts in a subprocess on 127.0.0.1 (a free port), with `--max-model-len` so a
   fuzzed max_tokens cannot ask for minutes of generation.
3. `schemathesis run` for `--minutes` (all phases, one worker, the `not_a_server_error` check and
   `--max-response-time 5`; the schema's 4xx are documented, refusals are the point), writing a HAR file;
   meanwhile /health is polled every second.
4. Counts printed as one JSON line: requests, 5xx, responses slower than 5 s, engine deaths (/health not 200
   while the server runs, or "engine" faults in its log), schemathesis' own failure summary.

A bench script (schemathesis is in the dev extra only); never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def openapi_schema() -> dict:
    from llava_next.entrypoints.openai import api_server
    from llava_next.entrypoints.openai import protocol as P

    guard = api_server.build_app(api_server.ServerState(["fuzz"]))
    schema = guard.app.openapi()
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", P.ChatCompletionRequest), ("/v1/completions", P.CompletionRequest)):
        op = schema["paths"][path]["post"]
        error = {"description": "an OpenAI error body", "content": {"application/json": {"schema": {"type": "object"}}}}
        for status in ("400", "401", "404", "408", "413", "415", "503"):  # the codes of RELIABILITY.md
            op.setdefault("responses", {}).setdefault(status, error)
        if "requestBody" in op:
            continue
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return schema


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "logs" / "fuzz"))
    parser.add_argument("--max-model-len", type=int, default=128)  # bounds one generation's length
    parser.add_argument("--seed", type=int, default=22)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "openapi.json").write_text(json.dumps(schema := openapi_schema(), indent=1))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "server.log", "w")  # noqa: SIM115 (closed after the server stops)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "llava_next.entrypoints.cli", "serve", args.model, "--port",
                               str(port), "--served-model-name", "fuzz", "--max-model-len", str(args.max_model_len),
                               "--log-level", "info"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    unhealthy, stop = [], threading.Event()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not become healthy")

        def watch():
            while not stop.wait(1.0):
                try:
                    code = httpx.get(url + "/health", timeout=5).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                if code != 200:
                    unhealthy.append((round(time.monotonic(), 1), code))

        threading.Thread(target=watch, daemon=True).start()
        har = out / "fuzz.har"
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", str(out / "openapi.json"), "--url", url,
               "--max-time", str(int(args.minutes * 60)), "--workers", "1", "--max-response-time", "5",
               "--checks", "not_a_server_error",
               "--request-timeout", "60", "--seed", str(args.seed), "--continue-on-failure", "--report", "har",
               "--report-har-path", str(har), "--no-color"]
        started = time.monotonic()
        run = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=args.minutes * 60 + 600,
                             check=False)  # cwd: schemathesis keeps its .schemathesis/ folder there
        elapsed = time.monotonic() - started
        (out / "schemathesis.txt").write_text(run.stdout + run.stderr)
        entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
        statuses = [e["response"]["status"] for e in entries]
        slow = [(round(e["time"] / 1000, 1), e["response"]["status"], (e["request"].get("postData") or {})
                 .get("text", "")[:300]) for e in entries if e.get("time", 0) > 5000]
        final = httpx.get(url + "/health", timeout=5).status_code
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    server_log = (out / "server.log").read_text(errors="replace")
    summary = [line for line in (run.stdout or "").splitlines() if "passed" in line or "failed" in line][-3:]
    result = {"minutes": round(elapsed / 60, 2), "requests": len(entries), "status_5xx": sum(s >= 500 for s in statuses),
              "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
              "slower_than_5s": len(slow), "slow": slow[:5], "health_not_200": len(unhealthy), "final_health": final,
              "engine_faults_logged": server_log.count("the engine stopped") + server_log.count("engine fault"),
              "server_exit": server.returncode, "schemathesis_rc": run.returncode, "schemathesis_summary": summary,
              "operations": sorted(schema["paths"])}
    print(json.dumps(result))
    (out / "counts.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
