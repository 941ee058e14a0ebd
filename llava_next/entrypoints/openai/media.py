"""The server's image-URL policy and fetcher: refuse by default, fetch only what the operator allowed.

`MediaPolicy.load(url)` (blocking; the server calls it in a worker thread) returns one RGB PIL image or raises
`InvalidImageError`:

- `data:image/...;base64,` URLs are always accepted (strict base64, the byte and pixel caps);
- `http(s)://` only when the host is in `allowed_domains` (exact, case-insensitive names; none by default).
  Every host name is resolved once and **every** resolved address must be public: loopback, private (RFC 1918,
  ULA), link-local (the cloud metadata address 169.254.169.254 and fe80::/10), CGNAT, multicast, reserved and
  unspecified addresses are refused, and so are IPv6 forms that embed one (IPv4-mapped `::ffff:a.b.c.d`,
  IPv4-compatible, 6to4, Teredo, NAT64). IP literals are read the way the C resolver reads them (decimal
  `2130706433`, hex `0x7f000001`, octal `0177.0.0.1`, short `127.1`), so no spelling slips through. The
  connection is made to the checked address (pinned: no second DNS look-up can rebind it), with the URL's
  host name kept for the `Host` header and TLS (SNI, certificate check). Redirects are followed by hand, at
  most `max_redirects`, each hop checked exactly like the first URL. One total deadline covers DNS, connect,
  headers, redirects and body (a watchdog shuts the socket down), and `max_bytes` caps the body (the declared
  Content-Length first, then the bytes counted while reading). Userinfo (`user@host`), proxies and
  non-http(s) redirect targets are refused.
- `file://` only under `allowed_local_path` (after resolving symlinks); nothing else is accepted.

Decoding goes through `llava_next.preprocess.images.decode_image` (format allow-list, bomb check from the
header before pixels are decoded, truncation is an error); images with an aspect ratio beyond
`max_aspect_ratio` are refused. Error messages never quote file bytes and cut URLs short.

`resolver` and `address_allowed` are injection points for tests (e.g. to treat one loopback address as a
public test server); the defaults are the system resolver and `is_public_address`.

Leaves out: caching of fetched images, HTTP/2, proxies, per-domain rate limits, image formats beyond
preprocess/images.py's allow-list, DNS resolution deadline inside getaddrinfo (the caller's await is bounded,
the worker thread may outlive it).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from llava_next.errors import InvalidImageError
from llava_next.preprocess import images as image_io

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 36_000_000
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def _short(text: str, limit: int = 60) -> str:
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host string denotes when it is an IP literal in any spelling the C resolver accepts."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))  # 127.1, 0x7f000001, 2130706433, 0177.0.0.1
        except OSError:
            return None
    return None


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if int(ip) >> 32 == 0:  # IPv4-compatible ::a.b.c.d (deprecated) and ::
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public_address(ip) -> bool:
    """True only for a globally routable unicast address with no private address embedded in it."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if any(not is_public_address(v4) for v4 in _embedded_v4(ip)):
            return False
    return bool(ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                      or ip.is_private or ip.is_unspecified))


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def normalize_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return host.encode("idna").decode("ascii") if host and not host.isascii() else host
    except UnicodeError:
        return host


