"""The synthetic world the embedded model learns: flat shapes on a coloured background, with captions.

A :class:`Scene` is one to three shapes of one kind and colour (``two small green squares at the top
left``) or two different single shapes (``a red circle and a blue star``) on a background colour.
Placements are fractions of the canvas, so one scene renders the same at any size or aspect: a
shape's size is a fraction of the shorter side, its centre a fraction of each side.

Some attribute combinations never appear in training (:data:`HELD_OUT_SHAPES`,
:data:`HELD_OUT_ON`): :func:`is_held_out` says whether a scene contains one, the dataset skips such
scenes, and the quality bench (``bench/mini_quality.py``) asks for exactly those. :func:`classify`
reads an image back with plain pixel statistics (border colour, dominant non-background colour,
connected components), which is how the bench scores the model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 140, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
"""Named colours and the RGB they are drawn in (the checker maps pixels back to the nearest one)."""

SYNONYMS = {"gray": ("gray", "grey"), "center": ("center", "centre", "middle")}
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 0.16, "medium": 0.26, "large": 0.40}
"""A shape's extent (diameter, side) as a fraction of the canvas's shorter side."""

POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.22, 0.22), "top": (0.5, 0.22), "top right": (0.78, 0.22),
    "left": (0.22, 0.5), "center": (0.5, 0.5), "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78), "bottom": (0.5, 0.78), "bottom right": (0.78, 0.78),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

HELD_OUT_SHAPES = frozenset({
    ("purple", "triangle"), ("orange", "circle"), ("green", "star"), ("pink", "square"),
    ("white", "circle"), ("blue", "triangle"), ("yellow", "square"), ("gray", "star"),
})
"""(colour, shape) pairs no training scene contains."""

HELD_OUT_ON = frozenset({
    ("red", "yellow"), ("blue", "black"), ("green", "white"), ("yellow", "purple"),
    ("black", "orange"), ("pink", "blue"), ("orange", "gray"), ("white", "red"),
})
"""(shape colour, background colour) pairs no training scene contains."""


@dataclass(frozen=True)
class Group:
    """``count`` shapes of one kind, colour and size; ``centres`` are (x, y) fractions of the canvas."""

    shape: str
    colour: str
    size: str
    count: int
    position: str | None  # named position in the caption, or None when placed freely
    centres: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scene:
    background: str
    groups: tuple[Group, ...]
    rotation: float = 0.0  # radians, the same small tilt for every shape (variety, not meaning)
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def shape_colours(self) -> set[str]:
        return {g.colour for g in self.groups}


def is_held_out(scene: Scene) -> bool:
    """Whether the scene contains a combination that training never shows."""
    return any(
        (g.colour, g.shape) in HELD_OUT_SHAPES or (g.colour, scene.background) in HELD_OUT_ON for g in scene.groups
    )


# --- sampling --------------------------------------------------------------------------------------


def sample_scene(rng: random.Random, *, held_out: bool | None = False, two_groups: float = 0.3) -> Scene:
    """A random scene. ``held_out``: False (training: never a held-out combination), True (always at
    least one), None (either)."""
    while True:
        scene = _draw(rng, two_groups)
        if held_out is None or is_held_out(scene) == held_out:
            return scene


def _draw(rng: random.Random, two_groups: float) -> Scene:
    background = rng.choice(list(COLOURS))
    fg = [c for c in COLOURS if c != background]
    if rng.random() < two_groups:
        colours = rng.sample(fg, 2)
        shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
        size = rng.choice(["small", "medium"])
        layout = rng.choice([("left", "right"), ("top", "bottom"), ("top left", "bottom right"),
                             ("top right", "bottom left"), None])
        groups = []
        for i in range(2):
            position = layout[i] if layout else None
            centre = POSITIONS[position] if position else None
            groups.append(_group(rng, shapes[i], colours[i], size, 1, position, centre, avoid=groups))
        return Scene(background, tuple(groups), rotation=rng.uniform(-0.2, 0.2))
    count = rng.choices([1, 2, 3], weights=[0.6, 0.25, 0.15])[0]
    size = rng.choice(list(SIZES)) if count == 1 else rng.choice(["small", "medium"] if count == 2 else ["small"])
    position = rng.choice([*POSITIONS, None, None]) if count == 1 or size == "small" else None
    centre = POSITIONS[position] if position else None
    group = _group(rng, rng.choice(SHAPES), rng.choice(fg), size, count, position, centre, avoid=[])
    return Scene(background, (group,), rotation=rng.uniform(-0.2, 0.2))


def _group(rng, shape, colour, size, count, position, anchor, *, avoid) -> Group:
    extent = SIZES[size]
    taken = [c for g in avoid for c in g.centres]
    for _ in range(200):
        if anchor is not None:
            centres = _cluster(rng, anchor, count, extent)
        else:
            margin = extent / 2 + 0.04
            centres = [(rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)) for _ in range(count)]
        if _apart([*taken, *centres], extent):
            return Group(shape, colour, size, count, position, tuple(centres))
    return Group(shape, colour, size, count, position, tuple(centres))  # crowded: overlap is allowed


def _cluster(rng, anchor, count, extent) -> list[tuple[float, float]]:
    ax, ay = anchor
    step = extent * 1.25
    offsets = {1: [(0.0, 0.0)], 2: [(-0.5, 0.0), (0.5, 0.0)], 3: [(-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)]}[count]
    if count > 1 and rng.random() < 0.5:
        offsets = [(y, x) for x, y in offsets]  # stacked instead of side by side
    lo, hi = extent / 2 + 0.02, 1 - extent / 2 - 0.02
    # move the whole cluster inward until every shape fits on the canvas
    ax = min(hi - max(dx for dx, _ in offsets) * step, max(lo - min(dx for dx, _ in offsets) * step, ax))
    ay = min(hi - max(dy for _, dy in offsets) * step, max(lo - min(dy for _, dy in offsets) * step, ay))
    jitter = lambda: rng.uniform(-0.02, 0.02)
    return [(ax + dx * step + jitter(), ay + dy * step + jitter()) for dx, dy in offsets]


def _apart(centres, extent) -> bool:
    return all(math.dist(a, b) >= extent * 1.15 for i, a in enumerate(centres) for b in centres[i + 1:])


# --- captions --------------------------------------------------------------------------------------


def caption(scene: Scene, rng: random.Random, *, name_background: float = 0.85) -> str:
    """A caption from varied templates; the background is named with probability ``name_background``."""
    parts = [_group_phrase(g, rng) for g in scene.groups]
    things = " and ".join(parts)
    bg = _word(scene.background, rng)
    if rng.random() >= name_background:
        return things
    return rng.choice([
        f"{things} on {_article('a ' + bg)} background",
        f"{things} on {bg}",
        f"{_article('a ' + bg)} background with {things}",
        f"{things}, {bg} background",
    ])


def _article(phrase: str) -> str:
    """``a orange ...`` -> ``an orange ...``."""
    return "an" + phrase[1:] if phrase.startswith("a ") and phrase[2:3] in "aeiou" else phrase


def _group_phrase(g: Group, rng: random.Random) -> str:
    size = "" if g.size == "medium" and rng.random() < 0.7 else g.size + " "
    noun = g.shape + ("s" if g.count > 1 else "")
    phrase = _article(f"{COUNT_WORDS[g.count]} {size}{_word(g.colour, rng)} {noun}")
    if g.position is not None:
        where = _word("center", rng) if g.position == "center" else g.position
        phrase += rng.choice([f" at the {where}", f" in the {where}"])
    return phrase


def _word(name: str, rng: random.Random) -> str:
    return rng.choice(SYNONYMS.get(name, (name,)))


def prompt(scene: Scene) -> str:
    """The canonical caption (first template, every attribute named): what the quality bench asks."""
    parts = []
    for g in scene.groups:
        size = "" if g.size == "medium" else g.size + " "
        noun = g.shape + ("s" if g.count > 1 else "")
        where = f" at the {g.position}" if g.position else ""
        parts.append(_article(f"{COUNT_WORDS[g.count]} {size}{g.colour} {noun}{where}"))
    return f"{' and '.join(parts)} on {_article('a ' + scene.background)} background"


def vocabulary() -> list[str]:
    """Every word a caption can use (the tokenizers are built from captions, this is for checks)."""
    words = {"a", "an", "two", "three", "and", "on", "at", "in", "the", "background", "with", ",", *SIZES}
    words |= {w for names in SYNONYMS.values() for w in names}
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


# --- rendering -------------------------------------------------------------------------------------


def pastel(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pastel version of a colour (half-way to white): the style the embedded model's LoRA learns."""
    return tuple(round(c + (255 - c) * 0.5) for c in rgb)  # type: ignore[return-value]


