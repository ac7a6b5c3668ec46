# As run for the control (`tiny 0 0`); the `dc 1500 500,1000,1500` run used it before two fixes that do not touch its path
# (the cache load's weights_only=False, and not scaling DecoderTiny's output twice). The `tinyw` kind was not run.
"""Probe: a new decoder on the committed AutoencoderTiny encoder's latents (encoder frozen, transformer
unchanged). Reads (a) the round trip on 60 held-out scenes (check_vae's), (b) the committed
transformer's own generations for 60 held-out prompts decoded by each decoder."""
import json, random, sys, time, numpy as np, torch, torch.nn.functional as F
from diffusers import AutoencoderDC, AutoencoderTiny, FluxPipeline
from kiln.training import mini, world
torch.manual_seed(0); torch.set_num_threads(2)
kind = sys.argv[1]; steps = int(sys.argv[2]); checks = {int(c) for c in sys.argv[3].split(",")}
W = "kiln/weights/flux-mini"
tiny = AutoencoderTiny.from_pretrained(W + "/vae", torch_dtype=torch.float32).eval()
cfg = tiny.config
for p in tiny.parameters(): p.requires_grad_(False)
def enc(x): return tiny.encode(x).latents
# the committed transformer's generations, as raw latents (cached)
gen_path = "/tmp/probe/gen.pt"
try:
    gen = torch.load(gen_path, weights_only=False)
except FileNotFoundError:
    pipe = FluxPipeline.from_pretrained(W, torch_dtype=torch.float32); pipe.set_progress_bar_config(disable=True)
    rng = random.Random(2026); scenes = [world.sample_scene(rng, held_out=True) for _ in range(60)]
    lats = []
    for i, sc in enumerate(scenes):
        packed = pipe(world.prompt(sc), height=512, width=512, num_inference_steps=8, true_cfg_scale=3.0, negative_prompt="",
                      output_type="latent", generator=torch.Generator().manual_seed(i)).images
        lats.append(pipe._unpack_latents(packed, 512, 512, 32) / cfg.scaling_factor + cfg.shift_factor)
    gen = {"latents": torch.cat(lats), "scenes": scenes}; torch.save(gen, gen_path)
if kind == "dc":
    w = (16, 32, 32, 32, 32, 32)
    dc = AutoencoderDC(in_channels=3, latent_channels=16, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=w, decoder_block_out_channels=w, encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6, upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu")
    dec = dc.decoder; decode = lambda z: dec(z)
elif kind == "tiny":  # the committed decoder, retrained from its own weights (control)
    dec = AutoencoderTiny.from_pretrained(W + "/vae", torch_dtype=torch.float32).decoder
    decode = lambda z: dec(z)
else:  # tinyw: a wider AutoencoderTiny decoder with bilinear upsampling, from scratch
    t2 = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(32,) * 6, decoder_block_out_channels=(48,) * 6,
        num_encoder_blocks=(0, 0, 1, 1, 1, 1), num_decoder_blocks=(2, 2, 2, 2, 1, 0), latent_channels=16, act_fn="relu", upsample_fn=kind[5:] or "bilinear")
    dec = t2.decoder; decode = lambda z: dec(z)
if kind.startswith("tiny"):
    # AutoencoderTiny.decode clamps/scales: decoder(x) then mul 2 sub 1
    decode = lambda z, d=dec: d(z)  # DecoderTiny.forward already maps to [-1, 1]
print("decoder params", sum(p.numel() for p in dec.parameters()), flush=True)
pools = [mini.render_dataset({(512, 512): 1500}, 11)]
@torch.no_grad()
def check():
    dec.eval(); rng = random.Random(7); right = {"background": 0, "colour": 0, "count": 0, "shape": 0}
    for _ in range(60):
        sc = world.sample_scene(rng, held_out=True, two_groups=0.0)
        x = mini.to_tensor([np.asarray(world.render(sc, 512, 512))])
        r = world.classify(mini.to_image(decode(enc(x)).clamp(-1, 1)[0])); g = sc.groups[0]
        right["background"] += r.background == sc.background; right["colour"] += r.colour == g.colour
        right["count"] += r.count == g.count; right["shape"] += r.shape == g.shape
    gr = {"g_bg": 0, "g_colour": 0, "g_count": 0, "g_shape": 0, "g_pos": 0, "g_pos_n": 0}
    for z, sc in zip(gen["latents"], gen["scenes"]):
        r = world.classify(mini.to_image(decode(z[None]).clamp(-1, 1)[0])); g = sc.groups[0]
        gr["g_bg"] += r.background == sc.background; gr["g_colour"] += r.colour == g.colour
        gr["g_count"] += r.count == g.count; gr["g_shape"] += r.shape == g.shape
        p = world.at_position(sc, r)
        if p is not None: gr["g_pos"] += p; gr["g_pos_n"] += 1
    dec.train()
    out = {k: round(v / 60, 3) for k, v in right.items()}
    out.update({k: round(v / 60, 3) for k, v in gr.items() if k not in ("g_pos", "g_pos_n")})
    out["g_pos"] = round(gr["g_pos"] / max(1, gr["g_pos_n"]), 3)
    return out
print(json.dumps({"step": 0, **check()}), flush=True)
rng = random.Random(1)
opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
dec.train(); t = time.time(); spent = 0.0; losses = []
for step in range(1, steps + 1):
    x = mini.to_tensor([mini._vae_crop(rng, pools) for _ in range(8)])
    with torch.no_grad(): z = enc(x)
    y = decode(z + 0.1 * torch.randn_like(z))
    rec = (y - x).abs().mean() + F.mse_loss(y, x)
    opt.zero_grad(); rec.backward(); torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0); opt.step(); sched.step()
    losses.append(rec.item())
    if step % 250 == 0: print(step, round(float(np.mean(losses[-250:])), 4), f"{time.time() - t - spent:.0f}s", flush=True)
    if step in checks:
        c0 = time.time(); r = check(); spent += time.time() - c0
        print(json.dumps({"step": step, "train_s": round(time.time() - t - spent, 1), **r}), flush=True)
