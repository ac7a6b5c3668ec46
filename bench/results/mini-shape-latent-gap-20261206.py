"""Do a VAE's standardised latents tell circle from square? For pairs of scenes identical but for the
shape (same colours, size, centre, tilt), the mean squared latent difference between two shapes,
against the spread that a caption leaves open (the same shape moved within its named position)."""
import random, sys
import numpy as np, torch
from diffusers import AutoencoderDC, AutoencoderTiny
from kiln.training import mini, world
from kiln.training.world import Group, Scene, COLOURS
torch.set_num_threads(2)
path = sys.argv[1]
cls = AutoencoderDC if "AutoencoderDC" in open(f"{path}/config.json").read() else AutoencoderTiny
vae = cls.from_pretrained(path, torch_dtype=torch.float32).eval()
cfg = vae.config
def lat(scenes):
    x = mini.to_tensor([np.asarray(world.render(s, 512, 512)) for s in scenes])
    with torch.no_grad():
        o = vae.encode(x)
    z = o.latents if hasattr(o, "latents") else o.latent
    return (z - cfg.shift_factor) * cfg.scaling_factor
rng = random.Random(0)
shapes = ("circle", "square", "triangle", "star")
rows = {}
for size in ("small", "large"):
    scenes = {s: [] for s in shapes}; moved = []
    for _ in range(24):
        bg = rng.choice(list(COLOURS)); fg = rng.choice([c for c in COLOURS if c != bg])
        cx, cy = 0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06); rot = rng.uniform(-0.2, 0.2)
        for s in shapes:
            scenes[s].append(Scene(bg, (Group(s, fg, size, 1, "center", ((cx, cy),)),), rotation=rot))
        dx, dy = 0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06)
        moved.append(Scene(bg, (Group("circle", fg, size, 1, "center", ((dx, dy),)),), rotation=rot))
    z = {s: lat(v) for s, v in scenes.items()}
    zm = lat(moved)
    gap = lambda a, b: float((a - b).pow(2).mean())
    rows[size] = {f"{a}-{b}": gap(z[a], z[b]) for i, a in enumerate(shapes) for b in shapes[i + 1:]}
    rows[size]["circle moved"] = gap(z["circle"], zm)
print(f"{'pair':<18}" + "".join(f"{s:>10}" for s in rows))
for k in rows["small"]:
    print(f"{k:<18}" + "".join(f"{rows[s][k]:>10.4f}" for s in rows))
