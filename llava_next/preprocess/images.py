"""Loading images safely: any supported source in, one RGB `PIL.Image.Image` out.

Sources: PIL images, numpy arrays and torch tensors (HWC or CHW, uint8 or float in [0, 1], 1/3/4 channels, or 2-D
grayscale), raw bytes, local paths, `file://` URLs, `data:image/...;base64,` URLs (strict base64) and http(s) URLs
(connect and total timeout, byte cap, redirects only to http(s)). Every other scheme is refused.

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

Leaves out: ICC colour management (profiles are ignored, as transformers does), and the server-side rules for
URLs (fetching off by default, private/loopback addresses refused after DNS resolution), which belong to the
server.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
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
    except UnidentifiedImageError as e:
        raise InvalidImageError(
            f"{source}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)}); "
            f"{len(data):,} bytes starting {data[:8]!r}"
        ) from e
    except Exception as e:  # header parse errors
        raise InvalidImageError(f"{source}: unreadable image header: {e}") from e
    try:
        check_pixels(image.width, image.height, max_pixels)  # BEFORE any pixel is decoded
        image.load()  # first frame only; truncated data raises here
    except InvalidImageError as e:
        image.close()
        raise InvalidImageError(f"{source}: {e}") from None
    except Exception as e:
        image.close()
        raise InvalidImageError(f"{source}: truncated or corrupt {image.format} data: {e}") from e
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
        raise InvalidImageError(f"{path}: file is {size:,} bytes, over the limit of {max_bytes:,}; pass max_bytes=")
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


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): never to file:, ftp: or anything else."""

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


def _watched(base: type, deadline: _Deadline) -> type:
    """`base` (HTTPConnection or HTTPSConnection) watched by `deadline`, its socket timeout cut to the time left."""

    class Watched(base):
        def connect(self):
            self.timeout = min(self.timeout, deadline.remaining())
            if self.timeout <= 0:
                raise socket.timeout("no time left to connect")
            super().connect()
            deadline.watch(self)

    return Watched


class _HttpHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self._context)


def fetch_url(url: str, *, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
              max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """Download an http(s) URL: at most `max_bytes`, `connect_timeout` to connect and per read, `timeout` in all.

    The total deadline covers the status line, headers, redirects and body: a watchdog shuts the connection down
    when it is up. Connecting (TCP, TLS handshake) gets at most the time left, per socket operation; DNS look-ups
    are bounded by the system resolver only.
    """
    deadline = _Deadline(timeout)
    opener = urllib.request.build_opener(_HttpOnlyRedirects, _HttpHandler(deadline), _HttpsHandler(deadline))
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
               max_bytes: int | None = DEFAULT_MAX_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One RGB `PIL.Image.Image` from any supported source (see the module docstring).

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
        data = fetch_url(source, timeout=timeout, connect_timeout=connect_timeout, max_bytes=max_bytes)
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
