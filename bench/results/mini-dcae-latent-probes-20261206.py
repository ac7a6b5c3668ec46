"""The latent probes and timings of mini-dcae-full-run-20261206.md, as run (five scripts).

robust.py, shift.py and stats.py ran with the patch applied (expose_latents); DC weights at /tmp/full/out (the full run), the
committed ones copied to /tmp/old-weights while the run's weights sat in kiln/weights/flux-mini; predict.py ran after
the committed weights were restored. Their output is mini-dcae-latent-probes-20261206.log."""

# ==== robust.py ====
import random, numpy as np, torch
from diffusers import AutoencoderDC, AutoencoderTiny
from kiln.training import mini, world
from kiln.engine.families.base import expose_latents, vae_latents
torch.manual_seed(0)
rng = random.Random(9)
scenes = [world.sample_scene(rng, held_out=True, two_groups=0.0) for _ in range(24)]
x = mini.to_tensor([np.asarray(world.render(s, 512, 512)) for s in scenes])
for name, cls, path in [("dc", AutoencoderDC, "kiln/weights/flux-mini/vae"), ("tiny", AutoencoderTiny, "/tmp/old-weights/vae")]:
    v = cls.from_pretrained(path, torch_dtype=torch.float32).eval(); expose_latents(v)
    with torch.no_grad():
        z = vae_latents(v, x); sd = z.std()
        for sigma in (0.0, 0.2, 0.4, 0.7):
            for mode in ("noise", "blur"):
                if mode == "noise": zz = z + sigma * sd * torch.randn_like(z)
                else:
                    if sigma == 0: continue
                    # mix toward a 3x3 box-blurred latent (imitating an averaged prediction)
                    b = torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False); zz = (1 - sigma) * z + sigma * b
                y = torch.cat([v.decode(zz[i:i+8]).sample for i in range(0, 24, 8)]).clamp(-1, 1)
                r = [world.classify(mini.to_image(y[i])) for i in range(24)]
                c = np.mean([ri.colour == s.groups[0].colour for ri, s in zip(r, scenes)])
                n = np.mean([ri.count == s.groups[0].count for ri, s in zip(r, scenes)])
                sh = np.mean([ri.shape == s.groups[0].shape for ri, s in zip(r, scenes)])
                print(name, mode, sigma, f"colour {c:.2f} count {n:.2f} shape {sh:.2f}", flush=True)

# ==== shift.py ====
import random, numpy as np, torch
from diffusers import AutoencoderDC, AutoencoderTiny
from kiln.training import mini, world
from kiln.engine.families.base import expose_latents, vae_latents
rng = random.Random(5)
scenes = [world.sample_scene(rng, two_groups=0.0) for _ in range(16)]
big = [np.asarray(world.render(s, 576, 576)) for s in scenes]
def crop(dx): return mini.to_tensor([b[32:544, 32 + dx:544 + dx] for b in big])
for name, cls, path in [("dc", AutoencoderDC, "kiln/weights/flux-mini/vae"), ("tiny", AutoencoderTiny, "/tmp/old-weights/vae")]:
    v = cls.from_pretrained(path, torch_dtype=torch.float32).eval(); expose_latents(v)
    with torch.no_grad():
        z0 = (vae_latents(v, crop(0)) - v.config.shift_factor) * v.config.scaling_factor
        spread = (z0 - z0.mean(dim=(2, 3), keepdim=True)).pow(2).mean().sqrt().item()
        out = []
        for dx in (1, 2, 4, 8, 16, 32):
            z = (vae_latents(v, crop(dx)) - v.config.shift_factor) * v.config.scaling_factor
            # compare with z0 shifted by whole latent pixels where dx = 32
            d = (z - z0).pow(2).mean().sqrt().item()
            out.append(f"{dx}px {d / spread:.2f}")
        zs = (vae_latents(v, crop(32)) - v.config.shift_factor) * v.config.scaling_factor
        d32 = (zs[..., :-1] - z0[..., 1:]).pow(2).mean().sqrt().item() / spread
        # channel-wise: share of each latent's variance from its spatial-lowpass component
        low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z0, 2), scale_factor=2, mode="bilinear")
        lowshare = 1 - (z0 - low).pow(2).mean().item() / (z0 - z0.mean(dim=(2, 3), keepdim=True)).pow(2).mean().item()
    print(name, "change vs within-image spread:", ", ".join(out), f"| 32px vs shifted latent {d32:.2f} | low-pass share {lowshare:.2f}")

# ==== predict.py ====
import random, numpy as np, torch
from diffusers import AutoencoderDC, AutoencoderTiny
from kiln.training import mini, world

from kiln.training.world import _group, POSITIONS, Scene, SHAPES, COLOURS
rng = random.Random(4)
combos = []
for _ in range(12):
    bg = rng.choice(list(COLOURS)); fg = rng.choice([c for c in COLOURS if c != bg])
    combos.append((rng.choice(SHAPES), fg, rng.choice(["small", "medium", "large"]), rng.choice(list(POSITIONS)), bg))
