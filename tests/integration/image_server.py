"""A real HTTP server on 127.0.0.1 that serves real images and misbehaves on purpose (slow
replies, 429 with Retry-After, 500s, truncated bodies, HTML sent as an image, redirect loops,
opt-out headers): what the url-list source's tests download from (fixture `image_server`)."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def picture(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A real image: a colour gradient with noise, encoded as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    pixels = np.clip(pixels + rng.integers(0, 40, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = picture(64, 48, "PNG", 1)
JPEG = picture(64, 32, "JPEG", 2)
MAX_BYTES = 200_000
HUGE = 300_000
SLOW_S = 3.0
TIMEOUT_S = 1.0  # slow enough that only /slow times out on a busy machine


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: the server closes the connection after each answer (a short body ends there)."""

    server: Server

    def log_message(self, format, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def _image(self, data: bytes, kind: str = "image/png", **headers: str):
        self._send(200, data, {"Content-Type": kind, **headers}, len(data))

    def do_GET(self):
        path = self.path
        hits = self.server.record(path)
        if path == "/img.png":
            self._image(PNG)
        elif path == "/img.jpg":
            self._image(JPEG, "image/jpeg")
        elif path == "/404":
            self._send(404, b"gone", length=4)
        elif path == "/410":
            self._send(410, b"gone", length=4)
        elif path == "/500":
            self._send(500, b"oops", length=4)
        elif path == "/flaky":  # 500, then the image
            self._send(500, b"later", length=5) if hits == 1 else self._image(PNG)
        elif path == "/busy":  # 429 with Retry-After, then the image
            self._send(429, b"", {"Retry-After": "1"}, 0) if hits == 1 else self._image(JPEG, "image/jpeg")
        elif path == "/always-busy":
            self._send(429, b"", {"Retry-After": "0"}, 0)
        elif path == "/slow":
            time.sleep(SLOW_S)
            self._image(PNG)
        elif path == "/truncated":
            self._send(200, PNG[: len(PNG) // 2], {"Content-Type": "image/png"}, len(PNG))
        elif path == "/html":
            page = b"<!doctype html><html><body>not a picture</body></html>"
            self._send(200, page, {"Content-Type": "image/png"}, len(page))
        elif path == "/loop-a":
            self._send(302, headers={"Location": "/loop-b"}, length=0)
        elif path == "/loop-b":
            self._send(302, headers={"Location": "/loop-a"}, length=0)
        elif path.startswith("/chain/"):  # /chain/N redirects N times, then the image
            left = int(path.rsplit("/", 1)[1])
            if left == 0:
                self._image(JPEG, "image/jpeg")
            else:
                self._send(301 if left % 2 else 307, headers={"Location": f"/chain/{left - 1}"}, length=0)
        elif path == "/to-ftp":
            self._send(302, headers={"Location": "ftp://127.0.0.1/img.png"}, length=0)
        elif path == "/huge-declared":
            self._send(200, b"x" * 100, {"Content-Type": "image/png"}, HUGE)
        elif path == "/huge-streamed":  # no Content-Length: the body ends when the server closes
            self._send(200, PNG + b"\0" * HUGE, {"Content-Type": "image/png"})
        elif path == "/noai":
            self._image(PNG, **{"X-Robots-Tag": "noai"})
        elif path == "/otherbot":
            self._image(PNG, **{"X-Robots-Tag": "otherbot: NoImageAI, noarchive"})
        elif path == "/noarchive":  # a directive that does not opt out
            self._image(PNG, **{"X-Robots-Tag": "noarchive, nosnippet"})
        else:
            self._send(404, b"", length=0)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections when 32 threads connect at once

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)

    def record(self, path: str) -> int:
        with self.lock:
            self.hits[path] += 1
            self.times[path].append(time.monotonic())
            return self.hits[path]

    def handle_error(self, request, client_address):  # a client that hung up on /slow or a big body
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"
