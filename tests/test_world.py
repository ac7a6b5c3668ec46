"""kiln.training.world: scene sampling, held-out combinations, captions, rendering and the pixel checker."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from PIL import Image

from kiln.training import world
from kiln.training.world import COLOURS, POSITIONS, SHAPES, SIZES, Group, Reading, Scene

NAMES = list(COLOURS)
CORNERS = ("top left", "top right", "bottom left", "bottom right")


def truth(scene: Scene) -> tuple[str, str, int]:
    g = scene.groups[0]
    return scene.background, g.colour, g.count


def read(image: Image.Image) -> tuple[str, str | None, int]:
    r = world.classify(image)
    return r.background, r.colour, r.count


def single(background: str, shape: str, colour: str, centres, *, size: str = "medium", rotation: float = 0.0,
           position: str | None = None) -> Scene:
    return Scene(background, (Group(shape, colour, size, len(centres), position, tuple(centres)),), rotation=rotation)


def sampled(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng, **kwargs) for _ in range(n)]


def with_noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    px = np.asarray(image).astype(np.float64)
    px += np.random.default_rng(seed).normal(0.0, sigma, px.shape)
    return Image.fromarray(np.clip(px.round(), 0, 255).astype(np.uint8))


def tokens(text: str) -> list[str]:
    return text.replace(",", "").split(" ")


# --- classify on known images -------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(128, 128), (256, 256), (160, 96), (96, 160)])
def test_classify_reads_sampled_single_group_scenes(width, height):
    for scene in sampled(11, 40, two_groups=0):
        assert read(world.render(scene, width, height)) == truth(scene), scene


@pytest.mark.parametrize("width,height", [(512, 512), (1024, 576)])
def test_classify_reads_sampled_scenes_at_full_size(width, height):
    for scene in sampled(12, 5, two_groups=0):
        assert read(world.render(scene, width, height)) == truth(scene), scene


@pytest.mark.parametrize("width,height", [(128, 128), (512, 512), (160, 96)])
def test_classify_reads_where_the_shapes_stand(width, height):
    named = [s for s in sampled(13, 120, two_groups=0) if s.groups[0].position is not None]
    assert len(named) > 40
    for scene in named:
        assert world.at_position(scene, world.classify(world.render(scene, width, height))) is True, scene


def test_a_shape_elsewhere_is_not_at_its_position():
    group = Group("circle", "red", "medium", 1, "top left", (POSITIONS["top left"],))
    moved = Scene("blue", (Group("circle", "red", "medium", 1, "top left", (POSITIONS["bottom right"],)),))
    reading = world.classify(world.render(moved, 256, 256))
    assert reading.centre[0] > 0.6 and reading.centre[1] > 0.6
    assert world.at_position(Scene("blue", (group,)), reading) is False
    assert world.at_position(moved, reading) is True
    unnamed = Scene("blue", (Group("circle", "red", "medium", 1, None, ((0.5, 0.5),)),))
    assert world.at_position(unnamed, reading) is None
    assert world.at_position(Scene("blue", (group,)), world.classify(world.render(Scene("blue", ()), 64, 64))) is False


@pytest.mark.parametrize("i", range(len(NAMES)))
def test_classify_reads_every_background_colour(i):
    """Each colour as the background, and (rotated by three) each colour as the shape."""
    background, colour = NAMES[i], NAMES[(i + 3) % len(NAMES)]
    scene = single(background, SHAPES[i % len(SHAPES)], colour, [(0.5, 0.5)], rotation=0.1)
    for width, height in [(128, 128), (256, 144)]:
        reading = world.classify(world.render(scene, width, height))
        assert (reading.background, reading.colour, reading.count) == (background, colour, 1)
        assert reading.colours[0] == colour


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_classify_counts_one_two_and_three_shapes(shape, count):
    centres = [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)][:count] if count > 1 else [(0.5, 0.5)]
    scene = single("white", shape, "red", centres, size="small", rotation=-0.15)
    for width, height in [(256, 256), (1024, 576)]:
        assert read(world.render(scene, width, height)) == ("white", "red", count)


@pytest.mark.parametrize("colour,background", [
    ("red", "white"), ("orange", "yellow"), ("yellow", "orange"), ("gray", "purple"), ("purple", "gray"),
    ("blue", "purple"), ("white", "pink"),
])
@pytest.mark.parametrize("centre", [(0.5, 0.5), (SIZES["small"] / 2, SIZES["small"] / 2)])
def test_classify_finds_a_small_star_on_a_wide_canvas(colour, background, centre):
    """The smallest area: a small star on 1024x576, also at the outermost centre a cluster can reach."""
    scene = single(background, "star", colour, [centre], size="small", rotation=0.2)
    assert read(world.render(scene, 1024, 576)) == (background, colour, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_classify_reads_the_shape(shape, size):
    """Every shape at every size, tilted both ways, on square and wide canvases: the smallest case is a
    small shape on a 576-pixel side."""
    for rotation, (width, height) in [(-0.2, (512, 512)), (0.2, (1024, 576)), (0.1, (576, 1024)), (0.0, (1024, 1024))]:
        scene = single("white", shape, "blue", [(0.45, 0.55)], size=size, rotation=rotation)
        assert world.classify(world.render(scene, width, height)).shape == shape, (rotation, width, height)


def test_a_blob_is_no_star_and_a_speck_has_no_shape():
    yy, xx = np.mgrid[:256, :256]
    ellipse = ((xx - 128) / 60) ** 2 + ((yy - 120) / 45) ** 2 <= 1  # solid: no star; 0.75 round: a square
    assert world.read_shape(ellipse) == "square"
    disc = ((xx - 128) / 60) ** 2 + ((yy - 120) / 56) ** 2 <= 1
    assert world.read_shape(disc) == "circle"
    assert world.read_shape(np.pad(np.ones((5, 5), bool), 20)) is None  # under SHAPE_MIN_PIXELS
    assert world.read_shape(np.zeros((64, 64), bool)) is None


@pytest.mark.parametrize("background", NAMES)
def test_classify_plain_background_has_no_shape(background):
    for width, height in [(128, 128), (1024, 576)]:
        image = world.render(Scene(background, ()), width, height)
        assert world.classify(image) == Reading(background, None, 0, ())


def test_classify_takes_the_background_from_the_border():
    """A shape covering most of the picture is still the shape: the background is the border's colour."""
    px = np.empty((128, 128, 3), np.uint8)  # 128: classify reads it without resampling
    px[:] = COLOURS["yellow"]
    px[8:-8, 8:-8] = COLOURS["blue"]
    assert world.classify(Image.fromarray(px)) == Reading("yellow", "blue", 1, ("blue",))


