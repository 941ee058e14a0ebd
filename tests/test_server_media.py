"""Image URLs through the real server: no request ever makes it connect to a blocked address.

A loopback "victim" listener on 127.0.0.1 counts every connection it accepts. The server allow-lists every
spelling of loopback (decimal, hex, octal, short forms, IPv6 loopback and IPv4-mapped/compatible/NAT64/6to4
forms, `localhost`), so only the address check stands between a request and the victim; each request gets a
400 and the victim sees **zero** connections. A second test server on 127.0.0.2 plays a public image host
(`images.test`, resolved by a test resolver; the policy opts in to exactly the network 127.0.0.2/32, and the
production classifier decides every other address): a
plain fetch works, while its redirects to the victim (by IP, by name, by a mapped form, through a second hop)
are refused at the hop, and slow or oversized bodies hit the deadline and the byte cap. file:// works only
under the allowed folder. Unit checks of the address parser cover the encodings directly.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import socket
import threading
import time

import httpx
import pytest
from address_corpus import Victims
from server_fixtures import (
    MODEL,
    ThreadServer,
    full_checkpoint,
    image_message,
    png_bytes,
    wait_until,
)

from llava_next.entrypoints.openai.media import MediaPolicy
from llava_next.preprocess.fetch import is_public_address, parse_ip

PNG = png_bytes(30, 40, seed=3)


class ImageHost(http.server.ThreadingHTTPServer):
    daemon_threads = True


def make_handler(victim_port: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            routes = {
                "/ip": f"http://127.0.0.1:{victim_port}/x.png",
                "/name": f"http://localhost:{victim_port}/x.png",
                "/mapped": f"http://[::ffff:127.0.0.1]:{victim_port}/x.png",
                "/decimal": f"http://2130706433:{victim_port}/x.png",
                "/userinfo": f"http://images.test@127.0.0.1:{victim_port}/x.png",
                "/hop": "/ip",  # a first, allowed hop, then the victim
                "/file": "file:///etc/passwd",
                "/loop": "/loop",
            }
            if self.path in routes:
                self.send_response(302)
                self.send_header("Location", routes[self.path])
                self.end_headers()
            elif self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)
            elif self.path == "/big.png":
                self.send_response(200)
                self.send_header("Content-Length", str(10 * 1024 * 1024))
                self.end_headers()
            elif self.path == "/big-undeclared.png":
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(64):
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass
            elif self.path == "/slow.png":
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(40):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
            else:
                self.send_response(404)
                self.end_headers()

    return Handler


BLOCKED_HOSTS = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1",
                 "127.000.000.001", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
                 "[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "0.0.0.0", "0", "localhost.",
                 "LOCALHOST", "[::]"]
OTHER_BLOCKED = ["169.254.169.254", "10.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1", "[fe80::1]",
                 "[fd00:ec2::254]", "[::ffff:169.254.169.254]", "224.0.0.1", "255.255.255.255", "0xa9fea9fe"]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_root, tmp_path_factory):
    victim = Victims()
    host = ImageHost(("127.0.0.2", 0), make_handler(victim.port))
    threading.Thread(target=host.serve_forever, daemon=True).start()
    host_port = host.server_address[1]
    media_dir = tmp_path_factory.mktemp("media")
    (media_dir / "cat.png").write_bytes(PNG)
    (media_dir / "notes.txt").write_bytes(b"SECRET-CONTENTS-1234 " * 10)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "o.png").write_bytes(PNG)
    os.symlink(outside / "o.png", media_dir / "escape.png")

    def resolver(name, port):
        if name == "images.test":
            return ["127.0.0.2"]
        return [info[4][0] for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)]

    domains = {h.strip("[]").rstrip(".").lower() for h in BLOCKED_HOSTS + OTHER_BLOCKED} | {"images.test"}
    policy = MediaPolicy(frozenset(domains), str(media_dir), max_bytes=1 << 20, timeout=1.5, connect_timeout=1.0,
                         resolver=resolver, allowed_networks=("127.0.0.2/32",))
    server = ThreadServer(full_checkpoint(tiny_checkpoint, tiny_root), media=policy)
    yield server, victim, host_port, media_dir, outside
    server.stop()
    host.shutdown()
    victim.close()


def ask(server, url):
    body = {"model": MODEL, "messages": image_message("What is it?", url), "max_tokens": 2, "temperature": 0}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


def test_every_blocked_address_form_is_refused_without_a_connection(setup):
    server, victim, *_ = setup
    for i, host in enumerate(BLOCKED_HOSTS):
        schemes = ("http", "https") if i < 4 else ("http",)
        for url in (f"{scheme}://{host}:{victim.port}/x.png" for scheme in schemes):
            r = ask(server, url)
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"]["code"] == "invalid_image"
    for host in OTHER_BLOCKED:
        r = ask(server, f"http://{host}/latest/meta-data/")
        assert r.status_code == 400, (host, r.text)
    # tricks that are not in the allow-list at all
    for url in (f"http://images.test@127.0.0.1:{victim.port}/", f"http://127.0.0.1:{victim.port}\\@images.test/",
                f"http://127.0.0.2.nip.io:{victim.port}/", f"http://[::ffff:127.0.0.1%25lo]:{victim.port}/"):
        assert ask(server, url).status_code == 400, url
    assert victim.connections == 0


def test_redirects_are_checked_at_every_hop(setup):
    server, victim, host_port, *_ = setup
    ok = ask(server, f"http://images.test:{host_port}/ok.png")
    assert ok.status_code == 200, ok.text
    for path in ("/ip", "/name", "/mapped", "/decimal", "/userinfo", "/hop", "/file", "/loop"):
        r = ask(server, f"http://images.test:{host_port}{path}")
        assert r.status_code == 400, (path, r.text)
        assert "SECRET" not in r.text and "root:" not in r.text
    assert victim.connections == 0


def test_byte_cap_and_deadline(setup):
    server, victim, host_port, *_ = setup
    for path in ("/big.png", "/big-undeclared.png"):
        r = ask(server, f"http://images.test:{host_port}{path}")
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"], r.text
    start = time.monotonic()
    r = ask(server, f"http://images.test:{host_port}/slow.png")
    assert r.status_code == 400 and "longer than" in r.json()["error"]["message"], r.text
    assert time.monotonic() - start < 3.0
    assert victim.connections == 0


def test_local_files_only_under_the_allowed_folder(setup):
    server, _, _, media_dir, outside = setup
    assert ask(server, (media_dir / "cat.png").as_uri()).status_code == 200
    for url in ((outside / "o.png").as_uri(), (media_dir / "escape.png").as_uri(),
                f"file://{media_dir}/../{outside.name}/o.png", "file:///etc/passwd", "file://otherhost/etc/passwd",
                (media_dir / "missing.png").as_uri()):
        r = ask(server, url)
        assert r.status_code == 400, (url, r.text)
    r = ask(server, (media_dir / "notes.txt").as_uri())
    assert r.status_code == 400 and "SECRET" not in r.text and "1234" not in r.text


def test_address_parser_reads_every_encoding():
    loop = ipaddress.ip_address("127.0.0.1")
    for text in ("127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "0x7F.0.0.1",
                 "017700000001"):
        assert parse_ip(text) == loop, text
    assert parse_ip("example.com") is None and parse_ip("1.2.3.4.example") is None
    for text in ("::1", "::ffff:127.0.0.1", "::ffff:7f00:1", "::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::",
                 "2001:0:4136:e378:8000:63bf:80ff:fffe", "fe80::1", "fc00::1", "169.254.169.254", "10.1.2.3",
                 "172.31.255.255", "192.168.0.1", "100.64.0.1", "0.0.0.0", "::", "ff02::1", "240.0.0.1",
                 "::ffff:10.0.0.1", "198.18.0.1"):
        assert not is_public_address(ipaddress.ip_address(text)), text
    for text in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert is_public_address(ipaddress.ip_address(text)), text


def test_default_policy_refuses_every_remote_url():
    policy = MediaPolicy()
    from llava_next.errors import InvalidImageError

    for url in ("http://example.com/a.png", "https://example.com/a.png", "file:///tmp/a.png", "ftp://x/y"):
        with pytest.raises(InvalidImageError):
            policy.load(url)


def test_the_victim_would_see_a_connection_if_the_check_were_off(setup):
    """Control: the zero above is the policy's doing, not an unreachable listener."""
    _, victim, *_ = setup
    from llava_next.errors import InvalidImageError

    before = victim.connections
    policy = MediaPolicy(frozenset({"127.0.0.1"}), timeout=1.0, allowed_networks=("127.0.0.0/8",))
    with pytest.raises(InvalidImageError):
        policy.load(f"http://127.0.0.1:{victim.port}/x.png")
    time.sleep(0.3)
    assert victim.connections == before + 1
    victim.connections = before  # leave the count as the other tests expect


