"""Paired 128x128 crops: one scene, two different shapes (same colours, size, centre, tilt, crop)."""
import random
import numpy as np
from kiln.training import world
from kiln.training.world import Group, Scene, COLOURS, SHAPES
def pair_pool(n, seed, pairs=None):
    rng = random.Random(seed); out = []
    for k in range(n):
        a, b = pairs[k % len(pairs)] if pairs else rng.sample(list(SHAPES), 2)
        bg = rng.choice(list(COLOURS)); fg = rng.choice([c for c in COLOURS if c != bg])
        size = rng.choice(["small", "medium", "large"]); rot = rng.uniform(-0.2, 0.2)
        cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)
        ox, oy = rng.randint(-16, 16), rng.randint(-16, 16)
        x0 = min(max(0, int(cx * 512) - 64 + ox), 384); y0 = min(max(0, int(cy * 512) - 64 + oy), 384)
        crops = []
        for s in (a, b):
            img = np.asarray(world.render(Scene(bg, (Group(s, fg, size, 1, None, ((cx, cy),)),), rotation=rot), 512, 512))
            crops.append(img[y0:y0 + 128, x0:x0 + 128])
        out.append((a, b, crops[0], crops[1]))
    return out
