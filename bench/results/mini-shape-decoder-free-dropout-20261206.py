"""Probe: can the decoder learn to draw the shape the latents' shape channels name, if it must?
From the full run's state before the decoder stage (work/before-decoder.pt), the decoder stage again
(kiln.training.mini.tune_decoder's loop) on 800 fresh training scenes, but with the nine free latent
channels (neither colour nor shape) zeroed in a share DROP of the windows, so the decoder has to
draw from the colour and shape channels alone; then the A/B script's reading on N held-out scenes.
Usage: PIPELINE_DIR WORK_DIR STEPS DROP N"""
import json, math, random, sys, time
import numpy as np, torch, torch.nn.functional as F
from diffusers import FluxPipeline
from kiln.training import mini, world

torch.set_num_threads(2)
path, work, steps, drop, n_eval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
t0 = time.time()
pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
state = torch.load(f"{work}/before-decoder.pt")
vae = pipe.vae
cfg = dict(vae.config)
vae.load_state_dict(state["vae"])
pipe.transformer.load_state_dict(state["transformer"]); pipe.text_encoder.load_state_dict(state["clip"]); pipe.text_encoder_2.load_state_dict(state["t5"])
for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2): m.eval()
cond = mini._Frozen(mini.Conditioner(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2))
rendered = mini.render_dataset({(512, 512): 800}, 99)
data = mini.encode_dataset(vae, rendered)
latents, scenes = data[(512, 512)]
free = [c for c in range(16) if not (c < 3 or mini.SHAPE_CHANNELS.start <= c < mini.SHAPE_CHANNELS.stop)]
rng = random.Random(6); gen = torch.Generator().manual_seed(6)
opt = torch.optim.AdamW(vae.decoder.parameters(), lr=mini.DECODER_LR)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
vae.decoder.train(); losses = []; n = mini.DECODER_WINDOW; f = mini.VAE_FACTOR
for step in range(steps):
    true = rng.random() < 0.25
    idx = rng.sample(range(len(scenes)), 8)
    z = latents[idx]
    if not true:
        z = mini.sample_from(pipe.transformer, cond, z, [world.prompt(scenes[i]) for i in idx], rng.randint(3, 5), gen)
    raw = z / cfg["scaling_factor"] + cfg["shift_factor"]
    if true:
        raw = raw + mini.VAE_LATENT_NOISE * torch.randn(raw.shape, generator=gen)
    windows, targets = [], []
    for j, i in enumerate(idx):
        sc = scenes[i]
        cx, cy = rng.choice(rng.choice(sc.groups).centres)
        x0 = min(max(0, round(cx * 16 - n / 2 + rng.uniform(-1, 1))), 16 - n)
        y0 = min(max(0, round(cy * 16 - n / 2 + rng.uniform(-1, 1))), 16 - n)
        w = raw[j, :, y0:y0 + n, x0:x0 + n].clone()
        if rng.random() < drop:
            w[free] = 0.0
        windows.append(w)
        targets.append(rendered[(512, 512)][0][i][y0 * f:(y0 + n) * f, x0 * f:(x0 + n) * f])
    y = vae.decode(torch.stack(windows)).sample
    x = mini.to_tensor(targets)
    loss = (y - x).abs().mean() + F.mse_loss(y, x)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0); opt.step(); sched.step()
    losses.append(loss.item())
    if step % 100 == 0 or step == steps - 1:
        print("decoder", step, round(float(np.mean(losses[-100:])), 4), round(time.time() - t0), flush=True)
vae.eval()
rng = random.Random(77); evals = []
while len(evals) < n_eval:
    sc = world.sample_scene(rng, held_out=True, two_groups=0.0)
    if sc.groups[0].count == 1:
        evals.append(sc)
right = {"full": 0, "free zeroed": 0}; colour = 0; tiles = []
for i, sc in enumerate(evals):
    with torch.no_grad():
        packed = pipe(world.prompt(sc), negative_prompt="", true_cfg_scale=3.0, num_inference_steps=8, height=512, width=512,
                      max_sequence_length=32, generator=torch.Generator().manual_seed(i), output_type="latent").images
        raw = FluxPipeline._unpack_latents(packed, 512, 512, 32) / cfg["scaling_factor"] + cfg["shift_factor"]
        a = mini.to_image(vae.decode(raw).sample.clamp(-1, 1)[0])
        raw0 = raw.clone(); raw0[:, free] = 0
        b = mini.to_image(vae.decode(raw0).sample.clamp(-1, 1)[0])
    ra = world.classify(a)
    right["full"] += ra.shape == sc.groups[0].shape; colour += ra.colour == sc.groups[0].colour
    right["free zeroed"] += world.classify(b).shape == sc.groups[0].shape
    if i < 8:
        tiles.append(np.concatenate([np.asarray(world.render(sc, 512, 512).resize((160, 160))), np.asarray(a.resize((160, 160))), np.asarray(b.resize((160, 160)))], 0))
from PIL import Image
Image.fromarray(np.concatenate(tiles, 1)).save(f"/tmp/full/dropout-{steps}-{drop}.png")
print(json.dumps({"steps": steps, "drop": drop, "shape_right": {k: round(v / n_eval, 3) for k, v in right.items()},
                  "colour": round(colour / n_eval, 3), "s": round(time.time() - t0)}), flush=True)
