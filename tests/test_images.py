"""llava_next.images: every bad-image case of RELIABILITY.md gets its typed error; good sources load as RGB."""

from __future__ import annotations

import base64
import http.server
import io
import resource
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llava_next.errors import InvalidImageError
from llava_next.preprocess.images import load_image, to_rgb

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height RGB pixels (a decompression bomb when large)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + png_chunk(b"IEND", b""))


def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())  # 451 x 300


def good_png() -> bytes:
    return encode(Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)), "PNG")


# ----- decompression bombs -----

def test_png_bomb_50000_squared_is_refused_fast_and_small():
    bomb = png_header_only(50_000, 50_000)
    assert len(bomb) < 200
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match="bomb|pixels"):
        load_image(bomb)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024


def test_our_pixel_cap_is_checked_from_the_header_below_pillows_limit():
    bomb = png_header_only(9000, 8000)  # 72 MP: under Pillow's bomb limit, over our 64 MP default
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match="72,000,000 pixels"):
        load_image(bomb)
    assert time.perf_counter() - start < 1.0


def test_pixel_cap_is_configurable():
    data = encode(photo(), "PNG")
    with pytest.raises(InvalidImageError, match="max_pixels"):
        load_image(data, max_pixels=10_000)
    assert load_image(data, max_pixels=451 * 300).size == (451, 300)


# ----- broken data -----

@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(fmt):
    data = encode(photo(), fmt)
    for cut in (len(data) // 2, len(data) * 9 // 10, 40):  # (a PNG missing only IEND still has every pixel)
        with pytest.raises(InvalidImageError):
            load_image(data[:cut])


@pytest.mark.parametrize("data", [b"", bytes(RNG.integers(0, 256, 5000, dtype=np.uint8)), b"GIF89a", b"\x89PNG\r\n"])
def test_empty_random_and_header_only_bytes_are_refused(data):
    with pytest.raises(InvalidImageError):
        load_image(data)


def test_formats_outside_the_allow_list_are_refused():
    image = Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for fmt in ("PPM", "ICO", "TGA", "PCX"):
        with pytest.raises(InvalidImageError, match="allowed format"):
            load_image(encode(image, fmt))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert load_image(encode(image, fmt)).size == (16, 16)


# ----- sources -----

def test_data_urls_strict_base64():
    data = good_png()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert np.array_equal(np.asarray(load_image(url)), np.asarray(load_image(data)))
    for bad in ("data:image/png;base64,@@@@", "data:image/png;base64,iVBOR w0K", url[:-3] + "%%%",
                "data:image/png;base64,AAA"):  # bad characters, spaces, bad padding
        with pytest.raises(InvalidImageError, match="base64"):
            load_image(bad)
    for bad in ("data:text/plain;base64,QUJD", "data:image/png,rawbytes", "data:,"):
        with pytest.raises(InvalidImageError, match="data URL"):
            load_image(bad)
    with pytest.raises(InvalidImageError):  # valid base64 of something that is not an image
        load_image("data:image/png;base64," + base64.b64encode(b"hello world").decode())


def test_bytes_and_data_urls_over_max_bytes_are_refused_before_decoding():
    data = good_png()
    with pytest.raises(InvalidImageError, match=f"image bytes: {len(data):,} bytes, over the limit of 100"):
        load_image(data, max_bytes=100)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    with pytest.raises(InvalidImageError, match=f"data URL: {len(data):,} bytes, over the limit of 100"):
        load_image(url, max_bytes=100)
    assert load_image(data, max_bytes=len(data)).size == load_image(url, max_bytes=len(data)).size


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x/y", "s3://bucket/key.jpg", "HTTPX://a"])
def test_unknown_schemes_are_refused(url):
    with pytest.raises(InvalidImageError, match="scheme"):
        load_image(url)


def test_paths_and_file_urls(tmp_path):
    path = tmp_path / "cat image.png"
    path.write_bytes(encode(photo(), "PNG"))
    expected = np.asarray(photo())
    assert np.array_equal(np.asarray(load_image(str(path))), expected)
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(path.as_uri())), expected)  # file:///.../cat%20image.png
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError):
        load_image((tmp_path / "missing.png").as_uri())
    with pytest.raises(InvalidImageError, match="regular file"):
        load_image(str(tmp_path))
    with pytest.raises(InvalidImageError, match="remote host"):
        load_image("file://otherhost/etc/x.png")
    with pytest.raises(InvalidImageError, match="max_bytes"):
        load_image(path, max_bytes=1000)


