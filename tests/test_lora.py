"""LoRA adapters: safetensors judged by parsing, the content-hash cache, loading into the running
pipeline and switching back to the base model, refusals, and both dialects that name adapters."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api_helpers import FileServer, running_server
from kiln.engine import GenerationRequest
from kiln.engine.request import LoraRef
from kiln.errors import InvalidLora, InvalidParameters
from kiln.loras import LoraStore, read_header
from kiln.testing.loras import random_lora

pytestmark = pytest.mark.slow

PASTEL = Path(__file__).parents[1] / "kiln" / "weights" / "flux-mini" / "lora" / "pastel" / "pastel.safetensors"
PROMPT = "a large red circle on a blue background"


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> bytes:
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LoraStore(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def toy_loras(toys_dir):
    """Two different random adapters for the flux/dev toy and one for the flux/dev2 toy."""
    return {"dev": random_lora(toys_dir / "flux1-dev", seed=1), "dev-b": random_lora(toys_dir / "flux1-dev", seed=2),
            "dev2": random_lora(toys_dir / "flux2-dev", seed=3)}


def ref(store: LoraStore, data: bytes, weight: float = 1.0) -> LoraRef:
    return LoraRef(sha256=store.add_bytes(data), weight=weight, source="test")


def render(engine, store, model="mini", loras=(), fmt="toy-64", seed=5, **kw) -> np.ndarray:
    request = GenerationRequest.create(family="flux", model=model, task="t2i", format=fmt, prompt=PROMPT, seed=seed,
                                       loras=loras, **kw)
    return np.asarray(engine.generate(request, loras=store).outputs[0].image).astype(int)


# --- files -----------------------------------------------------------------------------------------


def test_a_safetensors_file_is_judged_by_parsing(tmp_path):
    good = tmp_path / "anything.bin"  # the name is never looked at
    good.write_bytes(safetensors_bytes({"a.lora_A.weight": ("F16", [2, 3], bytes(12))}, {"format": "pt"}))
    assert read_header(good)["a.lora_A.weight"]["shape"] == [2, 3]
    assert set(read_header(PASTEL)) and all(k.startswith("transformer.") for k in read_header(PASTEL))


@pytest.mark.parametrize(("data", "words"), [
    (pickle.dumps({"weight": [1.0, 2.0]}), "plausible header length"),  # what a .ckpt / .bin holds
    (b"PK\x03\x04" + bytes(200), "plausible header length"),  # a zip (torch.save's format)
    (b"<html>not found</html>", "plausible header length"),
    (struct.pack("<Q", 5) + b"[1,2]", "not a JSON object"),
    (struct.pack("<Q", 4) + b"nope", "not JSON"),
    (safetensors_bytes({"w": ("F32", [2], bytes(8))})[:-1], "bytes, its header describes"),  # truncated
    (safetensors_bytes({"w": ("F32", [3], bytes(8))}), "as many bytes as its shape"),
    (safetensors_bytes({"w": ("PY_OBJECT", [1], bytes(8))}), "unknown dtype"),
    (safetensors_bytes({}), "no tensors"),
    (safetensors_bytes({"w": ("F32", [2], bytes(8))}, {"x": 1}), "__metadata__"),
])
def test_anything_else_is_refused(tmp_path, data, words):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidLora, match=words):
        read_header(path)


def test_the_store_names_files_by_content_and_evicts_the_least_recently_used(tmp_path):
    store = LoraStore(tmp_path, max_bytes=3000, keep_s=0.0)
    files = [safetensors_bytes({"w": ("U8", [1000], bytes([i]) * 1000)}) for i in range(3)]
    shas = [store.add_bytes(data) for data in files[:2]]
    assert shas[0] == hashlib.sha256(files[0]).hexdigest() and store.add_bytes(files[0]) == shas[0]
    assert store.path(shas[0]) is not None  # used: now the second is the least recent
    third = store.add_bytes(files[2])
    assert store.path(shas[1]) is None and store.path(shas[0]) is not None and store.path(third) is not None
    assert store.total_bytes() <= 3000
    with pytest.raises(InvalidLora):
        store.add_bytes(pickle.dumps("no"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(f"{s}.safetensors" for s in (shas[0], third))


def test_downloads_a_dead_process_left_are_swept_at_start(tmp_path):
    import os

    old, fresh = tmp_path / ".fetch-abc", tmp_path / ".fetch-def"
    old.write_bytes(b"half")
    fresh.write_bytes(b"in progress")
    os.utime(old, (1, 1))
    LoraStore(tmp_path)
    assert not old.exists() and fresh.exists()


def test_recently_used_adapters_are_kept_past_the_bound(tmp_path):
    store = LoraStore(tmp_path, max_bytes=10, keep_s=3600.0)  # a queued job may still need them
    a = store.add_bytes(safetensors_bytes({"w": ("U8", [100], bytes(100))}))
    b = store.add_bytes(safetensors_bytes({"w": ("U8", [100], bytes([1]) * 100)}))
    assert store.path(a) is not None and store.path(b) is not None


# --- the engine --------------------------------------------------------------------------------------


def test_the_embedded_models_lora_changes_the_output_with_its_weight_and_switches_off(engine, store):
    base = render(engine, store)
    pastel = ref(store, PASTEL.read_bytes())
    full = render(engine, store, loras=(pastel,))
    half = render(engine, store, loras=(pastel.model_copy(update={"weight": 0.5}),))
    assert np.abs(full - base).mean() > 3 and np.abs(half - base).mean() > 1
    assert 0 < np.abs(half - base).mean() < np.abs(full - base).mean()
    # pastel is lighter: the same scene, its colours mixed toward white
    assert full.mean() > base.mean()
    # switching back and forth reloads nothing and changes nothing
    assert np.array_equal(render(engine, store), base)
    assert np.array_equal(render(engine, store, loras=(pastel,)), full)
    assert np.array_equal(render(engine, store, loras=(pastel.model_copy(update={"weight": 0.0}),)), base)
    assert np.array_equal(render(engine, store), base)


def test_adapters_stack_with_their_own_weights(engine, store, toy_loras):
    a, b = ref(store, toy_loras["dev"]), ref(store, toy_loras["dev-b"])
    kw = dict(model="dev", steps=15)
    base = render(engine, store, **kw)
    only_a, only_b = render(engine, store, loras=(a,), **kw), render(engine, store, loras=(b,), **kw)
    both = render(engine, store, loras=(a, b), **kw)
    assert len({x.tobytes() for x in (base, only_a, only_b, both)}) == 4
    # the same adapter twice is that adapter at the sum of the weights
    twice = render(engine, store, loras=(a.model_copy(update={"weight": 0.5}), a.model_copy(update={"weight": 0.5})), **kw)
    assert np.array_equal(twice, only_a)
    assert np.array_equal(render(engine, store, **kw), base)


def test_flux2_takes_its_own_adapters_and_the_layers_a_flux1_adapter_shares_with_it(engine, store, toy_loras):
    kw = dict(model="dev2", steps=engine.catalog.resolve("flux", "dev2").steps.min)
    base = render(engine, store, **kw)
    own = render(engine, store, loras=(ref(store, toy_loras["dev2"]),), **kw)
    # the toys share layer names and sizes in their double blocks, so a FLUX.1 adapter loads there (the
    # reference's "FLUX.1 LoRAs work" on dev2); at full size the sizes differ and it is a 400
    flux1 = render(engine, store, loras=(ref(store, toy_loras["dev"]),), **kw)
    assert len({base.tobytes(), own.tobytes(), flux1.tobytes()}) == 3
    assert np.array_equal(render(engine, store, **kw), base)


def test_an_adapter_for_another_model_is_a_clear_400_and_the_model_still_works(engine, store, toy_loras):
    kw = dict(model="dev", steps=15)
    base = render(engine, store, **kw)
    with pytest.raises(InvalidLora, match="does not fit flux/dev"):  # the embedded model's: other shapes
        render(engine, store, loras=(ref(store, PASTEL.read_bytes()),), **kw)
    alien = safetensors_bytes({"unet.down.0.lora_A.weight": ("F32", [4, 8], bytes(128)),
                               "unet.down.0.lora_B.weight": ("F32", [8, 4], bytes(128))})
    with pytest.raises(InvalidLora, match="no layer that flux/dev has"):
        render(engine, store, loras=(ref(store, alien),), **kw)
    assert np.array_equal(render(engine, store, **kw), base)
    assert np.array_equal(render(engine, store, loras=(ref(store, toy_loras["dev"]),), **kw),
                          render(engine, store, loras=(ref(store, toy_loras["dev"]),), **kw))


def test_models_without_loras_refuse_them_saying_why(engine, store, toy_loras):
    lora = ref(store, toy_loras["dev"])
    with pytest.raises(InvalidParameters, match="flux/schnell does not take LoRAs: it is distilled.*flux/dev"):
        engine.plan(GenerationRequest.create(family="flux", model="schnell", task="t2i", prompt=PROMPT, loras=(lora,)))
    with pytest.raises(InvalidParameters, match="zimage/turbo does not take LoRAs: Z-Image"):
        engine.plan(GenerationRequest.create(family="zimage", model="turbo", task="t2i", prompt=PROMPT, loras=(lora,)))


def test_an_adapter_missing_from_the_store_is_a_clear_error(engine, tmp_path):
    gone = LoraRef(sha256="0" * 64, source="https://example.com/gone.safetensors")
    with pytest.raises(InvalidLora, match="no longer in this server's LoRA cache"):
        render(engine, LoraStore(tmp_path), loras=(gone,))


# --- the dialects ------------------------------------------------------------------------------------


@pytest.fixture
def files(toy_loras):
    hub_info = json.dumps({"siblings": [{"rfilename": "README.md"}, {"rfilename": "pastel.safetensors"}]}).encode()
    server = FileServer({"/pastel.safetensors": PASTEL.read_bytes(), "/model.ckpt": pickle.dumps({"w": 1}),
                         "/toy.safetensors": toy_loras["dev"], "/api/models/kiln/pastel": hub_info,
                         "/kiln/pastel/resolve/main/pastel.safetensors": PASTEL.read_bytes()})
    yield server
    server.close()


def image_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def generate(srv, model="mini", **body):
    body = {"prompt": PROMPT, "seed": 5, **body}
    return srv.client.post(f"/image/flux/{model}/t2i?format=toy-64", json=body, headers=srv.auth)


def test_render_api_loras_by_url_are_fetched_once_and_applied(tmp_path, engine, files):
    with running_server(tmp_path, engine, allow_private_fetch=True) as srv:
        plain = generate(srv)
        first = generate(srv, loras=[{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}])
        again = generate(srv, loras=[{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}])
        assert plain.status_code == first.status_code == again.status_code == 200, first.text
        assert np.abs(image_of(first.content) - image_of(plain.content)).mean() > 3
        assert first.content == again.content and files.hits["/pastel.safetensors"] == 1
        assert generate(srv).content == plain.content
        # queued jobs carry the adapter through the queue
        job = srv.client.post("/queue", json={"modality": "image", "family": "flux", "model": "mini", "task": "t2i",
                                              "format": "toy-64", "prompt": PROMPT, "seed": 5,
                                              "loras": [{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}]},
                              headers=srv.auth)
        assert job.status_code in (200, 201, 202), job.text
        done = srv.wait_for(job.json()["id"])
        assert done.status.value == "complete", done.error
        output = srv.client.get(f"/jobs/{done.id}", headers=srv.auth, follow_redirects=False).json()["output"]
        queued = srv.client.get(output.removeprefix("http://127.0.0.1:8080")).content
        assert np.array_equal(image_of(queued), image_of(first.content))
        assert files.hits["/pastel.safetensors"] == 1


@pytest.mark.parametrize(("path", "weight", "status", "words"), [
    ("/model.ckpt", 1.0, 400, "not a safetensors file"),
    ("/missing.safetensors", 1.0, 400, "HTTP 404"),
    ("/toy.safetensors", 1.0, 400, "does not fit flux/mini"),
    ("/pastel.safetensors", 1.6, 400, "weight"),
])
def test_render_api_lora_errors(tmp_path, engine, files, path, weight, status, words):
    with running_server(tmp_path, engine, allow_private_fetch=True) as srv:
        r = generate(srv, loras=[{"url": files.url + path, "weight": weight}])
        assert r.status_code == status and words in r.json()["message"], r.text
        assert r.json()["error"] == "invalid_parameters" and "Traceback" not in r.text
        assert generate(srv).status_code == 200  # the server and the model are fine


def test_render_api_refuses_before_downloading(tmp_path, engine, files):
    with running_server(tmp_path, engine, allow_private_fetch=True) as srv:
        r = generate(srv, model="schnell", loras=[{"url": f"{files.url}/toy.safetensors", "weight": 1.0}])
        assert r.status_code == 400 and "does not take LoRAs" in r.json()["message"] and not files.hits
        r = generate(srv, loras=[{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}] * 6)
        assert r.status_code == 400 and not files.hits
    with running_server(tmp_path / "closed", engine) as srv:  # the default: no private addresses
        r = generate(srv, loras=[{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}])
        assert r.status_code == 400 and "private or local network" in r.json()["message"] and not files.hits
    with running_server(tmp_path / "small", engine, allow_private_fetch=True, lora_max_bytes=4096) as srv:
        r = generate(srv, loras=[{"url": f"{files.url}/pastel.safetensors", "weight": 1.0}])
        assert r.status_code == 400 and "LoRA is larger than" in r.json()["message"]


def test_wavespeed_loras_by_url_and_by_hugging_face_repo_id(tmp_path, engine, files):
    with running_server(tmp_path, engine, allow_private_fetch=True, hf_endpoint=files.url) as srv:
        def submit(**body):
            body = {"prompt": PROMPT, "size": "256*256", "seed": 5, "enable_sync_mode": True, "output_format": "png",
                    "enable_base64_output": True, **body}
            return srv.client.post("/api/v3/kiln/flux-mini", json=body, headers=srv.auth)

        plain, by_url = submit(), submit(loras=[{"path": f"{files.url}/pastel.safetensors", "scale": 1}])
        by_repo = submit(loras=[{"path": "kiln/pastel", "scale": 1}])
        by_repo_again = submit(loras=[{"path": "kiln/pastel", "scale": 1}])
        strong = submit(loras=[{"path": "kiln/pastel/pastel.safetensors", "scale": 3}])
        for r in (plain, by_url, by_repo, by_repo_again, strong):
            assert r.status_code == 200 and r.json()["data"]["status"] == "completed", r.text
        pictures = [image_of(base64.b64decode(r.json()["data"]["outputs"][0].split(",")[-1]))
                    for r in (plain, by_url, by_repo, by_repo_again, strong)]
        assert np.abs(pictures[1] - pictures[0]).mean() > 3 and np.array_equal(pictures[1], pictures[2])
        assert np.array_equal(pictures[2], pictures[3]) and not np.array_equal(pictures[4], pictures[1])
        # the repo id was looked up on the hub once and its file downloaded once, for both requests
        assert files.hits["/api/models/kiln/pastel"] == 1
        assert files.hits["/kiln/pastel/resolve/main/pastel.safetensors"] == 1
        r = submit(loras=[{"path": "not a path", "scale": 1}])
        assert r.status_code == 400 and "Hugging Face repo id" in r.json()["message"]
        r = srv.client.post("/api/v3/wavespeed-ai/flux-schnell-lora", json={
            "prompt": PROMPT, "size": "512*512", "loras": [{"path": "kiln/pastel", "scale": 1}]}, headers=srv.auth)
        assert r.status_code == 400 and "distilled" in r.json()["message"]


def test_a_cached_repo_id_works_while_the_hub_is_down(tmp_path, engine, files):
    with running_server(tmp_path, engine, allow_private_fetch=True, hf_endpoint=files.url) as srv:
        def submit(path):
            body = {"prompt": PROMPT, "size": "256*256", "seed": 5, "enable_sync_mode": True, "output_format": "png",
                    "enable_base64_output": True, "loras": [{"path": path, "scale": 1}]}
            return srv.client.post("/api/v3/kiln/flux-mini", json=body, headers=srv.auth)

        first = submit("kiln/pastel")
        assert first.json()["data"]["status"] == "completed", first.text
        files.httpd.shutdown()
        files.httpd.server_close()  # the hub refuses connections from now on
        again = submit("kiln/pastel")
        assert again.status_code == 200 and again.json()["data"]["outputs"] == first.json()["data"]["outputs"], again.text
        assert files.hits["/api/models/kiln/pastel"] == 1
        # a repo id never resolved before needs the hub: a 400 that says it could not be reached
        other = submit("kiln/other")
        assert other.status_code == 400 and "Hugging Face model page" in other.json()["message"], other.text
