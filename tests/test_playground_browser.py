"""The playground in a real headless Chromium (the OS package, driven by Playwright) against a real
``kiln serve`` with auth on and the embedded model: enter the key, generate with step previews, edit
with an uploaded image and a mask stroke, queue a job behind a busy worker and cancel it.

Screenshots land in ``tests/artifacts/playground/`` (or ``$KILN_TEST_ARTIFACTS/playground``);
``KILN_README_SCREENSHOT=1`` also copies the one the README shows to ``docs/images/playground.png``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from helpers import free_port
from kiln.keys import KeyStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("KILN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# the flags a CI container needs, and nothing that reaches the network on its own
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("KILN_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts") / "playground"
PROMPT = "three small yellow circles on a dark blue background"
WAIT_MS = 90_000  # a busy 2-core CI machine takes seconds per step at the larger sizes

if CHROMIUM is None:
    pytest.skip("Chromium is not installed (sudo apt-get install chromium, or set KILN_CHROMIUM)",
                allow_module_level=True)


class Server:
    """``kiln serve`` as its own process: the default catalog (flux/mini), auth on, one key."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True)
        store = KeyStore(data_dir / "kiln.db")
        self.key = store.create("browser", rate_per_min=10**6).secret
        store.close()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "serve.log"
        self.log = self.log_path.open("wb")  # a pipe nobody reads would fill up and stall the server
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILN_SYNC_WAIT_S": "60"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready:\n" + self.output()
            time.sleep(0.05)

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.base}/jobs/{job_id}", headers={"Authorization": f"Bearer {self.key}"}).json()

    def wait_for_job(self, job_id: str, status: str) -> dict:
        deadline = time.monotonic() + WAIT_MS / 1000
        while (job := self.job(job_id))["status"] != status:
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.05)
        return job

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "data")
    yield srv
    srv.stop()


@pytest.fixture
def page():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="kiln-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1440, "height": 900}, device_scale_factor=1,
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.problems = []  # console errors (CSP violations among them) and uncaught exceptions
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda exc: page.problems.append(str(exc)))
        page.sent = []  # the WebSocket messages the page sent
        page.on("websocket", lambda ws: ws.on("framesent", lambda payload: page.sent.append(payload)))
        try:
            yield page
        finally:
            context.close()


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def set_range(page, selector: str, value) -> None:
    page.locator(selector).evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def wait_for_stage(page) -> str:
    """The stage's state once the generation on it has ended (complete, error, cancelled)."""
    # (wait_for_function would evaluate a string, which the page's policy rightly forbids)
    expect(page.locator("#stage")).to_have_attribute("data-state", re.compile("^(complete|error|cancelled)$"),
                                                      timeout=WAIT_MS)
    state = page.locator("#stage").get_attribute("data-state")
    if state != "complete":
        raise AssertionError(f"{state}: {page.locator('#error').inner_text()}")
    return state


