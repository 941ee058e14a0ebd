"""The one SSRF-safe http(s) fetch: one address classifier, a pinned connection, a deadline, a byte cap.

`fetch(url, policy)` returns the body of an http(s) URL or raises `InvalidImageError`. `load_image` (and so
`LLM.chat`, the processor and the pipeline) and the server's `MediaPolicy` both call it; they differ only in the
`FetchPolicy` they pass: any host (`allowed_hosts=None`) or an allow-list of host names, and which non-public
networks, if any, the caller opted in to (`allow_networks`, e.g. `ANY_NETWORK` for `allow_local_network=True`).

Addresses (`blocked_reason`): one classifier for every spelling. IP literals are read the way the C resolver
reads them (decimal `2130706433`, hex `0x7f000001`, octal `0177.0.0.1`, short `127.1`). An IPv6 address that
embeds an IPv4 one is decided by the embedded address: IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated
`::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16` and Teredo (server and
client). The local-use NAT64 prefix `64:ff9b:1::/48` (RFC 8215) is refused as a whole: IANA marks it not globally
reachable, and where the IPv4 address sits inside depends on the site's own prefix length. Refused besides:
unspecified, loopback, link-local (the metadata address 169.254.169.254, fe80::/10), site-local (fec0::/10,
which Python's `is_global` accepts), multicast, private (RFC 1918, ULA fc00::/7), CGNAT, reserved and every
other non-global range.

A host name is resolved once per connection; **every** address returned must be allowed (a resolver answering a
public and a loopback address is refused), and the socket connects to a checked address (pinned: no second
look-up can rebind it), keeping the name for `Host`, SNI and the certificate check. Redirects are followed by
hand, at most `max_redirects`, each hop checked like the first URL; only http(s) targets. One total deadline
covers connect, headers, redirects and body (a watchdog shuts the socket down when it is up); `max_bytes` caps
the body (the declared Content-Length first, then the bytes read). Userinfo, whitespace and backslashes in URLs
are refused; environment proxies are never used (a proxy would hide the destination).

Leaves out: a deadline inside `getaddrinfo` (the system resolver's own), HTTP/2, caching, cookies, proxies.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from llava_next.errors import InvalidImageError

ANY_NETWORK = ("0.0.0.0/0", "::/0")  # allow_local_network=True
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated
_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _short(text: str, limit: int = 80) -> str:
    text = str(text).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a URL host denotes when it is an IP literal in any spelling the C resolver accepts."""
    text = str(host).strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))  # 127.1, 0x7f000001, 2130706433, 0177.0.0.1
        except OSError:
            return None
    return None


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]] | None:
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", [ip.ipv4_mapped]
    if ip in _TRANSLATED:
        return "IPv4-translated", [low]
    if ip in _NAT64:
        return "NAT64", [low]
    if ip.sixtofour is not None:
        return "6to4", [ip.sixtofour]
    if ip.teredo is not None:
        return "Teredo", list(ip.teredo)
    if ip in _COMPATIBLE:  # also :: and ::1, which become 0.0.0.0 and 0.0.0.1: refused either way
        return "IPv4-compatible", [low]
    return None


def blocked_reason(address) -> str | None:
    """Why `address` (an IP address object or string) is not a public unicast address; None when it is."""
    try:
        ip = address if isinstance(address, ipaddress._BaseAddress) else ipaddress.ip_address(
            str(address).split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "local-use NAT64 (64:ff9b:1::/48)"
        embedded = _embedded(ip)
        if embedded is not None:
            form, inner = embedded
            for v4 in inner:
                reason = blocked_reason(v4)
                if reason is not None:
                    return f"{reason} (in an {form} IPv6 address)"
            return None  # decided by the embedded public address
    for test, reason in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                         (ip.is_link_local, "link-local (cloud metadata)"), (ip.is_multicast, "multicast"),
                         (getattr(ip, "is_site_local", False), "site-local"), (ip.is_private, "private"),
                         (ip.is_reserved, "reserved"), (not ip.is_global, "non-global")):
        if test:
            return reason
    return None


def is_public_address(address) -> bool:
    return blocked_reason(address) is None