def test_arrays_and_tensors():
    hwc = RNG.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(hwc)), hwc)
    assert np.array_equal(np.asarray(load_image(np.moveaxis(hwc, -1, 0))), hwc)  # CHW
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(hwc).permute(2, 0, 1))), hwc)
    floats = hwc / 255.0
    assert np.abs(np.asarray(load_image(floats)).astype(int) - hwc).max() <= 1
    gray = hwc[..., 0]
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([hwc, np.zeros((7, 9, 1), np.uint8)], -1)  # fully transparent: white
    assert (np.asarray(load_image(rgba)) == 255).all()
    for bad in (np.zeros((7, 9, 2), np.uint8), np.zeros((2, 3, 4, 5), np.uint8), np.full((4, 4, 3), 2.0),
                np.full((4, 4, 3), np.nan), np.zeros((0, 4, 3), np.uint8), np.full((4, 4, 3), 300)):
        with pytest.raises(InvalidImageError):
            load_image(bad)
    with pytest.raises(InvalidImageError, match="unsupported image source"):
        load_image(12345)


# ----- content rules -----

def test_gif_with_many_frames_gives_the_first_frame_quickly():
    frames = [Image.new("RGB", (64, 48), (4 * k % 256, 255 - k % 256, 7)) for k in range(300)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    start = time.perf_counter()
    image = load_image(data)
    assert time.perf_counter() - start < 0.5
    assert image.mode == "RGB" and image.size == (64, 48)
    assert (np.asarray(image) == np.array([0, 255, 7], np.uint8)).all()


def test_exif_orientation_6_rotates_jpeg():
    stored = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 tall
    stored[:20, :30] = (255, 0, 0)  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    image = load_image(data)
    assert image.size == (40, 60)  # width and height swapped
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(image), np.rot90(decoded, k=-1))
    top_right = np.asarray(image)[5, -5].astype(int)
    assert top_right[0] > 200 and top_right[1] < 60  # the red corner is now at the top right


def test_tiny_and_extreme_sizes():
    for h, w in ((1, 1), (1, 3000), (3000, 1)):
        array = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = load_image(encode(Image.fromarray(array), "PNG"))
        assert image.size == (w, h) and np.array_equal(np.asarray(image), array)


def _mode_images() -> dict[str, tuple[Image.Image, str]]:
    """One image per Pillow mode, with a file format that stores that mode."""
    rgb = Image.fromarray(RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    la = rgb.convert("LA")
    la.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))))
    p_transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_transparent.info["transparency"] = 3
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(RNG.integers(0, 256, (24, 32), dtype=np.uint8)))
    i16 = Image.fromarray(RNG.integers(0, 65536, (24, 32)).astype(np.uint16))
    f32 = Image.fromarray(RNG.uniform(-10, 300, (24, 32)).astype(np.float32))
    return {
        "1": (rgb.convert("1"), "PNG"), "L": (rgb.convert("L"), "PNG"), "LA": (la, "PNG"),
        "P": (rgb.convert("P"), "GIF"), "P+transparency": (p_transparent, "PNG"), "RGBA": (rgba, "PNG"),
        "CMYK": (rgb.convert("CMYK"), "JPEG"), "I;16": (i16, "PNG"), "I": (i16.convert("I"), "TIFF"),
        "F": (f32, "TIFF"), "YCbCr": (rgb.convert("YCbCr"), "JPEG"), "RGBA-webp": (rgba, "WEBP"),
    }


@pytest.mark.parametrize("name", list(_mode_images()))
def test_every_mode_becomes_rgb_like_transformers(name):
    from transformers.image_transforms import convert_to_rgb

    image, fmt = _mode_images()[name]
    data = encode(image, fmt)
    loaded = load_image(data)
    assert loaded.mode == "RGB" and loaded.size == image.size
    reference = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)  # transformers' rule, same file
    assert np.array_equal(np.asarray(loaded), reference)
    assert np.array_equal(np.asarray(to_rgb(image)), convert_to_rgb(image, return_numpy=True))


