"""The chat page's rendering in a real headless Chromium (Debian's /usr/bin/chromium through Playwright), served
by the real app with no model loaded (so fast): what the page does with what the server sends.

- Markdown becomes elements (headings, emphasis, inline code, safe links, nested and numbered lists, tables with
  alignment, fenced code with its language, quotes): markdown.js imported by the page itself.
- An image over 1344 px is downscaled in the browser (to 1344 px, JPEG); a thumbnail can be removed.
- The server's own 503 (here: the model is still loading) is shown as a readable message, and so is an error
  event in the middle of a stream (the partial text is kept); the stream for the latter comes from Playwright's
  network interception, in the exact form serving_chat.py sends.
- When localStorage is full, the conversation is still saved, without its images, and the page says so.
Every test ends with no unexpected console error and no dialog.
"""

from __future__ import annotations

import json
import shutil

import chat_page_fixtures as pf
import pytest

pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
if not shutil.which(pf.CHROMIUM):
    pytest.skip(f"the browser tests need {pf.CHROMIUM} (apt-get install chromium chromium-driver; .ci/run does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    served = pf.PageServer()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def tab(browser, server):
    t = pf.Tab(browser, server.url + "/")
    try:
        yield t
    finally:
        t.close()


def test_server_503_is_shown(tab):
    assert tab.page.inner_text("#model-name") == "tiny-llava"
    tab.ask("Hello")
    tab.wait_answer(2)
    assert tab.page.inner_text(".msg.assistant .error") == (
        "Error 503 (server_loading): the server is loading; retry later")
    tab.check(r"status of 503")


def test_large_image_is_downscaled_in_the_browser(tab):
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 1600, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:1200, None], np.full((1, 1), 128, np.uint8)), -1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    tab.page.set_input_files("#file-input", files=[{"name": "big.png", "mimeType": "image/png",
                                                    "buffer": buf.getvalue()}])
    img = tab.page.wait_for_selector("#attachments .thumb img")
    tab.page.wait_for_function("() => document.querySelector('#attachments .thumb img').complete")
    src, size = img.evaluate("i => [i.src.slice(0, 23), [i.naturalWidth, i.naturalHeight]]")
    assert src == "data:image/jpeg;base64," and size == [1344, 1008]
    tab.page.click("#attachments .thumb button")
    assert tab.page.locator("#attachments .thumb").count() == 0
    tab.check()


MARKDOWN = """## Title *here*
Some **bold**, _italic_, ~~old~~ and `x < y` with [a link](https://example.com/a?b=1).

- one
- two
  - nested
3. three
4. four

| left | right |
|:-----|------:|
| `a`  | **b** |

```python
print("<hi>")
```
> quoted"""


def test_markdown_renders_as_elements(tab):
    tree = tab.page.evaluate("""async (text) => {
        const { render } = await import("/ui/markdown.js");
        const box = document.createElement("div");
        box.append(render(text));
        const q = (s) => [...box.querySelectorAll(s)];
        return {
            tags: [...box.children].map((n) => n.tagName), h2: q("h2")[0].textContent, em: q("em").map((n) => n.textContent),
            strong: q("strong").map((n) => n.textContent), del: q("del")[0].textContent, code: q("p code")[0].textContent,
            href: q("a")[0].href, rel: q("a")[0].rel, items: q("ul > li").length, nested: q("li > ul > li")[0]?.textContent,
            start: q("ol")[0].start, th: q("th").map((n) => n.textContent), align: q("td")[1].style.textAlign,
            pre: q("pre code")[0].textContent, lang: q("pre code")[0].className, quote: q("blockquote p")[0].textContent,
        };
    }""", MARKDOWN)
    assert tree["tags"] == ["H2", "P", "UL", "OL", "TABLE", "PRE", "BLOCKQUOTE"]
    assert tree["h2"] == "Title here" and tree["em"] == ["here", "italic"] and tree["strong"] == ["bold", "b"]
    assert tree["del"] == "old" and tree["code"] == "x < y" and tree["href"] == "https://example.com/a?b=1"
    assert "noopener" in tree["rel"] and tree["items"] == 3 and tree["nested"] == "nested" and tree["start"] == 3
    assert tree["th"] == ["left", "right"] and tree["align"] == "right"
    assert tree["pre"] == 'print("<hi>")' and tree["lang"] == "lang-python" and tree["quote"] == "quoted"
    tab.check()


def test_error_event_mid_stream_is_shown(tab):
    """The server's own mid-stream error event (as sent when it shuts down) keeps the partial text, shows why."""
    shutdown = {"error": {"message": "the server is shutting down; the stream was ended early",
                          "type": "service_unavailable", "param": None, "code": "server_shutdown"}}
    delta = {"choices": [{"index": 0, "delta": {"content": "Partial"}, "finish_reason": None}]}
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=f"data: {json.dumps(delta)}\n\ndata: {json.dumps(shutdown)}\n\ndata: [DONE]\n\n"))
    tab.ask("Hi")
    tab.wait_answer(2)
    assert tab.page.inner_text(".msg.assistant .body") == "Partial"
    assert tab.page.inner_text(".msg.assistant .error") == (
        "Error (server_shutdown): the server is shutting down; the stream was ended early")
    tab.check()




def test_full_storage_drops_images_not_the_conversation(tab):
    from server_fixtures import png_bytes

    filled = tab.page.evaluate("""() => {  // fill localStorage until fewer than 2,000 characters are left
        let size = 1 << 24, total = 0;
        for (let i = 0; size >= 2000; i++) {
            try { localStorage.setItem("filler" + i, "x".repeat(size)); total += size; } catch { size >>= 1; }
        }
        return total;
    }""")
    assert filled > 1_000_000
    image = png_bytes(120, 160, seed=9)  # ~77 kB as a data: URL, more than the space left
    tab.page.set_input_files("#file-input", files=[{"name": "a.png", "mimeType": "image/png", "buffer": image}])
    tab.page.wait_for_selector("#attachments .thumb img")
    tab.ask("Keep this")
    tab.wait_answer(2)
    assert tab.page.inner_text("#status") == "browser storage is full: 1 image(s) not kept, oldest conversations first"
    assert "images not kept" in tab.page.inner_text(".msg.user .images")
    user = tab.messages()[0]
    assert user["text"] == "Keep this" and user["images"] == [] and user["imagesDropped"] is True
    tab.check(r"status of 503")