def test_production_classifier_end_to_end_refuses_the_shared_corpus(setup):
    """The server with no test hook but DNS: every blocked address of the shared corpus (names resolving to it,
    a public + loopback answer) and every loopback spelling is a 400, and listeners on 127.0.0.1 and 127.0.0.2
    (the address the other tests opt in to) see zero connections."""
    from address_corpus import LOOPBACK_SPELLINGS, corpus_names, resolver_for

    server, *_ = setup
    victims = Victims()
    table = corpus_names()
    strict = MediaPolicy(frozenset(table) | {h.strip("[]").rstrip(".").lower() for h in LOOPBACK_SPELLINGS},
                         timeout=2.0, connect_timeout=0.5, resolver=resolver_for(table))
    saved, server.serving.media = server.serving.media, strict
    try:
        for host in list(table) + LOOPBACK_SPELLINGS:
            r = ask(server, f"http://{host}:{victims.port}/x.png")
            assert r.status_code == 400 and "refused to fetch" in r.json()["error"]["message"], (host, r.text)
        time.sleep(0.2)
        assert victims.connections == 0
    finally:
        server.serving.media = saved
        victims.close()


def test_fifo_folder_and_percent_decoding_of_local_files(setup):
    """A FIFO under the allowed folder is refused at once (it used to block a preparation thread in open()), a
    folder is a 400, and a file:// path is percent-decoded exactly once."""
    server, _, _, media_dir, _ = setup
    fifo = media_dir / "pipe.png"
    os.mkfifo(fifo)
    (media_dir / "a%41.png").write_bytes(PNG)  # a literal '%41' in the name
    policy = server.serving.media
    result = {}

    def load():
        try:
            policy.load(fifo.as_uri())
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            result["error"] = exc

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(3.0)
    if thread.is_alive():  # unblock the stuck open() so the test ends, then fail
        with open(fifo, "wb"):
            pass
        thread.join(3.0)
        pytest.fail("file:// to a FIFO blocked the thread")
    assert "regular file" in str(result["error"])
    for url in (fifo.as_uri(), media_dir.as_uri(), media_dir.as_uri() + "/"):
        r = ask(server, url)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", (url, r.text)
    assert ask(server, f"file://{media_dir}/a%2541.png").status_code == 200  # %25 -> '%', once
    assert ask(server, f"file://{media_dir}/a%41.png").status_code == 400  # 'aA.png' does not exist


