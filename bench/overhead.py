"""What the server adds to a generation: sync HTTP against the same generation in process.

Usage::

    python bench/overhead.py            # full run, ~2-3 minutes on 2 cores, writes bench/results/
    python bench/overhead.py --quick    # sanity run (~45 s), prints only unless --write
    python bench/overhead.py --profile  # where the time goes, stage by stage (~1 min), writes

Setup: toy checkpoints (``kiln.testing.toys.build_toys``, cached in ``--toys``) and the toy catalog
with the small formats (``write_toy_catalog(..., small_formats=True)``); model ``flux/toy`` (the
FLUX.1 architecture at toy size, the default model the worker preloads), task t2i, a fixed prompt,
fixed steps (``--steps``, default 4), seeds drawn deterministically from ``--seed``. Two formats:
``toy-64`` (64x64: the generation is cheap, so the overhead is visible) and ``512`` (a realistic
output size: a 150 KB WebP to encode, store and send).

The server is ``kiln serve`` itself in its own process: ``kiln.cli.main`` runs ``serve`` unchanged
(settings, ``build_app``, ``uvicorn.run`` on 127.0.0.1 with kiln's arguments, auth on, a key created
beforehand through the ``KeyStore`` in its temp data dir, ``KILN_SYNC_WAIT_S=600`` so no request of
the concurrency-8 runs is turned away with 503). The bench only wraps ``kiln.server.build_runtime`` in
that process to keep the runtime it builds and to open a control socket (Unix socket, random auth
key) on a thread of its own. The in-process arms run *in the server process* through that socket, on
the very worker, engine (the loaded model) and asset store the HTTP requests use, and are timed
there; only the command and the result cross the socket. The HTTP client is ``httpx`` in the bench
process, as a real client would be.

Arms (each request is one complete generation; all arms include the WebP encode, so the differences
exclude encoding):

- ``engine``: ``GenerationRequest.create`` + ``Engine.generate`` + the worker's ``_encode`` of every
  output, called directly on the control thread: the generation itself, what a library user pays.
- ``worker``: ``Worker.run_sync`` from the control thread: the above plus the hand-off to the worker
  thread (deque + Condition) and the future back, and ``LocalAssetStore.put`` (content hash, temp file,
  fsync, rename, folder fsync) -- exactly what the sync route does after validation.
- ``http``: ``POST /image/flux/toy/t2i?format=...`` with ``Authorization: Bearer`` and a JSON body
  ``{prompt, steps, seed}``; response 200 with the WebP bytes (checked).
- ``healthz`` (c=1 only): ``GET /healthz`` on the same connection: the HTTP round-trip floor
  (httpx + uvicorn/h11 + FastAPI routing + the rate-header middleware), no auth, no work.

"The same generation": same model object, task, format, prompt, steps and sampler, so the same
pipeline work (the worker and http arms even run it on the same worker thread). Each request gets
its own seed (``--seed`` + a counter shared by all arms): the store is content-addressed, so
repeating one seed would make every put after the first a no-op (stat + utime, no fsync) and flatter
the server; a real server stores a new file per generation, and the seed does not change the cost.
``--same-seed`` measures the repeated-seed case instead. Before measuring, the bench checks that the
server's response for one seed is byte for byte what ``engine`` + encode give.

Overhead definitions (all at the median, one run, arms interleaved so machine noise hits all):

- concurrency 1: each trial runs every arm once, in a shuffled order. For every request, *pipeline*
  = the engine's own ``elapsed_ms`` (denoising loop + VAE decode; the server sends the same number as
  ``X-Generation-Time``) and *outside* = latency - pipeline. **overhead = median outside(http) -
  median outside(engine)**: HTTP, auth, validation, the worker hand-off and storage; encoding is in
  both arms. Split into ``http - worker`` (the HTTP layer) and ``worker - engine`` (hand-off +
  storage). Target: <= 3 ms. The end-to-end ``median(http) - median(engine)`` (and the median of
  per-trial paired differences) is reported too, but on these VMs the pipeline runs up to ~15 %
  faster or slower on one thread than on another of the same process for a whole run (seen in both
  directions with nothing else running: the engine arm runs on the control thread, the other two on
  the worker thread), which at 40-200 ms per generation is larger than the overhead being measured;
  taking each request's own pipeline time out removes that without removing anything the server does.
- concurrency 8: 8 callers contend for the one worker, which serializes generations, so each
  request's latency is mostly waiting for the others. Compared like with like: 8 HTTP clients (8
  threads, one keep-alive connection each) against 8 threads in the server process calling
  ``Worker.run_sync``, each caller issuing requests back to back, in blocks that alternate between
  the arms. Both arms have the hand-off and storage and generate on the same worker thread, so the
  differences are the HTTP layer under contention. **overhead per generation = wall / requests,
  http - worker**: what the server adds to each generation's slot on the one worker (the throughput
  it costs; at saturation each request's latency carries ~8 of these). Split into the serial part
  outside the work, ``(wall - sum of generate + encode ms) / requests``, and the slowdown of the pipeline
  itself (the server's Python work competing with the denoising loop for the GIL and the cores).
  Per-request latency (median, p90, difference) and throughput are reported too.

Torch threads: ``--torch-threads`` (default 1) sets ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` in
both processes. With 2 threads per process on these 2-core VMs, every OpenMP region waits for its
slowest thread, so whenever anything else on the machine takes a core a 40 ms toy generation
stalls for up to 2.4 s (measured while other tests ran); one thread keeps the pipeline's time
steady and leaves the other core to the server's own Python work, as on a GPU server.

Cross-checks: the pipeline medians per arm (does the denoising loop run as fast in every arm?);
``GET /healthz`` round trip (the HTTP floor); client CPU per HTTP request (``time.thread_time``: the
client's share of the http arm, not the server's); ``store.put`` alone on unique bytes of the
output's size.

``--profile`` starts the same ``kiln serve`` process with the sync route's stages stamped inside it
by wrapping functions at run time (nothing outside bench/ is edited) and prints / writes (1) the time
spent in each stage at concurrency 1: client send + uvicorn receive, middleware + routing + body
validation, auth and the key lookup, ``build_request`` and its threadpool hop to ``engine.plan``,
``spend_credit``, the threadpool hop to ``run_sync``, the Condition hand-off, generate, encode,
``put_soon``, the future back to the route, the response, the client's receive. (The what-if
variants of the first profile, 20261121, have all landed or been superseded and were removed.) Without
httptools + uvloop importable (they are kiln dependencies; uvicorn picks them up) uvicorn falls back to
h11 and asyncio: results then get an ``-h11`` suffix.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _machine import load_average, machine, write_results  # noqa: E402

FAMILY, MODEL, TASK = "flux", "toy", "t2i"
PROMPT = "a red circle on a blue background, studio lighting"
TARGET_MS = 3.0
WAIT_S = 600.0  # sync_wait_s for both sides: no 503 in the concurrency-8 runs
FORMATS = ("toy-64", "512")

# Per format: (c=1 trials, c=8 rounds, requests per caller per c=8 block); --quick divides.
PLAN = {"toy-64": (150, 8, 4), "512": (40, 6, 2)}
QUICK_PLAN = {"toy-64": (50, 3, 3), "512": (12, 2, 1)}
# --profile: requests for the stage table
PROFILE_STAGE_REQUESTS = {"toy-64": 200, "512": 60}


# --------------------------------------------------------------------------- helpers


def pct(xs: list[float], q: float) -> float:
    """Quantile ``q`` (0..1) with linear interpolation."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median": round(statistics.median(xs), 3), "p10": round(pct(xs, 0.1), 3),
            "p90": round(pct(xs, 0.9), 3), "mean": round(statistics.fmean(xs), 3), "min": round(min(xs), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Seeds:
    """Deterministic seeds: one counter shared by every arm (or one fixed seed with --same-seed)."""

    def __init__(self, base: int, same: bool) -> None:
        self.base, self.same, self.i = base, same, 0
        self._lock = threading.Lock()

    def next(self) -> int:
        if self.same:
            return self.base
        with self._lock:
            self.i += 1
            return self.base + self.i


# --------------------------------------------------------------------------- the two sides


class InProcess:
    """The in-process arms, run inside the server process on its own runtime (worker, engine, store)."""

    def __init__(self, worker: Any, steps: int) -> None:
        self.worker, self.engine, self.store, self.steps = worker, worker.engine, worker.store, steps

    def request(self, fmt: str, seed: int):
        from kiln.engine import GenerationRequest

        return GenerationRequest.create(family=FAMILY, model=MODEL, task=TASK, format=fmt, prompt=PROMPT,
                                        steps=self.steps, seed=seed)

    def engine_once(self, fmt: str, seed: int, want_data: bool = False) -> tuple[float, dict]:
        from kiln.worker.runner import _encode

        t0 = time.perf_counter()
        result = self.engine.generate(self.request(fmt, seed))
        t1 = time.perf_counter()
        data = [_encode(o)[0] for o in result.outputs]
        t2 = time.perf_counter()
        ms = (t2 - t0) * 1e3
        info = {"pipeline_ms": result.elapsed_ms, "bytes": len(data[0]), "work_ms": (t2 - t0) * 1e3,
                "generate_ms": (t1 - t0) * 1e3, "encode_ms": (t2 - t1) * 1e3}
        if want_data:
            info["data"] = data[0]
        return ms, info

    def worker_once(self, fmt: str, seed: int) -> tuple[float, dict]:
        t0 = time.perf_counter()
        stored = self.worker.run_sync(self.request(fmt, seed), wait_s=WAIT_S, retry_after=5)
        ms = (time.perf_counter() - t0) * 1e3
        return ms, {"pipeline_ms": stored.result.elapsed_ms, "bytes": len(stored.first_bytes),
                    "work_ms": stored.generate_ms + stored.encode_ms}

    def block(self, fmt: str, seeds: list[list[int]]) -> dict:
        """len(seeds) threads calling run_sync back to back, one seed list each."""
        its = [iter(row) for row in seeds]
        return _block([(lambda it=it: self.worker_once(fmt, next(it))) for it in its], len(seeds[0]))

    def serve(self, conn, marks: Marks | None = None) -> None:
        """Answer the bench process's commands until it hangs up (runs on a thread of the server process)."""

        def marks_on() -> None:
            marks.events = []
            marks.on = True

        def marks_off() -> list[tuple[float, str]]:
            marks.on = False
            return list(marks.events)

        ops = {"engine": self.engine_once, "worker": self.worker_once, "block": self.block,
               "store": lambda nbytes, reps: time_store(self.store, nbytes, reps),
               "marks_on": marks_on, "marks_off": marks_off}
        while True:
            try:
                op, kw = conn.recv()
            except (EOFError, OSError):
                return
            try:
                conn.send(("ok", ops[op](**kw)))
            except Exception as exc:  # noqa: BLE001 - reported in the bench process
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


def child_main(control: str, steps: int, kiln_argv: list[str]) -> int:
    """The server process: ``kiln serve`` itself, plus a control socket for the in-process arms.

    ``kiln.cli.serve.run`` runs unchanged (settings, key check, ``build_app``, ``uvicorn.run`` with its
    arguments); ``kiln.server.build_runtime`` is wrapped only to get hold of the runtime it builds, so
    the in-process arms use the very worker, engine (loaded model) and store the HTTP requests use.
    """
    from multiprocessing.connection import Listener

    import kiln.server as server_mod
    from kiln.cli.main import main as kiln_main

    build_runtime, create_app = server_mod.build_runtime, server_mod.create_app
    authkey = bytes.fromhex(os.environ.pop("KILN_BENCH_AUTHKEY"))
    profiling = os.environ.pop("KILN_BENCH_PROFILE", "") == "1"
    held: dict[str, Any] = {}

    def capture(settings, **kw):
        held["runtime"] = runtime = build_runtime(settings, **kw)
        listener = Listener(control, family="AF_UNIX", authkey=authkey)

        def accept() -> None:
            with listener, listener.accept() as conn:
                InProcess(runtime.worker, steps).serve(conn, held.get("marks"))
            # The bench process hung up. It stops this server itself (SIGINT, then hangs up); if it died
            # instead, stop anyway rather than linger as an orphan.
            time.sleep(10)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=accept, name="bench-control", daemon=True).start()
        return runtime

    def instrumented_app(services, **kw):
        app = create_app(services, **kw)
        held["marks"], wrapped = instrument(app, held["runtime"])
        return wrapped

    server_mod.build_runtime = capture
    if profiling:  # --profile: stamp the stages (build_app calls create_app right after build_runtime)
        server_mod.create_app = instrumented_app
    return kiln_main(kiln_argv)