def test_classify_reports_both_colours_of_two_groups():
    hand = [
        Scene("white", (Group("circle", "red", "medium", 1, "left", ((0.25, 0.5),)),
                        Group("star", "blue", "medium", 1, "right", ((0.75, 0.5),)))),
        Scene("black", (Group("square", "orange", "small", 1, "top", ((0.5, 0.25),)),
                        Group("triangle", "yellow", "small", 1, "bottom", ((0.5, 0.75),)))),
        Scene("pink", (Group("star", "purple", "small", 1, "top left", ((0.22, 0.22),)),
                       Group("circle", "gray", "medium", 1, "bottom right", ((0.78, 0.78),)))),
    ]
    scenes = hand + sampled(13, 25, two_groups=1.0)
    assert all(len(s.groups) == 2 for s in scenes)
    for scene in scenes:
        for width, height in [(128, 128), (256, 144)]:
            reading = world.classify(world.render(scene, width, height))
            assert reading.background == scene.background
            assert reading.colour in scene.shape_colours
            assert scene.shape_colours <= set(reading.colours), (scene, reading)


# --- robustness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height,n", [(128, 128, 16), (512, 512, 3), (1024, 576, 2)])
def test_classify_ignores_mild_noise(width, height, n):
    for k, scene in enumerate(sampled(14, n, two_groups=0)):
        image = world.render(scene, width, height)
        noisy = with_noise(image, 6.0, seed=k)
        assert not np.array_equal(np.asarray(noisy), np.asarray(image))
        assert read(noisy) == read(image) == truth(scene), scene
        assert world.classify(noisy).colours[0] == scene.groups[0].colour


SPECKS = [(3, 3), (4, 64), (3, 124), (64, 3), (124, 4), (124, 124), (64, 124), (124, 64), (20, 100), (100, 20)]


def _speckle(image: Image.Image, rgb) -> Image.Image:
    px = np.asarray(image).copy()
    for x, y in SPECKS:
        px[y, x] = rgb
    return Image.fromarray(px)


