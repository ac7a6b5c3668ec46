"""Shape channels: does a transformer draw the shape it is asked for when four latent channels say
which shape covers each patch? Trains the recipe's VAE stage exactly as `kiln.training.mini.train`
does (seed 0, full plan; saved where `--from-stage 2` reuses it), then a fresh transformer and text
side on the recipe's focus stage alone (2000 single-shape scenes, canonical captions, 1500 steps) and
reads its pictures: section 2's same-seed test of mini-shape-collapse-20261206.md and the checker's
shape on 4 shapes x 5 positions x 2 sizes x 2 seeds."""
import json, logging, sys, time
from pathlib import Path
import numpy as np, torch
from diffusers import FluxPipeline
from kiln.engine.families.base import expose_latents
from kiln.training import mini, world

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(2)
work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
t0 = time.time(); out = {}
plan = mini.Plan.scaled(1.0)
clip_tok, t5_tok = mini.tokenizers(0)
rendered = mini.render_dataset(plan.images, 10)
pastel = mini.render_dataset({(512, 512): plan.lora_images}, 20, pastel=True)
torch.manual_seed(0)
vae = mini.build_vae()
if (work / "vae.pt").exists():
    vae.load_state_dict(torch.load(work / "vae.pt")["state"])
else:
    t = time.perf_counter()
    rep = mini.train_vae(vae, [rendered, pastel], plan, 0)
    torch.save({"state": vae.state_dict(), "report": rep, "vae_s": time.perf_counter() - t}, work / "vae.pt")
out["vae_check"] = mini.check_vae(vae, 60, 0)
shift, scaling = mini.standardise(vae, rendered[(512, 512)][0][:96], rendered[(512, 512)][1][:96])
vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
del rendered, pastel
for p in vae.parameters(): p.requires_grad_(False)
focus = mini.encode_dataset(vae, mini.render_dataset({(512, 512): 2000}, 30, focus=True))
torch.manual_seed(5)
clip, t5 = mini.build_text(clip_tok, t5_tok); transformer = mini.build_transformer()
cond = mini.Conditioner(clip_tok, t5_tok, clip, t5)
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1500  # focus steps (1500 unless given)
res = mini.train_transformer(transformer, cond, focus, mini.Plan(transformer_steps=steps, focus_steps=steps), 0, focus=focus)
out["final_loss"] = round(res["final_loss"], 4)
expose_latents(vae)
pipe = FluxPipeline(scheduler=mini.build_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                    tokenizer_2=t5_tok, transformer=transformer)
pipe.set_progress_bar_config(disable=True)

def draw(prompt, seed):
    with torch.no_grad():
        return pipe(prompt, negative_prompt="", true_cfg_scale=3.0, num_inference_steps=8, height=512, width=512,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(seed)).images[0]

shapes = world.SHAPES; rows = []
for seed in range(3):
    rows.append([np.asarray(draw(f"a large red {s} at the center on a white background", seed).resize((128, 128))).astype(np.float32) / 255 for s in shapes])
for i in range(4):
    for j in range(i + 1, 4):
        out[f"{shapes[i]}-{shapes[j]}"] = round(float(np.mean([np.abs(r[i] - r[j]).mean() for r in rows])), 4)
right = {s: 0 for s in shapes}; n = 0; pics = []
for s in shapes:
    for pos in ("center", "top left", "right", "bottom", "top right"):
        for size in ("small ", "", "large "):
            for seed in range(2):
                img = draw(f"a {size}blue {s} at the {pos} on a yellow background", 100 + seed)
                right[s] += world.classify(img).shape == s
                if pos == "center" and seed == 0: pics.append(np.asarray(img.resize((128, 128))))
out["shape_right"] = {s: round(v / 30, 3) for s, v in right.items()}
out["shape_right_all"] = round(sum(right.values()) / 120, 3)
out["s"] = round(time.time() - t0)
from PIL import Image
grid = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
Image.fromarray((grid * 255).astype(np.uint8)).save(work / "probe-same-seed.png")
Image.fromarray(np.concatenate([np.concatenate(pics[i * 3:i * 3 + 3], 1) for i in range(4)], 0)).save(work / "probe-shapes.png")
print(json.dumps(out), flush=True)
