"""The kiln command in-process: generate, models, pull, and its exit codes."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from kiln.cli.main import main


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache for the duration of one test."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hub_cache(cache, repo_id: str, checkpoint) -> None:
    """Lay out ``checkpoint`` as the hub cache stores a downloaded snapshot of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)


@pytest.mark.slow
def test_generate_writes_the_image_and_prints_the_seed(catalog_file, tmp_path, capsys):
    out = tmp_path / "out.webp"
    code = main(["--catalog", str(catalog_file), "generate", "a red circle", "--model", "flux/dev", "--format", "toy-96x64",
                 "--steps", "15", "--seed", "7", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "seed 7" in captured.out and str(out) in captured.out
    with Image.open(out) as img:
        assert img.format == "WEBP" and img.size == (96, 64)


@pytest.mark.slow
def test_generate_png_several_outputs_and_video(catalog_file, tmp_path, capsys):
    out = tmp_path / "pic.png"
    assert main(["--catalog", str(catalog_file), "generate", "two green squares", "-m", "zimage/turbo", "-f", "toy-64",
                 "-n", "2", "--seed", "1", "-o", str(out), "-q"]) == 0
    for name in ("pic-1.png", "pic-2.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG"
    video = tmp_path / "clip.mp4"
    assert main(["--catalog", str(catalog_file), "generate", "a ball rolls", "-m", "wan/default", "-t", "t2v", "-f", "toy-64",
                 "--duration", "0.5", "--steps", "10", "-o", str(video), "-q"]) == 0
    assert video.read_bytes()[4:8] == b"ftyp"
    assert "13 frames at 24 fps" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_i2i_from_a_file(catalog_file, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (120, 80), (10, 200, 30)).save(source)
    out = tmp_path / "out.jpg"
    assert main(["--catalog", str(catalog_file), "generate", "make it blue", "-m", "flux/dev", "-t", "i2i", "-f", "toy-64",
                 "--image", str(source), "--strength", "0.6", "--steps", "15", "-o", str(out), "-q"]) == 0
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (64, 64)


PASTEL = "kiln/weights/flux-mini/lora/pastel/pastel.safetensors"


@pytest.mark.slow
def test_generate_with_a_local_lora_and_its_weight(catalog_file, tmp_path):
    def pixels(*extra):
        out = tmp_path / f"out{len(extra)}{'-'.join(extra).replace('/', '_')}.png"
        assert main(["--catalog", str(catalog_file), "generate", "a red circle on blue", "-m", "flux/mini", "-f", "toy-64",
                     "--seed", "3", "-o", str(out), "-q", *extra]) == 0
        with Image.open(out) as img:
            return img.tobytes()

    plain, full, half = pixels(), pixels("--lora", PASTEL), pixels("--lora", f"{PASTEL}:0.5")
    assert len({plain, full, half}) == 3 and pixels("--lora", f"{PASTEL}:0") == plain


@pytest.mark.parametrize(("args", "message"), [
    (["--lora", "/nonexistent.safetensors"], "cannot read /nonexistent.safetensors"),
    (["--lora", "pyproject.toml"], "not a safetensors file"),
    (["--model", "flux/schnell", "--steps", "4", "--lora", PASTEL], "does not take LoRAs"),
    (["--steps", "99"], "steps must be between 15 and 50"),
    (["--seed", "4294967296"], "seed"),
    (["--sampler", "ddim"], "unknown sampler"),
    (["--format", "720p"], "format '720p'"),
    (["--task", "edit", "--image", "/nonexistent.png"], "cannot read the image file"),
    (["-o", "out.mp4"], "cannot write image"),
    (["--model", "flux/dev9"], "unknown model flux/dev9"),
    (["-o", "/nonexistent-dir/out.webp"], "is not a directory"),
    (["--model", "wan/default", "--format", "480p", "--task", "i2v"], "i2v needs an input image"),
])
def test_bad_input_exits_2_with_a_message(catalog_file, capsys, args, message):
    code = main(["--catalog", str(catalog_file), "generate", "a red circle", "--model", "flux/dev", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_generate_with_a_model_not_installed_exits_3_naming_pull(hub_cache, capsys):
    assert main(["generate", "a red circle", "--model", "flux/schnell", "--format", "512"]) == 3
    assert "kiln pull flux/schnell" in capsys.readouterr().err


def test_models_lists_availability_and_says_random_weights(hub_cache, catalog_file, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "not installed: kiln pull flux/dev" in out and "flux/mini (default)" in out
    assert main(["--catalog", str(catalog_file), "models"]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def test_models_json(hub_cache, capsys):
    import json

    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["flux/schnell"]["aliases"] == ["fast"] and rows["flux/dev2"]["aliases"] == ["latest"]
    assert rows["wan/default"]["tasks"] == ["i2v", "t2v"]


@pytest.mark.slow
def test_pull_finds_an_offline_cache_and_generation_loads_from_it(hub_cache, toys_dir, tmp_path, capsys):
    assert main(["pull", "flux/schnell"]) == 1  # offline and not cached
    assert "cannot download black-forest-labs/FLUX.1-schnell" in capsys.readouterr().err
    put_in_hub_cache(hub_cache, "black-forest-labs/FLUX.1-schnell", toys_dir / "flux1-schnell")
    assert main(["pull", "fast"]) == 2  # FAMILY/MODEL is required
    capsys.readouterr()
    assert main(["pull", "flux/fast"]) == 0
    assert "installed at" in capsys.readouterr().out
    assert main(["models"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("flux/schnell"))
    assert line.rstrip().endswith("installed")
    out = tmp_path / "x.webp"
    assert main(["generate", "a red circle", "-m", "flux/schnell", "-f", "512", "--seed", "3", "-o", str(out), "-q"]) == 0
    with Image.open(io.BytesIO(out.read_bytes())) as img:
        assert img.size == (512, 512)


@pytest.mark.slow
def test_pull_builds_a_toy_model_locally(tmp_path, capsys):
    from kiln.catalog import DEFAULT_CATALOG

    text = DEFAULT_CATALOG.read_text().replace('source = "~/.cache/kiln/toys/flux1-dev"', f'source = "{tmp_path}/toys/flux1-dev"')
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(text)
    assert main(["--catalog", str(catalog), "pull", "flux/toy"]) == 0
    assert (tmp_path / "toys" / "flux1-dev" / "model_index.json").exists()
    assert main(["--catalog", str(catalog), "models"]) == 0
    assert "installed, RANDOM WEIGHTS" in capsys.readouterr().out


def test_pull_of_a_local_checkpoint_needs_no_download(toys_dir, tmp_path, capsys):
    from kiln.testing.catalog import toy_catalog_dict
    import tomli_w

    raw = toy_catalog_dict(toys_dir)
    raw["models"][1]["source"] = str(tmp_path / "missing")  # flux/dev points at nothing
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(tomli_w.dumps(raw))
    assert main(["--catalog", str(catalog), "pull", "flux/schnell"]) == 0
    assert str(toys_dir / "flux1-schnell") in capsys.readouterr().out
    assert main(["--catalog", str(catalog), "pull", "flux/dev"]) == 1
    assert "local checkpoint" in capsys.readouterr().err
    assert main(["--catalog", str(catalog), "generate", "a red circle", "-m", "flux/dev", "-f", "512"]) == 3
    assert f"no checkpoint at {tmp_path / 'missing'}" in capsys.readouterr().err


@pytest.mark.slow
def test_video_model_without_an_image_defaults_to_text_to_video(catalog_file, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["--catalog", str(catalog_file), "generate", "a ball rolls", "-m", "wan/default", "-f", "toy-64",
                 "--duration", "0.5", "--steps", "10", "-o", str(out), "-q"]) == 0
    assert "wan/default t2v" in capsys.readouterr().out


@pytest.mark.slow
def test_toys_command_writes_a_catalog_the_cli_can_use(toys_dir, tmp_path, capsys):
    from kiln.testing.toys import main as toys_main

    assert toys_main([str(toys_dir)]) == 0
    catalog = toys_dir / "catalog.toml"
    assert f"catalog -> {catalog}" in capsys.readouterr().out
    out = tmp_path / "dev.webp"
    assert main(["--catalog", str(catalog), "generate", "a red circle", "-m", "flux/default", "-f", "512",
                 "--steps", "15", "-o", str(out), "-q"]) == 0
    assert "flux/dev t2i 512x512" in capsys.readouterr().out


def test_a_stale_toy_reads_as_not_installed(tmp_path):
    from kiln.catalog import load_catalog
    from kiln.engine import weights
    from kiln.testing.toys import build_toy

    spec = load_catalog().models["flux/toy"].model_copy(update={"source": str(tmp_path / "flux1-dev")})
    build_toy("flux1-dev", tmp_path)
    assert weights.locate(spec) == tmp_path / "flux1-dev"
    (tmp_path / "flux1-dev" / "kiln_toy.json").write_text('{"format": -1, "name": "flux1-dev"}')
    assert weights.locate(spec) is None
