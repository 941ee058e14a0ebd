"""The chat page's HTTP side, in process (no model, no browser): routes, headers, the API-key guard's exemption.

- `/` and `/ui/<file>` answer without the key, with a strict Content-Security-Policy (no inline script or style,
  no remote origin), `X-Content-Type-Options: nosniff` and no CORS header, also for a cross-origin request.
- Only the page's own files are exempt: other `/ui/` names, POST `/`, the API and /metrics still need the key.
- `build_app(state, ui=False)` (what `--no-ui` does) serves no page: 404 at `/` and `/ui/app.js`; the CLI
  parses `--no-ui`.
- The files named in `ui.FILES` exist and are declared as package data in pyproject.toml (so a wheel ships them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

from llava_next.entrypoints.openai import api_server, ui

KEY = "k-123"
ROOT = Path(__file__).resolve().parents[1]


def client(ui_on=True, key=KEY):
    return TestClient(api_server.build_app(api_server.ServerState(["m"], api_key=key), ui=ui_on))


def test_page_headers_without_key():
    c = client()
    r = c.get("/", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'", "base-uri 'none'"):
        assert directive in csp
    assert "unsafe" not in csp and "http" not in csp and "*" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert not [h for h in r.headers if h.startswith("access-control-")]
    assert '<script type="module" src="/ui/app.js">' in r.text and "<script>" not in r.text and "style=" not in r.text
    for name, kind in ui.FILES.items():
        asset = c.get("/ui/" + name)
        assert asset.status_code == 200 and asset.headers["content-type"] == kind
        assert asset.headers["content-security-policy"] == csp and asset.headers["x-content-type-options"] == "nosniff"


def test_only_the_page_is_exempt_from_the_key():
    c = client()
    assert c.get("/ui/nope.js").status_code == 401
    assert c.get("/ui/../api_server.py").status_code in (401, 404)
    assert c.post("/", json={}).status_code == 401
    assert c.get("/v1/models").status_code == 401 and c.get("/metrics").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    pre = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert not [h for h in pre.headers if h.startswith("access-control-")]
    assert client(key=None).get("/ui/nope.js").status_code == 404


def test_no_ui_serves_no_page():
    c = client(ui_on=False, key=None)
    assert c.get("/").status_code == 404 and c.get("/ui/app.js").status_code == 404
    assert client(ui_on=False).get("/").status_code == 401  # with a key, an unknown route is 401 as before
    from llava_next.entrypoints.cli import build_parser

    assert build_parser().parse_args(["serve", "m", "--no-ui"]).no_ui is True
    assert build_parser().parse_args(["serve", "m"]).no_ui is False


def test_files_ship_as_package_data():
    assert (ui.FOLDER / "index.html").is_file() and all((ui.FOLDER / n).is_file() for n in ui.FILES)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    line = re.search(r'^"llava_next\.entrypoints\.openai\.ui" = (\[.*\])$', section, re.MULTILINE)
    patterns = json.loads(line.group(1))
    for name in ["index.html", *ui.FILES]:
        assert any(Path(name).match(p) for p in patterns), name
