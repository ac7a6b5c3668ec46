# build_dc.py (exec'd by the script for the trained variants)
# from diffusers import AutoencoderDC
# def build_dc():
#     w = (16, 32, 32, 32, 32, 32)
#     return AutoencoderDC(in_channels=3, latent_channels=16, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
#         encoder_block_out_channels=w, decoder_block_out_channels=w, encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(1,) * 6,
#         encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6, upsample_block_type="pixel_shuffle",
#         downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu")
"""Probe: how well does a fresh transformer learn a VAE's latents? Focus-stage only (single shapes at
named positions, canonical captions), STEPS steps, the recipe's flow loss and schedule; then reads the
VAE's round trip (check_vae, 60 scenes), the latents' within-caption variance, and the transformer's
generations of 24 unseen focus scenes (colour, position, shape)."""
import json, random, sys, time, numpy as np, torch, torch.nn.functional as F
from diffusers import AutoencoderDC, AutoencoderTiny, FluxPipeline
from kiln.training import mini, world
from kiln.training.world import _group, POSITIONS, Scene, SHAPES, COLOURS
torch.set_num_threads(2)
source = sys.argv[1]; steps = int(sys.argv[2]); vae_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
t0 = time.time(); report = {"source": source, "steps": steps}
def raw(v, x):
    o = v.encode(x); return o.latents if hasattr(o, "latents") else o.latent
if source == "tiny":
    vae = AutoencoderTiny.from_pretrained("kiln/weights/flux-mini/vae", torch_dtype=torch.float32)
elif source == "dcfull":
    vae = AutoencoderDC.from_pretrained("/tmp/full/out/vae", torch_dtype=torch.float32)
else:  # train a DC VAE variant: "noise0.3", "shift1.0"
    torch.manual_seed(1)
    vae = mini_build = None
    exec(open("/tmp/probe/build_dc.py").read())
    vae = build_dc()
    noise = float(source[5:]) if source.startswith("noise") else 0.1
    shift_w = float(source[5:]) if source.startswith("shift") else 0.0
    pools = [mini.render_dataset({(512, 512): 1500}, 11)]
    rng = random.Random(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=vae_steps, pct_start=0.05)
    vae.train(); tv = time.time(); losses = []
    for step in range(vae_steps):
        big = [mini._vae_crop(rng, pools, crop=144) for _ in range(8)]
        x = mini.to_tensor([b[8:136, 8:136] for b in big])
        z = vae.encode(x).latent
        y = vae.decode(z + noise * torch.randn_like(z)).sample
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        anchor = F.mse_loss(z[:, :3], F.avg_pool2d(x, 32) * 1.5)
        loss = rec + 0.5 * anchor + 1e-3 * z.pow(2).mean()
        if shift_w:
            dx, dy = rng.randint(-8, 8), rng.randint(-8, 8)
            xs = mini.to_tensor([b[8 + dy:136 + dy, 8 + dx:136 + dx] for b in big])
            loss = loss + shift_w * F.mse_loss(vae.encode(xs).latent, z)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0); opt.step(); sched.step()
        losses.append(rec.item())
        if step % 250 == 0: print("vae", step, round(float(np.mean(losses[-250:])), 4), flush=True)
    vae.eval(); report["vae_s"] = round(time.time() - tv); report["vae_loss"] = round(float(np.mean(losses[-100:])), 4)
    del pools
vae.eval()
for p in vae.parameters(): p.requires_grad_(False)
if not isinstance(vae, AutoencoderTiny):
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
    _orig = vae.encode
    vae.encode = lambda x, return_dict=True: AutoencoderTinyOutput(latents=_orig(x).latent) if return_dict else (_orig(x).latent,)
report["round_trip"] = mini.check_vae(vae, 60, 0)
with torch.no_grad():
    shift, scaling = mini.standardise(vae, mini.render_dataset({(512, 512): 96}, 10)[(512, 512)][0])
vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
# within-caption variance (predict.py)
rng = random.Random(4); combos = []
for _ in range(12):
    bg = rng.choice(list(COLOURS)); fg = rng.choice([c for c in COLOURS if c != bg])
    combos.append((rng.choice(SHAPES), fg, rng.choice(["small", "medium", "large"]), rng.choice(list(POSITIONS)), bg))
imgs = []
for shape, fg, size, pos, bg in combos:
    for _ in range(12):
        g = _group(rng, shape, fg, size, 1, pos, POSITIONS[pos], avoid=[])
        imgs.append(np.asarray(world.render(Scene(bg, (g,), rotation=rng.uniform(-0.2, 0.2)), 512, 512)))
with torch.no_grad():
    x = mini.to_tensor(imgs); z = torch.cat([vae.encode(x[i:i + 8]).latents for i in range(0, len(x), 8)])
z = ((z - shift) * scaling).view(12, 12, *z.shape[1:])
report["within_share"] = round(((z - z.mean(1, keepdim=True)).pow(2).mean() / (z - z.mean((0, 1), keepdim=True)).pow(2).mean()).item(), 4)
print(json.dumps(report), flush=True)
te = time.time()
focus = mini.encode_dataset(vae, mini.render_dataset({(512, 512): 2000}, 30, focus=True))
report["encode_s"] = round(time.time() - te)
clip_tok, t5_tok = mini.tokenizers(0)
torch.manual_seed(5)
clip, t5 = mini.build_text(clip_tok, t5_tok); transformer = mini.build_transformer()
cond = mini.Conditioner(clip_tok, t5_tok, clip, t5)
plan = mini.Plan(transformer_steps=steps, focus_steps=steps)
tt = time.time()
import logging; logging.basicConfig(level=logging.INFO, format="%(message)s")
res = mini.train_transformer(transformer, cond, focus, plan, 0, focus=focus)
report["transformer_s"] = round(time.time() - tt); report["final_loss"] = round(res["final_loss"], 4)
if not isinstance(vae, AutoencoderTiny):
    vae.register_to_config(block_out_channels=[32] * 6)
if True:
    pipe = FluxPipeline(scheduler=mini.build_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
pipe.set_progress_bar_config(disable=True)
rng = random.Random(99); right = {"colour": 0, "position": 0, "shape": 0, "background": 0}
for i in range(24):
    sc = mini._focus_scene(rng)
    with torch.no_grad():
        im = pipe(world.prompt(sc), height=512, width=512, num_inference_steps=8, true_cfg_scale=3.0, negative_prompt="",
                  generator=torch.Generator().manual_seed(i)).images[0]
    r = world.classify(im); g = sc.groups[0]
    right["colour"] += r.colour == g.colour; right["shape"] += r.shape == g.shape; right["background"] += r.background == sc.background
    right["position"] += bool(world.at_position(sc, r))
    if i < 6: im.resize((128, 128)).save(f"/tmp/probe/{source}-{i}.png")
report["generated_24"] = right; report["total_s"] = round(time.time() - t0)
print(json.dumps(report), flush=True)