def _solid_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


def test_per_image_cap_and_per_request_pixel_budget_from_the_headers(setup):
    """Per image (4 x 1008)^2 pixels; per request twice that, checked from every header before any decoding."""
    from server_fixtures import data_url

    from llava_next.entrypoints.openai.media import (
        DEFAULT_MAX_PIXELS,
        DEFAULT_MAX_REQUEST_PIXELS,
    )

    assert DEFAULT_MAX_PIXELS == 4032 * 4032 and DEFAULT_MAX_REQUEST_PIXELS == 2 * DEFAULT_MAX_PIXELS
    server, *_ = setup
    big = data_url(_solid_png(6000, 6000))  # 36 MP, 0.2 MB of PNG
    start = time.monotonic()
    r = ask(server, big)
    assert r.status_code == 400 and "per image" in r.json()["error"]["message"], r.text
    photo = data_url(_solid_png(4032, 3024))  # a phone photo: 12.2 MP, allowed alone
    body = {"model": MODEL, "messages": image_message("What?", photo, photo, photo), "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and "per request" in r.json()["error"]["message"], r.text
    assert time.monotonic() - start < 10.0  # refused from the headers: nothing decoded


def test_text_requests_never_queue_behind_images(setup):
    """Image preparation has its own pool: with every image thread (and more) blocked, a text-only request
    still completes at once."""
    import concurrent.futures

    server, *_ = setup
    release, entered = threading.Event(), []

    class Blocking(MediaPolicy):
        def load_all(self, urls):
            entered.append(1)
            release.wait(30)
            return super().load_all(urls)

        def load(self, url):  # the same block wherever images are loaded
            entered.append(1)
            release.wait(30)
            return super().load(url)

    blocking = Blocking(workers=2)
    saved, server.serving.media = server.serving.media, blocking
    pool = concurrent.futures.ThreadPoolExecutor(6)
    try:
        images = [pool.submit(ask, server, "data:image/png;base64,AAAA") for _ in range(6)]  # > both pools' threads
        assert wait_until(lambda: len(entered) >= 2, 10)
        start = time.monotonic()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=20)
        took = time.monotonic() - start
        assert r.status_code == 200 and not release.is_set(), r.text
        assert took < 10.0, took
        release.set()
        assert all(f.result(timeout=60).status_code == 400 for f in images)  # "AAAA" is no image
    finally:
        release.set()
        pool.shutdown(wait=True)
        server.serving.media = saved
