"""The chat page of `llava-next serve`: static files shipped in this folder, served at `/` and `/ui/<file>`.

`index.html` (markup), `app.css`, and the ES modules `app.js` (conversation state, composer, settings),
`attach.js` (images from the file picker, paste and drag and drop; downscaled above 1344 px), `chat.js`
(the streaming `/v1/chat/completions` client: fetch + ReadableStream SSE parsing, AbortController),
`markdown.js` (a safe Markdown renderer: DOM nodes with textContent only, never HTML from the model) and
`store.js` (conversations in localStorage). No CDN, no build step: the browser loads these files as they are.

`mount(app)` adds the routes; the files are read once, at mount. Every answer carries a strict
Content-Security-Policy (scripts, styles and fetches from this origin only, images also from data:/blob: URLs for
attachments, no framing, no inline script or style), `X-Content-Type-Options: nosniff`, `Referrer-Policy:
no-referrer`, and no CORS header. `is_public(path)` says which paths the server's API-key guard lets through: the
page and its files hold no secret (the key is typed into the page and sent by it to the API, which still checks it).

Leaves out: gzip, ETags (the files are small; `Cache-Control: no-cache` makes the browser revalidate), themes.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
SCRIPTS = ("app.js", "attach.js", "chat.js", "markdown.js", "store.js")
FILES = {"app.css": "text/css; charset=utf-8", **dict.fromkeys(SCRIPTS, "text/javascript; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def is_public(path: str) -> bool:
    """The page's own paths (no key needed to load the page; the API it calls still needs one)."""
    return path == "/" or (path.startswith("/ui/") and path[4:] in FILES)


def mount(app) -> None:
    """GET `/` (the page) and GET `/ui/<file>` (its CSS and scripts) on a FastAPI app."""
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    page = (FOLDER / "index.html").read_bytes()
    assets = {name: ((FOLDER / name).read_bytes(), kind) for name, kind in FILES.items()}

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in assets:
            raise HTTPException(404)
        body, kind = assets[name]
        return Response(body, media_type=kind, headers=HEADERS)
