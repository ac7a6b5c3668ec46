"""A small, deterministic caption corpus for training toy tokenizers offline.

The toy checkpoints in :mod:`kiln.testing.toys` need real tokenizers (CLIP-style byte-level BPE, T5/UMT5-style
Unigram, Qwen/Mistral-style byte-level BPE) but nothing may be downloaded, so their vocabularies are trained here
on a few hundred captions generated from templates. The corpus covers the words a test prompt is likely to use
(colours, shapes, scenes, motion, photographic styles) so those prompts tokenize into whole words rather than
single characters.
"""

from __future__ import annotations

import random
import string

COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gold",
    "silver", "teal", "crimson", "violet", "amber", "turquoise", "beige", "navy",
)
SHAPES = (
    "circle", "square", "triangle", "cube", "sphere", "pyramid", "star", "hexagon", "spiral", "ring", "cone",
    "cylinder", "heart", "diamond", "arrow",
)
SUBJECTS = (
    "cat", "dog", "fox", "horse", "bird", "owl", "robot", "astronaut", "dragon", "whale", "butterfly", "tiger",
    "rabbit", "monkey", "knight", "wizard", "child", "woman", "man", "car", "train", "boat", "bicycle", "lighthouse",
    "castle", "tree", "flower", "mountain", "city", "house", "bridge", "balloon", "kite", "teapot", "guitar",
)
SCENES = (
    "in a forest", "on a beach", "in the desert", "on the moon", "in a busy city street", "under the sea",
    "in a snowy village", "on a mountain top", "in a cozy kitchen", "in a neon lit alley", "in a field of flowers",
    "at sunset", "at night", "in the rain", "in a library", "on a spaceship", "in a garden", "by a lake",
    "in a studio", "on a rooftop",
)
MOTIONS = (
    "running", "jumping", "flying", "dancing", "swimming", "spinning", "walking slowly", "floating", "falling",
    "rolling", "waving", "turning around", "zooming in", "panning left", "panning right", "drifting", "rising",
    "bouncing", "glowing", "melting",
)
STYLES = (
    "photo", "photograph", "oil painting", "watercolor", "sketch", "3d render", "pixel art", "cinematic shot",
    "anime illustration", "studio portrait", "macro photo", "aerial view", "close up", "wide angle shot",
    "film still", "digital art",
)
QUALIFIERS = (
    "highly detailed", "soft light", "dramatic lighting", "sharp focus", "bokeh", "4k", "8k", "high quality",
    "vivid colors", "pastel colors", "golden hour", "volumetric light", "minimalist", "hyperrealistic",
    "long exposure", "shallow depth of field",
)
TEMPLATES = (
    "a {colour} {shape}",
    "a {colour} {shape} on a {colour2} background",
    "a {style} of a {subject} {scene}",
    "a {subject} {motion} {scene}, {qualifier}",
    "{style}, a {colour} {subject} {motion}, {qualifier}",
    "a {subject} made of {colour} glass {scene}",
    "two {subject}s {motion} together {scene}",
    "the camera is {motion} around a {colour} {subject}",
    "a {colour} {subject} and a {colour2} {shape} {scene}, {style}",
    "{qualifier} {style} of a {subject} {scene}",
    "a video of a {subject} {motion} {scene}",
    "slow motion: a {colour} {shape} {motion} {scene}",
    "A {subject} holding a sign that says \"{word}\"",
    "{subject} portrait, {qualifier}, {qualifier2}",
    "an abstract {style} with {colour} and {colour2} {shape}s",
)
WORDS = ("hello", "kiln", "welcome", "open", "stop", "yes", "no", "world", "test", "cafe")

# Fixed sentences: common prompt boilerplate (negative prompts, instructions) and a line that puts every printable
# ASCII character in the corpus so Unigram (no byte fallback) tokenizers know all of them.
EXTRA_LINES = (
    "blurry, low quality, worst quality, jpeg artifacts, watermark, text, deformed, bad anatomy, static",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, overall gray",
    "dance monkey",
    "system: You are a helpful assistant. user: describe the image. assistant: a photo of a cat.",
    "system: You are a helpful assistant. user: describe the video. assistant: a video of a dog.",
    "a dog is dancing",
    "An astronaut riding a horse on the moon, hyperrealistic",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    string.printable.strip(),
    "Ünïcödé ßtraße café naïve — “quotes” ‘single’ … ©®™ €£¥",
)


def captions(n: int = 600, *, seed: int = 0) -> list[str]:
    """Return ``n`` varied captions plus the fixed extra lines; deterministic for a given ``seed``."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        colour, colour2 = rng.sample(COLOURS, 2)
        qualifier, qualifier2 = rng.sample(QUALIFIERS, 2)
        text = template.format(
            colour=colour,
            colour2=colour2,
            shape=rng.choice(SHAPES),
            subject=rng.choice(SUBJECTS),
            scene=rng.choice(SCENES),
            motion=rng.choice(MOTIONS),
            style=rng.choice(STYLES),
            qualifier=qualifier,
            qualifier2=qualifier2,
            word=rng.choice(WORDS),
        )
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.3:
            text += "."
        out.append(text)
    out.extend(EXTRA_LINES)
    return out