def render(scene: Scene, width: int, height: int, *, supersample: int = 2, pastel: bool = False) -> Image.Image:
    """The scene as an RGB image of ``width`` x ``height`` (drawn larger, then downsampled: smooth edges);
    ``pastel`` draws every colour half-way to white."""
    s = supersample
    W, H = width * s, height * s
    paint = globals()["pastel"] if pastel else (lambda rgb: rgb)
    img = Image.new("RGB", (W, H), paint(COLOURS[scene.background]))
    draw = ImageDraw.Draw(img)
    side = min(W, H)
    for g in scene.groups:
        r = SIZES[g.size] * side / 2
        for cx, cy in g.centres:
            _shape(draw, g.shape, cx * W, cy * H, r, scene.rotation, paint(COLOURS[g.colour]))
    return img.resize((width, height), Image.BILINEAR) if s > 1 else img


def shape_labels(scene: Scene, width: int, height: int) -> np.ndarray:
    """(height, width) uint8: 0 on the background, ``1 + SHAPES.index(shape)`` where a shape covers the
    pixel (the same geometry as :func:`render`, without the smoothing). What the embedded model's VAE
    writes into its shape channels (``kiln.training.mini.shape_target``)."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    for g in scene.groups:
        r = SIZES[g.size] * side / 2
        for cx, cy in g.centres:
            _shape(draw, g.shape, cx * width, cy * height, r, scene.rotation, 1 + SHAPES.index(g.shape))
    return np.asarray(img)


def _shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, rot: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        return
    if shape == "square":
        pts = [(x + r * 0.9 * math.cos(rot + math.pi / 4 + k * math.pi / 2) * math.sqrt(2),
                y + r * 0.9 * math.sin(rot + math.pi / 4 + k * math.pi / 2) * math.sqrt(2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(x + r * math.cos(rot - math.pi / 2 + k * 2 * math.pi / 3),
                y + r * 1.1 * math.sin(rot - math.pi / 2 + k * 2 * math.pi / 3) + r * 0.2) for k in range(3)]
    else:  # star: five points, inner radius 0.45
        pts = [(x + (r if k % 2 == 0 else r * 0.45) * math.cos(rot - math.pi / 2 + k * math.pi / 5),
                y + (r if k % 2 == 0 else r * 0.45) * math.sin(rot - math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    draw.polygon(pts, fill=rgb)


# --- reading an image back -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What :func:`classify` sees in an image."""

    background: str
    colour: str | None  # the dominant non-background colour, None when there is none
    count: int  # connected regions of that colour, ignoring specks
    # non-background colours covering a noticeable area, largest first; soft edges between two colours
    # can add a third (a blend nearest to it), so this is a superset of the shapes' colours
    colours: tuple[str, ...]
    # where that colour is: the centre of its pixels as fractions of the width and height (x, y); a
    # measurement, not part of what the image is read as, so two readings compare equal without it
    centre: tuple[float, float] | None = field(default=None, compare=False)
    # what the largest region of that colour looks like (one of SHAPES, by :func:`read_shape`); None when
    # there is no colour or the region is too small to tell. A measurement too, outside equality
    shape: str | None = field(default=None, compare=False)