@dataclass
class MediaPolicy:
    allowed_domains: frozenset[str] = frozenset()
    allowed_local_path: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_redirects: int = 3
    max_aspect_ratio: float = 200.0
    resolver: Callable[[str, int], list[str]] = _system_resolver
    address_allowed: Callable[[object], bool] = is_public_address
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.allowed_domains = frozenset(normalize_host(d) for d in self.allowed_domains if d and d.strip())
        if self.allowed_local_path is not None:
            self.allowed_local_path = os.path.realpath(self.allowed_local_path)

    # -- entry point ---------------------------------------------------------------------------------------
    def load(self, url: str):
        """One RGB PIL image from an image_url (see the module docstring); InvalidImageError otherwise."""
        if not isinstance(url, str) or not url:
            raise InvalidImageError("image_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            image = image_io.load_image(url, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        elif scheme in ("http", "https"):
            image = self._decode(self.fetch(url), "image URL")
        elif scheme == "file":
            image = self._decode(self._read_local(url), "local image")
        else:
            raise InvalidImageError(f"image URL scheme {scheme!r} is not allowed: use data:image/...;base64,"
                                    + (" or http(s) for an allowed domain" if self.allowed_domains else "")
                                    + (" or file:// under the allowed local folder" if self.allowed_local_path
                                       else ""))
        w, h = image.size
        if max(w / h, h / w) > self.max_aspect_ratio:
            raise InvalidImageError(f"image is {w}x{h}: aspect ratio over {self.max_aspect_ratio:g} is refused")
        return image

    def _decode(self, data: bytes, source: str):
        return image_io.decode_image(data, max_pixels=self.max_pixels, source=source)

    # -- file:// -------------------------------------------------------------------------------------------
    def _read_local(self, url: str) -> bytes:
        if self.allowed_local_path is None:
            raise InvalidImageError("file:// image URLs are not allowed on this server (--allowed-local-media-path)")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise InvalidImageError("a file:// image URL must be file:///absolute/path")
        path = os.path.realpath(urllib.request.url2pathname(urllib.parse.unquote(parts.path)))
        root = self.allowed_local_path
        if os.path.commonpath([root, path]) != root:
            raise InvalidImageError("file:// image URL is outside the allowed local media folder")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise InvalidImageError("file:// image not found or not readable under the allowed folder") from None
        with os.fdopen(fd, "rb") as f:
            if not os.path.isfile(path) or os.fstat(f.fileno()).st_size > self.max_bytes:
                raise InvalidImageError(f"file:// image is not a regular file of at most {self.max_bytes:,} bytes")
            return f.read(self.max_bytes + 1)

    # -- http(s):// ----------------------------------------------------------------------------------------
    def check_url(self, url: str) -> tuple[urllib.parse.SplitResult, str, int, str]:
        """(parts, host, port, pinned address) for an http(s) URL the policy allows; InvalidImageError otherwise.
        DNS is looked up here, and every address it returns is checked."""
        if any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
            raise InvalidImageError("image URL holds whitespace, control characters or backslashes")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidImageError(f"malformed image URL {_short(url)!r}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidImageError(f"image URL scheme {scheme!r} is not allowed here")
        if "@" in parts.netloc or parts.username is not None:
            raise InvalidImageError("image URLs with credentials (user@host) are refused")
        host = normalize_host(parts.hostname or "")
        if not host:
            raise InvalidImageError("image URL has no host")
        if host not in self.allowed_domains:
            raise InvalidImageError(f"image host {_short(host)!r} is not in the allowed media domains"
                                    + ("" if self.allowed_domains else " (none are allowed: "
                                       "--allowed-media-domains)"))
        port = port or (443 if scheme == "https" else 80)
        literal = parse_ip(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = self.resolver(host, port)
            except (OSError, UnicodeError) as exc:
                raise InvalidImageError(f"image host {_short(host)!r} could not be resolved") from exc
        if not addresses:
            raise InvalidImageError(f"image host {_short(host)!r} could not be resolved")
        for address in addresses:
            try:
                ip = ipaddress.ip_address(str(address).split("%", 1)[0])
            except ValueError:
                raise InvalidImageError(f"image host {_short(host)!r} resolved to an unusable address") from None
            if not self.address_allowed(ip):
                raise InvalidImageError(f"image host {_short(host)!r} resolves to a loopback, private, link-local "
                                        "or reserved address; refused")
        return parts, host, port, str(addresses[0]).split("%", 1)[0]

    def fetch(self, url: str) -> bytes:
        """The body of an allowed http(s) URL (every hop checked, addresses pinned, deadline and byte cap)."""
        end = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            parts, host, port, address = self.check_url(url)
            status, location, body = self._get(parts, host, port, address, end)
            if status in REDIRECTS:
                if not location:
                    raise InvalidImageError(f"image URL redirected without a Location ({status})")
                url = urllib.parse.urljoin(url, location)
                continue
            if status != 200:
                raise InvalidImageError(f"image URL answered HTTP {status}")
            return body
        raise InvalidImageError(f"image URL redirected more than {self.max_redirects} times")

    def _get(self, parts, host: str, port: int, address: str, end: float) -> tuple[int, str | None, bytes]:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise InvalidImageError(f"image download took longer than {self.timeout:g} s")
        timeout = min(self.connect_timeout, remaining)
        if parts.scheme.lower() == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=self.ssl_context or ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)

        def pinned(_address, timeout, source_address=None):
            return socket.create_connection((address, port), timeout, source_address)

        conn._create_connection = pinned  # connect to the checked address; Host and SNI stay the name
        expired = threading.Event()

        def expire():
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(remaining, expire)
        timer.daemon = True
        timer.start()
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            default_port = 443 if parts.scheme.lower() == "https" else 80
            host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
            conn.request("GET", path, headers={"Host": host_header, "User-Agent": "llava_next-server",
                                               "Accept": "image/*", "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if response.status != 200:
                return response.status, None, b""
            declared = response.getheader("Content-Length")
            if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
                raise InvalidImageError(f"image URL body is {int(declared):,} bytes, over the limit of "
                                        f"{self.max_bytes:,}")
            chunks, total = [], 0
            while True:
                left = end - time.monotonic()
                if left <= 0 or expired.is_set():
                    raise InvalidImageError(f"image download took longer than {self.timeout:g} s")
                if conn.sock is not None:
                    conn.sock.settimeout(min(self.connect_timeout, left))
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_bytes:
                    raise InvalidImageError(f"image URL body is over the limit of {self.max_bytes:,} bytes")
                chunks.append(chunk)
            if expired.is_set():
                raise InvalidImageError(f"image download took longer than {self.timeout:g} s")
            return 200, None, b"".join(chunks)
        except InvalidImageError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if expired.is_set() or time.monotonic() >= end:
                raise InvalidImageError(f"image download took longer than {self.timeout:g} s") from exc
            raise InvalidImageError(f"image URL could not be fetched ({type(exc).__name__})") from exc
        finally:
            timer.cancel()
            conn.close()
