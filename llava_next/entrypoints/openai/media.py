"""The server's image-URL policy: refuse by default, fetch only what the operator allowed.

`MediaPolicy.load(url)` (blocking; the server calls it in its image-preparation pool) returns one RGB PIL image
or raises `InvalidImageError`:

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
from dataclasses import dataclass, field

from llava_next.errors import InvalidImageError
from llava_next.preprocess import images as image_io
from llava_next.preprocess.fetch import (
    FetchPolicy,
    fetch,
    normalize_host,
    system_resolve,
)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 36_000_000
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


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

    # -- entry point ---------------------------------------------------------------------------------------
    def load(self, url: str):
        """One RGB PIL image from an image_url (see the module docstring); InvalidImageError otherwise."""
        if not isinstance(url, str) or not url:
            raise InvalidImageError("image_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            image = image_io.load_image(url, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        elif scheme in ("http", "https"):
            image = self._decode(fetch(url, self.fetch_policy), "image URL")
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
        path = os.path.realpath(urllib.request.url2pathname(parts.path))  # url2pathname percent-decodes once
        root = self.allowed_local_path
        if os.path.commonpath([root, path]) != root:
            raise InvalidImageError("file:// image URL is outside the allowed local media folder")
        try:
            return image_io.read_regular_file(path, self.max_bytes, follow_symlinks=False, name="file:// image")
        except FileNotFoundError:
            raise InvalidImageError("file:// image not found under the allowed folder") from None
