"""The default catalog holds the render API's models with the reference's rules; bad files are refused."""

from __future__ import annotations

import tomllib

import pytest

from kiln.catalog import DEFAULT_CATALOG, load_catalog, parse_catalog
from kiln.engine import Engine
from kiln.errors import CatalogError, UnknownModel, UnsupportedFormat, UnsupportedTask


@pytest.fixture(scope="module")
def default_catalog():
    return load_catalog()


def raw_default() -> dict:
    return tomllib.loads(DEFAULT_CATALOG.read_text())


def test_default_catalog_has_the_render_api_models(default_catalog):
    assert {"flux/dev2", "flux/dev", "flux/schnell", "zimage/turbo", "wan/default"} <= set(default_catalog.models)
    assert default_catalog.aliases == {"latest": "flux/dev2", "default": "flux/dev", "fast": "flux/schnell", "turbo": "zimage/turbo"}


@pytest.mark.parametrize(("family", "name", "key"), [
    ("flux", "latest", "flux/dev2"), ("flux", "default", "flux/dev"), ("flux", "fast", "flux/schnell"),
    ("zimage", "turbo", "zimage/turbo"), ("flux", "dev", "flux/dev"),
])
def test_aliases_resolve_within_their_family(default_catalog, family, name, key):
    assert default_catalog.resolve(family, name).key == key


def test_alias_of_another_family_is_unknown(default_catalog):
    with pytest.raises(UnknownModel, match="zimage/fast"):
        default_catalog.resolve("zimage", "fast")


def test_reference_rules(default_catalog):
    schnell = default_catalog.models["flux/schnell"]
    assert (schnell.steps.min, schnell.steps.max, schnell.steps.default) == (4, 4, 4)
    assert schnell.guidance.mode == "fixed" and schnell.guidance.value == 3.5
    assert schnell.samplers == ["euler"] and schnell.schedulers == ["simple"] and not schnell.lora
    turbo = default_catalog.models["zimage/turbo"]
    assert (turbo.steps.min, turbo.steps.max) == (5, 12)
    assert turbo.guidance.mode == "ignored" and turbo.samplers == ["euler"] and not turbo.lora
    dev = default_catalog.models["flux/dev"]
    assert (dev.steps.min, dev.steps.max) == (15, 50) and (dev.guidance.min, dev.guidance.max) == (2.0, 5.0)
    assert dev.samplers == ["euler", "euler_a", "dpmpp_2m", "heun"] and dev.schedulers == ["simple", "normal", "sgm"]
    dev2 = default_catalog.models["flux/dev2"]
    assert (dev2.guidance.min, dev2.guidance.max) == (1.0, 5.0) and dev2.lora
    wan = default_catalog.models["wan/default"]
    assert wan.modality == "video" and set(wan.tasks) == {"i2v", "t2v"}
    assert (wan.guidance.min, wan.guidance.default, wan.guidance.max) == (6.0, 7.0, 8.0)
    assert wan.video is not None and (wan.video.duration.min, wan.video.duration.max) == (0.5, 10.0)
    assert wan.video.fps == 24


def test_format_table_matches_the_reference(default_catalog):
    assert default_catalog.formats["image"] == {
        "1024": (1024, 1024), "512": (512, 512), "portrait": (768, 1024), "portrait-wide": (576, 1024),
        "landscape": (1024, 768), "landscape-wide": (1024, 576),
    }
    assert default_catalog.formats["video"]["720p"] == (1280, 720) and default_catalog.formats["video"]["480p"] == (832, 480)


def test_size_and_task_errors_name_what_is_allowed(default_catalog):
    spec = default_catalog.models["flux/dev"]
    with pytest.raises(UnsupportedFormat, match="720p.*1024"):
        default_catalog.size_of(spec, "720p")
    with pytest.raises(UnsupportedTask, match="t2v.*t2i"):
        default_catalog.check_task(spec, "t2v")


def test_every_default_model_has_an_adapter(default_catalog):
    Engine(default_catalog, device="cpu")  # raises CatalogError otherwise


def _broken(mutate) -> dict:
    raw = raw_default()
    mutate(raw)
    return raw


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["models"][0].update(samplers=["ddim"], schedulers=["simple"]), "unknown sampler"),
    (lambda r: r["models"][0].update(formats=["2048"]), "formats"),
    (lambda r: r["models"][0].update(steps={"default": 60, "min": 15, "max": 50}), "steps"),
    (lambda r: r["models"][0].update(guidance={"fixed": 3.5, "default": 2.0}), "guidance"),
    (lambda r: r["models"][0].update(colour="red"), "colour"),
    (lambda r: r["aliases"].update(newest="flux/dev9"), "flux/dev9"),
    (lambda r: r["models"][1].update(model="dev2"), "twice"),
    (lambda r: r["models"][0].update(pipelines={"t2v": "WanPipeline"}), "modality"),
    (lambda r: r.update(default_model="flux/nope"), "default_model"),
    (lambda r: r.update(models={"family": "flux"}), r"\[\[models\]\]"),
    (lambda r: r.update(models=[1]), r"\[\[models\]\]"),
    (lambda r: r["formats"].update(image=5), "malformed"),
    (lambda r: r.update(aliases=["latest"]), "malformed"),
])
def test_bad_catalogs_are_refused_with_the_entry_named(tmp_path, mutate, message):
    with pytest.raises(CatalogError, match=message):
        parse_catalog(_broken(mutate), base_dir=tmp_path)


def test_unknown_pipeline_class_is_a_startup_error(tmp_path):
    raw = _broken(lambda r: r["models"][0].update(pipelines={"t2i": "StableDiffusionPipeline"}))
    with pytest.raises(CatalogError, match="StableDiffusionPipeline"):
        Engine(parse_catalog(raw, base_dir=tmp_path), device="cpu")


def test_unreadable_catalog_file(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[[models]\n")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "missing.toml")


def test_relative_local_source_resolves_against_the_catalog_file(tmp_path):
    raw = raw_default()
    raw["models"][0]["source"] = "./weights/dev2"
    catalog = parse_catalog(raw, base_dir=tmp_path)
    assert catalog.models["flux/dev2"].local_path == tmp_path / "weights" / "dev2"
    assert catalog.models["flux/dev"].local_path is None  # a hub id