@pytest.mark.parametrize("speck", ["red", "black", "white"])
def test_specks_on_a_plain_background_are_not_shapes(speck):
    image = _speckle(world.render(Scene("gray", ()), 128, 128), COLOURS[speck])
    assert world.classify(image) == Reading("gray", None, 0, ())


def test_specks_around_shapes_do_not_count():
    scene = single("gray", "square", "black", [(0.3, 0.5), (0.7, 0.5)], size="small")
    image = world.render(scene, 128, 128)
    clean = world.classify(image)
    assert clean == Reading("gray", "black", 2, ("black",))
    assert world.classify(_speckle(image, COLOURS["black"])) == clean  # same colour as the shapes
    assert world.classify(_speckle(image, COLOURS["red"])) == clean  # another colour


# --- held-out combinations -----------------------------------------------------------------------------


def _held_out_pairs(scene: Scene) -> set[tuple[str, str, str]]:
    pairs = set()
    for g in scene.groups:
        if (g.colour, g.shape) in world.HELD_OUT_SHAPES:
            pairs.add(("shape", g.colour, g.shape))
        if (g.colour, scene.background) in world.HELD_OUT_ON:
            pairs.add(("on", g.colour, scene.background))
    return pairs


def test_held_out_sets_are_pinned():
    """The embedded checkpoint was trained without exactly these: changing them invalidates the quality bench."""
    assert world.HELD_OUT_SHAPES == {
        ("purple", "triangle"), ("orange", "circle"), ("green", "star"), ("pink", "square"),
        ("white", "circle"), ("blue", "triangle"), ("yellow", "square"), ("gray", "star"),
    }
    assert world.HELD_OUT_ON == {
        ("red", "yellow"), ("blue", "black"), ("green", "white"), ("yellow", "purple"),
        ("black", "orange"), ("pink", "blue"), ("orange", "gray"), ("white", "red"),
    }
    assert all(c in COLOURS and s in SHAPES for c, s in world.HELD_OUT_SHAPES)
    assert all(c in COLOURS and b in COLOURS and c != b for c, b in world.HELD_OUT_ON)


def test_training_scenes_never_contain_a_held_out_combination():
    scenes = sampled(15, 4000)
    assert not any(world.is_held_out(s) for s in scenes)
    assert not any(_held_out_pairs(s) for s in scenes)
    # ... and the filter removes nothing else: every other pair still appears
    shapes = {(g.colour, g.shape) for s in scenes for g in s.groups}
    on = {(g.colour, s.background) for s in scenes for g in s.groups}
    assert shapes == set(itertools.product(NAMES, SHAPES)) - world.HELD_OUT_SHAPES
    assert on == {(c, b) for c in NAMES for b in NAMES if c != b} - world.HELD_OUT_ON
    assert any(len(s.groups) == 2 for s in scenes)


def test_held_out_scenes_always_contain_one_and_reach_every_pair():
    scenes = sampled(16, 2000, held_out=True)
    assert all(world.is_held_out(s) for s in scenes)
    seen = set().union(*(_held_out_pairs(s) for s in scenes))
    assert seen == {("shape", c, s) for c, s in world.HELD_OUT_SHAPES} | {("on", c, b) for c, b in world.HELD_OUT_ON}


def test_either_mode_yields_both_kinds():
    flags = {world.is_held_out(s) for s in sampled(17, 200, held_out=None)}
    assert flags == {True, False}


@pytest.mark.parametrize("colour,shape", sorted(world.HELD_OUT_SHAPES))
def test_is_held_out_for_each_held_out_shape(colour, shape):
    background = next(b for b in NAMES if b != colour and (colour, b) not in world.HELD_OUT_ON)
    assert world.is_held_out(single(background, shape, colour, [(0.5, 0.5)]))
    other = next(s for s in SHAPES if (colour, s) not in world.HELD_OUT_SHAPES)
    assert not world.is_held_out(single(background, other, colour, [(0.5, 0.5)]))
    # a held-out group makes a two-group scene held out, in either place
    fine = Group(other, colour, "small", 1, None, ((0.25, 0.5),))
    bad = Group(shape, colour, "small", 1, None, ((0.75, 0.5),))
    assert world.is_held_out(Scene(background, (fine, bad))) and world.is_held_out(Scene(background, (bad, fine)))


