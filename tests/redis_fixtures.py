"""A real ``redis-server`` for the tests: started once per session on a free port, emptied per test.

Tests that need it skip (with the reason) only when no ``redis-server`` binary is installed;
``scripts/setup`` installs one from the OS packages.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port


class RedisServer:
    """One ``redis-server`` process in its own directory; without persistence unless ``persistence``
    names other settings (``("--appendonly", "yes")``)."""

    def __init__(self, binary: str, directory: Path, persistence: tuple[str, ...] = ("--appendonly", "no")) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "redis.log"
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
                     "--save", "", *persistence, "--logfile", str(self.log)]
        self.start()

    def start(self) -> None:
        """(Re)start on the same port and directory: a persistent server reads its data back."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready()

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would stop it: no shutdown, no final write."""
        self.proc.kill()
        self.proc.wait()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start: {self.log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.02)  # polling for start-up, not timing the test
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it; or apt-get install redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path) -> Iterator[RedisServer]:
    """A server of this test's own that writes every change to its append-only file before answering."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it; or apt-get install redis-server)")
    server = RedisServer(binary, tmp_path, ("--appendonly", "yes", "--appendfsync", "always"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