def system_resolve(host: str, port: int) -> list[str]:
    """The resolver's TCP answers for (host, port), as address strings."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def normalize_host(host: str) -> str:
    host = str(host).strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return host.encode("idna").decode("ascii") if host and not host.isascii() else host
    except UnicodeError:
        return host


@dataclass(frozen=True)
class FetchPolicy:
    """Which URLs may be fetched, and the bounds of one fetch."""

    allowed_hosts: frozenset[str] | None = None  # None: any host; else exact names (case-insensitive, IDNA)
    allow_networks: tuple[str, ...] = ()  # non-public networks opted in to (ANY_NETWORK: all of them)
    timeout: float = 30.0  # seconds for the whole fetch, redirects included
    connect_timeout: float = 10.0  # seconds to connect, and for each read to make progress
    max_bytes: int | None = 64 * 1024 * 1024
    max_redirects: int = 5
    opt_in_hint: str = ""  # appended to a refusal: how the caller may opt in
    resolve: Callable[[str, int], list[str]] = system_resolve
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", frozenset(normalize_host(h) for h in self.allowed_hosts if h))
        object.__setattr__(self, "_networks", tuple(ipaddress.ip_network(n, strict=False) for n in self.allow_networks))

    def check_address(self, host: str, address: str) -> None:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        reason = blocked_reason(ip)
        if reason is not None and not any(ip.version == n.version and ip in n for n in self._networks):
            raise InvalidImageError(f"refused to fetch from host {_short(host)!r}: it is {_short(address, 48)}, a "
                                    f"{reason} address" + (f"; {self.opt_in_hint}" if self.opt_in_hint else ""))

    def check_url(self, url: str) -> tuple[urllib.parse.SplitResult, str, int, list[str]]:
        """(parts, host, port, checked addresses) for an http(s) URL this policy allows; InvalidImageError else."""
        if any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
            raise InvalidImageError("image URL holds whitespace, control characters or backslashes")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidImageError(f"{_short(url)}: could not download: malformed URL") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise InvalidImageError(f"image URL scheme {parts.scheme.lower()!r} is not allowed here")
        if "@" in parts.netloc:
            raise InvalidImageError("image URLs with credentials (user@host) are refused")
        host = normalize_host(parts.hostname or "")
        if not host:
            raise InvalidImageError("image URL has no host")
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            raise InvalidImageError(f"image host {_short(host)!r} is not in the allowed media domains" + (
                "" if self.allowed_hosts else " (none are allowed: --allowed-media-domains)"))
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        literal = parse_ip(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = [str(a).split("%", 1)[0] for a in self.resolve(host, port)]
            except (OSError, UnicodeError):
                raise InvalidImageError(f"image host {_short(host)!r} could not be resolved") from None
        if not addresses:
            raise InvalidImageError(f"image host {_short(host)!r} could not be resolved")
        for address in addresses:  # every answer, not just the one we would connect to
            try:
                self.check_address(host, address)
            except ValueError as exc:
                if isinstance(exc, InvalidImageError):
                    raise
                raise InvalidImageError(f"image host {_short(host)!r} resolved to an unusable address") from None
        return parts, host, port, addresses


class _Deadline:
    """The total time of one fetch: when it is up, the open connection is shut down (a blocked read returns)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = threading.Event()
        self._sock = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock) -> None:
        with self._lock:
            self._sock = sock
        if self.expired.is_set():
            self._expire()

    def _expire(self) -> None:
        self.expired.set()
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cancel(self) -> None:
        self._timer.cancel()


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of an http(s) URL the policy allows (every hop checked, addresses pinned, deadline, byte cap)."""
    deadline = _Deadline(policy.timeout)
    try:
        for _ in range(policy.max_redirects + 1):
            parts, host, port, addresses = policy.check_url(url)
            status, location, body = _get(policy, parts, host, port, addresses, deadline)
            if status in REDIRECTS:
                if not location:
                    raise InvalidImageError(f"image URL redirected without a Location ({status})")
                url = urllib.parse.urljoin(url, location)
                scheme = urllib.parse.urlsplit(url).scheme.lower()
                if scheme not in ("http", "https"):
                    raise InvalidImageError(f"refused a redirect to a {_short(scheme, 20)!r} URL")
                continue
            if status != 200:
                raise InvalidImageError(f"{_short(url)}: HTTP {status}")
            return body
        raise InvalidImageError(f"image URL redirected more than {policy.max_redirects} times")
    finally:
        deadline.cancel()


def _timed_out(policy: FetchPolicy) -> InvalidImageError:
    return InvalidImageError(f"image download took longer than {policy.timeout:g} s")


def _get(policy, parts, host, port, addresses, deadline) -> tuple[int, str | None, bytes]:
    https = parts.scheme.lower() == "https"
    if deadline.left() <= 0:
        raise _timed_out(policy)
    timeout = min(policy.connect_timeout, deadline.left())
    conn = (http.client.HTTPSConnection(host, port, timeout=timeout,
                                        context=policy.ssl_context or ssl.create_default_context())
            if https else http.client.HTTPConnection(host, port, timeout=timeout))

    def pinned(_address, timeout, source_address=None):  # connect to a checked address; Host and SNI keep the name
        error = None
        for address in addresses:
            try:
                sock = socket.create_connection((address, port), min(timeout, max(deadline.left(), 0.001)))
                deadline.watch(sock)
                return sock
            except OSError as exc:
                error = exc
        raise error

    conn._create_connection = pinned
    try:
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        default_port = 443 if https else 80
        host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
        conn.request("GET", target, headers={"Host": host_header, "User-Agent": "llava_next", "Accept": "image/*",
                                             "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if policy.max_bytes is not None and declared and declared.strip().isdigit() and int(declared) > policy.max_bytes:
            raise InvalidImageError(f"image URL body is {int(declared):,} bytes, over the limit of "
                                    f"{policy.max_bytes:,}")
        chunks, total = [], 0
        while True:
            left = deadline.left()
            if left <= 0 or deadline.expired.is_set():
                raise _timed_out(policy)
            if conn.sock is not None:
                conn.sock.settimeout(min(policy.connect_timeout, left))
            chunk = response.read1(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if policy.max_bytes is not None and total > policy.max_bytes:
                raise InvalidImageError(f"image URL body is over the limit of {policy.max_bytes:,} bytes")
            chunks.append(chunk)
        if deadline.expired.is_set():  # the watchdog's shutdown can look like a normal end of the body
            raise _timed_out(policy)
        return 200, None, b"".join(chunks)
    except InvalidImageError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired.is_set() or deadline.left() <= 0:
            raise _timed_out(policy) from exc
        raise InvalidImageError(f"{_short(parts.geturl())}: could not download: {type(exc).__name__}: "
                                f"{_short(exc, 120)}") from exc
    finally:
        conn.close()
