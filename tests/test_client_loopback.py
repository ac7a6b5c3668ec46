"""kiln.client and ``kiln generate --server`` against a real ``kiln serve`` process on loopback: the
default catalog, the real engine running flux/mini (shipped with the package), uvicorn, SQLite."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

import kiln.catalog
from client_helpers import FakeSleep
from helpers import free_port, png
from kiln import client as kc
from kiln.cli.main import main
from kiln.keys import KeyStore
from test_server_process import Process

pytestmark = pytest.mark.slow

DEFAULT_CATALOG = Path(kiln.catalog.__file__).parent / "default.toml"
MINI = {"model": "flux/mini", "format": "512", "steps": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("loopback") / "data"
    data_dir.mkdir(parents=True)
    store = KeyStore(data_dir / "kiln.db")
    key = store.create("test", rate_per_min=10**6).secret
    store.close()
    server = Process(DEFAULT_CATALOG, data_dir)
    try:
        yield server.base, key
    finally:
        assert server.graceful(), server.log


@pytest.fixture
def client(served):
    base, key = served
    with kc.Client(base, key, sleep=FakeSleep()) as c:
        yield c


def test_generate_on_loopback(client, served):
    out = client.generate("a red circle on a blue background", seed=7, **MINI)
    assert out.media_type == "image/webp" and out.seed == 7 and out.url.startswith(f"{served[0]}/i/")
    assert client.download(out.url) == out.data and set(out.timing) == {"generate", "encode", "store"}
    assert out.timing["generate"] >= out.generation_ms - 1
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.size == (512, 512)


def test_a_model_that_is_not_installed_is_not_retried(client):
    with pytest.raises(kc.ModelNotInstalled) as caught:
        client.generate("a red circle", model="flux/dev", format="512")
    assert caught.value.status == 503 and client._sleep.waits == []


def test_stream_follows_the_steps_as_they_happen(client):
    job = client.submit("a red circle on a blue background", seed=3, **{**MINI, "steps": 8})
    events = list(client.stream(job))
    assert events[-1].name == "complete" and events[-1].seed == 3
    steps = [e.step for e in events if isinstance(e, kc.Progress)]
    assert len(steps) >= 2 and steps == sorted(set(steps)) and steps[-1] <= 8  # live: more than the last step
    done = client.wait(job)
    assert done.output == events[-1].output and client.download(done.output)[:4] == b"RIFF"


def test_wait_times_out_and_cancel_stops_the_job(client):
    job = client.submit("a red circle on a blue background", model="flux/mini", format="1024", steps=24)
    with pytest.raises(TimeoutError):
        client.wait(job, timeout=0.05)
    client.cancel(job)
    with pytest.raises(kc.JobCancelled):
        client.wait(job)


def test_async_client_on_loopback(served):
    base, key = served

    async def go():
        async with kc.AsyncClient(base, key) as c:
            out = await c.generate("a red circle", seed=9, **MINI)
            job = await c.submit("a red circle", seed=9, **{**MINI, "steps": 8})
            events = [event async for event in c.stream(job)]
            done = await c.wait(job)
            return out, events, done, await c.download(done.output)

    out, events, done, data = asyncio.run(go())
    assert out.seed == 9 and events[-1].name == "complete" and done.seed == 9
    assert len([e for e in events if isinstance(e, kc.Progress)]) >= 2
    with Image.open(io.BytesIO(data)) as queued, Image.open(io.BytesIO(out.data)) as synced:
        assert queued.size == synced.size == (512, 512)


# --- kiln generate --server -----------------------------------------------------------------------


def kiln_generate(served, *args, key=None):
    base, default_key = served
    return main(["generate", *args, "--server", base, "--api-key", key or default_key])


def test_cli_generates_on_the_server_with_a_progress_bar(served, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert kiln_generate(served, "a red circle on a blue background", "-m", "flux/mini", "-f", "512", "--steps", "8",
                         "--seed", "7", "-o", str(out)) == 0
    captured = capsys.readouterr()
    assert "seed 7  flux/mini t2i 512x512  8 steps" in captured.out and str(out) in captured.out
    assert "/8 [" in captured.err and "running" in captured.err  # tqdm's bar, fed by the job's events
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (512, 512)
    base, key = served
    with kc.Client(base, key) as c:
        same = c.generate("a red circle on a blue background", model="flux/mini", format="512", steps=8, seed=7)
    with Image.open(io.BytesIO(same.data)) as sent, Image.open(out) as written:
        assert sent.convert("RGB").tobytes() == written.convert("RGB").tobytes()


def test_cli_several_outputs_an_uploaded_image_and_quiet(served, tmp_path, capsys):
    source = tmp_path / "in.png"
    source.write_bytes(png(120, 80))
    out = tmp_path / "pic.webp"
    assert kiln_generate(served, "make it blue", "-m", "flux/mini", "--image", str(source), "--strength", "0.6",
                         "--steps", "4", "-n", "2", "--seed", "4294967295", "-o", str(out), "-q") == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "seed 4294967295  flux/mini i2i 512x512" in captured.out
    for name in ("pic-1.webp", "pic-2.webp"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "WEBP"
    base, key = served
    with kc.Client(base, key) as c:  # output i is what seed + i makes alone (wrapping at 2**32)
        second = c.generate("make it blue", task="i2i", image=source, strength=0.6, seed=0, **MINI)
    assert (tmp_path / "pic-2.webp").read_bytes() == second.data


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--steps", "99"], 2, "steps must be between"),
    (["--lora", "/tmp/adapter.safetensors"], 2, "must be an http(s) URL"),
    (["-m", "flux/nope"], 2, "unknown model"),
    (["-m", "flux/dev", "-f", "512"], 3, "not installed"),
    (["-o", "out.mp4"], 2, "cannot write image"),
    (["--image", "/no/such/file.png"], 2, "cannot read the image file"),
])
def test_cli_exit_codes(served, args, code, message, capsys):
    assert kiln_generate(served, "a red circle", "-q", *args) == code
    assert message in capsys.readouterr().err


def test_cli_exit_1_for_a_bad_key_or_no_server(served, capsys):
    assert kiln_generate(served, "a red circle", "-q", key="kiln_sk_" + "a" * 43) == 1
    assert "API key not recognised" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--server", f"http://127.0.0.1:{free_port()}", "--api-key", "x"]) == 1
    assert "failed" in capsys.readouterr().err


def test_the_readme_example_runs(served, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python client"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    base, key = served
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8080", base).replace("kiln_sk_…", key), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("7 ") and "Completed(" in printed
    for name in ("circle.webp", "stars.webp"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "WEBP"


def test_cli_ctrl_c_cancels_the_job_on_the_server(served, monkeypatch):
    from kiln.cli import remote

    submitted = []
    real_submit = kc.Client.submit
    monkeypatch.setattr(kc.Client, "submit", lambda self, *a, **k: submitted.append(real_submit(self, *a, **k))
                        or submitted[-1])

    def interrupted(self, index, event):  # Ctrl-C while the bar shows the first step
        if isinstance(event, kc.Progress):
            raise KeyboardInterrupt

    monkeypatch.setattr(remote._RemoteProgress, "update", interrupted)
    assert kiln_generate(served, "a red circle", "-m", "flux/mini", "-f", "1024", "--steps", "24") == 130
    base, key = served
    with kc.Client(base, key) as c, pytest.raises(kc.JobCancelled):
        c.wait(submitted[0])