def test_playground_in_chromium(server, page):
    page.goto(server.base + "/")

    # The key is asked for once, because /models answered 401, and kept in local storage.
    expect(page.locator("#key-dialog")).to_be_visible()
    shot(page, "01-key")
    page.fill("#key-input", server.key)
    page.click("#key-save")
    expect(page.locator("#model")).to_have_value("flux/mini")  # the catalog's default model
    assert page.evaluate("localStorage.getItem('kiln.apiKey')") == server.key

    # The controls follow flux/mini's catalog entry.
    models = httpx.get(f"{server.base}/models", headers={"Authorization": f"Bearer {server.key}"}).json()["models"]
    mini = next(m for m in models if (m["family"], m["model"]) == ("flux", "mini"))
    steps = page.locator("#steps")
    assert [steps.get_attribute("min"), steps.get_attribute("max"), steps.input_value()] == [
        str(mini["info"]["steps_range"][0]), str(mini["info"]["steps_range"][1]), str(mini["info"]["default_steps"])]
    assert page.locator("#sampler option").all_inner_texts() == mini["info"]["samplers"]
    assert page.locator("#format option").all_inner_texts() == mini["formats"]
    assert page.locator("#task option").evaluate_all("os => os.map(o => o.value)") == mini["tasks"]
    expect(page.locator("#negative")).to_be_visible()  # flux/mini takes a negative prompt
    expect(page.locator("#input-image")).to_be_hidden()  # t2i takes no input image
    page.click("#advanced summary")
    expect(page.locator("#lora-add")).to_be_visible()
    expect(page.locator("#upscale")).to_be_visible()

    # Other models' entries shape the controls the same way (nothing is generated with them).
    by_key = {f"{m['family']}/{m['model']}": m for m in models}
    page.select_option("#model", "flux/schnell")  # distilled: fixed steps and guidance, no LoRAs
    expect(page.locator("#steps")).to_be_disabled()
    expect(page.locator("#steps-value")).to_have_text(f"{by_key['flux/schnell']['info']['fixed_steps']} (fixed)")
    expect(page.locator("#guidance-value")).to_have_text(f"{by_key['flux/schnell']['info']['fixed_guidance']} (fixed)")
    expect(page.locator("#negative")).to_be_hidden()
    expect(page.locator("#lora-add")).to_be_hidden()
    expect(page.locator("#lora-refusal")).to_contain_text(by_key["flux/schnell"]["info"]["lora_refusal"])
    page.select_option("#model", "flux/dev2")  # image input is reference conditioning: no strength, no passes
    page.select_option("#task", "i2i")
    expect(page.locator("#strength")).to_be_hidden()
    expect(page.locator("#upscale")).to_be_hidden()
    expect(page.locator("#detail")).to_be_hidden()
    page.select_option("#model", "zimage/turbo")
    expect(page.locator("#guidance-value")).to_have_text("ignored by this model")
    page.select_option("#model", "wan/default")  # video: duration, no samplers, no upscaling
    expect(page.locator("#duration")).to_be_visible()
    expect(page.locator("#sampler")).to_be_hidden()
    expect(page.locator("#upscale")).to_be_hidden()
    page.select_option("#task", "i2v")
    expect(page.locator("#image-file")).to_be_visible()
    expect(page.locator("#mask-clear")).to_be_hidden()  # a mask is for edit only
    page.select_option("#model", "flux/mini")
    page.click("#advanced summary")

    # Generate over the WebSocket: previews first, then the final image, then the history.
    page.fill("#prompt", PROMPT)
    page.select_option("#format", "512")  # at the model's default steps and guidance: the README's picture
    page.fill("#seed", "7")
    page.click("#generate")
    wait_for_stage(page)
    assert int(page.locator("#stage").get_attribute("data-frames")) >= 1, "no step preview was drawn before the image"
    result = page.locator("#result")
    expect(result).to_be_visible()
    assert result.evaluate("img => img.naturalWidth") == 512
    output = result.get_attribute("src")
    assert output.startswith(f"{server.base}/i/")
    first = page.locator("#history .item").first
    assert first.get_attribute("data-output") == output
    expect(first.locator(".url")).to_have_text(output)  # the permanent URL, in full
    expect(first.locator(".meta")).to_contain_text("seed 7")
    got = httpx.get(output)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    generate = json.loads(next(m for m in page.sent if '"generate"' in m))
    assert generate["stream_frames"] is True and generate["prompt"] == PROMPT and generate["seed"] == 7
    assert generate["steps"] == mini["info"]["default_steps"] and generate["guidance"] == mini["info"]["default_guidance"]
    shot(page, "02-generated")

    # Edit: upload the image just made, paint a mask stroke, generate from them.
    source = ARTIFACTS / "input.png"
    Image.open(io.BytesIO(got.content)).save(source)
    page.select_option("#task", "edit")
    page.set_input_files("#image-file", str(source))
    mask = page.locator("#mask")
    expect(mask).to_be_visible()
    box = mask.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=10)
    page.mouse.up()
    expect(mask).to_have_attribute("data-painted", "true")
    page.fill("#prompt", "a large orange star in the middle on a dark blue background")
    # the fewest steps, and guidance 1 (no second pass per step): quick on a busy CI machine too
    set_range(page, "#steps", mini["info"]["steps_range"][0])
    set_range(page, "#guidance", 1)
    sent_before = len(page.sent)
    page.click("#generate")
    wait_for_stage(page)
    expect(page.locator("#history .item")).to_have_count(2)
    expect(page.locator("#history .item").first.locator(".meta")).to_contain_text("edit")
    edit = json.loads(next(m for m in page.sent[sent_before:] if '"generate"' in m))
    assert edit["task"] == "edit" and edit["image"].startswith(f"{server.base}/u/")
    assert edit["steps"] == mini["info"]["steps_range"][0] and edit["guidance"] == 1
    sent_mask = Image.open(io.BytesIO(httpx.get(edit["mask"]).content)).convert("L")
    assert sent_mask.size == (512, 512)
    assert sent_mask.getpixel((256, 256)) == 255, "the stroke is white: regenerate"
    assert sent_mask.getpixel((256, 40)) == 0 and sent_mask.getpixel((20, 256)) == 0, "the rest is black: keep"
    shot(page, "03-edit")
    page.locator("#history .item").last.locator(".thumb").click()  # back to the first picture
    expect(page.locator("#result")).to_have_attribute("src", output)

    # The queue: a long job makes the worker busy, the next one waits behind it; cancel both.
    page.select_option("#task", "t2i")
    page.select_option("#format", "1024")
    set_range(page, "#steps", mini["info"]["steps_range"][1])
    set_range(page, "#guidance", mini["info"]["default_guidance"])
    page.fill("#prompt", "two large white triangles on a green background")
    page.click("#advanced summary")  # open it again
    page.select_option("#upscale", "2")
    page.click("#enqueue")
    busy = page.locator("#jobs .job").first
    expect(busy).to_have_attribute("data-status", "running", timeout=WAIT_MS)  # the worker has started it
    busy_id = busy.get_attribute("data-job-id")
    busy = page.locator(f'#jobs .job[data-job-id="{busy_id}"]')  # .first is the newest row, soon another
    page.select_option("#upscale", "")
    page.select_option("#format", "512")
    page.click("#enqueue")
    waiting = page.locator("#jobs .job").first
    expect(waiting).not_to_have_attribute("data-job-id", busy_id)
    waiting_id = waiting.get_attribute("data-job-id")
    waiting = page.locator(f'#jobs .job[data-job-id="{waiting_id}"]')
    expect(waiting).to_have_attribute("data-status", "queued")
    expect(waiting.locator(".state")).to_contain_text("#1 in line")  # its position, from the API
    readme = shot(page, "04-queue")
    waiting.locator(".cancel").click()
    expect(waiting).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    assert server.job(waiting_id)["status"] == "cancelled"
    busy.locator(".cancel").click()  # running: it stops between steps
    expect(busy).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    assert server.wait_for_job(busy_id, "cancelled")["status"] == "cancelled"
    shot(page, "05-cancelled")

    expect(page.locator("#error")).to_be_hidden()  # the page showed no error
    # the one 401 is GET /models without a key, which is how the page learns the server wants one
    assert page.problems == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    if os.environ.get("KILN_README_SCREENSHOT") == "1":
        shutil.copyfile(readme, ROOT / "docs" / "images" / "playground.png")
