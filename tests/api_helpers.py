"""A render-API server in process for tests: the real composition root, a real or fake worker."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi.testclient import TestClient

from kiln.api.app import create_app
from kiln.api.services import Services
from kiln.server import build_runtime
from kiln.settings import Settings


@dataclass
class Server:
    client: TestClient
    services: Services
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def wait_for(self, job_id: str, *, timeout: float = 60.0, until=None):
        """Poll until the job is terminal (or ``until(job)``); returns as soon as it is, no fixed sleep."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.services.broker.get(job_id)
            if (until or (lambda j: j.status.terminal))(job):
                return job
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} did not get there in {timeout}s")


@contextmanager
def running_server(tmp_path, engine, *, worker=None, webhook_schedule=(0.05, 0.05, 0.05), **settings):
    # a busy CI machine can take seconds to preload the default model: give sync requests time
    settings.setdefault("sync_wait_s", 120.0)
    settings = Settings(data_dir=tmp_path / "data", **settings)
    runtime = build_runtime(settings, engine=engine, worker=worker, webhook_schedule=webhook_schedule)
    app = create_app(runtime.services, on_start=runtime.start, on_stop=runtime.stop)
    key = runtime.services.keys.create("test").secret
    with TestClient(app, base_url="http://kiln.test") as client:
        yield Server(client, runtime.services, key)


class StalledWorker:
    """A worker that takes requests and never starts them: sync requests wait until they give up,
    queued jobs stay queued (WaveSpeed tasks stay ``created``). Subclass to fail them instead."""

    alive, current_job, seconds_per_job = True, None, 4.0

    def submit_sync(self, request, **kwargs):
        from kiln.worker import SyncTicket

        return SyncTicket(request)  # never started

    def withdraw(self, ticket):
        return True

    def still_starting(self, began):
        return False

    def wake(self):
        pass

    def start(self):
        pass

    def stop(self):
        pass


def serve(handler):
    """An HTTP server on a free 127.0.0.1 port, in a daemon thread: (server, its base URL)."""
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first ``fail_first`` posts, then 204,
    and keeps what it got (headers, body, status)."""

    def __init__(self, fail_first: int = 1) -> None:
        import http.server
        import threading

        self.calls: list[tuple[dict, bytes, int]] = []
        self.done = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(outer.calls) < fail_first else 204
                outer.calls.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if status == 204:
                    outer.done.set()

            def log_message(self, *args):
                pass

        self.httpd, base = serve(Handler)
        self.url = f"{base}/hook"

    def close(self):
        self.httpd.shutdown()


class FileServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 and counts the requests per path."""

    def __init__(self, files: dict[str, bytes]) -> None:
        import http.server

        self.files, self.hits = files, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = outer.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd, self.url = serve(Handler)

    def close(self):
        self.httpd.shutdown()