def test_alpha_is_composited_on_white_deterministically():
    la = Image.new("LA", (4, 4), (10, 0))  # fully transparent dark grey
    assert (np.asarray(load_image(encode(la, "PNG"))) == 255).all()
    p = Image.new("P", (4, 4), 5)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 5
    assert (np.asarray(to_rgb(p)) == 255).all()
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert (np.asarray(to_rgb(half)) == 127).all()  # 255 * (1 - 128/255), same each time
    assert np.array_equal(np.asarray(to_rgb(half)), np.asarray(to_rgb(half.copy())))


def test_a_good_image_still_loads_after_bad_ones():
    bad = [b"", png_header_only(50_000, 50_000), encode(photo(), "JPEG")[:3000], "ftp://x/y",
           "data:image/png;base64,!!", "/no/such/file.png"]
    for source in bad:
        with pytest.raises((InvalidImageError, FileNotFoundError)):
            load_image(source)
    assert np.array_equal(np.asarray(load_image(encode(photo(), "PNG"))), np.asarray(photo()))


def test_lazily_opened_pil_image_truncated_raises_typed_error():
    data = encode(photo(), "PNG")
    with pytest.raises(InvalidImageError):
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))


# ----- http(s), against a local server -----

class _Handler(http.server.BaseHTTPRequestHandler):
    png = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        elif self.path == "/slow-headers":  # a header that never ends: one byte every 0.1 s
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            try:
                for _ in range(100):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server():
    _Handler.png = encode(photo(), "PNG")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_http_fetch(server):
    expected = np.asarray(photo())
    local = dict(allow_local_network=True)  # the test server is on loopback
    assert np.array_equal(np.asarray(load_image(server + "/cat.png", **local)), expected)
    assert np.array_equal(np.asarray(load_image(server + "/redirect", **local)), expected)
    with pytest.raises(InvalidImageError, match="404"):
        load_image(server + "/missing.png", **local)
    with pytest.raises(InvalidImageError, match="(?i)redirect"):
        load_image(server + "/to-file", **local)
    with pytest.raises(InvalidImageError, match="limit"):
        load_image(server + "/cat.png", max_bytes=1000, **local)


@pytest.mark.parametrize("route,timeout,bound", [("/slow", 0.4, 2.0), ("/slow-headers", 0.5, 1.5)],
                         ids=["slow body", "slow headers"])
def test_http_total_timeout(server, route, timeout, bound):
    """The total timeout covers the whole request: a body or headers sent a byte at a time are cut off."""
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match="longer than"):
        load_image(server + route, timeout=timeout, connect_timeout=1.0, allow_local_network=True)
    assert time.perf_counter() - start < bound


def test_http_silent_server_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the kernel accepts the connection; nobody ever answers
    try:
        start = time.perf_counter()
        with pytest.raises(InvalidImageError, match="could not download"):
            load_image(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png", connect_timeout=0.3, timeout=5,
                       allow_local_network=True)
        assert time.perf_counter() - start < 2.0
    finally:
        silent.close()


def test_malformed_http_url_is_a_typed_error():
    with pytest.raises(InvalidImageError, match="could not download"):
        load_image("http://[::1/a.png")


def test_data_url_scheme_and_media_type_are_case_insensitive():
    data = good_png()
    url = "DATA:image/PNG;BASE64," + base64.b64encode(data).decode()
    assert np.array_equal(np.asarray(load_image(url)), np.asarray(load_image(data)))


def test_arrays_and_tensors_get_the_pixel_limit_and_bfloat16_works():
    with pytest.raises(InvalidImageError, match="over the limit"):
        load_image(np.zeros((3, 100, 100), np.uint8), max_pixels=5000)
    with pytest.raises(InvalidImageError, match="over the limit"):
        load_image(torch.zeros(100, 100), max_pixels=5000)
    x = torch.rand(3, 8, 6).bfloat16()
    assert np.array_equal(np.asarray(load_image(x)), np.asarray(load_image(x.float())))
    with pytest.raises(InvalidImageError, match="dtype"):
        load_image(np.zeros((4, 4, 3), np.complex64))
