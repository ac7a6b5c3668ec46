"""Probe: do the shapes the focus steps learned come back after the mixture steps? Loads a trained
flux/mini directory (the shape-channel recipe's output: run7 of mini-focus-length-20261206.md),
trains its transformer and text encoders N more steps on the recipe's focus scenes (exact, canonical
captions) at a lower learning rate (PEAK, a warm-up and a cosine to zero), saves the result as a
FluxPipeline directory. Run with the shape-channel recipe's code (mini-focus-length-20261206.patch).
Usage: SRC OUT STEPS PEAK_LR [MIX_SHARE]"""
import logging, random, sys, time
from pathlib import Path
import torch
from diffusers import FluxPipeline
from kiln.training import mini

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(2)
src, out, steps, peak = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
mix = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
pipe = FluxPipeline.from_pretrained(src, torch_dtype=torch.float32)
t0 = time.time()
focus = mini.encode_dataset(pipe.vae, mini.render_dataset({(512, 512): 2000}, 30, focus=True))
data = mini.encode_dataset(pipe.vae, mini.render_dataset({(512, 512): 2000}, 40)) if mix else None
cond = mini.Conditioner(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
mini.TRANSFORMER_LR = peak
if mix:  # a share of the batches from the mixture (varied captions, any scene)
    _batch = mini._batch
    rng_mix = random.Random(9)
    def batch(d, rng, dropout, weights=None, *, canonical=False):
        if rng_mix.random() < mix:
            return _batch(data, rng, dropout, weights)
        return _batch(d, rng, dropout, weights, canonical=canonical)
    mini._batch = batch
res = mini.train_transformer(pipe.transformer, cond, focus, mini.Plan(transformer_steps=steps, focus_steps=steps), 0, focus=focus)
pipe.save_pretrained(out)
print({"final_loss": round(res["final_loss"], 4), "s": round(time.time() - t0), "steps": steps, "peak": peak, "mix": mix}, flush=True)
