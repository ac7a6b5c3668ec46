"""The playground's routes in process: its page and files, their headers, and what it reads from the
API (the browser itself is driven in test_playground_browser.py)."""

from __future__ import annotations

import re
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api_helpers import StalledWorker
from kiln.api.app import create_app
from kiln.api.routes.playground import STATIC
from kiln.server import build_runtime
from kiln.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def app_client(tmp_path, **settings):
    """The real app on the default catalog, with a worker that never runs anything (no model loads)."""
    runtime = build_runtime(Settings(data_dir=tmp_path / "data", **settings), worker=StalledWorker())
    app = create_app(runtime.services, on_start=runtime.start, on_stop=runtime.stop)
    with TestClient(app, base_url="http://kiln.test:8080") as client:
        client.key = runtime.services.keys.create("test").secret
        yield client


@pytest.fixture
def client(tmp_path):
    with app_client(tmp_path) as c:
        yield c


def test_the_page_is_served_at_the_root_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/playground/main.js">' in r.text
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["img-src"] == "'self' blob: data: http://127.0.0.1:8080"  # the URLs the server hands out
    assert policy["connect-src"] == "'self' ws://kiln.test:8080 wss://kiln.test:8080"
    assert policy["frame-ancestors"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache"


def test_the_page_needs_no_key_and_the_api_still_does(client):
    """The page is public (it asks for the key itself); the API behind it is not."""
    assert client.get("/").status_code == 200
    r = client.get("/models")
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_assets_types_etags_and_head(client):
    for name, media_type in [("main.js", "text/javascript; charset=utf-8"), ("playground.css", "text/css; charset=utf-8"),
                             ("favicon.svg", "image/svg+xml")]:
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media_type, name
        assert client.get(f"/playground/{name}", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
        head = client.head(f"/playground/{name}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(r.content))


@pytest.mark.parametrize("path", ["/playground/nope.js", "/playground/..%2Fapp.py", "/playground/.hidden.js",
                                  "/playground/index.HTML", "/playground/", "/playground/x.py"])
def test_anything_else_under_the_prefix_is_a_404_in_the_api_shape(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_a_forged_host_header_stays_out_of_the_policy(client):
    r = client.get("/", headers={"Host": "evil.test; script-src *"})
    assert r.status_code == 200
    assert "evil" not in r.headers["content-security-policy"]
    assert "connect-src 'self';" in r.headers["content-security-policy"]


def test_a_public_url_elsewhere_is_allowed_for_images(tmp_path):
    with app_client(tmp_path, public_url="https://cdn.example.com/kiln") as c:
        policy = c.get("/").headers["content-security-policy"]
    assert "img-src 'self' blob: data: https://cdn.example.com;" in policy


def test_the_page_stays_out_of_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/playground") for p in paths)


def test_models_marks_the_default_model(client):
    models = client.get("/models", headers={"Authorization": f"Bearer {client.key}"}).json()["models"]
    assert [f"{m['family']}/{m['model']}" for m in models if m["default"]] == ["flux/mini"]


def test_every_module_the_page_imports_is_served(client):
    """A typo in an import breaks the page with nothing on the server side to notice it."""
    wanted = {"main.js"}
    seen: set[str] = set()
    while wanted:
        name = wanted.pop()
        seen.add(name)
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200, name
        wanted |= set(re.findall(r'^import .* from "\./([a-z0-9_-]+\.js)";$', r.text, re.M)) - seen
    assert seen == {p.name for p in STATIC.glob("*.js")}  # and no module lies unused
    page = client.get("/").text
    for ref in re.findall(r'(?:src|href)="/playground/([^"]+)"', page):
        assert client.get(f"/playground/{ref}").status_code == 200, ref


def test_every_static_file_ships_as_package_data():
    """The page must be in the wheel, not only in a source checkout."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kiln.api"]
    package = ROOT / "kiln" / "api"
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    assert {p for p in STATIC.rglob("*") if p.is_file()} <= shipped
