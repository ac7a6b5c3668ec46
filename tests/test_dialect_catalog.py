"""Other APIs' model names live in the catalog (``[dialects.*]``), checked when it loads."""

from __future__ import annotations

import copy
import tomllib

import pytest

from kiln.catalog import DEFAULT_CATALOG, load_catalog, parse_catalog
from kiln.errors import CatalogError, UnknownModel
from kiln.testing.catalog import toy_catalog_dict

RAW = tomllib.loads(DEFAULT_CATALOG.read_text(encoding="utf-8"))


def with_dialects(**tables) -> dict:
    raw = copy.deepcopy(RAW)
    raw["dialects"] = tables
    return raw


def test_the_default_catalog_maps_the_references_names():
    catalog = load_catalog()
    for path, key in (("wavespeed-ai/flux-dev", "flux/dev"), ("wavespeed-ai/flux-schnell-lora", "flux/schnell"),
                      ("wavespeed-ai/z-image/turbo", "zimage/turbo"), ("kiln/flux-mini", "flux/mini")):
        assert catalog.resolve_dialect("wavespeed", path)[0].key == key
    _, target = catalog.resolve_dialect("wavespeed", "wavespeed-ai/flux-dev")
    assert (target.steps, target.guidance) == (28, 5.0)  # the v2 reference's defaults for flux-dev
    assert catalog.resolve_dialect("vyro", "flux-dev")[0].key == "flux/dev"
    assert catalog.resolve_dialect("vyro", "flux-mini")[0].key == catalog.default_model
    for name, key in (("gpt-image-1", "flux/dev"), ("dall-e-3", "flux/dev"), ("dall-e-2", "flux/schnell"),
                      ("gpt-image-1-mini", "flux/schnell")):
        assert catalog.resolve_dialect("openai", name)[0].key == key


def test_the_test_catalog_keeps_them(tmp_path):
    raw = toy_catalog_dict(tmp_path)
    assert raw["dialects"] == RAW["dialects"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownModel, match="unknown style 'oil'; this server offers: flux-dev"):
        load_catalog().resolve_dialect("vyro", "oil", what="style")


@pytest.mark.parametrize(("tables", "message"), [
    ({"wavespeed": {"a/b": "flux/nope"}}, "unknown model flux/nope"),
    ({"wavespeed": {"a/b": "wan/default"}}, "makes videos"),
    ({"wavespeed": {"a/b": {"model": "flux/dev", "steps": 99}}}, "steps 99"),
    ({"wavespeed": {"a/b": {"model": "flux/schnell", "guidance": 2.0}}}, "guidance 2.0"),
    ({"wavespeed": {"no-owner": "flux/dev"}}, "not a valid name"),
    ({"vyro": {"a/b": "flux/dev"}}, "not a valid name"),
    ({"vyro": {"x": {"model": "flux/dev", "colour": "red"}}}, "colour"),
    ({"openai": {"flux/dev": "flux/dev"}}, "not a valid name"),  # a catalog name is taken as it is
    ({"openai": {"dall-e-3": "wan/default"}}, "makes videos"),
    ({"midjourney": {"x": "flux/dev"}}, "midjourney"),
])
def test_bad_tables_stop_start_up(tables, message):
    with pytest.raises(CatalogError, match=message):
        parse_catalog(with_dialects(**tables), base_dir=DEFAULT_CATALOG.parent)
