"""Local-network safety of image fetching (issue 15, item 3): loopback listeners started here count connections.

A blocked form must open no connection at all (the listener records zero); a redirect from an allowed first hop
to a local address is refused at the second hop; DNS rebinding (a second look-up answering differently) cannot
move a checked connection; an explicit `allow_local_network=True` still loads the image. The "public" first hop
of the redirect and rebinding tests is a listener on 127.0.0.2 that the test declares public by wrapping
opting in to that one network (`FetchPolicy(allow_networks=("127.0.0.2/32",))`): the production classifier still
runs for every other address, 127.0.0.1 included.

Leaves out: real public URLs (no network here) and TLS.
"""

from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from llava_next.errors import InvalidImageError
from llava_next.preprocess import fetch as fetch_module
from llava_next.preprocess.fetch import FetchPolicy, system_resolve
from llava_next.preprocess.images import load_image

HINT = "pass allow_local_network=True to allow loopback, private and link-local addresses"


def policy(**kwargs) -> FetchPolicy:
    """load_image's default policy, plus the one 127.0.0.2 opt-in the "public" listener needs."""
    return FetchPolicy(allow_networks=("127.0.0.2/32",), timeout=3, opt_in_hint=HINT, **kwargs)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="PNG")
    return buf.getvalue()


class _Listener:
    """A loopback HTTP server that counts the connections it accepts; serves /img.png and /to?<url> redirects."""

    def __init__(self, host: str = "127.0.0.1"):
        listener = self
        self.connections = 0
        png = _png()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def setup(self):
                listener.connections += 1
                super().setup()

            def do_GET(self):
                if self.path.startswith("/to?"):
                    self.send_response(302)
                    self.send_header("Location", self.path[4:])
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def listener():
    server = _Listener()
    yield server
    server.close()


@pytest.fixture
def public_listener():
    """A listener on 127.0.0.2, the one network `policy()` opts in to."""
    server = _Listener("127.0.0.2")
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny_processor():
    from processor_fixtures import shared_processor_folder

    from llava_next.preprocess.processor import LlavaNextProcessor

    return LlavaNextProcessor.from_pretrained(shared_processor_folder("mistral", "hub"))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


HOST_FORMS = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "017700000001", "127.1", "0177.0.0.1",
              "[::ffff:7f00:1]", "[::ffff:127.0.0.1]", "0.0.0.0", "0"]


def test_every_loopback_form_is_refused_without_a_connection(listener):
    for host in HOST_FORMS:
        with pytest.raises(InvalidImageError, match="allow_local_network"):
            load_image(f"http://{host}:{listener.port}/img.png", timeout=3, connect_timeout=1)
    assert listener.connections == 0


def test_opt_in_loads_from_the_listener(listener):
    image = load_image(f"http://127.0.0.1:{listener.port}/img.png", allow_local_network=True, timeout=3)
    assert image.size == (4, 4)
    assert listener.connections == 1


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/img.png", "http://localhost:{port}/img.png",
                                    "http://2130706433:{port}/img.png", "http://[::ffff:7f00:1]:{port}/img.png"])
def test_redirect_to_a_local_address_is_refused(listener, public_listener, target):
    public = f"http://127.0.0.2:{public_listener.port}"
    assert load_image(public + "/img.png", fetch_policy=policy()).size == (4, 4)  # the first hop alone is allowed
    with pytest.raises(InvalidImageError, match="allow_local_network"):
        load_image(public + "/to?" + target.format(port=listener.port), fetch_policy=policy())
    assert public_listener.connections == 2
    assert listener.connections == 0


def test_names_resolving_to_local_addresses_are_refused(listener):
    def resolve(host, port):
        return system_resolve("127.0.0.1" if host == "innocent.example" else host, port)

    with pytest.raises(InvalidImageError, match="127.0.0.1"):
        load_image(f"http://innocent.example:{listener.port}/img.png", fetch_policy=policy(resolve=resolve))
    assert listener.connections == 0


def test_dns_rebinding_cannot_move_a_checked_connection(listener, public_listener):
    """The first look-up answers 'public', any later one loopback: one look-up per connection, and the socket
    connects to the address that was checked."""
    calls = []

    def rebinding(host, port):
        if host != "rebind.example":
            return system_resolve(host, port)
        calls.append(host)
        return system_resolve("127.0.0.2" if len(calls) == 1 else "127.0.0.1", port)

    image = load_image(f"http://rebind.example:{public_listener.port}/img.png", fetch_policy=policy(resolve=rebinding))
    assert image.size == (4, 4)
    assert calls == ["rebind.example"]
    assert public_listener.connections == 1 and listener.connections == 0


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1",
                                     "169.254.169.254", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
                                     "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::7f00:1", "fc00::1",
                                     "fd12::1", "fe80::1", "fe80::1%eth0", "ff02::1", "2002:7f00:1::1",
                                     "2002:a9fe:a9fe::1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe"])
def test_address_classes_are_blocked(address):
    assert fetch_module.blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1",
                                     "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert fetch_module.blocked_reason(address) is None


def test_processor_and_chat_template_refuse_local_urls_and_take_the_opt_in(listener, tiny_processor):
    url = f"http://127.0.0.1:{listener.port}/img.png"
    chat = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InvalidImageError, match="allow_local_network"):
        tiny_processor.apply_chat_template(chat, tokenize=True, return_dict=True)
    with pytest.raises(InvalidImageError, match="allow_local_network"):
        tiny_processor(images=[url], text="<image> hi")
    assert listener.connections == 0
    out = tiny_processor.apply_chat_template(chat, tokenize=True, return_dict=True, allow_local_network=True)
    assert "pixel_values" in out
    assert "pixel_values" in tiny_processor(images=[url], text="<image> hi", allow_local_network=True)
    assert listener.connections == 2


def test_refused_file_never_echoes_its_bytes_or_size(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_bytes(b"zq:x:0:0:SECRET-CONTENT\n" * 7)
    for source in (str(secret), secret.as_uri()):
        with pytest.raises(InvalidImageError) as info:
            load_image(source)
        message = str(info.value)
        assert "zq:x" not in message and "SECRET" not in message and "168" not in message
    with pytest.raises(InvalidImageError) as info:
        load_image(str(secret), max_bytes=10)
    assert "168" not in str(info.value)