_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into :data:`COLOURS` of the nearest named colour for each RGB pixel (..., 3)."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    d = ((flat[:, None, :] - _RGB[None, :, :]) ** 2).sum(-1)
    return d.argmin(1).reshape(pixels.shape[:-1])


def classify(image: Image.Image, *, size: int = 128) -> Reading:
    """Background = the commonest named colour of the border; colour = the commonest other named colour
    (at least 0.2% of the shorter side squared, about a third of the smallest shape); count = its
    connected regions of at least 0.15% of that (specks of noise are not shapes); centre = the mean
    position of that colour's pixels."""
    from scipy import ndimage

    img = image.convert("RGB")
    if max(img.size) > size:  # statistics, not detail: a small copy is enough and fast
        scale = size / max(img.size)
        img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.BILINEAR)
    px = np.asarray(img)
    idx = nearest_colours(px)
    h, w = idx.shape
    b = max(1, round(min(h, w) * 0.04))
    border = np.concatenate([idx[:b].ravel(), idx[-b:].ravel(), idx[:, :b].ravel(), idx[:, -b:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    counts = np.bincount(idx.ravel(), minlength=len(_NAMES))
    counts[bg] = 0
    ref = min(h, w) ** 2
    present = [int(i) for i in np.argsort(-counts) if counts[i] >= 0.002 * ref]
    if not present:
        return Reading(_NAMES[bg], None, 0, ())
    fg = present[0]
    labels, n = ndimage.label(idx == fg)
    sizes = np.bincount(labels.ravel())[1:] if n else np.array([])
    count = int((sizes >= 0.0015 * ref).sum())
    ys, xs = np.nonzero(idx == fg)
    centre = ((float(xs.mean()) + 0.5) / w, (float(ys.mean()) + 0.5) / h)
    shape = _shape_of(image, fg)
    return Reading(_NAMES[bg], _NAMES[fg], count, tuple(_NAMES[i] for i in present), centre, shape)


SHAPE_MIN_PIXELS = 40
"""A region smaller than this (a disc about 7 pixels across) is not given a shape."""

SHAPE_SIDE = 256
"""The shorter side the shape is read at: a small shape on a 576-pixel side is then ~20 pixels across."""


def _shape_of(image: Image.Image, colour: int) -> str | None:
    """:func:`read_shape` of the largest region of ``colour`` (an index into :data:`COLOURS`)."""
    from scipy import ndimage

    img = image.convert("RGB")
    if min(img.size) > SHAPE_SIDE:
        scale = SHAPE_SIDE / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    labels, n = ndimage.label(nearest_colours(np.asarray(img)) == colour)
    if not n:
        return None
    return read_shape(labels == int(np.bincount(labels.ravel())[1:].argmax()) + 1)


def read_shape(region: np.ndarray) -> str | None:
    """Which of :data:`SHAPES` a boolean mask's region is, from two plain measures: *solidity* (its area
    over its convex hull's) separates the star (0.56 for a five-point star with inner radius 0.45, the
    others near 1); *roundness* (its area over the disc through its farthest pixel from its centroid)
    separates the rest: circle 1, square 2/pi = 0.64, triangle about 0.41. Thresholds sit half-way.
    A blob comes out as whatever it is closest to, usually a circle or a square."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(region)
    area = len(xs)
    if area < SHAPE_MIN_PIXELS:
        return None
    # pixel corners, so the hull covers whole pixels as the area counts them
    cx = np.concatenate([xs, xs + 1, xs, xs + 1]).astype(np.float64)
    cy = np.concatenate([ys, ys, ys + 1, ys + 1]).astype(np.float64)
    try:
        hull = ConvexHull(np.stack([cx, cy], 1)).volume  # in 2-D, volume is the area
    except QhullError:  # every pixel on one line
        return None
    if area / hull < 0.78:
        return "star"
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    reach = float(np.sqrt((cx - mx) ** 2 + (cy - my) ** 2).max())
    roundness = area / (math.pi * reach * reach)
    if roundness >= 0.80:
        return "circle"
    return "square" if roundness >= 0.52 else "triangle"


POSITION_TOLERANCE = 0.15
"""How far (as a fraction of the image) a read centre may be from the shapes' own and still be "at"
the named position: half the distance between two neighbouring named positions (0.28) and a little."""


def at_position(scene: Scene, reading: Reading) -> bool | None:
    """Whether the first group's shapes stand where the scene put them (its named position); None when
    the scene names no position. Compares the read centre with the mean of the shapes' centres."""
    group = scene.groups[0]
    if group.position is None:
        return None
    if reading.centre is None:
        return False
    tx = sum(x for x, _ in group.centres) / len(group.centres)
    ty = sum(y for _, y in group.centres) / len(group.centres)
    return math.dist(reading.centre, (tx, ty)) <= POSITION_TOLERANCE