@pytest.mark.parametrize("colour,background", sorted(world.HELD_OUT_ON))
def test_is_held_out_for_each_held_out_background(colour, background):
    shape = next(s for s in SHAPES if (colour, s) not in world.HELD_OUT_SHAPES)
    assert world.is_held_out(single(background, shape, colour, [(0.5, 0.5)]))
    other = next(b for b in NAMES if b not in (colour, background) and (colour, b) not in world.HELD_OUT_ON)
    assert not world.is_held_out(single(other, shape, colour, [(0.5, 0.5)]))


# --- captions -------------------------------------------------------------------------------------------


def _colour_words(name: str) -> tuple[str, ...]:
    return world.SYNONYMS.get(name, (name,))


def _check_articles(words: list[str]) -> None:
    for word, after in itertools.pairwise(words):
        if word == "a":
            assert after[0] not in "aeiou", words
        if word == "an":
            assert after[0] in "aeiou", words


def _check_group_named(words: list[str], g: Group, *, colour_words, centre_words) -> None:
    noun = g.shape + ("s" if g.count > 1 else "")
    hits = [i for i in range(1, len(words) - 1) if words[i] in colour_words and words[i + 1] == noun]
    assert hits, (words, g)
    i = hits[0]
    before = words[i - 2] if words[i - 1] in SIZES else words[i - 1]
    assert before in ({"a", "an"} if g.count == 1 else {world.COUNT_WORDS[g.count]}), (words, g)
    if g.position is not None:
        where = centre_words if g.position == "center" else (g.position,)
        text = " ".join(words)
        assert any(f"the {w}" in text for w in where), (words, g)


def test_captions_use_the_vocabulary_and_name_every_group():
    rng = random.Random(18)
    vocabulary = set(world.vocabulary())
    seen_an, used, commas = False, set(), 0
    for _ in range(600):
        scene = world.sample_scene(rng, held_out=None)
        text = world.caption(scene, rng)
        words = tokens(text)
        assert set(words) <= vocabulary, text
        used |= set(words)
        commas += "," in text
        _check_articles(words)
        seen_an |= "an" in words
        for g in scene.groups:
            _check_group_named(words, g, colour_words=_colour_words(g.colour), centre_words=world.SYNONYMS["center"])
    assert seen_an and commas
    assert used == vocabulary - {","}  # every word, synonyms included, is used


def test_caption_background_naming():
    rng = random.Random(19)
    scenes = [world.sample_scene(rng, two_groups=0) for _ in range(300)]
    for scene in scenes:
        assert scene.groups[0].colour != scene.background
        named = tokens(world.caption(scene, rng, name_background=1.0))
        assert set(_colour_words(scene.background)) & set(named), named
        bare = tokens(world.caption(scene, rng, name_background=0.0))
        assert not set(_colour_words(scene.background)) & set(bare), bare
        assert "background" not in bare and "on" not in bare and "with" not in bare


def test_caption_uses_an_before_vowels():
    scene = single("blue", "circle", "orange", [(0.5, 0.5)])
    for seed in range(20):
        assert world.caption(scene, random.Random(seed), name_background=0.0) in (
            "an orange circle", "a medium orange circle")
    assert world.prompt(scene) == "an orange circle on a blue background"
    assert world.prompt(single("orange", "star", "blue", [(0.5, 0.5)], size="large")) == \
        "a large blue star on an orange background"


def test_prompt_examples():
    squares = single("white", "square", "green", [(0.1, 0.2), (0.3, 0.2)], size="small", position="top left")
    assert world.prompt(squares) == "two small green squares at the top left on a white background"
    pair = Scene("gray", (Group("circle", "red", "medium", 1, "left", ((0.25, 0.5),)),
                          Group("triangle", "yellow", "small", 1, "right", ((0.75, 0.5),))))
    assert world.prompt(pair) == (
        "a red circle at the left and a small yellow triangle at the right on a gray background")


def test_prompt_names_every_attribute():
    vocabulary = set(world.vocabulary())
    for scene in sampled(20, 500, held_out=None):
        text = world.prompt(scene)
        words = tokens(text)
        assert set(words) <= vocabulary, text
        _check_articles(words)
        assert words[-1] == "background" and words[-2] == scene.background and words[-3] in ("a", "an"), text
        for g in scene.groups:
            _check_group_named(words, g, colour_words=(g.colour,), centre_words=("center",))
            if g.size != "medium":
                assert g.size in words


