"""LoRA adapters reach workers on other machines through the shared asset store (kiln.loras.shared)."""

from __future__ import annotations

import hashlib

import pytest
from api_helpers import FileServer, running_server
from test_lora import toy_loras  # noqa: F401, F811  (fixture)
from test_worker_process import WorkerProcess

from kiln.loras import LoraStore
from kiln.loras.shared import SharedLoras, asset_name
from kiln.storage import LocalAssetStore

PASTEL_DIR = "kiln/weights/flux-mini/lora/pastel/pastel.safetensors"


@pytest.fixture
def adapter() -> bytes:
    from pathlib import Path

    return (Path(__file__).resolve().parent.parent / PASTEL_DIR).read_bytes()


def test_an_api_nodes_adapter_is_copied_to_a_worker_that_lacks_it(tmp_path, adapter):
    shared = LocalAssetStore(tmp_path / "shared")
    node = SharedLoras(LoraStore(tmp_path / "node"), shared)
    worker = SharedLoras(LoraStore(tmp_path / "worker"), shared)
    sha = node.local.add_bytes(adapter)
    assert worker.path(sha) is None  # not published yet
    node.publish(sha)
    assert shared.stat("l", asset_name(sha)).size == len(adapter)
    copied = worker.path(sha)
    assert copied is not None and copied.read_bytes() == adapter and copied.parent == tmp_path / "worker"
    assert worker.cached(10) == [sha]  # advertised for routing from now on
    shared.delete("l", asset_name(sha))
    assert worker.path(sha) == copied  # kept in the worker's own cache


def test_a_damaged_shared_adapter_is_not_used(tmp_path, adapter):
    shared = LocalAssetStore(tmp_path / "shared")
    worker = SharedLoras(LoraStore(tmp_path / "worker"), shared)
    real = shared.put(adapter, "l", "application/vnd.kiln.safetensors")
    forged = hashlib.sha256(b"something else").hexdigest()
    path = next((tmp_path / "shared").rglob(real.name))
    path.rename(path.with_name(asset_name(forged)))  # another adapter's bytes under this name
    assert worker.path(forged) is None
    assert list((tmp_path / "worker").glob("*.safetensors")) == []


def test_adapters_are_not_served_by_the_cdn(tmp_path, engine, adapter):
    with running_server(tmp_path, engine) as srv:
        asset = srv.services.store.put(adapter, "l", "application/vnd.kiln.safetensors")
        assert srv.client.get(f"/l/{asset.name}").status_code == 404
        assert srv.client.get(f"/u/{asset.name}").status_code == 404


@pytest.mark.slow
def test_a_job_with_a_lora_runs_on_a_worker_with_its_own_data_directory(tmp_path, engine, catalog_file, redis_url,
                                                                          bucket, toy_loras):
    """Nothing shared but Redis and the bucket: the worker gets the adapter the API node fetched."""
    files = FileServer({"/toy.safetensors": toy_loras["dev"]})
    settings = bucket.settings()
    env = {"KILN_S3_BUCKET": settings["s3_bucket"], "KILN_S3_ENDPOINT_URL": settings["s3_endpoint_url"],
           "KILN_S3_REGION": settings["s3_region"], "KILN_S3_ACCESS_KEY": settings["s3_access_key"],
           "KILN_S3_SECRET_KEY": settings["s3_secret_key"]}
    try:
        with running_server(tmp_path / "api", engine, redis_url=redis_url, local_worker=False,
                            allow_private_fetch=True, **settings) as srv:
            worker = WorkerProcess(catalog_file, tmp_path / "worker", redis_url, **env)
            try:
                body = {"modality": "image", "family": "flux", "model": "dev", "task": "t2i", "format": "toy-64",
                        "prompt": "a red circle", "steps": 15, "seed": 3,
                        "loras": [{"url": f"{files.url}/toy.safetensors", "weight": 1.0}]}
                job_id = srv.client.post("/queue", json=body, headers=srv.auth).json()["id"]
                job = srv.wait_for(job_id)
                assert job.status.value == "complete", job.error_message
                sha = hashlib.sha256(toy_loras["dev"]).hexdigest()
                assert (tmp_path / "worker" / "loras" / f"{sha}.safetensors").exists()
                assert files.hits["/toy.safetensors"] == 1  # fetched once, by the API node
            finally:
                assert worker.stop() == 0, worker.log
    finally:
        files.close()
