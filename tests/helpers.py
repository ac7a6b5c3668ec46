"""Small builders shared by the tests."""

from __future__ import annotations

import io
import time

from PIL import Image


def png(width: int = 64, height: int = 64, colour=(200, 40, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def mask_png(width: int = 64, height: int = 64) -> bytes:
    """Black (keep) with a white (regenerate) square in the middle."""
    img = Image.new("L", (width, height), 0)
    img.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Clock:
    """A settable clock for code that takes ``clock=``: tests move time instead of sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (for a server the test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def until(predicate, timeout: float = 10.0, what: str = "the condition"):
    """Poll ``predicate`` every 10 ms until it returns something truthy, and return that; fail after
    ``timeout`` seconds. For waiting on another thread or process, never for timing one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout}s"
        time.sleep(0.01)
