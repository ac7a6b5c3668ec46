"""Does a fresh transformer tell circle from square on a given VAE's latents? The recipe's focus stage
alone (2000 single-shape scenes at named positions, canonical captions, STEPS steps), then section 2's
same-seed test: pictures of "a large red {shape} at the center on a white background", seeds 0-2."""
import sys, time, json, numpy as np, torch
from diffusers import AutoencoderDC, FluxPipeline
from kiln.engine.families.base import expose_latents
from kiln.training import mini
torch.set_num_threads(2)
path, steps = sys.argv[1], int(sys.argv[2]); t0 = time.time()
vae = AutoencoderDC.from_pretrained(path, torch_dtype=torch.float32).eval()
for p in vae.parameters(): p.requires_grad_(False)
focus = mini.encode_dataset(vae, mini.render_dataset({(512, 512): 2000}, 30, focus=True))
clip_tok, t5_tok = mini.tokenizers(0)
torch.manual_seed(5)
clip, t5 = mini.build_text(clip_tok, t5_tok); transformer = mini.build_transformer()
cond = mini.Conditioner(clip_tok, t5_tok, clip, t5)
import logging; logging.basicConfig(level=logging.INFO, format="%(message)s")
res = mini.train_transformer(transformer, cond, focus, mini.Plan(transformer_steps=steps, focus_steps=steps), 0, focus=focus)
expose_latents(vae)
pipe = FluxPipeline(scheduler=mini.build_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                    tokenizer_2=t5_tok, transformer=transformer)
pipe.set_progress_bar_config(disable=True)
shapes = ("circle", "square", "triangle", "star"); rows = []
for seed in range(3):
    row = []
    for s in shapes:
        with torch.no_grad():
            img = pipe(f"a large red {s} at the center on a white background", negative_prompt="", true_cfg_scale=3.0,
                       num_inference_steps=8, height=512, width=512, max_sequence_length=32,
                       generator=torch.Generator().manual_seed(seed)).images[0]
        row.append(np.asarray(img.resize((128, 128))).astype(np.float32) / 255)
    rows.append(row)
out = {"vae": path, "steps": steps, "final_loss": round(res["final_loss"], 4), "s": round(time.time() - t0)}
for i in range(4):
    for j in range(i + 1, 4):
        out[f"{shapes[i]}-{shapes[j]}"] = round(float(np.mean([np.abs(r[i] - r[j]).mean() for r in rows])), 4)
from PIL import Image
Image.fromarray((np.concatenate([np.concatenate(r, 1) for r in rows], 0) * 255).astype(np.uint8)).save(f"/tmp/full/focus-{path.strip('/').split('/')[-1]}.png")
print(json.dumps(out), flush=True)
