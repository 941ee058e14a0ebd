"""Loading images safely: any supported source in, one RGB `PIL.Image.Image` out.

Sources: PIL images, numpy arrays and torch tensors (HWC or CHW, uint8 or float in [0, 1], 1/3/4 channels, or 2-D
grayscale), raw bytes, local paths, `file://` URLs, `data:image/...;base64,` URLs (strict base64) and http(s) URLs
(connect and total timeout, byte cap, redirects only to http(s)). Every other scheme is refused.

Local network (RELIABILITY.md): an http(s) fetch refuses loopback, private (RFC 1918, CGNAT 100.64/10, fc00::/7),
link-local and metadata (169.254/16, fe80::/10), unspecified, multicast, reserved and every other non-global
address, and IPv6 forms that embed one (IPv4-mapped, IPv4-compatible, 6to4, NAT64), unless the caller passes
`allow_local_network=True`. The check runs on the addresses the resolver returns (so `2130706433`, `0x7f000001`,
`0177.0.0.1`, `127.1`, `[::ffff:7f00:1]`, `localhost` and names that resolve to local addresses are all caught),
on every hop of a redirect, and the socket connects to the very address that was checked (one look-up per
connection: no DNS rebinding between check and connect). Environment proxies are not used (a proxy would hide
the real destination). Local paths and `file://` URLs are the caller's own choice and are read.

Safety rules (RELIABILITY.md), all checked before pixels are decoded:
- formats are an allow-list (JPEG, PNG, WEBP, GIF, BMP, TIFF); anything else is refused;
- width * height from the header is checked against `max_pixels` (default 64 MP) before `.load()`, so a tiny PNG
  declaring 50,000 x 50,000 is refused in microseconds; Pillow's own DecompressionBombError is caught too;
- truncated files are errors (`ImageFile.LOAD_TRUNCATED_IMAGES` is never touched);
- animated images (GIF, WebP, APNG, multi-page TIFF) give their first frame only, without reading the others.

Every failure is an `InvalidImageError` (a ValueError) saying what was wrong, or `FileNotFoundError` for a
missing path. EXIF orientation is applied to everything that is decoded here or passed in as a PIL image, like
transformers' `load_image`.

`to_rgb` is transformers' `convert_to_rgb` rule, so pixel values agree with the reference processor: a band
named "A" or a `transparency` entry means alpha, composited on white; every other mode goes through Pillow's
`convert("RGB")`, which clips high-bit-depth modes (I;16, I, F) to 0..255 rather than rescaling them.

Error messages never echo a file's bytes or its size: only the source name (cut short) and what was wrong.

Leaves out: ICC colour management (profiles are ignored, as transformers does), HTTP proxies, and the server-side
rules (fetching off by default, files only under a configured folder), which belong to the server.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_next.errors import InvalidImageError

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: 8000 x 8000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # encoded bytes read from a file or URL
DEFAULT_TIMEOUT = 30.0  # seconds for a whole http(s) download
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to connect, and for each read to make progress

_ORIENTATION = 0x0112  # EXIF tag
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+\-]+)((?:;[^,;]*)*?);base64,(.*)$", re.DOTALL | re.IGNORECASE)


def _short(text: str, limit: int = 80) -> str:
    """A source string cut to fit an error message (a base64 payload can be megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image whose declared size is empty or larger than `max_pixels` (None: no limit of our own)."""
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"image has an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb or a very large image); pass max_pixels= (or set a processor's max_pixels) "
            "to allow it"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image from any Pillow mode; alpha (or a transparency key) is composited on white.

    Same rule as transformers' `convert_to_rgb`, so processor outputs match it for every mode.
    """
    if not isinstance(image, Image.Image):
        raise InvalidImageError(f"expected a PIL image, got {type(image).__name__}")
    try:
        image.load()  # a lazily opened image decodes here: turn its errors into ours
        if image.mode == "RGB":
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:  # Pillow raises many types (OSError, ValueError, SyntaxError, ...) for bad data
        raise InvalidImageError(f"cannot convert image of mode {image.mode!r} to RGB: {e}") from e


def array_to_pil(array, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a numpy array or torch tensor: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4.

    uint8 is taken as is; floats (bfloat16 too) must lie in [0, 1] and become uint8 as transformers does
    (x * 255, truncated); other integer types must lie in [0, 255]. A channels-first/last ambiguity is read as
    channels-first, like transformers. Four channels are RGBA (composited on white).
    """
    shape = tuple(getattr(array, "shape", ()))
    if len(shape) in (2, 3):  # the pixel limit, before anything is copied or converted
        height, width = shape[1:3] if len(shape) == 3 and shape[0] in (1, 3, 4) else shape[:2]
        check_pixels(width, height, max_pixels)
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu()
        array = (array.float() if str(array.dtype) == "torch.bfloat16" else array).numpy()  # numpy has no bfloat16
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    elif array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InvalidImageError(f"image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImageError(f"image array has an empty size: shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise InvalidImageError("a float image array must hold finite values in [0, 1]")
        array = (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)  # matches transformers
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise InvalidImageError(f"an integer image array must hold values in [0, 255], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidImageError(f"unsupported image array dtype {array.dtype}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array if mode != "L" else array[..., 0]), mode=mode))


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, source: str = "image bytes") -> Image.Image:
    """Decode encoded image bytes (allow-listed formats only), refusing bombs from the header; RGB out."""
    if not data:
        raise InvalidImageError(f"{source}: no data (empty image)")
    try:
        image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))  # reads the header only
    except Image.DecompressionBombError as e:
        raise InvalidImageError(f"{source}: refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"{source}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception:  # header parse errors; Pillow's message may quote the data, so it is not repeated
        raise InvalidImageError(f"{source}: unreadable image header") from None
    try:
        check_pixels(image.width, image.height, max_pixels)  # BEFORE any pixel is decoded
        image.load()  # first frame only; truncated data raises here
    except InvalidImageError as e:
        image.close()
        raise InvalidImageError(f"{source}: {e}") from None
    except Exception:
        image.close()
        raise InvalidImageError(f"{source}: truncated or corrupt {image.format} data") from None
    return to_rgb(_apply_exif(image))


def _apply_exif(image: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        if image.getexif().get(_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):  # skip the copy when upright
            return ImageOps.exif_transpose(image)
    except Exception:
        pass
    return image


def _read_file(path: str, max_bytes: int | None) -> bytes:
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {_short(path, 200)}")
    if not os.path.isfile(path):
        raise InvalidImageError(f"not a regular file: {_short(path, 200)}")
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise InvalidImageError(f"{_short(path, 200)}: file is over the limit of {max_bytes:,} bytes; pass max_bytes=")
    with open(path, "rb") as f:
        return f.read()


def _decode_data_url(url: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidImageError(
            f"data URL must look like 'data:image/<type>;base64,<payload>', got {_short(url)!r}"
        )
    payload = match.group(3).strip()
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"data URL has invalid base64 ({e}): {_short(url)!r}") from e


# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local-use): the last 32 bits are an IPv4 address.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d form


def address_blocked(address: str) -> str | None:
    """Why `address` (an IP address as the resolver returns it) is not a public one; None when it is public.

    Refused: loopback, private (RFC 1918, CGNAT 100.64/10, fc00::/7), link-local (169.254/16 with the cloud
    metadata address, fe80::/10), unspecified, multicast, reserved and every other non-global range, and an IPv6
    address embedding any of these (IPv4-mapped, IPv4-compatible, 6to4, NAT64).
    """
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and not (ip.is_loopback or ip.is_unspecified):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (any(ip in net for net in _NAT64) or ip in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_blocked(str(embedded))
            if inner is not None:
                return f"{inner} (embedded in the IPv6 address)"
            if ip in _IPV4_COMPATIBLE:
                return "a deprecated IPv4-compatible IPv6 address"
            return None  # IPv4-mapped, 6to4 or NAT64 form of a public IPv4 address
    for test, reason in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                         (ip.is_link_local, "link-local (cloud metadata)"), (ip.is_multicast, "multicast"),
                         (ip.is_private, "private"), (ip.is_reserved, "reserved")):
        if test:
            return reason
    if not ip.is_global:
        return "not a public address"
    return None


def _resolve(host: str, port: int) -> list[tuple]:
    """The resolver's answers for (host, port), TCP only: [(family, type, proto, canonname, sockaddr), ...]."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _connect_checked(address: tuple, timeout, source_address, allow_local_network: bool) -> socket.socket:
    """`socket.create_connection` with a check of every resolved address, connecting to the checked one only.

    Resolving once and connecting to the sockaddr that was checked means a second look-up (DNS rebinding) can
    never swap the destination between the check and the connection.
    """
    host, port = address
    try:
        infos = _resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise OSError(f"cannot resolve host {_short(str(host))!r}: {e}") from e
    if not allow_local_network:
        for info in infos:
            reason = address_blocked(info[4][0])
            if reason is not None:
                raise InvalidImageError(
                    f"refused to fetch from host {_short(str(host))!r}: it is {info[4][0]}, a {reason} address; "
                    "pass allow_local_network=True to allow loopback, private and link-local addresses"
                )
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            error = e
            sock.close()
    raise error if error is not None else OSError(f"no address found for {_short(str(host))!r}")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): never to file:, ftp: or anything else. Each hop connects through
    `_connect_checked`, so a redirect to a local address is refused like a first request to it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidImageError(f"refused redirect from {_short(req.full_url)} to a {scheme!r} URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """The total time of one download: when it is up, every connection of the request is shut down, so a read
    blocked on a server that trickles its headers (or its body, or a redirect) returns at once."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._connections: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, connection) -> None:
        """Shut `connection` (just connected) down when the time is up; raise if it is up already."""
        with self._lock:
            if self.expired:
                raise socket.timeout("the total time was up while connecting")
            self._connections.append(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for connection in self._connections:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; the reader sees EOF
                except (AttributeError, OSError):  # not connected yet, or already closed
                    pass

    def cancel(self) -> None:
        self._timer.cancel()


def _watched(base: type, deadline: _Deadline, allow_local_network: bool) -> type:
    """`base` (HTTPConnection or HTTPSConnection) watched by `deadline`, its socket timeout cut to the time left,
    connecting through `_connect_checked` (HTTPS then wraps that socket with the host name for SNI and the
    certificate check, as usual)."""

    class Watched(base):
        def connect(self):
            self.timeout = min(self.timeout, deadline.remaining())
            if self.timeout <= 0:
                raise socket.timeout("no time left to connect")
            self._create_connection = lambda address, timeout, source_address=None: _connect_checked(
                address, timeout, source_address, allow_local_network)
            super().connect()
            deadline.watch(self)

    return Watched


class _HttpHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline, allow_local_network: bool):
        super().__init__()
        self.deadline, self.allow_local_network = deadline, allow_local_network

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline, self.allow_local_network), req)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline, allow_local_network: bool):
        super().__init__()
        self.deadline, self.allow_local_network = deadline, allow_local_network

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline, self.allow_local_network), req,
                            context=self._context)


