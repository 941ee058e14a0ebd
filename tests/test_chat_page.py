"""The chat page of `llava-next serve`, driven in a real headless Chromium (Debian's /usr/bin/chromium through
Playwright) against the real CLI server on the tiny checkpoint, behind `--api-key`.

- An image uploaded with the file picker and a question: the streamed answer equals the server's own greedy
  answer for the same messages (a direct /v1/chat/completions call, temperature 0); usage and tokens/s shown.
  The tiny random checkpoint's greedy answer is one token repeated whatever the input, so the page's answer is
  also compared with a seeded sample (temperature 1, the page's Seed setting), which a different image changes.
- Paste and drag-and-drop attach images (several per message, the exact bytes sent).
- Stop (Escape) mid-stream: the server's running count and admitted slots drop back to 0 and no request finishes.
- Regenerate, edit-and-resend, a reload keeps the conversation, new/delete/export JSON.
- Errors: an over-long prompt shows the server's context-length message (400), an over-large body its 413.
- The API key: the page loads without it, the API answers 401 (shown), then works once the key is entered.
- XSS: the model's text (and an error message) carrying `<img src=x onerror=...>`, `<script>` and a
  `javascript:` link is shown as text, no such element is created and no dialog opens. The tiny random
  checkpoint cannot be made to emit a given string, so Playwright's network interception stands in for the
  server's stream in that test (the page's code path is the same: fetch -> SSE parser -> Markdown renderer);
  the user's own message with the same payload goes to the real server.
- The CLI serves the page (no key needed; the API still needs it); `--no-ui` serves no page (404 at /);
  a phone-sized viewport works; Shift+Enter adds a line, Enter sends. Every test ends with no unexpected
  console error. Markdown, downscaling, 503 and stream errors: test_chat_page_render.py; headers, CSP and the
  key's exemption: test_chat_page_http.py.

Set LLAVA_NEXT_CHAT_SCREENSHOT=PATH to save a screenshot of the finished conversation of the first test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import chat_page_fixtures as pf
import httpx
import pytest
from server_fixtures import full_checkpoint, image_message, png_bytes, wait_until

pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
if not shutil.which(pf.CHROMIUM):
    pytest.skip(f"the browser tests need {pf.CHROMIUM} (apt-get install chromium chromium-driver; .ci/run does)",
                allow_module_level=True)

KEY = "s3cret-key"
LOADED = r"status of (400|401|413)"  # Chromium logs every non-2xx fetch as a console error


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_root):
    folder = full_checkpoint(tiny_checkpoint, tiny_root)
    served = pf.Served(folder, "--max-model-len", "4096", "--max-request-bytes", "1000000", "--max-num-seqs", "4",
                    key=KEY)
    try:
        served.wait()
        yield served
    finally:
        served.stop()


@pytest.fixture
def tab(browser, server):
    t = pf.Tab(browser, server.url + "/", key=KEY)
    try:
        yield t
    finally:
        t.close()


def test_upload_and_ask_streams_the_greedy_answer(tab, server):
    png = png_bytes(40, 56, seed=3)
    tab.settings(temperature=0, max_tokens=24)
    tab.page.set_input_files("#file-input", files=[{"name": "a.png", "mimeType": "image/png", "buffer": png}])
    tab.page.wait_for_selector("#attachments .thumb img")
    question = "What is shown in this image?"
    tab.ask(question)
    tab.wait_answer(2)
    user, answer = tab.messages()
    assert user["images"] == [pf.data_url(png)] and user["text"] == question
    expected = pf.greedy(server, image_message(question, pf.data_url(png)), 24)
    assert expected and answer["text"] == expected
    assert answer["meta"]["usage"]["completion_tokens"] == 24 and answer["meta"]["tps"] > 0
    meta = tab.page.inner_text(".msg.assistant .meta")
    assert "24 completion tokens" in meta and "tokens/s" in meta
    assert tab.page.locator(".msg.user .images img").count() == 1
    assert tab.page.inner_text("#model-name") == "tiny-llava"
    tab.settings(temperature=1, seed=7)
    tab.page.click(".msg.assistant button:has-text('Regenerate')")
    tab.wait_answer(2)
    text = tab.messages()[1]["text"]
    assert text == pf.sampled(server, image_message(question, pf.data_url(png)), 24, seed=7)
    other = pf.data_url(png_bytes(40, 56, seed=4))
    assert text != pf.sampled(server, image_message(question, other), 24, seed=7)  # the image changes the answer
    if os.environ.get("LLAVA_NEXT_CHAT_SCREENSHOT"):
        tab.page.click("#toggle-settings")
        tab.page.screenshot(path=os.environ["LLAVA_NEXT_CHAT_SCREENSHOT"])
    tab.check()


def test_paste_and_drop_attach_images(tab, server):
    one, two = png_bytes(20, 30, seed=5), png_bytes(32, 24, seed=6)
    file_js = "([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));" \
              " const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/png'})); return dt; }"
    pasted = tab.page.evaluate_handle(file_js, [pf.data_url(one).split(",")[1], "one.png"])
    tab.page.evaluate("(dt) => document.querySelector('#prompt').dispatchEvent("
                      "new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}))", pasted)
    tab.page.wait_for_function("() => document.querySelectorAll('#attachments .thumb').length === 1")
    dropped = tab.page.evaluate_handle(file_js, [pf.data_url(two).split(",")[1], "two.png"])
    tab.page.dispatch_event("#messages", "dragenter", {"dataTransfer": dropped})
    assert tab.page.locator("#drop-overlay").is_visible()
    tab.page.dispatch_event("#messages", "drop", {"dataTransfer": dropped})
    tab.page.wait_for_function("() => document.querySelectorAll('#attachments .thumb').length === 2")
    assert tab.page.locator("#drop-overlay").is_hidden()
    tab.settings(temperature=1, seed=3, max_tokens=6)
    tab.ask("Compare them.")
    tab.wait_answer(2)
    user, answer = tab.messages()
    assert user["images"] == [pf.data_url(one), pf.data_url(two)]
    messages = image_message("Compare them.", pf.data_url(one), pf.data_url(two))
    assert answer["text"] == pf.sampled(server, messages, 6, seed=3)
    tab.check()


def test_escape_stops_the_stream_and_frees_the_slot(tab, server):
    tab.settings(temperature=0, max_tokens=1900)
    finished = sum(v for k, v in server.metrics().items() if k.startswith("llava_next_request_finish_total"))
    tab.ask("Tell me everything")
    assert wait_until(lambda: server.metrics()["llava_next_num_requests_running"] == 1, 30)
    tab.page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20")
    tab.page.keyboard.press("Escape")
    assert wait_until(lambda: server.metrics()["llava_next_num_requests_running"] == 0, 10)
    assert wait_until(lambda: server.metrics()["llava_next_num_requests_admitted"] == 0, 10)
    tab.wait_answer(2)
    after = sum(v for k, v in server.metrics().items() if k.startswith("llava_next_request_finish_total"))
    assert after == finished  # aborted, not finished
    assert tab.page.inner_text(".msg.assistant .meta").startswith("stopped")
    assert tab.messages()[1]["meta"]["stopped"] is True
    tab.check()


def test_regenerate_edit_and_reload(tab, server):
    question = [{"role": "user", "content": "Name a color.\nJust one."}]
    tab.settings(temperature=1, seed=5, max_tokens=12)
    tab.page.click("#prompt")
    tab.page.keyboard.type("Name a color.")
    tab.page.keyboard.press("Shift+Enter")  # a new line, not a send
    tab.page.keyboard.type("Just one.")
    assert tab.page.locator(".msg").count() == 0
    tab.page.keyboard.press("Enter")
    tab.wait_answer(2)
    first = tab.messages()[1]["text"]
    assert first == pf.sampled(server, question, 12, seed=5)
    before = pf.chat_200(server)
    tab.settings(seed=6)
    tab.page.click(".msg.assistant button:has-text('Regenerate')")
    tab.wait_answer(2)
    second = tab.messages()[1]["text"]
    assert pf.chat_200(server) == before + 1 and len(tab.messages()) == 2
    assert second == pf.sampled(server, question, 12, seed=6) != first
    tab.page.click(".msg.user button:has-text('Edit')")
    tab.page.fill(".msg.user textarea.edit", "Name an animal.")
    tab.page.click("button:has-text('Save & send')")
    tab.wait_answer(2)
    user, answer = tab.messages()
    assert user["text"] == "Name an animal."
    assert answer["text"] == pf.sampled(server, [{"role": "user", "content": "Name an animal."}], 12, seed=6)
    assert answer["text"] != second  # the edited text was sent
    tab.page.reload()
    tab.page.wait_for_selector(".msg.assistant")
    assert tab.page.inner_text(".msg.user .user-text") == "Name an animal."
    assert tab.page.locator("#conversations li").count() == 1
    tab.page.click("#new-chat")
    assert tab.page.locator("#conversations li").count() == 2 and tab.page.locator(".msg").count() == 0
    with tab.page.expect_download() as download:
        tab.page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert [c["messages"] for c in exported] == [[], [user, answer]]
    tab.page.click("#conversations li.current button[aria-label^='Delete']")
    assert tab.page.locator("#conversations li").count() == 1
    tab.check()


def test_errors_show_the_server_message(tab, server):
    long_text = "word " * 5000
    tab.settings(max_tokens=8)
    tab.ask(long_text)
    tab.wait_answer(2)
    r = server.chat([{"role": "user", "content": long_text.strip()}], max_tokens=8)
    assert r.status_code == 400
    shown = tab.page.inner_text(".msg.assistant .error")
    assert shown.startswith("Error 400 (context_length_exceeded): ") and r.json()["error"]["message"] in shown
    tab.page.click("#new-chat")
    tab.page.evaluate("t => { document.querySelector('#prompt').value = t; }", "x" * 1_100_000)
    tab.page.press("#prompt", "Enter")
    tab.wait_answer(2)
    assert "Error 413" in tab.page.inner_text(".msg.assistant .error")
    assert "over the limit of 1,000,000 bytes" in tab.page.inner_text(".msg.assistant .error")
    tab.check(LOADED)


def test_api_key_flow(browser, server):
    assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401
    t = pf.Tab(browser, server.url + "/")
    try:
        assert "401" in t.page.inner_text("#status") and t.page.locator("#settings").is_visible()
        t.settings(temperature=0, max_tokens=5)
        t.ask("Hello")
        t.wait_answer(2)
        assert "Error 401" in t.page.inner_text(".msg.assistant .error")
        assert t.page.locator("#settings").is_visible()  # opened by the 401
        t.settings(api_key=KEY)  # closing the panel commits the field (its change event)
        t.page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny-llava'")
        t.page.click(".msg.assistant button:has-text('Regenerate')")
        t.wait_answer(2)
        answer = t.messages()[1]
        assert "error" not in answer
        assert answer["text"] == pf.greedy(server, [{"role": "user", "content": "Hello"}], 5)
        assert t.page.evaluate("sessionStorage.getItem('llava-next-chat/api-key')") == KEY
        assert KEY not in t.page.evaluate("JSON.stringify(localStorage)")
        t.check(LOADED)
    finally:
        t.close()


PAYLOAD = ['Look: <img src=x onerror="window.__xss=1;alert(1)"> and <scr', 'ipt>window.__xss=2</script>\n\n',
           '| a | b |\n|---|---|\n| <img src=y onerror=alert(2)> | [go](javascript:alert(3)) |\n\n',
           '```html\n<script>alert(4)</script>\n```\n# <b>done</b>']


def test_model_text_is_never_html(tab, server):
    def sse(route):
        chunks = [{"choices": [{"index": 0, "delta": {"content": part}, "finish_reason": None}]} for part in PAYLOAD]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    tab.settings(max_tokens=4)
    tab.ask('<img src=z onerror="alert(5)"><script>alert(6)</script>')  # the user's text, to the real server
    tab.wait_answer(2)
    tab.page.route("**/v1/chat/completions", sse)
    tab.page.click(".msg.assistant button:has-text('Regenerate')")
    tab.wait_answer(2)
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=400, headers={"Content-Type": "application/json"},
        body=json.dumps({"error": {"message": "bad <img src=w onerror=alert(7)>", "code": "x"}})))
    tab.page.click("#new-chat")
    tab.ask("again")
    tab.wait_answer(2)
    page = tab.page
    assert "<img src=w onerror=alert(7)>" in page.inner_text(".msg.assistant .error")
    page.click("#conversations li:nth-child(2) .open")
    page.wait_for_selector(".msg.assistant table")
    text = page.inner_text(".msg.assistant .body")
    assert '<img src=x onerror="window.__xss=1;alert(1)">' in text and "<script>window.__xss=2</script>" in text
    assert page.inner_text(".msg.user .user-text").startswith("<img src=z")
    assert page.locator("#messages img").count() == 0 and page.locator("#messages script").count() == 0
    assert page.locator("#messages b").count() == 0 and page.locator("a[href^='javascript']").count() == 0
    assert page.locator("script").count() == 1  # the page's own module
    assert page.inner_text(".msg.assistant h1") == "<b>done</b>"
    assert page.inner_text(".msg.assistant pre code") == "<script>alert(4)</script>"
    assert page.evaluate("window.__xss") is None
    time.sleep(0.2)
    tab.check(LOADED)


def test_cli_serves_the_page_and_no_ui_turns_it_off(server, tiny_checkpoint, tiny_root):
    """(Headers and the guard's exemption in detail: tests/test_chat_page_http.py.)"""
    r = httpx.get(server.url + "/", timeout=5)
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401
    plain = pf.Served(full_checkpoint(tiny_checkpoint, tiny_root), "--no-ui")
    try:
        assert wait_until(lambda: pf.status(plain.url + "/health") is not None, 60, 0.1)
        assert pf.status(plain.url + "/") == 404 and pf.status(plain.url + "/ui/app.js") == 404
    finally:
        plain.stop()


def test_phone_viewport(browser, server):
    t = pf.Tab(browser, server.url + "/", key=KEY, viewport={"width": 390, "height": 800})
    try:
        page = t.page
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
        assert not page.locator("#new-chat").is_visible() or page.evaluate(
            "document.querySelector('#sidebar').getBoundingClientRect().right") <= 0
        page.click("#toggle-sidebar")
        page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0")
        page.click("#new-chat")
        page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
        t.settings(temperature=0, max_tokens=8)
        t.ask("Hi")
        t.wait_answer(2)
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
        box = page.locator("#send").bounding_box()
        assert box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 800
        if os.environ.get("LLAVA_NEXT_CHAT_SCREENSHOT"):
            page.screenshot(path=os.environ["LLAVA_NEXT_CHAT_SCREENSHOT"].replace(".png", "-phone.png"))
        t.check()
    finally:
        t.close()
