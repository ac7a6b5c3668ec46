"""Same seed, captions differing only in the shape word: does flux/mini's picture change with it?"""
import sys
import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
W = sys.argv[1]; out = sys.argv[2]
pipe = FluxPipeline.from_pretrained(W, torch_dtype=torch.float32)
shapes = ("circle", "square", "triangle", "star")
rows = []
for seed in range(3):
    row = []
    for s in shapes:
        g = torch.Generator().manual_seed(seed)
        img = pipe(f"a large red {s} at the center on a white background", negative_prompt="", true_cfg_scale=3.0,
                   num_inference_steps=8, height=512, width=512, generator=g,
                   max_sequence_length=32).images[0]
        row.append(np.asarray(img.resize((128, 128))).astype(np.float32) / 255)
    rows.append(row)
d_shape = np.mean([np.abs(r[i] - r[j]).mean() for r in rows for i in range(4) for j in range(i + 1, 4)])
d_seed = np.mean([np.abs(rows[a][k] - rows[b][k]).mean() for k in range(4) for a in range(3) for b in range(a + 1, 3)])
for i in range(4):
    for j in range(i + 1, 4):
        print(f"{shapes[i]:>8}-{shapes[j]:<8} mean |diff| {np.mean([np.abs(r[i] - r[j]).mean() for r in rows]):.4f}")
print(f"mean |diff| between shape words (same seed): {d_shape:.4f}; between seeds (same words): {d_seed:.4f}")
grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
Image.fromarray((grid * 255).astype(np.uint8)).save(out)