def fetch_url(url: str, *, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
              max_bytes: int | None = DEFAULT_MAX_BYTES, allow_local_network: bool = False) -> bytes:
    """Download an http(s) URL: at most `max_bytes`, `connect_timeout` to connect and per read, `timeout` in all.

    Local-network addresses are refused (see the module docstring) unless `allow_local_network=True`; the check
    runs on each connection of the request (redirects too), on the address it then connects to.

    The total deadline covers the status line, headers, redirects and body: a watchdog shuts the connection down
    when it is up. Connecting (TCP, TLS handshake) gets at most the time left, per socket operation; DNS look-ups
    are bounded by the system resolver only.
    """
    deadline = _Deadline(timeout)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HttpOnlyRedirects,
                                         _HttpHandler(deadline, bool(allow_local_network)),
                                         _HttpsHandler(deadline, bool(allow_local_network)))
    chunks, total = [], 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "llava_next", "Accept": "image/*"})
        with opener.open(request, timeout=min(connect_timeout, timeout)) as response:
            declared = response.headers.get("Content-Length")
            if max_bytes is not None and declared and declared.isdigit() and int(declared) > max_bytes:
                raise InvalidImageError(f"{_short(url)}: {int(declared):,} bytes, over the limit of {max_bytes:,}")
            while not deadline.expired:
                chunk = response.read1(1 << 16)  # returns what has arrived
                if not chunk:
                    break
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise InvalidImageError(f"{_short(url)}: more than the limit of {max_bytes:,} bytes")
                chunks.append(chunk)
    except InvalidImageError:
        raise
    except urllib.error.HTTPError as e:
        raise InvalidImageError(f"{_short(url)}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # DNS, refused, reset, socket timeout, malformed URL or response, or the watchdog's shutdown
        if deadline.expired:
            raise InvalidImageError(f"{_short(url)}: download took longer than {timeout} s") from e
        raise InvalidImageError(f"{_short(url)}: could not download: {getattr(e, 'reason', e)}") from e
    finally:
        deadline.cancel()
    if deadline.expired:  # the shutdown can look like a normal end of the body
        raise InvalidImageError(f"{_short(url)}: download took longer than {timeout} s")
    return b"".join(chunks)


def load_image(source, *, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
               max_bytes: int | None = DEFAULT_MAX_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               allow_local_network: bool = False) -> Image.Image:
    """One RGB `PIL.Image.Image` from any supported source (see the module docstring).

    `allow_local_network=True` lets an http(s) URL reach loopback, private and link-local addresses.

    Raises InvalidImageError (bad data, format, size, URL or scheme) or FileNotFoundError (missing path).
    """
    if isinstance(source, Image.Image):
        check_pixels(source.width, source.height, max_pixels)
        return to_rgb(_apply_exif(source))
    if isinstance(source, np.ndarray) or (hasattr(source, "detach") and hasattr(source, "shape")):
        return array_to_pil(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidImageError(f"image bytes: {len(data):,} bytes, over the limit of {max_bytes:,}")
        return decode_image(data, max_pixels=max_pixels)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise InvalidImageError(
            f"unsupported image source of type {type(source).__name__}: expected a PIL image, array, tensor, "
            "bytes, path or URL"
        )
    if not source:
        raise InvalidImageError("empty string given as an image source")
    if source[:5].lower() == "data:":
        data = _decode_data_url(source)
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidImageError(f"data URL: {len(data):,} bytes, over the limit of {max_bytes:,}")
        return decode_image(data, max_pixels=max_pixels, source="data URL")
    scheme_match = _SCHEME.match(source)
    if scheme_match is None:
        return decode_image(_read_file(source, max_bytes), max_pixels=max_pixels, source=_short(source, 200))
    scheme = scheme_match.group(1).lower()
    if scheme in ("http", "https"):
        data = fetch_url(source, timeout=timeout, connect_timeout=connect_timeout, max_bytes=max_bytes,
                         allow_local_network=allow_local_network)
        return decode_image(data, max_pixels=max_pixels, source=_short(source))
    if scheme == "file":
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise InvalidImageError(f"file URL names a remote host {parts.netloc!r}: {_short(source)}")
        path = urllib.request.url2pathname(parts.path)
        return decode_image(_read_file(path, max_bytes), max_pixels=max_pixels, source=_short(source, 200))
    raise InvalidImageError(
        f"unsupported URL scheme {scheme!r} in {_short(source)!r}: use a local path, file://, data:image/...;base64, "
        "http:// or https://"
    )
