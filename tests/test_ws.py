"""``/ws`` generate messages: what only POST /queue takes is refused, LoRAs by URL and negative prompts
work as over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from api_helpers import FileServer, running_server

pytestmark = pytest.mark.slow

PASTEL = Path(__file__).parents[1] / "kiln" / "weights" / "flux-mini" / "lora" / "pastel" / "pastel.safetensors"
ORIGIN = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("ws"), engine, allow_private_fetch=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def files():
    server = FileServer({"/pastel.safetensors": PASTEL.read_bytes()})
    yield server
    server.close()


def generate(**extra) -> dict:
    return {"type": "generate", "modality": "image", "family": "flux", "model": "mini", "task": "t2i",
            "format": "toy-64", "prompt": "a large red circle on a blue background", "seed": 5, **extra}


def run(ws, message: dict) -> dict:
    """Send one generate message; its complete or error reply."""
    ws.send_json(message)
    reply = ws.receive_json()
    assert reply["id"] == message["id"], reply
    return reply


def output(server, reply: dict) -> bytes:
    assert reply["type"] == "complete", reply
    r = server.client.get(reply["output"].removeprefix(ORIGIN))
    assert r.status_code == 200
    return r.content


@pytest.mark.parametrize(("extra", "words"), [
    ({"webhook": "https://example.com/hook"}, "webhook: only POST /queue takes it"),
    ({"idempotency_key": "k1"}, "idempotency_key: only POST /queue takes it"),
    ({"priority": "high"}, "priority: only POST /queue takes it"),
    ({"priority": "normal", "webhook": "https://example.com/hook"}, "priority, webhook: only POST /queue takes them"),
    ({"colour": "red"}, "colour"),
])
def test_what_only_the_queue_takes_is_refused(server, extra, words):
    with server.client.websocket_connect("/ws", headers=server.auth) as ws:
        reply = run(ws, generate(id="q", **extra))
        assert (reply["type"], reply["error"]) == ("error", "invalid_parameters") and words in reply["message"], reply
        assert run(ws, generate(id="after"))["type"] == "complete"  # the connection goes on


def test_loras_by_url(server, files):
    lora = [{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}]
    with server.client.websocket_connect("/ws", headers=server.auth) as ws:
        plain = output(server, run(ws, generate(id="plain")))
        pastel = output(server, run(ws, generate(id="pastel", loras=lora)))
        again = output(server, run(ws, generate(id="again", loras=lora)))
        assert pastel != plain and again == pastel and files.hits["/pastel.safetensors"] == 1
        assert output(server, run(ws, generate(id="plain-again"))) == plain  # the adapter switched off again
        refused = run(ws, generate(id="schnell", model="schnell", steps=4, loras=lora))
        assert refused["error"] == "invalid_parameters" and "does not take LoRAs" in refused["message"], refused
    http = server.client.post("/image/flux/mini/t2i?format=toy-64", headers=server.auth,
                              json={"prompt": "a large red circle on a blue background", "seed": 5, "loras": lora})
    assert http.status_code == 200 and http.content == pastel  # the same request over HTTP: the same pixels


def test_negative_prompt(server):
    with server.client.websocket_connect("/ws", headers=server.auth) as ws:
        plain = output(server, run(ws, generate(id="plain")))
        negative = output(server, run(ws, generate(id="neg", negative_prompt="a blue background")))
        assert negative != plain
        refused = run(ws, generate(id="schnell", model="schnell", steps=4, negative_prompt="blurry"))
        assert refused["error"] == "invalid_parameters", refused
        assert "negative prompt" in refused["message"] and "flux/dev" in refused["message"]
        assert "flux/mini" in refused["message"]
