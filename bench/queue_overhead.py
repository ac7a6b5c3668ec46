"""Queue overhead: no-op jobs through the embedded SQLite broker and the Redis broker, side by side.

Usage::

    python bench/queue_overhead.py            # ~1 minute on 2 cores; writes bench/results/queue-<date>.{json,md}
    python bench/queue_overhead.py --quick    # a sanity run, prints only

No engine, no HTTP, no storage: what a job costs the queue alone. Each broker is the one
``kiln.server.make_broker`` builds (SQLite: a file in a temp folder, WAL; Redis: a ``redis-server`` this
bench starts on a free port without persistence, as the tests do); workers are threads of this process
sharing one broker object, as an in-process worker and the API share one. A "no-op job" is
``submit`` -> ``claim`` -> ``complete`` with the claim's lease, the three calls every job makes.

Two measurements per broker and worker count (1, 2, 4):

- **throughput**: ``--jobs`` jobs submitted first (timed alone: *submit/s*), then drained by the
  workers, each looping ``claim`` + ``complete`` until the queue is empty: *jobs/s* = jobs / drain time.
- **latency**: one producer submits a job every ``--gap-ms`` (below saturation); idle workers wait as
  ``kiln.worker.Worker`` waits: on Redis, blocked in ``wait_for_work`` until a submit wakes them (the
  broker's per-worker bell); on SQLite, on a condition the submitter notifies, as the API wakes its
  in-process worker. *submit->claim* = from the start of ``submit`` to the return of the ``claim`` that
  took the job (median, p99): the wake-up included; also each call's own time (median), and their
  sum, *added per job*: what the queue adds to a job's end-to-end time when nothing waits.

Jobs carry routing needs (``m:flux/toy``) and workers claim holding that model, so the routing part
of the claim script runs as in production.

Targets (issue 7): >= 500 jobs/s and <= 2 ms added per job through Redis on the 2-core machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime as dt
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

from bench._machine import machine, write_results
from kiln.queue.local import SqliteBroker
from kiln.queue.redis import RedisBroker

PAYLOAD = {"request": {"modality": "image", "family": "flux", "model": "toy", "task": "t2i", "format": "toy-64",
                       "prompt": "a red circle", "steps": 1},
           "needs": ["m:flux/toy"]}
HOLDS = ["m:flux/toy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A throwaway ``redis-server`` (no persistence), as tests/redis_fixtures.py starts one."""

    def __init__(self, directory: Path) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed (scripts/setup installs it)")
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        self.version = out.split("v=")[1].split()[0] if "v=" in out else out

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def throughput(broker, jobs: int, workers: int) -> dict:
    started = time.perf_counter()
    for _ in range(jobs):
        broker.submit(dict(PAYLOAD))
    submitted = time.perf_counter() - started
    done = [0] * workers

    def drain(n: int) -> None:
        while (job := broker.claim(f"bench:{n}", holds=HOLDS)) is not None:
            broker.complete(job.id, "/i/none.webp", {"outputs": ["/i/none.webp"]}, lease=job.lease)
            done[n] += 1

    threads = [threading.Thread(target=drain, args=(n,)) for n in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drained = time.perf_counter() - started
    assert sum(done) == jobs, (sum(done), jobs)
    return {"jobs": jobs, "submit_s": submitted, "submit_per_s": jobs / submitted, "drain_s": drained,
            "jobs_per_s": jobs / drained}


def latency(broker, jobs: int, workers: int, gap_s: float) -> dict:
    submitted_at: dict[str, float] = {}
    claim_lag, submit_ms, claim_ms, complete_ms = [], [], [], []
    lock = threading.Lock()
    stop = threading.Event()
    bell = threading.Condition()  # the embedded broker's wake-up: the API notifies its worker after a submit

    def idle(n: int) -> None:
        if hasattr(broker, "wait_for_work"):
            broker.wait_for_work(f"bench:{n}", 0.5)
        else:
            with bell:
                bell.wait(0.5)

    def work(n: int) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            job = broker.claim(f"bench:{n}", holds=HOLDS)
            t1 = time.perf_counter()
            if job is None:
                idle(n)
                continue
            broker.complete(job.id, "/i/none.webp", {"outputs": ["/i/none.webp"]}, lease=job.lease)
            t2 = time.perf_counter()
            with lock:
                claim_lag.append((t1 - submitted_at[job.id]) * 1e3)
                claim_ms.append((t1 - t0) * 1e3)
                complete_ms.append((t2 - t1) * 1e3)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    next_at = time.perf_counter()
    for _ in range(jobs):
        while time.perf_counter() < next_at:
            time.sleep(0.0001)
        t0 = time.perf_counter()
        with lock:  # the id is known only when submit returns: hold the workers off it until then
            job, _ = broker.submit(dict(PAYLOAD))
            submitted_at[job.id] = t0
        submit_ms.append((time.perf_counter() - t0) * 1e3)
        with bell:
            bell.notify_all()
        next_at += gap_s
    deadline = time.monotonic() + 60
    while len(claim_lag) < jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    with bell:
        bell.notify_all()
    for n in range(workers):
        if hasattr(broker, "ring"):
            broker.ring(f"bench:{n}")
    for t in threads:
        t.join()
    med = statistics.median
    return {"jobs": jobs, "gap_ms": gap_s * 1e3,
            "submit_to_claim_ms": {"median": med(claim_lag), "p99": pct(claim_lag, 0.99)},
            "submit_ms": {"median": med(submit_ms), "p99": pct(submit_ms, 0.99)},
            "claim_ms": {"median": med(claim_ms), "p99": pct(claim_ms, 0.99)},
            "complete_ms": {"median": med(complete_ms), "p99": pct(complete_ms, 0.99)},
            "added_per_job_ms": med(submit_ms) + med(claim_ms) + med(complete_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per throughput run (default 2000)")
    parser.add_argument("--latency-jobs", type=int, default=500, help="jobs per latency run (default 500)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="time between submits in the latency runs")
    parser.add_argument("--workers", default="1,2,4", help="worker thread counts (default 1,2,4)")
    parser.add_argument("--quick", action="store_true", help="200/100 jobs, print only")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.latency_jobs = 200, 100
    counts = [int(n) for n in args.workers.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = Redis(Path(tmp))
        try:
            for workers in counts:
                for name in ("sqlite", "redis"):
                    def make(name=name, workers=workers):
                        if name == "redis":
                            server.flush()
                            return RedisBroker(server.url)
                        return SqliteBroker(Path(tmp) / f"{workers}-{time.monotonic_ns()}.db")
                    broker = make()
                    tp = throughput(broker, args.jobs, workers)
                    broker.close()
                    broker = make()
                    lat = latency(broker, args.latency_jobs, workers, args.gap_ms / 1e3)
                    broker.close()
                    rows.append({"broker": name, "workers": workers, "throughput": tp, "latency": lat})
                    print(f"  {name:6} x{workers}: {tp['jobs_per_s']:.0f} jobs/s", file=sys.stderr)
        finally:
            server.stop()

    header = ("| broker | workers | jobs/s (drain) | submit/s | submit→claim median ms | p99 ms "
              "| submit / claim / complete median ms | added per job ms |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        tp, lat = row["throughput"], row["latency"]
        lines.append(
            f"| {row['broker']} | {row['workers']} | {tp['jobs_per_s']:.0f} | {tp['submit_per_s']:.0f} "
            f"| {lat['submit_to_claim_ms']['median']:.2f} | {lat['submit_to_claim_ms']['p99']:.2f} "
            f"| {lat['submit_ms']['median']:.2f} / {lat['claim_ms']['median']:.2f} / {lat['complete_ms']['median']:.2f} "
            f"| {lat['added_per_job_ms']:.2f} |")
    md = (f"# bench/queue_overhead.py, {dt.date.today().isoformat()}\n\n"
          f"No-op jobs (submit, claim, complete); {args.jobs} jobs per throughput run, {args.latency_jobs} "
          f"per latency run at one submit every {args.gap_ms:g} ms; workers are threads. Redis {server.version}, "
          "no persistence. Targets (issue 7): >= 500 jobs/s, <= 2 ms added per job through Redis.\n\n"
          + header + "\n".join(lines) + "\n")
    print(md)
    if not args.quick:
        data = {"machine": machine(extra={"redis_server": server.version}, packages=("redis",)),
                "args": vars(args), "rows": rows}
        write_results(f"queue-{dt.date.today().strftime('%Y%m%d')}", data, md)


if __name__ == "__main__":
    main()
