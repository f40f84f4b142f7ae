"""Test inputs made on the spot: images as bytes and data URLs, hostile images (compression and
pixel bombs), and a loopback image server with misbehaving endpoints."""

from __future__ import annotations

import base64
import io
import ssl
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

MODEL = "glm-4v-flash-web"  # the seed article's name, an alias of the demo model


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    return compressor.compress(data) + compressor.flush()


def gzip_bomb(inflated_bytes: int, layers: int = 2) -> bytes:
    """Zeros gzipped `layers` times (a body for `Content-Encoding: gzip, gzip`): with two layers,
    600 MB of zeros fit in about a kilobyte. Made without compressing every megabyte: a deflate
    block flushed with Z_FULL_FLUSH is byte-aligned and independent of what came before, so one
    megabyte's block repeated is the stream of many."""
    step = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the gzip frame is added here
    block = compressor.compress(bytes(step)) + compressor.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(inflated_bytes, step)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = block * whole + tail.compress(bytes(rest)) + tail.flush()
    crc = 0
    for _ in range(whole):
        crc = zlib.crc32(bytes(step), crc)
    crc = zlib.crc32(bytes(rest), crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    body = header + deflated + crc.to_bytes(4, "little") + (inflated_bytes & 0xFFFFFFFF).to_bytes(4, "little")
    for _ in range(layers - 1):
        body = gzip_bytes(body)
    return body


def pixel_bomb(size: tuple[int, int], mode: str = "RGBA", fmt: str = "PNG") -> bytes:
    """A flat picture of `size`: a small file that decodes to size[0] * size[1] pixels."""
    buffer = io.BytesIO()
    fill = {"RGBA": (10, 20, 30, 255), "RGB": (10, 20, 30), "L": 10, "P": 1, "1": 0}[mode]
    Image.new(mode, size, fill).save(buffer, fmt)
    return buffer.getvalue()


class ImageServer:
    """A loopback HTTP(S) server with images and misbehaving endpoints, for fetch tests.

    `files`: path -> (body, media type), answered 200; `headers`: extra response headers by path
    (e.g. a Content-Encoding the body does not have); `statuses`: path -> status answered instead;
    `redirects`: path -> Location (302); `slow`: path -> seconds to wait first. Every request's
    path and headers are kept in `requests`, in arrival order.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.statuses: dict[str, int] = {}
        self.redirects: dict[str, str] = {}
        self.slow: dict[str, float] = {}  # path -> seconds to wait before answering
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append((self.path, dict(self.headers.items())))
                if self.path in outer.slow:
                    time.sleep(outer.slow[self.path])
                if self.path in outer.statuses:
                    body = b"upstream says no"
                    self.send_response(outer.statuses[self.path])
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.end_headers()
                    return
                if self.path not in outer.files:
                    self.send_error(404)
                    return
                body, mime = outer.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(body)))
                for name, value in outer.headers.get(self.path, {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.host = host
        self.scheme = "https" if ssl_context else "http"
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def hits(self, path: str | None = None) -> int:
        return sum(1 for p, _ in self.requests if path is None or p == path)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