class Remote:
    """The bench process's handle on the in-process arms running in the server process."""

    def __init__(self, control: str, authkey: bytes) -> None:
        from multiprocessing.connection import Client

        self.conn = Client(control, family="AF_UNIX", authkey=authkey)

    def _call(self, op: str, **kw) -> Any:
        self.conn.send((op, kw))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"server-side {op} failed: {value}")
        return value

    def engine_once(self, fmt: str, seed: int, want_data: bool = False) -> tuple[float, dict]:
        return self._call("engine", fmt=fmt, seed=seed, want_data=want_data)

    def worker_once(self, fmt: str, seed: int) -> tuple[float, dict]:
        return self._call("worker", fmt=fmt, seed=seed)

    def block(self, fmt: str, seeds: list[list[int]]) -> dict:
        return self._call("block", fmt=fmt, seeds=seeds)

    def store(self, nbytes: int, reps: int) -> list[float]:
        return self._call("store", nbytes=nbytes, reps=reps)

    def marks_on(self) -> None:
        self._call("marks_on")

    def marks_off(self) -> list[tuple[float, str]]:
        return self._call("marks_off")

    def close(self) -> None:
        self.conn.close()


class Server:
    """``kiln serve`` in a subprocess (auth on, one key made through the KeyStore), with a control socket."""

    def __init__(self, data_dir: Path, catalog_file: Path, log_file: Path, steps: int, profile: bool = False) -> None:
        from kiln.keys import KeyStore

        data_dir.mkdir(parents=True, exist_ok=True)
        keys = KeyStore(data_dir / "kiln.db")
        self.key = keys.create("bench", rate_per_min=10**9).secret  # no 429 in a bench
        keys.close()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        control = str(data_dir.parent / "control.sock")
        authkey = os.urandom(16)
        env = dict(os.environ, KILN_SYNC_WAIT_S=str(WAIT_S), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   KILN_BENCH_AUTHKEY=authkey.hex(), KILN_BENCH_PROFILE="1" if profile else "0")
        self.log = open(log_file, "wb")
        kiln_argv = ["--catalog", str(catalog_file), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                     "--data-dir", str(data_dir)]
        self.cmd = ["kiln", *kiln_argv]
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", control, "--steps", str(steps), "--", *kiln_argv],
            cwd=str(ROOT), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
            self.remote = Remote(control, authkey)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            raise

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("kiln serve did not become ready in 180 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the worker stops
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self.remote.close()
        self.log.close()


class HttpCaller:
    """One keep-alive connection, as one HTTP caller.

    The client is the measuring instrument, not the server, and its own CPU time lands inside the
    http arm's latency (it is reported as *client CPU*). On this VM httpx spends ~1.5 ms per request
    and ``http.client`` ~0.6 ms (its header parsing goes through ``email.parser``); ``raw`` (the
    default) is a minimal HTTP/1.1 client on a socket, the way load generators such as wrk measure a
    server: the request's bytes are built once per call and sent in one ``sendall``, and the reply is
    read by ``Content-Length``, ~0.1 ms. ``--client stdlib`` or ``--client httpx`` measure what users of
    those clients see.
    """

    def __init__(self, base: str, key: str, steps: int, client: str = "raw") -> None:
        from urllib.parse import urlsplit

        self.kind, self.steps = client, steps
        self.auth = f"Bearer {key}"
        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port
        self.sock = None
        if client == "httpx":
            import httpx

            self.client = httpx.Client(base_url=base, headers={"Authorization": self.auth}, timeout=WAIT_S + 60)
        elif client == "stdlib":
            import http.client

            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=WAIT_S + 60)

    def _request(self, method: str, path: str, body: dict | None) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Authorization": self.auth, "Content-Type": "application/json"}
        if self.kind == "httpx":
            r = self.client.request(method, path, content=data, headers=headers)
            return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content
        for attempt in (0, 1):  # one retry on a fresh connection: uvicorn drops idle ones after 5 s
            try:
                if self.kind == "stdlib":
                    return self._stdlib(method, path, data, headers)
                return self._raw(method, path, data, headers)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, EOFError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _stdlib(self, method, path, data, headers):
        import http.client

        try:
            self.conn.request(method, path, body=data, headers=headers)  # bytes: one send()
            r = self.conn.getresponse()
        except http.client.RemoteDisconnected as exc:
            raise ConnectionResetError(str(exc)) from exc
        content = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, content

    def _raw(self, method, path, data, headers):
        import socket

        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=WAIT_S + 60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if data is not None:
            lines.append(f"Content-Length: {len(data)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (data or b""))
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        head = buf[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        need = end + 4 + int(hdrs.get("content-length", "0"))
        while len(buf) < need:
            chunk = self.sock.recv(max(262144, need - len(buf)))
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        self.buf = buf[need:]
        return status, hdrs, buf[end + 4:need]

    def once(self, fmt: str, seed: int) -> tuple[float, dict]:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        status, headers, content = self._request("POST", f"/image/{FAMILY}/{MODEL}/{TASK}?format={fmt}",
                                                 {"prompt": PROMPT, "steps": self.steps, "seed": seed})
        ms = (time.perf_counter() - t0) * 1e3
        cpu = (time.thread_time() - c0) * 1e3
        if status != 200 or headers.get("content-type") != "image/webp":
            raise RuntimeError(f"POST answered {status} {headers.get('content-type')}: {content[:300]!r}")
        timing = dict(part.strip().split(";dur=") for part in headers["server-timing"].split(","))
        return ms, {"pipeline_ms": int(headers["x-generation-time"]), "bytes": len(content),
                    "work_ms": float(timing["generate"]) + float(timing["encode"]),
                    "client_cpu_ms": cpu, "data": content}

    def healthz(self) -> tuple[float, dict]:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        status, _, _ = self._request("GET", "/healthz", None)
        ms = (time.perf_counter() - t0) * 1e3
        if status != 200:
            raise RuntimeError(f"/healthz answered {status}")
        return ms, {"client_cpu_ms": (time.thread_time() - c0) * 1e3}

    def close(self) -> None:
        if self.kind == "httpx":
            self.client.close()
        elif self.kind == "stdlib":
            self.conn.close()
        elif self.sock is not None:
            self.sock.close()
            self.sock = None


# --------------------------------------------------------------------------- measuring


def run_c1(fmt: str, trials: int, inproc: Remote, http: HttpCaller, seeds: Seeds, rng: random.Random) -> dict:
    """Every trial runs each arm once, in a shuffled order."""
    arms = {
        "engine": lambda: inproc.engine_once(fmt, seeds.next()),
        "worker": lambda: inproc.worker_once(fmt, seeds.next()),
        "http": lambda: http.once(fmt, seeds.next()),
        "healthz": http.healthz,
    }
    raw: dict[str, dict[str, list]] = {
        a: {"ms": [], "pipeline_ms": [], "work_ms": [], "client_cpu_ms": [], "bytes": []} for a in arms}
    for _ in range(trials):
        order = list(arms)
        rng.shuffle(order)
        for arm in order:
            ms, info = arms[arm]()
            rec = raw[arm]
            rec["ms"].append(round(ms, 3))
            for k in ("pipeline_ms", "work_ms", "client_cpu_ms", "bytes"):
                if k in info:
                    rec[k].append(round(info[k], 3) if isinstance(info[k], float) else info[k])
    return {a: {k: v for k, v in rec.items() if v} for a, rec in raw.items()}


def _block(fns: list, per_caller: int) -> dict:
    """Run ``per_caller`` requests back to back in each of len(fns) threads; latencies and wall time."""
    n = len(fns)
    barrier = threading.Barrier(n + 1)
    lat: list[list[float]] = [[] for _ in range(n)]
    pipe: list[list[int]] = [[] for _ in range(n)]
    work: list[list[float]] = [[] for _ in range(n)]
    spans: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(per_caller):
                t0 = time.perf_counter()
                _, info = fns[i]()
                t1 = time.perf_counter()
                lat[i].append((t1 - t0) * 1e3)
                pipe[i].append(info["pipeline_ms"])
                work[i].append(round(info["work_ms"], 3))
                spans[i].append((t0, t1))
        except BaseException as exc:  # noqa: BLE001 - reported after the block
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    start = min(s[0][0] for s in spans)
    end = max(s[-1][1] for s in spans)
    return {"ms": [round(x, 3) for row in lat for x in row], "pipeline_ms": [x for row in pipe for x in row],
            "work_ms": [x for row in work for x in row],
            "wall_s": round(end - start, 4), "n": n * per_caller}


def run_c8(fmt: str, rounds: int, per_caller: int, inproc: Remote, callers: list[HttpCaller], seeds: Seeds) -> dict:
    """Alternate blocks of 8 HTTP callers (threads here) and 8 run_sync threads (in the server process)."""
    n = len(callers)

    def http_block(k: int) -> dict:
        return _block([(lambda c=c: c.once(fmt, seeds.next())) for c in callers], k)

    def worker_block(k: int) -> dict:
        return inproc.block(fmt, [[seeds.next() for _ in range(k)] for _ in range(n)])

    arms = {"http": http_block, "worker": worker_block}
    raw: dict[str, list[dict]] = {a: [] for a in arms}
    for block in arms.values():  # warm-up block per arm (threads, connections, the worker's deque)
        block(1)
    for r in range(rounds):
        order = list(arms)  # each arm goes first in half the rounds
        if r % 2:
            order.reverse()
        for arm in order:
            gc.collect()
            raw[arm].append(arms[arm](per_caller))
    return raw


def time_store(store, nbytes: int, reps: int) -> list[float]:
    """store.put of unique bytes of the output's size (what the worker does per image)."""
    out = []
    for i in range(reps):
        data = os.urandom(nbytes)
        t0 = time.perf_counter()
        store.put(data, "i", "image/webp")
        out.append(round((time.perf_counter() - t0) * 1e3, 3))
    return out


# --------------------------------------------------------------------------- analysis


def analyse_c1(raw: dict) -> dict:
    med = {a: statistics.median(r["ms"]) for a, r in raw.items()}
    p90 = {a: pct(r["ms"], 0.9) for a, r in raw.items()}
    paired = lambda a, b: [x - y for x, y in zip(raw[a]["ms"], raw[b]["ms"])]  # noqa: E731
    gen_arms = ("engine", "worker", "http")
    outside = {a: [m - w for m, w in zip(raw[a]["ms"], raw[a]["work_ms"])] for a in gen_arms}
    out_med = {a: statistics.median(v) for a, v in outside.items()}
    res = {
        "stats": {a: stats(r["ms"]) for a, r in raw.items()},
        # headline: end to end, difference of medians
        "overhead_ms": round(med["http"] - med["engine"], 3),
        "http_layer_ms": round(med["http"] - med["worker"], 3),
        "handoff_storage_ms": round(med["worker"] - med["engine"], 3),
        "overhead_p90_ms": round(p90["http"] - p90["engine"], 3),
        "paired_median_ms": {
            "http-engine": round(statistics.median(paired("http", "engine")), 3),
            "http-worker": round(statistics.median(paired("http", "worker")), 3),
            "worker-engine": round(statistics.median(paired("worker", "engine")), 3),
        },
        "ratio_http_engine": round(med["http"] / med["engine"], 4),
        # cross-check: the same differences with each request's own pipeline time taken out
        "pipeline_ms_median": {a: statistics.median(raw[a]["pipeline_ms"]) for a in gen_arms},
        "outside_stats": {a: stats(v) for a, v in outside.items()},
        "outside_overhead_ms": round(out_med["http"] - out_med["engine"], 3),
        "outside_http_layer_ms": round(out_med["http"] - out_med["worker"], 3),
        "outside_handoff_storage_ms": round(out_med["worker"] - out_med["engine"], 3),
        "client_cpu_ms_median": {a: round(statistics.median(raw[a]["client_cpu_ms"]), 3) for a in ("http", "healthz")},
        "healthz_ms_median": round(med["healthz"], 3),
    }
    res["within_target"] = res["outside_overhead_ms"] <= TARGET_MS  # the headline: see the docstring
    res["end_to_end_within_target"] = res["overhead_ms"] <= TARGET_MS
    return res


def analyse_c8(raw: dict) -> dict:
    lat = {a: [x for b in blocks for x in b["ms"]] for a, blocks in raw.items()}
    per_gen = {a: [b["wall_s"] * 1e3 / b["n"] for b in blocks] for a, blocks in raw.items()}
    thr = {a: [b["n"] / b["wall_s"] for b in blocks] for a, blocks in raw.items()}
    med = {a: statistics.median(v) for a, v in lat.items()}
    pg = {a: statistics.median(v) for a, v in per_gen.items()}
    pipe = {a: [x for b in blocks for x in b["pipeline_ms"]] for a, blocks in raw.items()}
    # serial time per generation outside generate + encode: (block wall - sum of their times) / requests
    out_gen = {a: [(b["wall_s"] * 1e3 - sum(b["work_ms"])) / b["n"] for b in blocks] for a, blocks in raw.items()}
    og = {a: statistics.median(v) for a, v in out_gen.items()}
    return {
        "pipeline_ms_median": {a: statistics.median(v) for a, v in pipe.items()},
        "outside_per_generation_ms_median": {a: round(v, 3) for a, v in og.items()},
        "outside_per_generation_overhead_ms": round(og["http"] - og["worker"], 3),
        "paired_outside_per_generation_ms": round(statistics.median(
            [h - w for h, w in zip(out_gen["http"], out_gen["worker"])]), 3),
        "stats": {a: stats(v) for a, v in lat.items()},
        "throughput_per_s_median": {a: round(statistics.median(v), 3) for a, v in thr.items()},
        "per_generation_ms_median": {a: round(v, 3) for a, v in pg.items()},
        "latency_overhead_ms": round(med["http"] - med["worker"], 3),
        "latency_overhead_p90_ms": round(pct(lat["http"], 0.9) - pct(lat["worker"], 0.9), 3),
        "per_generation_overhead_ms": round(pg["http"] - pg["worker"], 3),
        "paired_per_generation_ms": round(statistics.median(
            [h - w for h, w in zip(per_gen["http"], per_gen["worker"])]), 3),
        "throughput_ratio": round(statistics.median(thr["http"]) / statistics.median(thr["worker"]), 4),
    }


# --------------------------------------------------------------------------- output


def render_md(result: dict, args) -> str:
    m = result["machine"]
    pk = m["packages"]
    cfg = result["config"]
    fmts = result["formats"]
    lines = [
        f"# Server overhead bench {result['date']}{' (quick)' if args.quick else ''}",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, {m['os']}, "
        f"Python {m['python']}; torch {pk.get('torch')} ({cfg['torch_threads']} thread(s) per process), diffusers "
        f"{pk.get('diffusers')}, fastapi {pk.get('fastapi')}, starlette {pk.get('starlette')}, uvicorn "
        f"{pk.get('uvicorn')} (h11 {pk.get('h11')}, httptools {pk.get('httptools')}, uvloop {pk.get('uvloop')}), "
        f"httpx {pk.get('httpx')}. Load average (1/5/15 min) at start {m.get('load_average_start')}, at end "
        f"{m.get('load_average')}; run took {m.get('bench_wall_s')} s.",
        "",
        f"Command: `python bench/overhead.py{' --quick' if args.quick else ''}"
        f"{' --same-seed' if args.same_seed else ''}` - model `{FAMILY}/{MODEL}` (toy FLUX.1, random weights), "
        f"{TASK}, {cfg['steps']} steps, default sampler, "
        f"{'one fixed seed ' + str(cfg['seed']) if args.same_seed else 'seeds ' + str(cfg['seed']) + '+n (a new one per request)'}; "
        f"server = `kiln serve` (uvicorn, auth on) in its own process, client = {cfg.get('client', 'httpx')} "
        "in the bench process (one keep-alive connection per caller). "
        "Shared, noisy VM: medians and ratios from one run.",
        "",
        "Arms: **engine** = `GenerationRequest.create` + `Engine.generate` + the worker's WebP encode, in process; "
        "**worker** = `Worker.run_sync` in process (engine + encode + hand-off to the worker thread + "
        "`WriteBehindStore.put_soon`, the store as the server has it); **http** = `POST /image/flux/toy/t2i?format=F` "
        "to the server (auth, validation, the same worker path, response). "
        "**healthz** = `GET /healthz`, the HTTP round-trip floor.",
        "",
        "## Concurrency 1",
        "",
        "Each trial runs every arm once, in shuffled order. *work* = the request's own `Engine.generate` call + "
        "encode time (timed around those calls in the engine arm; the worker's `Stored.generate_ms` + "
        "`encode_ms`; the server's `Server-Timing` header in the http arm); *outside* = latency - work, per "
        "request. **Overhead = median outside(http) - median outside(engine)**: what the server adds (HTTP, "
        "auth, validation, hand-off, storage), excluding encoding as the target says, and with the pipeline's "
        "own speed taken out, because that speed differs by up to ~10% between threads and processes on this "
        "VM for reasons the server does not cause (see the pipeline medians below). "
        f"Target <= {TARGET_MS:g} ms. HTTP layer = http - worker, hand-off + storage = worker - engine (outside medians).",
        "",
        "| format | n | outside engine / worker / http ms | http outside p90 | **overhead** | HTTP layer "
        "| hand-off + storage | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for fmt, r in fmts.items():
        a = r["c1"]
        o = a["outside_stats"]
        lines.append(
            f"| {fmt} | {o['http']['n']} | {o['engine']['median']:.2f} / {o['worker']['median']:.2f} / "
            f"{o['http']['median']:.2f} | {o['http']['p90']:.2f} | **{a['outside_overhead_ms']:+.2f} ms** | "
            f"{a['outside_http_layer_ms']:+.2f} | {a['outside_handoff_storage_ms']:+.2f} | "
            f"{'within' if a['within_target'] else 'OVER'} {TARGET_MS:g} ms |")
    lines += [
        "",
        "End to end (whole latency, pipeline included; the difference of medians mixes the overhead with the "
        "pipeline-speed difference shown in the next column). healthz = `GET /healthz` round trip; client CPU = "
        "the client's thread time per request (its share of the http arm); store.put = the server store's durable "
        "`put` (what an async job pays; a sync request only hands the write over) alone on unique bytes of the "
        "output's size.",
        "",
        "| format | engine / worker / http ms (p90) | http - engine | paired | http/engine | pipeline engine / worker "
        "/ server ms | healthz ms | client CPU http / healthz | store.put ms (p90) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, r in fmts.items():
        a = r["c1"]
        s_, p, c = a["stats"], a["pipeline_ms_median"], a["client_cpu_ms_median"]
        st = r["store_put"]
        lines.append(
            f"| {fmt} | {s_['engine']['median']:.1f} ({s_['engine']['p90']:.1f}) / {s_['worker']['median']:.1f} "
            f"({s_['worker']['p90']:.1f}) / {s_['http']['median']:.1f} ({s_['http']['p90']:.1f}) | "
            f"{a['overhead_ms']:+.2f} | {a['paired_median_ms']['http-engine']:+.2f} | {a['ratio_http_engine']:.3f} | "
            f"{p['engine']:g} / {p['worker']:g} / {p['http']:g} | {a['healthz_ms_median']:.2f} | "
            f"{c['http']:.2f} / {c['healthz']:.2f} | {st['median']:.2f} ({st['p90']:.2f}) |")
    lines += [
        "",
        "## Concurrency 8",
        "",
        "8 callers contend for the one worker, which runs one generation at a time, so a request's latency is "
        "mostly waiting for the other seven. Compared like with like: 8 HTTP clients (threads in the bench "
        "process, one keep-alive connection each) vs 8 threads in the server process calling `Worker.run_sync` "
        "on the same worker, every caller sending its requests back to back; blocks of the two arms alternate "
        "(each arm first in half the rounds). Both arms have the hand-off and storage and generate on the same "
        "worker thread, so the differences are the HTTP layer under contention. **Overhead at c=8 = wall time "
        "per generation (block wall / requests), http - worker**: how much the server lowers throughput, i.e. "
        "what it adds to each generation's slot on the one worker (at saturation ~8 of these are in every "
        "request's latency). Split into the serial part outside the work ((wall - sum of the requests' "
        "generate + encode ms) / requests) and the slowdown of the pipeline itself (the server's Python work "
        "competes with the denoising loop for the GIL and the 2 cores).",
        "",
        "| format | requests http + worker | latency worker / http ms (p90) | latency diff | throughput worker "
        "/ http /s | ratio | ms per generation worker / http | **overhead per generation** | of which outside "
        "the work | of which pipeline slowdown (pipeline worker / server) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, r in fmts.items():
        a = r["c8"]
        s_ = a["stats"]
        pg, th, pp = a["per_generation_ms_median"], a["throughput_per_s_median"], a["pipeline_ms_median"]
        lines.append(
            f"| {fmt} | {s_['http']['n']} + {s_['worker']['n']} | {s_['worker']['median']:.1f} ({s_['worker']['p90']:.1f}) "
            f"/ {s_['http']['median']:.1f} ({s_['http']['p90']:.1f}) | {a['latency_overhead_ms']:+.2f} | "
            f"{th['worker']:.2f} / {th['http']:.2f} | {a['throughput_ratio']:.3f} | {pg['worker']:.2f} / {pg['http']:.2f} | "
            f"**{a['per_generation_overhead_ms']:+.2f} ms** | {a['outside_per_generation_overhead_ms']:+.2f} | "
            f"{pp['http'] - pp['worker']:+.1f} ({pp['worker']:g} / {pp['http']:g}) |")
    lines.append("")
    if result.get("same_bytes") is not None:
        lines += [f"Same generation: the server's WebP for seed {cfg['seed']} "
                  f"{'is byte for byte' if result['same_bytes'] else 'is NOT'} what engine + encode give in process.", ""]
    lines += [result["verdict"], ""]
    return "\n".join(lines)


def verdict(formats: dict) -> str:
    parts = []
    for fmt, r in formats.items():
        a, c8 = r["c1"], r["c8"]
        parts.append(f"{fmt}: {a['outside_overhead_ms']:+.2f} ms at c=1 (HTTP layer {a['outside_http_layer_ms']:+.2f}, "
                     f"hand-off + storage {a['outside_handoff_storage_ms']:+.2f}; end to end {a['overhead_ms']:+.2f}), "
                     f"{c8['per_generation_overhead_ms']:+.2f} ms per generation at c=8 ("
                     f"{c8['outside_per_generation_overhead_ms']:+.2f} outside the work; latency "
                     f"{c8['latency_overhead_ms']:+.2f} ms, throughput x{c8['throughput_ratio']:.3f})")
    ok = all(r["c1"]["within_target"] for r in formats.values())
    return (f"Verdict: the median overhead at concurrency 1 is {'within' if ok else 'OVER'} the {TARGET_MS:g} ms "
            "target. " + "; ".join(parts) + ".")


# --------------------------------------------------------------------------- --profile


class Marks:
    """Timestamps of named events; at concurrency 1 one request's events never interleave with another's."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.on = False

    def __call__(self, name: str) -> None:
        if self.on:
            self.events.append((time.perf_counter(), name))

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        import inspect

        orig = getattr(obj, attr)
        if inspect.iscoroutinefunction(orig):
            async def wrapped(*a, **k):
                self(name + ">")
                try:
                    return await orig(*a, **k)
                finally:
                    self(name + "<")
        else:
            def wrapped(*a, **k):
                self(name + ">")
                try:
                    return orig(*a, **k)
                finally:
                    self(name + "<")
        setattr(obj, attr, wrapped)


def _span(events: list[tuple[float, str]], name: str) -> float:
    t = {n: ts for ts, n in events}
    return (t[name + "<"] - t[name + ">"]) * 1e3


def instrument(app: Any, runtime: Any) -> tuple[Marks, Any]:
    """In the server process: stamp the sync route's stages; return the marks and the wrapped app."""
    import kiln.api.auth as auth_mod
    import kiln.api.routes.generate as gen_mod
    import kiln.worker.runner as runner_mod

    svc, worker = runtime.services, runtime.worker
    mark = Marks()
    mark.wrap(auth_mod, "authenticate_token", "auth")
    mark.wrap(svc.keys, "lookup", "keys.lookup")
    mark.wrap(svc.keys, "spend", "keys.spend")
    mark.wrap(gen_mod, "_sync", "route")
    mark.wrap(gen_mod, "build_request", "build_request")
    mark.wrap(svc, "validate", "plan")
    mark.wrap(gen_mod, "spend_credit", "spend_credit")
    mark.wrap(gen_mod, "run_sync", "run_sync")
    mark.wrap(worker, "_generate", "worker._generate")
    mark.wrap(worker.engine, "generate", "engine.generate")
    mark.wrap(runner_mod, "_encode", "encode")
    mark.wrap(worker.store, "put_soon", "store.put_soon")
    mark.wrap(worker.broker, "claim", "broker.claim")

    async def asgi(scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await app(scope, receive, send)
        mark("asgi>")

        async def timed_send(message):
            if message["type"] == "http.response.start":
                mark("response.start")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                mark("asgi<")

        await app(scope, receive, timed_send)

    return mark, asgi


def profile(args, tmp: Path) -> int:
    """Stage timings of the sync route in the ``kiln serve`` process, concurrency 1."""
    from kiln.testing.catalog import write_toy_catalog
    from kiln.testing.toys import build_toys

    load_start = load_average()
    toys = Path(args.toys).expanduser()
    build_toys(toys)
    catalog_file = write_toy_catalog(toys, tmp / "catalog.toml", small_formats=True)
    server = Server(tmp / "server-data", catalog_file, tmp / "server.log", args.steps, profile=True)
    remote = server.remote
    caller = HttpCaller(server.base, server.key, args.steps, args.client)
    seeds = Seeds(args.seed, args.same_seed)
    lines: list[str] = []
    raw: dict[str, Any] = {}
    try:
        for fmt in args.formats:
            n = 60 if args.quick else PROFILE_STAGE_REQUESTS.get(fmt, 80)
            for _ in range(5):
                caller.once(fmt, seeds.next())
            per_request: list[list[tuple[float, str]]] = []
            lat = []
            for _ in range(n):
                remote.marks_on()
                t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable with the server process's stamps
                ms, _info = caller.once(fmt, seeds.next())
                t1 = time.perf_counter()
                time.sleep(0.002)  # let the worker's post-request broker.claim land in this request's events
                per_request.append(sorted([(t0, "client>"), (t1, "client<"), *remote.marks_off()]))
                lat.append(ms)
            lines += _profile_table(fmt, per_request, lat)
            raw[fmt] = {"stage_events": [[(round((t - ev[0][0]) * 1e3, 4), n) for t, n in ev] for ev in per_request],
                        "latency_ms": [round(x, 3) for x in lat]}
            print("\n".join(lines[-(len(STAGES) + 6):]), file=sys.stderr)
    finally:
        caller.close()
        server.close()
    m = machine(extra={"bench_args": vars(args), "load_average_start": load_start},
                packages=("torch", "fastapi", "starlette", "uvicorn", "h11", "httptools", "uvloop", "httpx", "anyio"))
    pk = m["packages"]
    head = [f"# Server overhead profile {dt.date.today().strftime('%Y%m%d')}{' (quick)' if args.quick else ''}", "",
            f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, Python {m['python']}; torch {pk['torch']} "
            f"({args.torch_threads} thread), fastapi {pk['fastapi']}, starlette {pk['starlette']}, uvicorn {pk['uvicorn']} "
            f"(h11 {pk['h11']}, httptools {pk['httptools']}, uvloop {pk['uvloop']}), httpx {pk['httpx']}. Load average "
            f"at start {load_start}, at end {m['load_average']}.", "",
            f"Command: `python bench/overhead.py --profile{' --quick' if args.quick else ''}`. The server is `kiln serve` "
            "in its own process, as in the main bench, with the sync route's stages stamped there by wrapping "
            "functions at run time (nothing outside bench/ is edited; the wrappers add a few microseconds per stage); "
            f"the client ({args.client}) stamps `client>` / `client<` in the bench process (perf_counter is CLOCK_MONOTONIC, "
            f"the same clock in both processes). Model `{FAMILY}/{MODEL}`, {args.steps} steps, a new seed per "
            "request, concurrency 1."]
    md = "\n".join(head + lines) + "\n"
    print(md)
    if (not args.quick or args.write) and not args.no_write:
        tag = "" if pk["httptools"] and pk["uvloop"] else "-h11"
        stem = f"overhead-{dt.date.today().strftime('%Y%m%d')}-profile{tag}" + ("-quick" if args.quick else "")
        out_dir = HERE / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.json").write_text(json.dumps({"machine": m, "formats": raw}, separators=(",", ":")) + "\n",
                                              encoding="utf-8")
        (out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
        print(f"wrote {out_dir / stem}.json and .md", file=sys.stderr)
    return 0


# (label, start event, end event, spans subtracted): stages of one sync request, in order
STAGES = (
    ("client send + uvicorn receive/parse", "client>", "asgi>", ()),
    ("middleware + routing + body read/JSON + query/body validation", "asgi>", "route>", ("auth",)),
    ("  of which auth (key lookup in SQLite + rate limiter)", "auth>", "auth<", ()),
    ("    of which KeyStore.lookup", "keys.lookup>", "keys.lookup<", ()),
    ("build_request: create + engine.plan", "build_request>", "build_request<", ()),
    ("  of which engine.plan itself", "plan>", "plan<", ()),
    ("spend_credit (no SQLite write for an unlimited key)", "spend_credit>", "spend_credit<", ()),
    ("spend_credit< .. run_sync>", "spend_credit<", "run_sync>", ()),
    ("hand-off to the worker thread (deque + Condition)", "run_sync>", "worker._generate>", ()),
    ("engine.generate (pipeline, plan again)", "engine.generate>", "engine.generate<", ()),
    ("encode (WebP)", "encode>", "encode<", ()),
    ("store.put_soon (hash; the write happens after)", "store.put_soon>", "store.put_soon<", ()),
    ("future back: worker -> event loop -> route returns", "worker._generate<", "route<", ()),
    ("response: middleware, headers, send", "route<", "asgi<", ()),
    ("client receive/parse", "asgi<", "client<", ()),
)


def _profile_table(fmt: str, per_request: list[list[tuple[float, str]]], lat: list[float]) -> list[str]:
    rows: dict[str, list[float]] = {label: [] for label, *_ in STAGES}
    for events in per_request:
        t = {n: ts for ts, n in events}
        for label, start, end, minus in STAGES:
            if start in t and end in t:
                v = t[end] - t[start] - sum(t[m + "<"] - t[m + ">"] for m in minus)
                rows[label].append(v * 1e3)
    lines = ["", f"## {fmt}: stages ({len(lat)} requests, client latency median {statistics.median(lat):.2f} ms)", "",
             "| stage | median ms | p90 ms |", "|---|---:|---:|"]
    total = 0.0
    for label, start, end, _ in STAGES:
        v = rows[label]
        if not v:
            continue
        med = statistics.median(v)
        if not label.startswith(" "):
            total += med
        lines.append(f"| {label.replace(' ', '&nbsp;', label.find(label.strip()[0]))} (`{start}`..`{end}`) | {med:.3f} | "
                     f"{pct(v, 0.9):.3f} |")
    lines.append(f"| sum of the top-level medians | {total:.3f} | |")
    return lines


# --------------------------------------------------------------------------- main


def measure(args, tmp: Path) -> dict:
    from kiln.testing.catalog import write_toy_catalog
    from kiln.testing.toys import build_toys

    toys = Path(args.toys).expanduser()
    print(f"toys in {toys} ...", file=sys.stderr)
    build_toys(toys)
    catalog_file = write_toy_catalog(toys, tmp / "catalog.toml", small_formats=True)
    seeds = Seeds(args.seed, args.same_seed)
    rng = random.Random(args.seed)
    plan = QUICK_PLAN if args.quick else PLAN

    print("starting kiln serve ...", file=sys.stderr)
    server = Server(tmp / "server-data", catalog_file, tmp / "server.log", args.steps)
    inproc = server.remote
    http = HttpCaller(server.base, server.key, args.steps, args.client)
    callers = [HttpCaller(server.base, server.key, args.steps, args.client) for _ in range(8)]
    out: dict[str, Any] = {"formats": {}, "server_cmd": server.cmd}
    try:
        # The same generation: the server's bytes for one seed == engine + encode in process.
        check_seed = args.seed
        _, e = inproc.engine_once(args.formats[0], check_seed, want_data=True)
        _, h = http.once(args.formats[0], check_seed)
        out["same_bytes"] = e["data"] == h["data"]
        if not out["same_bytes"]:
            print("! server bytes differ from engine + encode for the same seed", file=sys.stderr)
        t_start = time.perf_counter()
        for fmt in args.formats:
            trials, rounds, per_caller = plan.get(fmt, plan["512"])
            print(f"[{fmt}] warm-up ...", file=sys.stderr)
            for _ in range(3 if args.quick else 5):
                inproc.engine_once(fmt, seeds.next())
                inproc.worker_once(fmt, seeds.next())
                http.once(fmt, seeds.next())
                http.healthz()
            gc.collect()
            print(f"[{fmt}] concurrency 1: {trials} trials x 4 arms ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
            c1 = run_c1(fmt, trials, inproc, http, seeds, rng)
            a1 = analyse_c1(c1)
            print(f"[{fmt}]   overhead {a1['overhead_ms']:+.2f} ms (http {a1['stats']['http']['median']:.1f}, "
                  f"worker {a1['stats']['worker']['median']:.1f}, engine {a1['stats']['engine']['median']:.1f})",
                  file=sys.stderr)
            print(f"[{fmt}] concurrency 8: {rounds} rounds x 2 arms x {8 * per_caller} requests "
                  f"({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
            c8 = run_c8(fmt, rounds, per_caller, inproc, callers, seeds)
            a8 = analyse_c8(c8)
            print(f"[{fmt}]   latency overhead {a8['latency_overhead_ms']:+.2f} ms, per generation "
                  f"{a8['per_generation_overhead_ms']:+.2f} ms", file=sys.stderr)
            nbytes = int(statistics.median(c1["http"]["bytes"]))
            store_ms = inproc.store(nbytes, 10 if args.quick else 30)
            out["formats"][fmt] = {
                "plan": {"c1_trials": trials, "c8_rounds": rounds, "c8_requests_per_caller": per_caller},
                "c1_raw": c1, "c8_raw": c8, "c1": a1, "c8": a8,
                "store_put_raw_ms": store_ms, "store_put": stats(store_ms), "output_bytes": nbytes,
            }
    finally:
        for c in [http, *callers]:
            c.close()
        server.close()
        out["server_log_tail"] = (tmp / "server.log").read_text(errors="replace").splitlines()[-20:]
    out["verdict"] = verdict(out["formats"])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the server process (see Server): --child SOCKET --steps N -- <kiln args>
        sep = argv.index("--")
        return child_main(argv[1], int(argv[3]), argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials (~1 min); writes nothing unless --write")
    ap.add_argument("--write", action="store_true", help="write results even in --quick mode")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results files")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated formats (default {','.join(FORMATS)})")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps (default 4, flux/toy's default)")
    ap.add_argument("--seed", type=int, default=1234, help="first seed (default 1234)")
    ap.add_argument("--same-seed", action="store_true",
                    help="every request uses --seed (storage then only refreshes the existing file)")
    ap.add_argument("--toys", default=os.environ.get("KILN_TEST_TOYS") or "~/.cache/kiln/bench-toys",
                    help="where the toy checkpoints are built / reused (default KILN_TEST_TOYS, else ~/.cache/kiln/bench-toys)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch/OpenMP threads in both processes (default 1: see the module docstring)")
    ap.add_argument("--client", choices=("raw", "stdlib", "httpx"), default="raw",
                    help="HTTP client of the http arm (default raw: a minimal socket client; see HttpCaller)")
    ap.add_argument("--profile", action="store_true",
                    help="time the sync route's stages with the server in process (prints only)")
    args = ap.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    # Before torch is imported anywhere (the server subprocess inherits the environment).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.torch_threads)
    import torch

    torch.set_num_threads(args.torch_threads)

    if args.profile:
        with tempfile.TemporaryDirectory(prefix="kiln-overhead-profile-") as d:
            return profile(args, Path(d))

    load_start = load_average()
    if load_start and load_start[0] > 0.5:
        print(f"! load average {load_start} before start: other processes will skew timings", file=sys.stderr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-overhead-") as d:
        res = measure(args, Path(d))
    res["date"] = dt.date.today().strftime("%Y%m%d")
    res["config"] = {"family": FAMILY, "model": MODEL, "task": TASK, "prompt": PROMPT, "steps": args.steps,
                     "torch_threads": args.torch_threads,
                     "seed": args.seed, "same_seed": args.same_seed, "formats": args.formats,
                     "sync_wait_s": WAIT_S, "target_ms": TARGET_MS, "client": args.client}
    res["machine"] = machine(
        extra={"bench_args": vars(args), "bench_wall_s": round(time.perf_counter() - t0, 1), "load_average_start": load_start},
        packages=("torch", "numpy", "pillow", "diffusers", "transformers", "fastapi", "starlette", "uvicorn", "h11",
                  "httptools", "uvloop", "httpx", "anyio", "pydantic"),
    )
    md = render_md(res, args)
    print()
    print(md)
    if (not args.quick or args.write) and not args.no_write:
        pk = res["machine"]["packages"]
        tag = "" if pk.get("httptools") and pk.get("uvloop") else "-h11"  # uvicorn picks them up when installed
        write_results(f"overhead-{res['date']}{tag}" + ("-quick" if args.quick else ""), res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
