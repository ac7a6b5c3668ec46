"""flux/mini's text side: distance between captions that differ only in the shape word, per pair."""
import itertools, sys
import torch
from diffusers import FluxPipeline
pipe = FluxPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
shapes = ("circle", "square", "triangle", "star")
texts = [f"a large red {s} at the center on a white background" for s in shapes]
with torch.no_grad():
    pe, pooled, _ = pipe.encode_prompt(texts, texts, max_sequence_length=32)
rel = lambda a, b: float((a - b).norm() / ((a.norm() + b.norm()) / 2))
for i, j in itertools.combinations(range(4), 2):
    print(f"{shapes[i]:>8}-{shapes[j]:<8} T5 {rel(pe[i], pe[j]):.3f}  CLIP {rel(pooled[i], pooled[j]):.3f}")