imgs = []
for shape, fg, size, pos, bg in combos:
    for _ in range(12):
        g = _group(rng, shape, fg, size, 1, pos, POSITIONS[pos], avoid=[])
        imgs.append(np.asarray(world.render(Scene(bg, (g,), rotation=rng.uniform(-0.2, 0.2)), 512, 512)))
x = mini.to_tensor(imgs)
for name, cls, path in [("dc", AutoencoderDC, "/tmp/full/out/vae"), ("tiny", AutoencoderTiny, "kiln/weights/flux-mini/vae")]:
    v = cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        z = torch.cat([(lambda o: getattr(o, "latents", None) if hasattr(o, "latents") else o.latent)(v.encode(x[i:i+8])) for i in range(0, len(x), 8)])
        z = (z - v.config.shift_factor) * v.config.scaling_factor
    z = z.view(12, 12, *z.shape[1:])
    within = (z - z.mean(1, keepdim=True)).pow(2).mean().item()
    total = (z - z.mean((0, 1), keepdim=True)).pow(2).mean().item()
    # within-combo variance, excluding pixels where every variation is background-like
    wpix = (z - z.mean(1, keepdim=True)).pow(2).mean((1, 2))  # (12, h, w)
    ch = (z - z.mean(1, keepdim=True)).pow(2).mean((0, 1, 3, 4)) / (z - z.mean((0, 1), keepdim=True)).pow(2).mean((0, 1, 3, 4))
    print(name, f"within/total {within/total:.3f}  within {within:.3f} total {total:.3f}", "per channel", np.round(ch.numpy(), 2))

# ==== stats.py ====
import random, numpy as np, torch
from diffusers import AutoencoderDC, AutoencoderTiny
from kiln.training import mini, world
from kiln.engine.families.base import expose_latents, vae_latents
rng = random.Random(3)
scenes = [world.sample_scene(rng) for _ in range(32)]
x = mini.to_tensor([np.asarray(world.render(s, 512, 512)) for s in scenes])
for name, cls, path in [("dc", AutoencoderDC, "kiln/weights/flux-mini/vae"), ("tiny", AutoencoderTiny, "/tmp/old-weights/vae")]:
    v = cls.from_pretrained(path, torch_dtype=torch.float32).eval(); expose_latents(v)
    with torch.no_grad():
        z = (vae_latents(v, x) - v.config.shift_factor) * v.config.scaling_factor
    std_c = z.std(dim=(0, 2, 3)); mean_c = z.mean(dim=(0, 2, 3))
    # spatial smoothness: mean abs diff between neighbouring latent pixels relative to std
    dx = (z[..., 1:] - z[..., :-1]).abs().mean().item(); 
    bgdiff = (z - z.median(dim=-1, keepdim=True).values.median(dim=-2, keepdim=True).values).abs()
    frac = (bgdiff.mean(1) > 0.5).float().mean().item()
    w = mini.shape_weight(z)
    print(name, "std/ch", np.round(std_c.numpy(), 2), "\n mean/ch", np.round(mean_c.numpy(), 2), "\n neighbour diff", round(dx, 3), "frac non-bg", round(frac, 3), "weight mean", round(w.mean().item(), 2))

# ==== dc_time.py (timings of untrained AutoencoderDC variants and the committed AutoencoderTiny) ====
import time, torch
from diffusers import AutoencoderDC
torch.set_num_threads(2); torch.manual_seed(0)
def build(enc_layers=(1,)*6, w=(16,32,32,32,32,32)):
    return AutoencoderDC(in_channels=3, latent_channels=16, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=w, decoder_block_out_channels=w, encoder_layers_per_block=enc_layers, decoder_layers_per_block=(1,)*6,
        encoder_qkv_multiscales=((),)*6, decoder_qkv_multiscales=((),)*6, upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0).eval()
x = torch.randn(8,3,512,512)
for name, v in [("base", build()), ("enc0", build(enc_layers=(0,1,1,1,1,1)))]:
    with torch.no_grad():
        v.encode(x[:1]); t=time.time(); z=v.encode(x).latent; te=(time.time()-t)/8
        t=time.time(); v.decode(z); td=(time.time()-t)/8
    xc = torch.randn(8,3,128,128); v.train(); t=time.time()
    for _ in range(3):
        z=v.encode(xc).latent; y=v.decode(z).sample; y.mean().backward()
    ts=(time.time()-t)/3
    print(name, sum(p.numel() for p in v.parameters()), f"enc/img {te*1000:.0f}ms dec/img {td*1000:.0f}ms train step {ts:.2f}s")
from diffusers import AutoencoderTiny
tiny = AutoencoderTiny.from_pretrained("kiln/weights/flux-mini/vae").float().eval()
dc = build()
for name, v, get in [("tiny", tiny, lambda o: o.latents), ("dc", dc, lambda o: o.latent), ("dc-enc0", build(enc_layers=(0,1,1,1,1,1)), lambda o: o.latent)]:
    with torch.no_grad():
        for bs in (1, 8):
            xs = x[:bs]; get(v.encode(xs))
            t=time.time(); z=get(v.encode(xs)); te=(time.time()-t)/bs
            t=time.time(); v.decode(z); td=(time.time()-t)/bs
            print(name, bs, f"enc/img {te*1000:.0f}ms dec/img {td*1000:.0f}ms")