# --- determinism and pastel ------------------------------------------------------------------------------


def test_same_seed_same_scenes_captions_and_renders():
    def run(seed):
        rng = random.Random(seed)
        scenes = [world.sample_scene(rng) for _ in range(30)]
        captions = [world.caption(s, rng) for s in scenes]
        return scenes, captions

    a, b, c = run(21), run(21), run(22)
    assert a == b and a != c
    for scene in a[0][:4]:
        assert world.render(scene, 128, 96).tobytes() == world.render(scene, 128, 96).tobytes()
    assert world.render(a[0][0], 128, 96).tobytes() != world.render(c[0][0], 128, 96).tobytes()


def test_pastel_render():
    scene = single("blue", "circle", "red", [(0.5, 0.5)], size="large")
    normal, soft = world.render(scene, 128, 128), world.render(scene, 128, 128, pastel=True)
    assert normal.tobytes() != soft.tobytes()
    assert normal.getpixel((0, 0)) == COLOURS["blue"] and normal.getpixel((64, 64)) == COLOURS["red"]
    assert soft.getpixel((0, 0)) == world.pastel(COLOURS["blue"])
    assert soft.getpixel((127, 127)) == world.pastel(COLOURS["blue"])
    assert soft.getpixel((64, 64)) == world.pastel(COLOURS["red"])
    for name, rgb in COLOURS.items():
        assert all(abs(p - (c + 255) / 2) <= 0.5 for p, c in zip(world.pastel(rgb), rgb)), name


# --- geometry -------------------------------------------------------------------------------------------


def _distances(centres) -> list[float]:
    return [math.dist(a, b) for a, b in itertools.combinations(centres, 2)]


def test_sampled_shapes_stay_on_the_canvas_and_apart():
    for scene in sampled(23, 3000, held_out=None):
        extent = max(SIZES[g.size] for g in scene.groups)
        centres = [c for g in scene.groups for c in g.centres]
        for g in scene.groups:
            assert len(g.centres) == g.count
            half = SIZES[g.size] / 2
            for x, y in g.centres:
                assert 0 <= x <= 1 and 0 <= y <= 1
                assert half - 1e-9 <= x <= 1 - half + 1e-9 and half - 1e-9 <= y <= 1 - half + 1e-9, scene
        assert all(d >= extent * 1.15 for d in _distances(centres)), scene


@pytest.mark.parametrize("position", CORNERS)
def test_clusters_of_three_at_corners(position):
    rng = random.Random(24)
    extent = SIZES["small"]
    rows, columns = [], []
    for _ in range(100):
        g = world._group(rng, "square", "red", "small", 3, position, POSITIONS[position], avoid=[])
        assert g.count == 3 and len(g.centres) == 3 and g.position == position
        xs, ys = [c[0] for c in g.centres], [c[1] for c in g.centres]
        assert all(extent / 2 - 1e-9 <= v <= 1 - extent / 2 + 1e-9 for v in xs + ys), g
        assert min(_distances(g.centres)) >= extent * 1.15, g
        # the cluster stays in its corner
        mx, my = sum(xs) / 3, sum(ys) / 3
        assert (mx < 0.5) == ("left" in position) and (my < 0.5) == ("top" in position), g
        (rows if max(xs) - min(xs) > max(ys) - min(ys) else columns).append(g)
    assert rows and columns  # side by side and stacked both happen
    for g in (rows[0], columns[0]):
        for shape in SHAPES:
            scene = Scene("green", (Group(shape, "white", "small", 3, position, g.centres),), rotation=0.2)
            for width, height in [(256, 256), (1024, 576)]:
                assert read(world.render(scene, width, height)) == ("green", "white", 3), (shape, g)


@pytest.mark.parametrize("width,height", [(512, 512), (1024, 576)])
def test_shape_labels_mark_where_each_shape_is_drawn(width, height):
    for scene in sampled(8, 12, two_groups=0.5):
        labels = world.shape_labels(scene, width, height)
        assert labels.shape == (height, width) and labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0} | {1 + SHAPES.index(g.shape) for g in scene.groups}
        drawn = world.nearest_colours(np.asarray(world.render(scene, width, height))) != NAMES.index(scene.background)
        agree = (drawn == (labels > 0)).mean()
        assert agree > 0.995, agree  # only the smoothed edges differ
