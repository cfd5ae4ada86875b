"""Fixtures the integration tests share."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from image_server import Server


@pytest.fixture
def image_server() -> Iterator[Server]:
    """The misbehaving image server (image_server.py) on a free port of 127.0.0.1, in a thread."""
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
