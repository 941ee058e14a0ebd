"""The server's image-URL policy: refuse by default, fetch only what the operator allowed.

`MediaPolicy.load_all(urls)` (blocking; the server runs it in the policy's own bounded pool, `executor`, so a
text-only request never queues behind images) returns one RGB PIL image per URL or raises `InvalidImageError`.
Every URL's bytes are read first and every header parsed; only when each image is within `max_pixels` and all
of them within `max_request_pixels` is any pixel decoded. Caps (the processor never keeps more than the largest
pinpoint side, 1008 px for the default pinpoints, per image side):
- `max_pixels` = (4 x 1008)^2 = 16,257,024 per image: a 4032 x 3024 phone photo passes, a 6000 x 6000 does not;
  anything larger holds over 16x the pixels the model can see at the largest pinpoint (672 x 672 or 336 x 1008);
- `max_request_pixels` = 2 x that = 32,514,048 decoded pixels per request (~98 MB as RGB bytes; preparing two
  4032 x 4032 images, tiles included, peaks at +344 MB), whatever the number of images;
- `workers` = 2 threads decode images at once for the whole server.
JPEG draft decoding (`Image.draft`, libjpeg's 1/2-1/8 DCT scaling) is not used: the anyres resize (bicubic,
antialiased over every source pixel) and the 336 px base tile depend on the full-resolution pixels for every
image larger than its targets, so a draft decode would change `pixel_values` and break exactness with
transformers; no size exists where it is both a saving and exact.

Sources:
- `data:image/...;base64,` URLs are always accepted (strict base64, the byte and pixel caps);
- `http(s)://` only when the host is in `allowed_domains` (exact, case-insensitive names; none by default),
  fetched by `llava_next.preprocess.fetch` (the package's one fetcher: one address classifier, every resolved
  address checked, pinned connection, total deadline, byte cap, every redirect hop checked), with no private
  network allowed unless listed in `allowed_networks`;
- `file://` only under `allowed_local_path` (after resolving symlinks; the path percent-decoded once), and only
  a regular file: a FIFO, a device or a folder is refused from `fstat` after a non-blocking open, so no request
  can block a thread on it.

Decoding goes through `llava_next.preprocess.images.decode_image` (format allow-list, bomb check from the
header before pixels are decoded, truncation is an error); images with an aspect ratio beyond
`max_aspect_ratio` are refused. Error messages never quote file bytes and cut URLs short.

`resolver` is the DNS injection point (tests map a test name to a loopback listener); the address classifier
is not injectable.

Leaves out: caching of fetched images, proxies, per-domain rate limits, a deadline inside getaddrinfo (the
caller's await is bounded, the worker thread may outlive it).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llava_next.errors import InvalidImageError
from llava_next.model.anyres import DEFAULT_PINPOINTS
from llava_next.preprocess import images as image_io
from llava_next.preprocess.fetch import (
    FetchPolicy,
    fetch,
    normalize_host,
    system_resolve,
)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
LARGEST_PINPOINT_SIDE = max(max(p) for p in DEFAULT_PINPOINTS)  # 1008
DEFAULT_MAX_PIXELS = (4 * LARGEST_PINPOINT_SIDE) ** 2  # 16,257,024 per image
DEFAULT_MAX_REQUEST_PIXELS = 2 * DEFAULT_MAX_PIXELS  # decoded pixels per request
DEFAULT_WORKERS = 2  # image-preparation threads for the whole server
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass
class MediaPolicy:
    allowed_domains: frozenset[str] = frozenset()
    allowed_local_path: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    workers: int = DEFAULT_WORKERS
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_redirects: int = 3
    max_aspect_ratio: float = 200.0
    resolver: Callable[[str, int], list[str]] = system_resolve
    allowed_networks: tuple[str, ...] = ()  # non-public networks the operator opts in to (none by default)
    ssl_context: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.allowed_domains = frozenset(normalize_host(d) for d in self.allowed_domains if d and d.strip())
        if self.allowed_local_path is not None:
            self.allowed_local_path = os.path.realpath(self.allowed_local_path)
        self.fetch_policy = FetchPolicy(
            allowed_hosts=self.allowed_domains, allow_networks=tuple(self.allowed_networks), timeout=self.timeout,
            connect_timeout=self.connect_timeout, max_bytes=self.max_bytes, max_redirects=self.max_redirects,
            resolve=self.resolver, ssl_context=self.ssl_context)
        self._executor: ThreadPoolExecutor | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The server's image-preparation pool (`workers` threads), apart from the text preparation pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="llava-next-image")
        return self._executor

    def load_all(self, urls: list[str]) -> list:
        """One RGB PIL image per URL; every header is checked against both caps before any pixel is decoded."""
        raw = [self._bytes(url) for url in urls]
        total = 0
        for data, source in raw:
            w, h = image_io.image_size(data, source=source)
            if w * h > self.max_pixels:
                raise InvalidImageError(f"{source} is {w}x{h} = {w * h:,} pixels, over the limit of "
                                        f"{self.max_pixels:,} per image (the model sees at most "
                                        f"{LARGEST_PINPOINT_SIDE} px a side); send it smaller")
            total += w * h
        if total > self.max_request_pixels:
            raise InvalidImageError(f"the request's images hold {total:,} pixels in all, over the limit of "
                                    f"{self.max_request_pixels:,} per request; send fewer or smaller images")
        return [self._checked(image_io.decode_image(data, max_pixels=self.max_pixels, source=source))
                for data, source in raw]

    # -- one URL ------------------------------------------------------------------------------------------
    def load(self, url: str):
        """One RGB PIL image from an image_url (see the module docstring); InvalidImageError otherwise."""
        return self.load_all([url])[0]

    def _bytes(self, url: str) -> tuple[bytes, str]:
        """(encoded bytes, a name for messages) of one image_url, within `max_bytes`."""
        if not isinstance(url, str) or not url:
            raise InvalidImageError("image_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = image_io.decode_data_url(url)
            if len(data) > self.max_bytes:
                raise InvalidImageError(f"data URL: {len(data):,} bytes, over the limit of {self.max_bytes:,}")
            return data, "data URL"
        if scheme in ("http", "https"):
            return fetch(url, self.fetch_policy), "image URL"
        if scheme == "file":
            return self._read_local(url), "local image"
        raise InvalidImageError(f"image URL scheme {scheme!r} is not allowed: use data:image/...;base64,"
                                + (" or http(s) for an allowed domain" if self.allowed_domains else "")
                                + (" or file:// under the allowed local folder" if self.allowed_local_path else ""))

    def _checked(self, image):
        w, h = image.size
        if max(w / h, h / w) > self.max_aspect_ratio:
            raise InvalidImageError(f"image is {w}x{h}: aspect ratio over {self.max_aspect_ratio:g} is refused")
        return image

    # -- file:// -------------------------------------------------------------------------------------------
    def _read_local(self, url: str) -> bytes:
        if self.allowed_local_path is None:
            raise InvalidImageError("file:// image URLs are not allowed on this server (--allowed-local-media-path)")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise InvalidImageError("a file:// image URL must be file:///absolute/path")
        path = os.path.realpath(urllib.request.url2pathname(parts.path))  # url2pathname percent-decodes once
        root = self.allowed_local_path
        if os.path.commonpath([root, path]) != root:
            raise InvalidImageError("file:// image URL is outside the allowed local media folder")
        try:
            return image_io.read_regular_file(path, self.max_bytes, follow_symlinks=False, name="file:// image")
        except FileNotFoundError:
            raise InvalidImageError("file:// image not found under the allowed folder") from None
