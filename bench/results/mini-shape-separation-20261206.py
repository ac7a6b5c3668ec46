"""Screen: the recipe's AutoencoderDC (reconstruction, colour anchor, latent noise, steadiness) plus a
shape-separation term: for paired crops of one scene with two different shapes, the mean squared
latent difference, relative to the batch's latent variance, must reach TARGET (hinge). Then: the
latent gap per shape pair (crops and whole 512 images), the round trip, the within-caption share."""
import json, random, sys, time
sys.path.insert(0, "/tmp/full")
import numpy as np, torch, torch.nn.functional as F
from pairs import pair_pool  # mini-shape-separation-pairs-20261206.py, as pairs.py
from kiln.training import mini, world
from kiln.training.world import _group, POSITIONS, Scene, SHAPES, COLOURS
torch.set_num_threads(2)
steps, weight, target = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
t0 = time.time(); rep = {"steps": steps, "weight": weight, "target": target}
pools = [mini.render_dataset({(512, 512): 1500}, 11)]
hard = len(sys.argv) > 4 and sys.argv[4] == "hard"  # only circle/square and triangle/star pairs
rep["pairs"] = "hard" if hard else "any"
pairs = pair_pool(1500, 21, pairs=[("circle", "square"), ("triangle", "star")] if hard else None)
print("rendered", round(time.time() - t0), flush=True)
torch.manual_seed(1); vae = mini.build_vae()
rng = random.Random(1)
opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
m, size = 8, 128; vae.train(); losses = []; seps = []
for step in range(steps):
    big = [mini._vae_crop(rng, pools, crop=size + 2 * m) for _ in range(8)]
    x = mini.to_tensor([b[m:m + size, m:m + size] for b in big])
    z = mini.encode(vae, x)
    y = vae.decode(z + 0.1 * torch.randn_like(z)).sample
    rec = (y - x).abs().mean() + F.mse_loss(y, x)
    anchor = F.mse_loss(z[:, :3], F.avg_pool2d(x, 32) * 1.5)
    dx, dy = rng.randint(-m, m), rng.randint(-m, m)
    moved = mini.to_tensor([b[m + dy:m + dy + size, m + dx:m + dx + size] for b in big])
    steady = F.mse_loss(mini.encode(vae, moved), z)
    loss = rec + 0.5 * anchor + steady + 1e-3 * z.pow(2).mean()
    if weight:
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(4)]
        zab = mini.encode(vae, mini.to_tensor([p[2] for p in chosen] + [p[3] for p in chosen]))
        gap = (zab[:4] - zab[4:]).pow(2).mean((1, 2, 3)) / z.var().detach()
        loss = loss + weight * F.relu(target - gap).mean()
        seps.append(gap.mean().item())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0); opt.step(); sched.step()
    losses.append(rec.item())
    if step % 250 == 0 or step == steps - 1:
        print("vae", step, round(float(np.mean(losses[-250:])), 4), "gap", round(float(np.mean(seps[-250:] or [0])), 3), round(time.time() - t0), flush=True)
vae.eval(); rep["vae_s"] = round(time.time() - t0); rep["rec_loss"] = round(float(np.mean(losses[-100:])), 4)
for p in vae.parameters(): p.requires_grad_(False)
rep["round_trip"] = mini.check_vae(vae, 60, 0)
with torch.no_grad():
    shift, scaling = mini.standardise(vae, mini.render_dataset({(512, 512): 96}, 10)[(512, 512)][0])
from kiln.engine.families.base import expose_latents
expose_latents(vae)
vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
vae.save_pretrained(f"/tmp/full/sepvae-{weight}-{target}-{rep['pairs']}")
# crop gaps (as calib.py)
pool = pair_pool(120, 5, pairs=[("circle", "square"), ("circle", "triangle"), ("triangle", "star")])
with torch.no_grad():
    za = vae.encode(mini.to_tensor([p[2] for p in pool])).latents; zb = vae.encode(mini.to_tensor([p[3] for p in pool])).latents
var = torch.cat([za, zb]).var().item(); g = ((za - zb) ** 2).mean((1, 2, 3)) / var
rep["crop_gap"] = {n: round(g[k::3].mean().item(), 4) for k, n in enumerate(["circle-square", "circle-triangle", "triangle-star"])}
# within-caption share (as the learnability probe)
rng = random.Random(4); combos = []
for _ in range(12):
    bg = rng.choice(list(COLOURS)); fg = rng.choice([c for c in COLOURS if c != bg])
    combos.append((rng.choice(SHAPES), fg, rng.choice(["small", "medium", "large"]), rng.choice(list(POSITIONS)), bg))
imgs = []
for shape, fg, sz, pos, bg in combos:
    for _ in range(12):
        gr = _group(rng, shape, fg, sz, 1, pos, POSITIONS[pos], avoid=[])
        imgs.append(np.asarray(world.render(Scene(bg, (gr,), rotation=rng.uniform(-0.2, 0.2)), 512, 512)))
with torch.no_grad():
    xx = mini.to_tensor(imgs); zz = torch.cat([vae.encode(xx[i:i + 8]).latents for i in range(0, len(xx), 8)])
zz = ((zz - shift) * scaling).view(12, 12, *zz.shape[1:])
rep["within_share"] = round(((zz - zz.mean(1, keepdim=True)).pow(2).mean() / (zz - zz.mean((0, 1), keepdim=True)).pow(2).mean()).item(), 4)
rep["total_s"] = round(time.time() - t0)
print(json.dumps(rep), flush=True)
