"""Loading images safely: any supported source in, one RGB `PIL.Image.Image` out.

Sources: PIL images, numpy arrays and torch tensors (HWC or CHW, uint8 or float in [0, 1], 1/3/4 channels, or 2-D
grayscale), raw bytes, local paths, `file://` URLs, `data:image/...;base64,` URLs (strict base64) and http(s) URLs
(connect and total timeout, byte cap, redirects only to http(s)). Every other scheme is refused.

Local network (RELIABILITY.md): http(s) goes through `preprocess/fetch.py`, the one fetcher this package has
(the server's too): loopback, private, link-local, metadata and every other non-global address, in every
spelling, after DNS and on every redirect hop, is refused unless the caller passes `allow_local_network=True`
(or a `fetch_policy`). Local paths and `file://` URLs are the caller's own choice and are read, but only when
they are regular files (a FIFO, a device or a folder is refused before anything is read, so none can block).

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
import io
import os
import re
import stat
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_next.errors import InvalidImageError
from llava_next.preprocess.fetch import ANY_NETWORK, FetchPolicy, fetch

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: 8000 x 8000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # encoded bytes read from a file or URL
DEFAULT_TIMEOUT = 30.0  # seconds for a whole http(s) download
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to connect, and for each read to make progress

_ORIENTATION = 0x0112  # EXIF tag
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_OPT_IN = "pass allow_local_network=True to allow loopback, private and link-local addresses"
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


def _open(data: bytes, source: str) -> Image.Image:
    """The lazily opened image (header read, no pixels decoded): allow-listed formats only."""
    if not data:
        raise InvalidImageError(f"{source}: no data (empty image)")
    try:
        return Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))  # reads the header only
    except Image.DecompressionBombError as e:
        raise InvalidImageError(f"{source}: refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"{source}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception:  # header parse errors; Pillow's message may quote the data, so it is not repeated
        raise InvalidImageError(f"{source}: unreadable image header") from None


def image_size(data: bytes, *, source: str = "image bytes") -> tuple[int, int]:
    """(width, height) from the header alone, no pixel decoded (for a budget over several images)."""
    image = _open(data, source)
    try:
        return image.size
    finally:
        image.close()


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, source: str = "image bytes",
                 max_bytes: int | None = None) -> Image.Image:
    """Decode encoded image bytes (allow-listed formats only, at most `max_bytes`), refusing bombs from the
    header; RGB out."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidImageError(f"{source}: {len(data):,} bytes, over the limit of {max_bytes:,}")
    image = _open(data, source)
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


def read_regular_file(path: str, max_bytes: int | None, *, follow_symlinks: bool = True,
                      name: str | None = None) -> bytes:
    """The bytes of a regular file, at most `max_bytes`: a FIFO, socket, device (`/dev/zero`) or folder is refused
    from `fstat` after a non-blocking open (so a FIFO never blocks the thread), before anything is read.
    `name` stands for the path in error messages."""
    name = _short(path, 200) if name is None else name
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {name}") from None
    except OSError as e:
        raise InvalidImageError(f"cannot open {name}: {e.strerror or type(e).__name__}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise InvalidImageError(f"{name}: {kind}; images are read from regular files only")
        if max_bytes is not None and info.st_size > max_bytes:
            raise InvalidImageError(f"{name}: file is over the limit of {max_bytes:,} bytes; "
                                    "pass max_bytes=")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as f:
        chunks, total = [], 0
        while True:  # st_size can lie (a growing file, /proc): count what is read
            chunk = f.read(1 << 20 if max_bytes is None else min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise InvalidImageError(f"{name}: file is over the limit of {max_bytes:,} bytes; "
                                        "pass max_bytes=")


def decode_data_url(url: str) -> bytes:
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


def load_image(source, *, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
               max_bytes: int | None = DEFAULT_MAX_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               allow_local_network: bool = False, fetch_policy: FetchPolicy | None = None) -> Image.Image:
    """One RGB `PIL.Image.Image` from any supported source (see the module docstring).

    `allow_local_network=True` lets an http(s) URL reach loopback, private and link-local addresses.
    `fetch_policy` replaces the whole http(s) policy (hosts, networks, timeouts, byte cap) built from the others.

    Raises InvalidImageError (bad data, format, size, URL or scheme) or FileNotFoundError (missing path).
    """
    if isinstance(source, Image.Image):
        check_pixels(source.width, source.height, max_pixels)
        return to_rgb(_apply_exif(source))
    if isinstance(source, np.ndarray) or (hasattr(source, "detach") and hasattr(source, "shape")):
        return array_to_pil(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), max_pixels=max_pixels, max_bytes=max_bytes)
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
        return decode_image(decode_data_url(source), max_pixels=max_pixels, source="data URL", max_bytes=max_bytes)
    scheme_match = _SCHEME.match(source)
    if scheme_match is None:
        return decode_image(read_regular_file(source, max_bytes), max_pixels=max_pixels, source=_short(source, 200))
    scheme = scheme_match.group(1).lower()
    if scheme in ("http", "https"):
        data = fetch(source, fetch_policy or FetchPolicy(
            allow_networks=ANY_NETWORK if allow_local_network else (), timeout=timeout,
            connect_timeout=connect_timeout, max_bytes=max_bytes, opt_in_hint=_OPT_IN))
        return decode_image(data, max_pixels=max_pixels, source=_short(source))
    if scheme == "file":
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise InvalidImageError(f"file URL names a remote host {parts.netloc!r}: {_short(source)}")
        path = urllib.request.url2pathname(parts.path)
        return decode_image(read_regular_file(path, max_bytes), max_pixels=max_pixels, source=_short(source, 200))
    raise InvalidImageError(
        f"unsupported URL scheme {scheme!r} in {_short(source)!r}: use a local path, file://, data:image/...;base64, "
        "http:// or https://"
    )
